"""Where a pruned prefill's time goes (``meteor-plugin bench --profile``): per part, its time beside its share
of the counted FLOPs.

Parts are the model's modules (each encoder, the projectors, the decoder layers, the LM head) and the work
the plugin adds (each stage's scoring and selection, and its gathering and bookkeeping). Each is timed
exclusively: a part's time excludes the parts nested in it (Stage 3's selection runs inside a decoder
layer's call, and is not counted twice). A part that takes a larger share of the time than of the FLOPs is
where the speedup falls short of the FLOPs ratio. The plugin's methods are wrapped only while profiling.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..flops import flop_counter

OTHER = "other (embeddings, splicing, masks, ...)"  # the prefill's time outside every named part

# (owner, attribute, part) of the plugin's work; an owner is imported lazily so this module stays light.
PLUGIN_PARTS = (
    ("meteor_plugin.stages.encoder:VitPruner", "_select", "stage 1: scoring and selection"),
    ("meteor_plugin.stages.encoder:VitPruner", "block_args", "stage 1: gathering"),
    ("meteor_plugin.stages.vision", "prune_output", "stage 1: scoring and selection"),
    ("meteor_plugin.stages.vision", "cooperative_prune", "stage 2: scoring, selection, gathering"),
    ("meteor_plugin.stages.decoder:DecoderPruner", "_select", "stage 3: scoring and selection"),
    ("meteor_plugin.stages.decoder:DecoderPruner", "layer_args", "stage 3: gathering and masks"),
)


class Parts:
    """Exclusive time (and FLOPs, with a counter) per part over the runs it watches."""

    def __init__(self, sync: Callable[[], None], counter: Optional[FlopCounterMode] = None):
        self.sync, self.counter = sync, counter
        self.stack: List[Tuple[str, float, float]] = []
        self.seconds: Dict[str, float] = defaultdict(float)
        self.flops: Dict[str, float] = defaultdict(float)

    def _flops(self) -> float:
        return float(self.counter.get_total_flops()) if self.counter is not None else 0.0

    def enter(self, part: str) -> None:
        self.sync()
        self.stack.append((part, time.perf_counter(), self._flops()))

    def exit(self) -> None:
        self.sync()
        part, start, flops = self.stack.pop()
        seconds, done = time.perf_counter() - start, self._flops() - flops
        self.seconds[part] += seconds
        self.flops[part] += done
        if self.stack:  # the parent's own time excludes this
            self.seconds[self.stack[-1][0]] -= seconds
            self.flops[self.stack[-1][0]] -= done


def model_parts(model: Any) -> List[Tuple[torch.nn.Module, str]]:
    """(module, part) of a LLaVA or EAGLE model: its encoders, projectors, decoder layers and LM head."""
    llm = model.get_model()
    tower = llm.get_vision_tower()
    towers = list(getattr(tower, "vision_towers", None) or [tower])
    parts = [(t, encoder_part(t)) for t in towers]
    projectors = getattr(llm, "mm_projectors", None)
    if projectors is not None:
        parts += [(p, "projectors") for p in projectors]
    if getattr(llm, "mm_projector", None) is not None:
        parts.append((llm.mm_projector, "projectors"))
    parts += [(layer, "LLM decoder layers") for layer in llm.layers]
    parts.append((model.lm_head, "LM head"))
    return parts


def encoder_part(tower: torch.nn.Module) -> str:
    """The part an encoder's time is counted under: ``encoder`` and its checkpoint's base name."""
    return f"encoder {os.path.basename(str(getattr(tower, 'vision_tower_name', type(tower).__name__)))}"


def without(unpruned: Dict[str, Any], pruned: Dict[str, Any], parts: List[str]) -> Dict[str, float]:
    """Speedup and FLOPs ratio of two profiles (`profile`) with ``parts`` taken out of both: what is left of the
    prefill once the work both variants do alike is set aside."""
    def rest(result):
        rows = [r for r in result["parts"] if r["part"] in parts]
        return (result["prefill_ms"] - sum(r["ms"] for r in rows),
                result["gflops"] * (1 - sum(r["flops_share"] for r in rows)))

    (ms_u, gf_u), (ms_p, gf_p) = rest(unpruned), rest(pruned)
    set_aside = [r for r in pruned["parts"] if r["part"] in parts]
    return {"speedup": ms_u / ms_p, "flops_ratio": gf_u / gf_p,
            "time_share": sum(r["time_share"] for r in set_aside), "flops_share": sum(r["flops_share"] for r in set_aside)}


def flop_rate(result: Dict[str, Any], part: str) -> float:
    """GFLOP/s of one part of a `profile`: how fast it ran its counted FLOPs."""
    row = next(r for r in result["parts"] if r["part"] == part)
    return result["gflops"] * row["flops_share"] / (row["ms"] / 1000) if row["ms"] > 0 else 0.0


@contextlib.contextmanager
def watching(model: Any, parts: Parts) -> Iterator[None]:
    import importlib

    handles = []
    for module, part in model_parts(model):
        handles.append(module.register_forward_pre_hook(lambda m, a, p=part: parts.enter(p)))
        handles.append(module.register_forward_hook(lambda m, a, o: parts.exit()))
    restore = []
    for owner, attr, part in PLUGIN_PARTS:
        path, _, cls = owner.partition(":")
        target = importlib.import_module(path)
        target = getattr(target, cls) if cls else target
        original = getattr(target, attr)

        def wrapped(*args, _original=original, _part=part, **kwargs):
            parts.enter(_part)
            try:
                return _original(*args, **kwargs)
            finally:
                parts.exit()

        setattr(target, attr, wrapped)
        restore.append((target, attr, original))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for target, attr, original in restore:
            setattr(target, attr, original)


def profile(model: Any, prefill: Callable[[], Any], repeats: int, device: torch.device, variant: Any) -> Dict[str, Any]:
    """Inside ``variant``'s scope (a ``compare.Variant``), run ``prefill`` ``repeats`` times for the time, and once more
    under a FLOPs counter; returns per part: seconds per prefill, share of time, share of FLOPs."""
    return profile_side_by_side(model, prefill, repeats, device, [variant])[0]


def profile_side_by_side(model: Any, prefill: Callable[[], Any], repeats: int, device: torch.device,
                         variants: List[Any]) -> List[Dict[str, Any]]:
    """`profile` of each variant, their timed runs interleaved (as `compare` times them) so that a drift of the
    machine hits all alike: profiles whose parts are compared across variants (`without`) need that."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for variant in variants:
        with variant.scope():
            prefill()  # warm-up
    timed = [Parts(sync) for _ in variants]
    totals = [0.0] * len(variants)
    for _ in range(repeats):
        for i, variant in enumerate(variants):
            with variant.scope(), watching(model, timed[i]):
                timed[i].enter(OTHER)
                start = time.perf_counter()
                prefill()
                sync()
                totals[i] += time.perf_counter() - start
                timed[i].exit()
    results = []
    for variant, parts, total in zip(variants, timed, totals):
        with variant.scope(), flop_counter() as counter:
            counted = Parts(lambda: None, counter)
            with watching(model, counted):
                counted.enter(OTHER)
                prefill()
                counted.exit()
        all_flops = float(counter.get_total_flops())
        rows = [{"part": part, "ms": 1000 * parts.seconds[part] / repeats, "time_share": parts.seconds[part] / total,
                 "flops_share": counted.flops.get(part, 0.0) / all_flops if all_flops else 0.0}
                for part in sorted(parts.seconds, key=lambda p: -parts.seconds[p])]
        results.append({"prefill_ms": 1000 * total / repeats, "repeats": repeats, "gflops": all_flops / 1e9,
                        "parts": rows})
    return results



def report(result: Dict[str, Any], title: str) -> str:
    lines = [f"  profile of the {title} prefill ({result['prefill_ms']:.1f} ms, mean of {result['repeats']} runs; "
             "each part's own time, without the parts inside it):",
             f"    {'part':42}{'ms':>9}{'time':>8}{'FLOPs':>8}"]
    for row in result["parts"]:
        lines.append(f"    {row['part']:42}{row['ms']:>9.2f}{100 * row['time_share']:>7.1f}%"
                     f"{100 * row['flops_share']:>7.1f}%")
    return "\n".join(lines)
