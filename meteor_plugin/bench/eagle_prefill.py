"""All three stages on a random EAGLE-X4-shaped model: unpruned EAGLE against METEOR, side by side.

Four encoders of EAGLE's kinds (a CLIP ViT, a ConvNeXt, a windowed ViT standing for EVA-02, a Pix2Struct
encoder), each reaching EAGLE's 32x32 = 1024 grid positions, and a Llama of width 1024 and 8 layers.
Unpruned is EAGLE as shipped (channel concatenation, one projector, 1024 visual tokens). METEOR is the
same weights converted to per-encoder projectors, at the paper's setting: Stage 1 keeps about a third of
the encoders' tokens (1193 in METEOR's ablation), Stage 2 keeps 576, Stage 3 keeps 242 (76% fewer than
1024). Encoder ranks are calibrated on generated images first.
"""

from __future__ import annotations

import contextlib

from dataclasses import asdict, dataclass
from typing import Any, Dict

import torch

import meteor_plugin
from meteor_plugin.bench.compare import Variant, compare, cost_rows, float_mask_line, runs_text, speed, speedup_line
from meteor_plugin.bench.llava_prefill import float_mask_variant
from meteor_plugin.bench.machine import describe
from meteor_plugin.bench.profile import encoder_part, flop_rate, profile_side_by_side, report as profile_report, without
from meteor_plugin.calibrate import encoder_ranks, pixels
from meteor_plugin.fidelity import scene_images
from meteor_plugin.testing.eagle_like import TinyEagleSpec, build_tiny_eagle
from meteor_plugin.testing.llava import make_batch


@dataclass
class EagleBench:
    encoder_keep: int = 1193
    fusion_keep: int = 576
    llm_keep: int = 242
    llm_layer: int = 2
    text_before: int = 35
    text_after: int = 20
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    profile: bool = False  # also time each part of the pruned prefill (bench.profile)
    float_mask: bool = False  # also time the pruned prefill with proportional attention in a float mask


def x4_shaped_towers() -> Dict[str, Dict[str, Any]]:
    """Encoders wide enough to matter next to the LLM, still CPU-sized; every one ends on the 32x32 grid."""
    return {
        "clip-448": {"input_image_size": 336, "patch_size": 14, "hidden_size": 256, "intermediate_size": 1024,
                     "num_hidden_layers": 6, "num_attention_heads": 4},
        "convnext-1024": {"input_image_size": 128, "patch_size": 2, "hidden_sizes": [64, 256], "depths": [1, 2]},
        "sam-1024": {"input_image_size": 128, "patch_size": 2, "hidden_size": 64, "num_hidden_layers": 3,
                     "num_attention_heads": 2, "mlp_dim": 256, "window_size": 8, "global_attn_indexes": [2],
                     "output_channels": 64},
        "pix2struct-1024": {"input_image_size": 128, "patch_size": 4, "max_patches": 1024, "hidden_size": 256,
                            "d_ff": 1024, "d_kv": 64, "num_hidden_layers": 4, "num_attention_heads": 4},
    }


X4_SCALED = TinyEagleSpec(towers=x4_shaped_towers(), llm_hidden=1024, llm_layers=8, llm_heads=16, llm_kv_heads=16,
                          llm_intermediate=2816, vocab_size=32000)
QUICK = TinyEagleSpec()


def run(bench: EagleBench = EagleBench(), spec: TinyEagleSpec = X4_SCALED) -> Dict[str, Any]:
    from meteor_plugin.adapters.eagle import convert_to_post_projection

    device = torch.device(bench.device)
    dtype = getattr(torch, bench.dtype)
    model = build_tiny_eagle(spec).to(device=device, dtype=dtype)
    ranks = encoder_ranks(model, pixels(model, scene_images(4)))
    convert_to_post_projection(model)
    config = meteor_plugin.MeteorConfig(
        encoder_keep=bench.encoder_keep, fusion_keep=bench.fusion_keep, encoder_ranks=ranks,
        llm_layer=bench.llm_layer, llm_min_keep=bench.llm_keep, llm_max_keep=bench.llm_keep,
    )
    attachment = meteor_plugin.attach(model, config)  # this model prunes; "unpruned" runs it as EAGLE does
    ids, _, images = make_batch([(bench.text_before, bench.text_after)], [True], vocab_size=spec.vocab_size,
                                image_size=spec.image_size, seed=0)
    ids, images = ids.to(device), images.to(device=device, dtype=dtype)

    def prefill():
        with torch.no_grad():
            return model(input_ids=ids, images=images, use_cache=True)

    grid = spec.visual_tokens

    def inspect(name: str) -> Dict[str, Any]:
        if name == "unpruned":
            full = ids.shape[1] - 1 + grid
            return {"stages": {"llm input": grid}, "layer_tokens": [full] * spec.llm_layers}
        run_stats = meteor_plugin.stats(model)
        sample = run_stats.stages[0]
        return {
            "stages": {"encoders": sample["encoder"].entered, "after stage 1": sample["encoder"].left,
                       "after stage 2": sample["fusion"].left, "after stage 3": sample["llm"].left},
            "per_encoder": sample["encoder"].detail["per_encoder"],
            "layer_tokens": list(run_stats.layer_seq_len),
        }

    variants = [Variant("unpruned", meteor_plugin.disabled), Variant("meteor", contextlib.nullcontext)]
    if bench.float_mask:
        variants.append(float_mask_variant())
    results = compare(prefill, variants, bench.repeats, bench.warmup, device, inspect=inspect,
                      llm=model.get_model())
    profiled = unpruned_profile = in_full = None
    if bench.profile:
        from meteor_plugin.adapters.eagle.encoders import PRUNED_INSIDE

        unpruned_profile, profiled = profile_side_by_side(model, prefill, bench.repeats, device, variants[:2])
        # The encoders Stage 1 prunes at their output run whole in both variants: what METEOR can speed up is the rest.
        parts = [encoder_part(t) for t in model.get_model().get_vision_tower().vision_towers
                 if type(t).__name__ not in PRUNED_INSIDE]
        in_full = {"parts": parts, **without(unpruned_profile, profiled, parts),
                   "layer_gflops_per_s": [flop_rate(p, "LLM decoder layers") for p in (unpruned_profile, profiled)]}
    attachment.detach()
    return {
        "benchmark": "eagle-x4-prefill",
        "machine": describe(device),
        "dtype": bench.dtype,
        "model": {"encoders": spec.vision_tower, "towers": spec.towers, "llm_hidden": spec.llm_hidden,
                  "llm_layers": spec.llm_layers, "llm_heads": spec.llm_heads, "vocab_size": spec.vocab_size},
        "settings": asdict(bench),
        "profile": profiled,
        "profile_unpruned": unpruned_profile,
        "without_encoders_run_in_full": in_full,
        "encoder_ranks": ranks,
        "variants": results,
        "visual_tokens_reduction": 1 - results["meteor"]["stages"]["after stage 3"] / grid,
        **speed(results, "unpruned", "meteor", device),
    }


