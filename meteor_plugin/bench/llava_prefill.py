"""Stage 3 on a random LLaVA-1.5-shaped model: prefill latency and peak memory, unpruned against pruned.

The model keeps LLaVA-1.5's token geometry (a 336 px CLIP with 14 px patches: 576 visual tokens) and a
Llama of width 1024 and 8 layers, small enough for a CPU. Both variants run on the same model and the
same inputs, interleaved, in one process; the analytic FLOPs ratio is printed beside the measured speedup.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List

import torch

import meteor_plugin
from meteor_plugin.bench.flops import LlmShape, prefill_flops, scoring_flops, vit_flops
from meteor_plugin.bench.machine import describe
from meteor_plugin.bench.memory import peak_memory_bytes
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


LLAVA15_SCALED = TinyLlavaSpec(
    image_size=336, patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4,
    llm_hidden=1024, llm_layers=8, llm_heads=16, llm_kv_heads=16, llm_intermediate=2816, vocab_size=32000,
    attn_implementation="sdpa",
)
QUICK = TinyLlavaSpec(image_size=96, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
                      llm_hidden=64, llm_layers=4, llm_heads=4, llm_kv_heads=2, llm_intermediate=128, vocab_size=256)


class _ScoringTimer:
    """Times Stage 3's scoring and selection (the work pruning adds) during a block."""

    def __init__(self, sync):
        self.total = 0.0
        self._sync = sync

    def __enter__(self):
        self._original = DecoderPruner._select
        timer = self

        def timed(pruner, *args, **kwargs):
            timer._sync()
            start = time.perf_counter()
            try:
                return timer._original(pruner, *args, **kwargs)
            finally:
                timer._sync()
                timer.total += time.perf_counter() - start

        DecoderPruner._select = timed
        return self

    def __exit__(self, *exc):
        DecoderPruner._select = self._original


def run(bench: PrefillBench = PrefillBench(), spec: TinyLlavaSpec = LLAVA15_SCALED) -> Dict[str, Any]:
    device = torch.device(bench.device)
    dtype = getattr(torch, bench.dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    meteor_plugin.disable()
    model = build_tiny_llava(spec).to(device=device, dtype=dtype)
    visual = spec.visual_tokens
    if not 0 < bench.keep <= visual:
        raise ValueError(f"keep={bench.keep} is invalid: allowed 1..{visual} (the visual tokens per image)")
    ids, mask, images = make_batch([(bench.text_before, bench.text_after)], [True], vocab_size=spec.vocab_size,
                                   image_size=spec.image_size, seed=0)
    ids, images = ids.to(device), images.to(device=device, dtype=dtype)
    config = meteor_plugin.MeteorConfig(encoder=False, fusion=False, llm=True, llm_layer=bench.llm_layer,
                                        llm_min_keep=bench.keep, llm_max_keep=bench.keep)

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, images=images, use_cache=True)
        sync()

    def timed(pruned: bool) -> float:
        if pruned:
            meteor_plugin.enable(config)
        else:
            meteor_plugin.disable()
        start = time.perf_counter()
        prefill()
        return time.perf_counter() - start

    for _ in range(bench.warmup):
        timed(False)
        timed(True)
    times: Dict[str, List[float]] = {"unpruned": [], "pruned": []}
    with _ScoringTimer(sync) as scoring:
        for _ in range(bench.repeats):
            times["unpruned"].append(timed(False))
            times["pruned"].append(timed(True))
    scoring_share = scoring.total / max(sum(times["pruned"]), 1e-12)
    meteor_plugin.enable(config)
    prefill()
    run_stats = meteor_plugin.stats(model)
    layer_tokens = list(run_stats.layer_seq_len)
    kept = run_stats.stages[0]["llm"].left
    memory = {"pruned": peak_memory_bytes(prefill, device)}
    meteor_plugin.disable()
    memory["unpruned"] = peak_memory_bytes(prefill, device)

    shape = LlmShape.from_config(model.config)
    full = ids.shape[1] - 1 + visual
    vision = vit_flops(visual + 1, spec.vision_hidden, spec.vision_layers, spec.vision_hidden * 2)
    projector = 2.0 * visual * (spec.vision_hidden * spec.llm_hidden + spec.llm_hidden * spec.llm_hidden)
    flops_unpruned = prefill_flops(shape, [full] * spec.llm_layers, full, vision, projector)
    flops_pruned = prefill_flops(shape, layer_tokens, layer_tokens[-1], vision, projector,
                                 scoring_flops(shape, full, bench.text_after))
    median = {k: statistics.median(v) for k, v in times.items()}
    speedup = median["unpruned"] / median["pruned"]
    flops_ratio = flops_unpruned["total"] / flops_pruned["total"]
    return {
        "benchmark": "llava-stage3-prefill",
        "machine": describe(device),
        "dtype": bench.dtype,
        "model": asdict(spec),
        "settings": asdict(bench),
        "visual_tokens": {"unpruned": visual, "pruned": kept},
        "sequence_length": full,
        "layer_tokens": {"unpruned": [full] * spec.llm_layers, "pruned": layer_tokens},
        "prefill_seconds": {"unpruned": median["unpruned"], "pruned": median["pruned"], "runs": times},
        "speedup": speedup,
        "gflops": {"unpruned": flops_unpruned["total"] / 1e9, "pruned": flops_pruned["total"] / 1e9,
                   "pruned_breakdown": {k: v / 1e9 for k, v in flops_pruned.items()}},
        "flops_ratio": flops_ratio,
        "speedup_over_flops_ratio": speedup / flops_ratio,
        "scoring_share_of_pruned_prefill": scoring_share,
        "peak_memory_mib": {k: v / 2 ** 20 for k, v in memory.items()},
    }


