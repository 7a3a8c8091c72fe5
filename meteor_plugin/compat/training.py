"""Trainer API differences between the transformers generations LLaVA/EAGLE training meets.

LLaVA's ``llava_trainer.py`` and EAGLE's ``eagle_trainer.py`` were written for transformers 4.37/4.44. On
transformers 5.x they break in four places, each repaired here without touching their files:

- ``from transformers.trainer import ALL_LAYERNORM_LAYERS`` fails (the name moved to ``pytorch_utils``):
  the module cannot even be imported, so the name is put back before the import;
- ``Trainer(tokenizer=...)`` is gone (``processing_class``): ``trainer_kwargs`` renames it;
- ``_get_train_sampler`` gained a ``train_dataset`` argument that their override does not take;
- ``_save_checkpoint(model, trial)`` lost ``metrics``, which their override passes on positionally.

Resuming on 4.37/4.44 with torch >= 2.6 fails in the Trainer itself: ``_load_rng_state`` calls
``torch.load`` on the numpy RNG state, which the new ``weights_only=True`` default refuses;
``numpy_rng_globals`` allows exactly the numpy types that file holds (what transformers 5 does).

Upstream launch scripts pass flags that some generations renamed: ``--evaluation_strategy`` (4.37) is
``--eval_strategy`` (4.41+, the only one in 5.x) and ``--warmup_ratio`` became a fractional
``--warmup_steps`` in 5.x. ``translate_flags`` rewrites them for the installed version.

And one between transformers 4.x and current DeepSpeed: 4.x fills ``stage3_prefetch_bucket_size: "auto"``
with ``0.9 * hidden * hidden``, a float that DeepSpeed >= 0.15's config validation rejects
(``int_from_float``); 5.x rounds it. ``round_zero3_bucket_sizes`` rounds it on 4.x too.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict

from ..registry import TRAINING_REGISTRY as REGISTRY
from .transformers import transformers_version


def make_trainer_importable() -> None:
    """Let ``from transformers.trainer import ALL_LAYERNORM_LAYERS`` work again (transformers 5)."""
    import transformers.trainer as trainer_module

    if not hasattr(trainer_module, "ALL_LAYERNORM_LAYERS"):
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

        REGISTRY.patch(trainer_module, "ALL_LAYERNORM_LAYERS", ALL_LAYERNORM_LAYERS)


def trainer_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``Trainer.__init__`` keyword arguments for this transformers version."""
    from transformers import Trainer

    params = inspect.signature(Trainer.__init__).parameters
    if "tokenizer" in kwargs and "tokenizer" not in params and "processing_class" in params:
        kwargs = dict(kwargs)
        kwargs["processing_class"] = kwargs.pop("tokenizer")
    return kwargs


def base_save_checkpoint(trainer: Any, model: Any, trial: Any, *args: Any, **kwargs: Any) -> Any:
    """``transformers.Trainer._save_checkpoint`` with the arguments this version takes."""
    from transformers import Trainer

    params = inspect.signature(Trainer._save_checkpoint).parameters
    if "metrics" not in params:
        args, kwargs = (), {k: v for k, v in kwargs.items() if k != "metrics"}
    return Trainer._save_checkpoint(trainer, model, trial, *args, **kwargs)


def checkpoint_folder(trainer: Any, trial: Any = None) -> str:
    """Where ``_save_checkpoint`` writes for the current step (the Trainer computes it the same way)."""
    import os

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    run_dir = trainer._get_output_dir(trial=trial)
    return os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


_ROUNDED_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def round_zero3_bucket_sizes() -> None:
    """Make transformers 4.x write whole numbers where DeepSpeed's config wants them (idempotent)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    cls = hf_deepspeed.HfTrainerDeepSpeedConfig
    if REGISTRY.is_patched(cls, "trainer_config_finalize"):
        return
    original = cls.trainer_config_finalize

    def trainer_config_finalize(self, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        zero = self.config.get("zero_optimization", {})
        for key in _ROUNDED_KEYS:
            if isinstance(zero.get(key), float):
                zero[key] = int(zero[key])
        return out

    REGISTRY.patch(cls, "trainer_config_finalize", trainer_config_finalize)


# (flag in upstream scripts, the same flag in other generations). A float warmup_steps < 1 is a ratio in 5.x.
_RENAMED_FLAGS = (("warmup_ratio", "warmup_steps"), ("evaluation_strategy", "eval_strategy"),
                  ("eval_strategy", "evaluation_strategy"))


def translate_flags(argv: list, training_arguments: type) -> list:
    """Rename flags this transformers' ``TrainingArguments`` does not know to the names it does."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(training_arguments)}
    out = list(argv)
    for old, new in _RENAMED_FLAGS:
        if old in known or new not in known:
            continue
        for i, arg in enumerate(out):
            flag, sep, value = arg.partition("=")
            if flag in (f"--{old}", f"--{old.replace('_', '-')}"):
                if any(a.split("=")[0] in (f"--{new}", f"--{new.replace('_', '-')}") for a in out):
                    raise SystemExit(f"--{old} and --{new} both given: this transformers only has --{new}")
                if old == "warmup_ratio":
                    ratio = float(value if sep else out[i + 1])
                    if not 0 <= ratio < 1:
                        raise SystemExit(f"--warmup_ratio {ratio}: must be in [0, 1)")
                out[i] = f"--{new}" + (sep + value if sep else "")
    return out


def numpy_rng_globals():
    """A context in which ``torch.load(weights_only=True)`` accepts the numpy arrays of an RNG state file."""
    import contextlib

    import numpy as np
    import torch

    if not hasattr(torch.serialization, "safe_globals"):
        return contextlib.nullcontext()
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    return torch.serialization.safe_globals(allowed)


def cpu_training_flags() -> Dict[str, bool]:
    """TrainingArguments fields a CPU run needs on this transformers generation.

    5.x: without ``use_cpu`` accelerate counts one process and DeepSpeed's batch check fails. 4.x with
    accelerate 0.34: with ``use_cpu`` the Trainer wraps the model in DDP instead of DeepSpeed."""
    return {"use_cpu": True} if transformers_version()[0] >= 5 else {}


def dtype_keyword() -> str:
    """The ``from_pretrained`` keyword for the weights' dtype: ``dtype`` in 5.x, ``torch_dtype`` before."""
    return "dtype" if transformers_version()[0] >= 5 else "torch_dtype"
