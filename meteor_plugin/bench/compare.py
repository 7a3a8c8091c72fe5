"""Running variants of one prefill side by side: interleaved timings, counted FLOPs, peak memory."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional

import torch

from ..progress import bar
from ..flops import count_flops
from ..compat.transformers import cache_bytes
from .memory import peak_memory_bytes, peak_memory_in


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
                results[v.name] = {
                    **extra,
                    "seconds": statistics.median(runs[v.name]),
                    "runs": runs[v.name],
                    "gflops": count_flops(prefill) / 1e9,
                    "peak_memory_mib": peak_memory_bytes(prefill, device) / 2 ** 20,
                    "kv_cache_mib": cache_bytes(getattr(out, "past_key_values", None)) / 2 ** 20,
                }
                del out
                if llm is not None:
                    results[v.name]["llm_peak_memory_mib"] = peak_memory_in(prefill, llm, device) / 2 ** 20
            progress.update(extra_runs)
    return results


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
    rows = (("prefill latency (s)", "seconds", 3), ("GFLOPs (counted)", "gflops", 1),
            ("peak memory (MiB)", "peak_memory_mib", 1), ("  of it the LLM's own", "llm_peak_memory_mib", 1),
            ("KV cache after prefill (MiB)", "kv_cache_mib", 2))
    return [f"  {label:26}{unpruned[key]:>{width}.{digits}f}{pruned[key]:>{width}.{digits}f}"
            for label, key, digits in rows if key in unpruned and key in pruned]


def speedup_line(result: Dict[str, Any]) -> str:
    return (f"  measured speedup {result['speedup']:.2f}x, FLOPs ratio {result['flops_ratio']:.2f}x: "
            f"the speedup reaches {100 * result['speedup_over_flops_ratio']:.0f}% of the FLOPs ratio")