def report(result: Dict[str, Any]) -> str:
    m = result["model"]
    s = result["settings"]
    lt = result["layer_tokens"]
    lines = [
        "LLaVA-1.5-shaped random model, Stage 3 (text-guided pruning in the LLM), batch 1",
        f"  vision: CLIP {m['image_size']} px / {m['patch_size']} px patches = {result['visual_tokens']['unpruned']} "
        f"tokens, width {m['vision_hidden']}, {m['vision_layers']} layers",
        f"  LLM: width {m['llm_hidden']}, {m['llm_layers']} layers, {m['llm_heads']} heads, MLP {m['llm_intermediate']}, "
        f"vocab {m['vocab_size']}; prompt {s['text_before']} + image + {s['text_after']} tokens = {result['sequence_length']}",
        f"  machine: {result['machine']}, {result['dtype']}; median of {s['repeats']} interleaved runs",
        "",
        f"  {'':28}{'unpruned':>14}{'Stage 3':>14}",
        f"  {'visual tokens':28}{result['visual_tokens']['unpruned']:>14}{result['visual_tokens']['pruned']:>14}",
        f"  {'tokens per LLM layer':28}{_runs(lt['unpruned']):>14}{_runs(lt['pruned']):>14}",
        f"  {'prefill latency (s)':28}{result['prefill_seconds']['unpruned']:>14.3f}{result['prefill_seconds']['pruned']:>14.3f}",
        f"  {'analytic GFLOPs':28}{result['gflops']['unpruned']:>14.1f}{result['gflops']['pruned']:>14.1f}",
        f"  {'peak memory (MiB)':28}{result['peak_memory_mib']['unpruned']:>14.1f}{result['peak_memory_mib']['pruned']:>14.1f}",
        "",
        f"  measured speedup {result['speedup']:.2f}x, FLOPs ratio {result['flops_ratio']:.2f}x: "
        f"the speedup reaches {100 * result['speedup_over_flops_ratio']:.0f}% of the FLOPs ratio",
        f"  Stage 3 scoring takes {100 * result['scoring_share_of_pruned_prefill']:.1f}% of the pruned prefill",
    ]
    return "\n".join(lines)


def _runs(values: List[int]) -> str:
    """[616, 616, 184, 184] -> '616x2 184x2'."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        out.append(f"{values[i]}x{j - i}")
        i = j
    return " ".join(out)