def report(result: Dict[str, Any]) -> str:
    u, m = result["variants"]["unpruned"], result["variants"]["meteor"]
    st = m["stages"]
    ranks = result["encoder_ranks"]
    per = ", ".join(f"{n} {c}->{k} (rank {ranks[n]:.1f})" for n, (c, k) in m["per_encoder"].items())
    lines = [
        "EAGLE-X4-shaped random model, all three stages, batch 1",
        f"  encoders: {result['model']['encoders']} (each reaches the 32x32 grid); LLM width "
        f"{result['model']['llm_hidden']}, {result['model']['llm_layers']} layers, vocab {result['model']['vocab_size']}",
        f"  machine: {result['machine']}, {result['dtype']}; median of {result['settings']['repeats']} interleaved runs",
        f"  Stage 1 per encoder (split by effective rank): {per}",
        "",
        f"  {'':26}{'EAGLE':>18}{'METEOR':>18}",
        f"  {'visual tokens: encoders':26}{'1024 x 4 grid':>18}{st['encoders']:>18}",
        f"  {'  after stage 1':26}{'-':>18}{st['after stage 1']:>18}",
        f"  {'  after stage 2 (to LLM)':26}{u['stages']['llm input']:>18}{st['after stage 2']:>18}",
        f"  {'  after stage 3':26}{'-':>18}{st['after stage 3']:>18}",
        f"  {'tokens per LLM layer':26}{runs_text(u['layer_tokens']):>18}{runs_text(m['layer_tokens']):>18}",
        *cost_rows(u, m, width=18),
        "",
        f"  {100 * result['visual_tokens_reduction']:.0f}% fewer visual tokens past Stage 3 than EAGLE's 1024",
        speedup_line(result),
        f"  peak memory: the whole prefill's peak is the encoders' (METEOR runs every encoder, pruning inside CLIP "
        f"only), {u['peak_memory_mib']:.0f} -> {m['peak_memory_mib']:.0f} MiB; the language model's own peak "
        f"{u['llm_peak_memory_mib']:.0f} -> {m['llm_peak_memory_mib']:.0f} MiB "
        f"({u['llm_peak_memory_mib'] / m['llm_peak_memory_mib']:.2f}x less), its KV cache "
        f"{u['kv_cache_mib']:.1f} -> {m['kv_cache_mib']:.1f} MiB ({u['kv_cache_mib'] / m['kv_cache_mib']:.2f}x less)",
    ]
    if float_mask_line(result, "meteor"):
        lines.append(float_mask_line(result, "meteor"))
    if result.get("profile"):
        lines += ["", profile_report(result["profile"], "pruned")]
        rest = result["without_encoders_run_in_full"]
        names = ", ".join(p.replace("encoder ", "") for p in rest["parts"])
        lines.append(
            f"  the encoders METEOR runs in full ({names}) take {100 * rest['time_share']:.1f}% of the pruned prefill's "
            f"time for {100 * rest['flops_share']:.1f}% of its FLOPs; without them in both profiled runs: speedup "
            f"{rest['speedup']:.2f}x, needed-FLOPs ratio {rest['flops_ratio']:.2f}x "
            f"({100 * rest['speedup'] / rest['flops_ratio']:.0f}% of it); the decoder layers ran "
            f"{rest['layer_gflops_per_s'][0]:.0f} GFLOP/s unpruned and {rest['layer_gflops_per_s'][1]:.0f} pruned "
            "(fewer rows per matrix product)")
    return "\n".join(lines)
