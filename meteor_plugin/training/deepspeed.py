"""DeepSpeed (and plain torch.distributed) helpers that the training entry needs, GPU or CPU.

On a machine without CUDA, DeepSpeed runs with its CPU accelerator and the gloo backend (notes/stack.md,
section 2). Three things differ from a GPU node and are handled here:

- ``deepspeed.init_distributed`` JIT-builds a shared-memory allreduce op with g++ (about 25 s, and it fails
  without a compiler); gloo's allreduce gives the same results, so the build is skipped on CPU unless
  ``METEOR_DS_SHM_OP=1``;
- under ZeRO-3 the model is built inside ``zero.Init``, which needs ``deepspeed.comm`` initialised first
  (otherwise its batch-size check sees a world of one process);
- transformers 5's ``TrainingArguments`` needs ``use_cpu=True`` to count the processes on CPU, while
  transformers 4.x with accelerate 0.34 must *not* get it: there ``use_cpu`` silently swaps DeepSpeed for
  DDP (see ``cpu_training_flags``).
"""

from __future__ import annotations

import importlib
import os
from typing import Dict, Iterable, List, Tuple

import torch


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def skip_shm_op_build() -> bool:
    """On CPU, keep ``deepspeed.init_distributed`` from compiling its shm op; returns True if skipped."""
    if not on_cpu() or os.environ.get("METEOR_DS_SHM_OP") == "1":
        return False
    try:
        # ``import deepspeed.comm.torch`` binds the torch package (name shadowing): go through importlib.
        module = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return False
    from ..registry import REGISTRY

    if not REGISTRY.is_patched(module, "build_shm_op"):
        REGISTRY.patch(module, "build_shm_op", lambda: None)
    return True


def cpu_training_flags() -> Dict[str, bool]:
    """TrainingArguments fields a CPU run needs on this transformers generation (empty on GPU)."""
    if not on_cpu():
        return {}
    import transformers

    major = int(transformers.__version__.split(".")[0])
    # 5.x: without use_cpu accelerate counts one process and DeepSpeed's batch check fails.
    # 4.x + accelerate 0.34: with use_cpu the Trainer wraps the model in DDP instead of DeepSpeed.
    return {"use_cpu": True} if major >= 5 else {}


def init_distributed_early(training_args) -> None:
    """Initialise deepspeed.comm right after the arguments are parsed, before any model is built."""
    if not getattr(training_args, "deepspeed", None):
        return
    import deepspeed

    _ = training_args.device  # lets accelerate set up the process group first, as the Trainer would
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else None)


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def gathered_cpu(named: Iterable[Tuple[str, torch.nn.Parameter]]) -> Dict[str, torch.Tensor]:
    """Full CPU copies of parameters, gathering ZeRO-3 partitions (every rank must call this)."""
    named = list(named)
    partitioned: List[torch.nn.Parameter] = [p for _, p in named if hasattr(p, "ds_id")]
    if partitioned:
        from deepspeed import zero

        with zero.GatheredParameters(partitioned):
            return {name: p.data.detach().cpu().clone() for name, p in named}
    return {name: p.detach().cpu().clone() for name, p in named}
