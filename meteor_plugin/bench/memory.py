"""Peak memory of a block of code: CUDA's allocator statistics on a GPU, tensor storages on a CPU.

On a CPU there is no allocator peak to read, so ``PeakTensorMemory`` watches every tensor storage an op
creates inside the block and tracks the largest total alive at once (weights and inputs created
before the block are not counted). It slows the block down: measure memory and time in separate runs.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.region_peak = 0  # the largest total alive since `region_start`, see `peak_memory_in`
        self._sizes: Dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._sizes or key in inputs:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            weakref.finalize(storage, self._release, key)
        self.peak = max(self.peak, self.live)
        self.region_peak = max(self.region_peak, self.live)
        return out


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory that ``fn()`` adds on top of what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with PeakTensorMemory() as tracker:
        fn()
    return tracker.peak


def peak_memory_in(fn: Callable[[], Any], module: torch.nn.Module, device: torch.device) -> int:
    """Peak memory that ``module``'s forward adds while ``fn()`` runs, on top of what was alive when that forward
    began (for the language model of a VLM: its own activations and KV cache, not the encoders'). The largest
    of its calls if it runs more than once."""
    peaks = []
    if device.type == "cuda":
        state = {}

        def begin(*_):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            state["before"] = torch.cuda.memory_allocated(device)

        def end(*_):
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - state["before"])
    else:
        tracker = PeakTensorMemory()
        state = {}

        def begin(*_):
            state["before"] = tracker.live
            tracker.region_peak = tracker.live

        def end(*_):
            peaks.append(tracker.region_peak - state["before"])
    handles = [module.register_forward_pre_hook(lambda m, a: begin()), module.register_forward_hook(lambda m, a, o: end())]
    try:
        if device.type == "cuda":
            fn()
        else:
            with tracker:
                fn()
    finally:
        for h in handles:
            h.remove()
    if not peaks:
        raise RuntimeError(f"{type(module).__name__} never ran during the measured block")
    return max(peaks)
