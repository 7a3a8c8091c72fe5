"""Stages 1 and 3 on a random LLaVA-1.6-shaped model (the llava package's anyres path): prefill latency,
FLOPs and memory, unpruned against pruned.

LLaVA-1.6's geometry is where pruning pays most: a 336 px CLIP with 14 px patches sees the base image and
four 336 px crops of a 672 px image (5 x 576 = 2880 patch tokens, plus 48 row separators), against 576
for LLaVA-1.5. The language model is the same scaled Llama as the LLaVA-1.5 bench (width 1024, 8 layers),
small enough for a CPU. Pruned: Stage 1 keeps half of every crop's patches inside CLIP, Stage 3 keeps 360
visual tokens after ``llm_layer`` (12.5% of 2880, VisionZip's LLaVA-NeXT setting is 320). Both variants
run on the same model and inputs, interleaved, in one process; the FLOPs ratio is printed beside the
measured speedup.
"""

from __future__ import annotations

import contextlib

from dataclasses import asdict, dataclass, replace
from typing import Any, Dict

import torch

import meteor_plugin
from meteor_plugin.bench.compare import Variant, compare, cost_rows, runs_text, speed, speedup_line
from meteor_plugin.bench.llava_prefill import LLAVA15_SCALED, QUICK
from meteor_plugin.bench.machine import describe
from meteor_plugin.bench.profile import profile, report as profile_report
from meteor_plugin.testing.llava import TinyLlavaSpec, build_tiny_llava, make_batch


@dataclass
class NextBench:
    encoder_keep: float = 0.5  # of each CLIP input's patches, inside CLIP
    llm_keep: int = 360  # visual tokens after llm_layer
    llm_layer: int = 2
    text_before: int = 35
    text_after: int = 20
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    profile: bool = False  # also time each part of the pruned prefill (bench.profile)


LLAVA16_SCALED = replace(LLAVA15_SCALED, merge="spatial_unpad")
QUICK_NEXT = replace(QUICK, merge="spatial_unpad")


def run(bench: NextBench = NextBench(), spec: TinyLlavaSpec = LLAVA16_SCALED) -> Dict[str, Any]:
    device = torch.device(bench.device)
    dtype = getattr(torch, bench.dtype)
    model = build_tiny_llava(spec).to(device=device, dtype=dtype)
    ids, _, _ = make_batch([(bench.text_before, bench.text_after)], [True], vocab_size=spec.vocab_size, seed=0)
    side = spec.image_size
    images = torch.randn(1, 5, 3, side, side, generator=torch.Generator().manual_seed(0))  # base + 2x2 crops
    ids, images, sizes = ids.to(device), images.to(device=device, dtype=dtype), [(2 * side, 2 * side)]
    # Proportional attention does not run on spatial merges yet ("auto" would warn): measured as users get it.
    config = meteor_plugin.MeteorConfig(encoder=True, fusion=False, llm=True, encoder_keep=bench.encoder_keep,
                                        llm_layer=bench.llm_layer, llm_min_keep=bench.llm_keep,
                                        llm_max_keep=bench.llm_keep, proportional_attention="off")

    def prefill():
        with torch.no_grad():
            return model(input_ids=ids, images=images, image_sizes=sizes, use_cache=True)

    def inspect(name):
        stats = meteor_plugin.stats(model)
        if stats is None:  # unpruned: read the layout from a run with every stage off
            with meteor_plugin.enabled(encoder=False, fusion=False, llm=False):
                prefill()
                stats = meteor_plugin.stats(model)
        s = stats.stages[0]
        return {"layer_tokens": list(stats.layer_seq_len), "encoder_tokens": s["encoder"].left if "encoder" in s
                else s["anyres"].entered, "visual_tokens": s["llm"].left if "llm" in s else s["anyres"].left,
                "separators": s["anyres"].detail["newlines"]}

    attachment = meteor_plugin.attach(model, config)  # this model prunes; "unpruned" runs it as it is
    variants = [Variant("unpruned", meteor_plugin.disabled), Variant("meteor", contextlib.nullcontext)]
    results = compare(prefill, variants, bench.repeats, bench.warmup, device, inspect=inspect,
                      llm=model.get_model())
    profiled = profile(model, prefill, bench.repeats, device, variants[1]) if bench.profile else None
    attachment.detach()
    return {
        "benchmark": "llava-next-prefill", "machine": describe(device), "dtype": bench.dtype, "model": asdict(spec),
        "settings": asdict(bench), "profile": profiled, "variants": results, **speed(results, "unpruned", "meteor", device),
    }


def report(result: Dict[str, Any]) -> str:
    m, s, v = result["model"], result["settings"], result["variants"]
    u, p = v["unpruned"], v["meteor"]
    lines = [
        "LLaVA-1.6-shaped random model (anyres: base image + 2x2 crops, spatial_unpad), Stages 1 and 3, batch 1",
        f"  vision: CLIP {m['image_size']} px / {m['patch_size']} px patches x 5 inputs = {u['encoder_tokens']} tokens, "
        f"width {m['vision_hidden']}, {m['vision_layers']} layers; {u['separators']} row separators",
        f"  LLM: width {m['llm_hidden']}, {m['llm_layers']} layers, {m['llm_heads']} heads, MLP {m['llm_intermediate']}; "
        f"prompt {s['text_before']} + image + {s['text_after']} tokens",
        f"  pruned: Stage 1 keeps {s['encoder_keep']:g} of each input's patches in CLIP, Stage 3 keeps "
        f"{s['llm_keep']} after layer {s['llm_layer']}",
        f"  machine: {result['machine']}, {result['dtype']}; median of {s['repeats']} interleaved runs",
        "",
        f"  {'':26}{'unpruned':>16}{'METEOR':>16}",
        f"  {'tokens out of CLIP':26}{u['encoder_tokens']:>16}{p['encoder_tokens']:>16}",
        f"  {'visual tokens at the end':26}{u['visual_tokens']:>16}{p['visual_tokens']:>16}",
        f"  {'tokens per LLM layer':26}{runs_text(u['layer_tokens']):>16}{runs_text(p['layer_tokens']):>16}",
        *cost_rows(u, p),
        "",
        speedup_line(result),
    ]
    if result.get("profile"):
        lines += ["", profile_report(result["profile"], "pruned")]
    return "\n".join(lines)
