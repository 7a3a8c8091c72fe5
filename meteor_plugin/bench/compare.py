"""Running variants of one prefill side by side: interleaved timings, needed FLOPs, peak memory.

FLOPs are the work that is needed (``meteor_plugin.flops``: causal attention as its lower triangle, in every
variant); what an attention kernel executes beyond it (a mask makes SDPA compute the full square) is reported
apart, as overhead. The speedup is the ratio of the variants' median times, with each interleaved round's
ratio as its spread; the target is a share of the needed-FLOPs ratio: 90% on a CPU (a shared virtual machine
moves by several points between runs), 95% on a GPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional

import torch

from ..progress import bar
from ..flops import count
from ..compat.transformers import cache_bytes
from .memory import peak_memory_bytes, peak_memory_in

CPU_TARGET, GPU_TARGET = 0.90, 0.95  # of the needed-FLOPs ratio, for the median speedup


@dataclass
class Variant:
    name: str
    scope: Callable[[], ContextManager]  # the model runs this variant inside it (meteor_plugin.enabled/disabled)


def compare(prefill: Callable[[], Any], variants: List[Variant], repeats: int, warmup: int,
            device: torch.device, inspect: Callable[[str], Dict[str, Any]] = lambda name: {},
            llm: Optional[torch.nn.Module] = None) -> Dict[str, Dict[str, Any]]:
    """Times every variant ``repeats`` times, interleaved so that drift hits all alike; then, per variant,
    one plain run whose results ``inspect`` reads (e.g. token counts) and whose output's KV cache is measured,
    and separate runs that count its FLOPs and peak memory (those instruments slow a run down): the whole
    prefill's, and with ``llm`` (the language model's decoder stack) that module's own."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def once(variant: Variant) -> float:
        with variant.scope():
            sync()
            start = time.perf_counter()
            prefill()
            sync()
            return time.perf_counter() - start

    runs: Dict[str, List[float]] = {v.name: [] for v in variants}
    results: Dict[str, Dict[str, Any]] = {}
    # warm-up and timed rounds, then per variant: the inspected run, FLOPs and memory (3 prefills)
    extra_runs = 4 if llm is not None else 3
    with bar((warmup + repeats + extra_runs) * len(variants), "prefills", "run") as progress:
        for _ in range(warmup):
            for v in variants:
                once(v)
                progress.update(1)
        for _ in range(repeats):
            for v in variants:
                runs[v.name].append(once(v))
                progress.update(1)
        for v in variants:
            with v.scope():
                out = prefill()
                extra = inspect(v.name)
                needed, overhead = count(prefill)
                results[v.name] = {
                    **extra,
                    "seconds": statistics.median(runs[v.name]),
                    "runs": runs[v.name],
                    "gflops": needed / 1e9,
                    "overhead_gflops": overhead / 1e9,
                    "peak_memory_mib": peak_memory_bytes(prefill, device) / 2 ** 20,
                    "kv_cache_mib": cache_bytes(getattr(out, "past_key_values", None)) / 2 ** 20,
                }
                del out
                if llm is not None:
                    results[v.name]["llm_peak_memory_mib"] = peak_memory_in(prefill, llm, device) / 2 ** 20
            progress.update(extra_runs)
    return results


def speed(results: Dict[str, Dict[str, Any]], unpruned: str, pruned: str, device: torch.device) -> Dict[str, Any]:
    """The speedup of ``pruned`` over ``unpruned`` (median times), each interleaved round's, the needed-FLOPs ratio,
    the share of it reached and the target for this device."""
    u, p = results[unpruned], results[pruned]
    speedup, ratio = u["seconds"] / p["seconds"], u["gflops"] / p["gflops"]
    return {"speedup": speedup, "flops_ratio": ratio, "speedup_over_flops_ratio": speedup / ratio,
            "round_speedups": sorted(a / b for a, b in zip(u["runs"], p["runs"])),
            "target": GPU_TARGET if device.type == "cuda" else CPU_TARGET}


def runs_text(values: List[int]) -> str:
    """[616, 616, 184, 184] -> '616x2 184x2'."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        out.append(f"{values[i]}x{j - i}")
        i = j
    return " ".join(out)


def cost_rows(unpruned: Dict[str, Any], pruned: Dict[str, Any], width: int = 16) -> List[str]:
    """The report rows every speed bench prints: latency, counted FLOPs and peak memory, side by side."""
    rows = (("prefill latency (s)", "seconds", 3), ("GFLOPs (needed)", "gflops", 1),
            ("  executed beyond them", "overhead_gflops", 1),
            ("peak memory (MiB)", "peak_memory_mib", 1), ("  of it the LLM's own", "llm_peak_memory_mib", 1),
            ("KV cache after prefill (MiB)", "kv_cache_mib", 2))
    return [f"  {label:26}{unpruned[key]:>{width}.{digits}f}{pruned[key]:>{width}.{digits}f}"
            for label, key, digits in rows if key in unpruned and key in pruned]


def speedup_line(result: Dict[str, Any]) -> str:
    """The speedup against the needed-FLOPs ratio, the rounds' spread beside the median, and the target."""
    ratio, rounds, target = result["flops_ratio"], result["round_speedups"], result["target"]
    share = result["speedup_over_flops_ratio"]
    return (f"  measured speedup {result['speedup']:.2f}x (median of the runs; rounds {rounds[0]:.2f}-{rounds[-1]:.2f}x), "
            f"needed-FLOPs ratio {ratio:.2f}x: the speedup reaches {100 * share:.0f}% of it (rounds "
            f"{100 * rounds[0] / ratio:.0f}-{100 * rounds[-1] / ratio:.0f}%); target {100 * target:.0f}% on this "
            f"device: {'met' if share >= target else 'missed'}")


def float_mask_line(result: Dict[str, Any], pruned: str) -> Optional[str]:
    """With ``--float-mask``: the pruned prefill with proportional attention's biases in a float mask against the
    key column's causal path, timed in the same rounds."""
    masked = result["variants"].get("float mask")
    if masked is None:
        return None
    column = result["variants"][pruned]
    rounds = sorted(a / b for a, b in zip(masked["runs"], column["runs"]))
    return (f"  proportional attention through a float mask (transformers 4.x, eager): {masked['seconds']:.3f} s, "
            f"{masked['overhead_gflops']:.1f} GFLOPs executed beyond the needed; the key column's causal path is "
            f"{masked['seconds'] / column['seconds']:.2f}x as fast (rounds {rounds[0]:.2f}-{rounds[-1]:.2f}x)")
