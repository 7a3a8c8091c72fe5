"""Stage 3 on a random LLaVA-1.5-shaped model: prefill latency and peak memory, unpruned against pruned.

The model keeps LLaVA-1.5's token geometry (a 336 px CLIP with 14 px patches: 576 visual tokens) and a
Llama of width 1024 and 8 layers, small enough for a CPU. Both variants run on the same model and the
same inputs, interleaved, in one process; the FLOPs ratio is printed beside the measured speedup.
"""

from __future__ import annotations

import contextlib

import time
from dataclasses import asdict, dataclass
from typing import Any, Dict

import torch

import meteor_plugin
from meteor_plugin.bench.compare import (Variant, compare, cost_rows, float_mask_line, runs_text, speed,
                                         speedup_line)
from meteor_plugin.bench.machine import describe
from meteor_plugin.bench.profile import profile, report as profile_report
from meteor_plugin.stages.decoder import DecoderPruner
from meteor_plugin.testing.llava import TinyLlavaSpec, build_tiny_llava, make_batch


@dataclass
class PrefillBench:
    keep: int = 144  # visual tokens kept by Stage 3: 25% of 576
    llm_layer: int = 2
    text_before: int = 35  # LLaVA v1's system prompt and "USER:" come before the image
    text_after: int = 20  # the question and "ASSISTANT:"
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    profile: bool = False  # also time each part of the pruned prefill (bench.profile)
    float_mask: bool = False  # also time the pruned prefill with proportional attention in a float mask


LLAVA15_SCALED = TinyLlavaSpec(
    image_size=336, patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4,
    llm_hidden=1024, llm_layers=8, llm_heads=16, llm_kv_heads=16, llm_intermediate=2816, vocab_size=32000,
    attn_implementation="sdpa",
)
QUICK = TinyLlavaSpec(image_size=96, patch_size=8, vision_hidden=32, vision_layers=4, vision_heads=2,
                      llm_hidden=64, llm_layers=4, llm_heads=4, llm_kv_heads=2, llm_intermediate=128, vocab_size=256)


class ScoringTimer:
    """Accumulates the time Stage 3 spends scoring and selecting (the work pruning adds)."""

    def __init__(self, sync):
        self.total = 0.0
        self.sync = sync
        self.original = DecoderPruner._select

    def __enter__(self):
        timer = self

        def timed(pruner, *args, **kwargs):
            timer.sync()
            start = time.perf_counter()
            try:
                return timer.original(pruner, *args, **kwargs)
            finally:
                timer.sync()
                timer.total += time.perf_counter() - start

        DecoderPruner._select = timed
        return self

    def __exit__(self, *exc):
        DecoderPruner._select = self.original


def run(bench: PrefillBench = PrefillBench(), spec: TinyLlavaSpec = LLAVA15_SCALED) -> Dict[str, Any]:
    device = torch.device(bench.device)
    dtype = getattr(torch, bench.dtype)
    model = build_tiny_llava(spec).to(device=device, dtype=dtype)
    visual = spec.visual_tokens
    if not 0 < bench.keep <= visual:
        raise ValueError(f"keep={bench.keep} is invalid: allowed 1..{visual} (the visual tokens per image)")
    ids, _, images = make_batch([(bench.text_before, bench.text_after)], [True], vocab_size=spec.vocab_size,
                                image_size=spec.image_size, seed=0)
    ids, images = ids.to(device), images.to(device=device, dtype=dtype)
    config = meteor_plugin.MeteorConfig(encoder=False, fusion=False, llm=True, llm_layer=bench.llm_layer,
                                        llm_min_keep=bench.keep, llm_max_keep=bench.keep)

    def prefill():
        with torch.no_grad():
            return model(input_ids=ids, images=images, use_cache=True)

    def layers(name):
        run_stats = meteor_plugin.stats(model) if name == "stage3" else None
        full = ids.shape[1] - 1 + visual
        return {"layer_tokens": list(run_stats.layer_seq_len) if run_stats else [full] * spec.llm_layers,
                "visual_tokens": run_stats.stages[0]["llm"].left if run_stats else visual}

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    attachment = meteor_plugin.attach(model, config)  # this model prunes; "unpruned" runs it as it is
    variants = [Variant("unpruned", meteor_plugin.disabled), Variant("stage3", contextlib.nullcontext)]
    if bench.float_mask:
        variants.append(float_mask_variant())
    results = compare(prefill, variants, bench.repeats, bench.warmup, device, inspect=layers, llm=model.get_model())
    # Scoring's share: its time inside pruned prefills, both measured in the same runs.
    elapsed = 0.0
    with ScoringTimer(sync) as scoring:
        for _ in range(bench.repeats):
            start = time.perf_counter()
            prefill()
            sync()
            elapsed += time.perf_counter() - start
    profiled = profile(model, prefill, bench.repeats, device, variants[1]) if bench.profile else None
    attachment.detach()
    return {
        "benchmark": "llava-stage3-prefill",
        "machine": describe(device),
        "dtype": bench.dtype,
        "model": asdict(spec),
        "settings": asdict(bench),
        "profile": profiled,
        "sequence_length": ids.shape[1] - 1 + visual,
        "variants": results,
        **speed(results, "unpruned", "stage3", device),
        "scoring_share_of_pruned_prefill": scoring.total / elapsed,
    }


def float_mask_variant() -> Variant:
    """The pruned prefill with proportional attention's biases in an additive float mask, where the key column would
    run (``--float-mask``): what transformers 4.x and eager attention run."""
    from meteor_plugin.compat.key_column import float_mask

    return Variant("float mask", float_mask)  # inside it, the attached model runs its pruned prefill that way


def report(result: Dict[str, Any]) -> str:
    m, s, v = result["model"], result["settings"], result["variants"]
    u, p = v["unpruned"], v["stage3"]
    lines = [
        "LLaVA-1.5-shaped random model, Stage 3 (text-guided pruning in the LLM), batch 1",
        f"  vision: CLIP {m['image_size']} px / {m['patch_size']} px patches = {u['visual_tokens']} tokens, "
        f"width {m['vision_hidden']}, {m['vision_layers']} layers",
        f"  LLM: width {m['llm_hidden']}, {m['llm_layers']} layers, {m['llm_heads']} heads, MLP {m['llm_intermediate']}, "
        f"vocab {m['vocab_size']}; prompt {s['text_before']} + image + {s['text_after']} tokens = {result['sequence_length']}",
        f"  machine: {result['machine']}, {result['dtype']}; median of {s['repeats']} interleaved runs",
        "",
        f"  {'':26}{'unpruned':>16}{'Stage 3':>16}",
        f"  {'visual tokens':26}{u['visual_tokens']:>16}{p['visual_tokens']:>16}",
        f"  {'tokens per LLM layer':26}{runs_text(u['layer_tokens']):>16}{runs_text(p['layer_tokens']):>16}",
        *cost_rows(u, p),
        "",
        speedup_line(result),
        f"  Stage 3 scoring takes {100 * result['scoring_share_of_pruned_prefill']:.1f}% of the pruned prefill",
    ]
    if float_mask_line(result, "stage3"):
        lines.append(float_mask_line(result, "stage3"))
    if result.get("profile"):
        lines += ["", profile_report(result["profile"], "pruned")]
    return "\n".join(lines)
