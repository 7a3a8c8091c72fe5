"""DeepSpeed set-up that the training entry needs, GPU or CPU (ranks, barriers and ZeRO-3 gathers: ``distributed.py``).

On a machine without CUDA, DeepSpeed runs with its CPU accelerator and the gloo backend (notes/stack.md,
section 2). Three things differ from a GPU node and are handled here:

- ``deepspeed.init_distributed`` JIT-builds a shared-memory allreduce op with g++ (about 25 s, and it fails
  without a compiler); gloo's allreduce gives the same results, so the build is skipped on CPU unless
  ``METEOR_DS_SHM_OP=1``;
- under ZeRO-3 the model is built inside ``zero.Init``, which needs ``deepspeed.comm`` initialised first
  (otherwise its batch-size check sees a world of one process);
- transformers 5's ``TrainingArguments`` needs ``use_cpu=True`` to count the processes on CPU, while
  transformers 4.x with accelerate 0.34 must *not* get it: there ``use_cpu`` silently swaps DeepSpeed for
  DDP (``compat.training.cpu_training_flags``).
"""

from __future__ import annotations

import importlib
import os
from typing import Dict

import torch

from ..compat import training as compat
from ..registry import TRAINING_REGISTRY as REGISTRY


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
    if not REGISTRY.is_patched(module, "build_shm_op"):
        REGISTRY.patch(module, "build_shm_op", lambda: None)
    return True


def cpu_training_flags() -> Dict[str, bool]:
    """TrainingArguments fields a CPU run needs on this transformers generation (empty on GPU)."""
    if not on_cpu():
        return {}
    return compat.cpu_training_flags()


def init_distributed_early(training_args) -> None:
    """Initialise deepspeed.comm right after the arguments are parsed, before any model is built."""
    if not getattr(training_args, "deepspeed", None):
        return
    import deepspeed

    _ = training_args.device  # lets accelerate set up the process group first, as the Trainer would
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else None)
