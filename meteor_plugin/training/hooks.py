"""What ``python -m meteor_plugin.train`` changes in upstream's training module before calling ``train()``.

Upstream ``train()`` (LLaVA's ``llava/train/train.py``, EAGLE's root ``train.py``) looks every helper up
in its own module's globals when it runs, so replacing a few globals is enough; nothing in the file is
edited. Each replacement is recorded in training's own patch registry, so leaving ``installed`` (or ``uninstall``)
restores the module exactly. The globals:

| global | replaced by | why |
|---|---|---|
| ``ModelArguments`` | the same + METEOR's flags | ``--help`` lists them (the entry takes them out of argv) |
| ``TrainingArguments`` | the same + CPU setup after parsing | gloo DeepSpeed, ``use_cpu`` per version |
| ``find_all_linear_names`` | ``lora.target_regex`` | adapters only on the LLM's decoder layers |
| the Trainer class | ``trainer.make_trainer(...)`` | markers, resume, staging, checks, stats, 5.x |
| ``safe_save_model_for_hf_trainer`` | ``trainer.save_final_model(...)`` | LoRA trainables (EAGLE), CPU |
| the model class | a loader whose ``from_pretrained`` fixes ``--bits`` | 4.44/5.x refuse upstream's kwargs |
| ``preprocess_v1`` | the same, with ``tokenizer.legacy`` defaulting to True | multi-turn v1 data with a non-Llama tokenizer |
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional

from ..registry import TRAINING_REGISTRY as REGISTRY
from ..compat import training as compat
from . import arguments, lora, quant
from ..adapters.family import TrainingSpec
from .trainer import make_trainer, save_final_model


@dataclass
class Session:
    """One training run through the entry: what was installed and what happened."""

    codebase: TrainingSpec
    trainer: Any = None
    final_dir: Optional[str] = None
    staging: Optional[str] = None
    resumed_from: Optional[str] = None
    engine: Optional[str] = None
    adapted: List[str] = field(default_factory=list)
    fully_trained: List[str] = field(default_factory=list)
    quantized: List[str] = field(default_factory=list)
    cast_to_half: List[str] = field(default_factory=list)
    cast_to_float: List[str] = field(default_factory=list)


class QuantizationSafeLoader:
    """Stands in for the model class in the train module: ``from_pretrained`` gets valid ``--bits`` kwargs."""

    def __init__(self, cls: type, extra_skip=()):
        self.meteor_wrapped = cls
        self._extra_skip = tuple(extra_skip)

    def from_pretrained(self, *args: Any, **kwargs: Any):
        return self.meteor_wrapped.from_pretrained(*args, **quant.fix_from_pretrained_kwargs(kwargs, self._extra_skip))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.meteor_wrapped, name)

    def __call__(self, *args: Any, **kwargs: Any):
        return self.meteor_wrapped(*args, **kwargs)


def _set(module: Any, name: str, value: Any) -> None:
    if REGISTRY.is_patched(module, name):  # installed again in one process: the registry keeps the original
        setattr(module, name, value)
    else:
        REGISTRY.patch(module, name, value)


def _original(module: Any, name: str) -> Any:
    return REGISTRY.original(module, name) if REGISTRY.is_patched(module, name) else getattr(module, name)


def require_globals(module: Any, codebase: TrainingSpec) -> None:
    needed = ("train", "ModelArguments", "TrainingArguments", "find_all_linear_names",
              "safe_save_model_for_hf_trainer", codebase.trainer_class, codebase.model_global)
    missing = [n for n in needed if not hasattr(module, n)]
    if missing:
        raise RuntimeError(
            f"{module.__name__} ({getattr(module, '__file__', '?')}) has no {', '.join(missing)}: it is not the "
            f"{codebase.name} training script meteor_plugin.train knows how to drive"
        )


def replace_final_save(module: Any) -> None:
    """EAGLE fix 3 (and CPU saving for both): the end-of-train save keeps every trained weight."""
    _set(module, "safe_save_model_for_hf_trainer", save_final_model(_original(module, "safe_save_model_for_hf_trainer")))


def fix_quantized_loading(module: Any, model_global: str, extra_skip=()) -> None:
    """EAGLE fix 2 (LLaVA too on transformers 5): ``--bits 4/8`` loads, with the visual modules unquantised."""
    original = _original(module, model_global)
    original = getattr(original, "meteor_wrapped", original)
    _set(module, model_global, QuantizationSafeLoader(original, extra_skip))


def default_tokenizer_legacy(module: Any) -> None:
    """Multi-turn ``v1`` conversations with tokenizers that lack Llama's ``legacy`` flag.

    ``preprocess_v1`` reads ``tokenizer.legacy`` for every round after the first, to undo a prefix-space
    token the non-legacy sentencepiece Llama tokenizer adds; any other tokenizer (a word-level or BPE
    ``PreTrainedTokenizerFast``) has no such attribute, and every multi-turn sample fails with an
    AttributeError. Such tokenizers have no prefix-space quirk, which is what ``legacy=True`` means
    there, so the attribute is set to True on them; Llama tokenizers keep their own value.
    ``preprocess_v1``'s length check still masks any sample whose rounds do not add up.
    """
    original = _original(module, "preprocess_v1") if hasattr(module, "preprocess_v1") else None
    if original is None:
        return

    @functools.wraps(original)
    def preprocess_v1(sources, tokenizer, *args, **kwargs):
        if not hasattr(tokenizer, "legacy"):
            tokenizer.legacy = True
        return original(sources, tokenizer, *args, **kwargs)

    _set(module, "preprocess_v1", preprocess_v1)


def install(module: Any, codebase: TrainingSpec) -> Session:
    """Make ``module.train()`` run with METEOR's training behaviour; returns the run's session."""
    require_globals(module, codebase)
    session = Session(codebase=codebase)
    _set(module, "ModelArguments", arguments.with_meteor_fields(_original(module, "ModelArguments")))
    _set(module, "TrainingArguments", arguments.with_cpu_setup(_original(module, "TrainingArguments")))
    _set(module, "find_all_linear_names", lora.target_regex)
    _set(module, codebase.trainer_class, make_trainer(_original(module, codebase.trainer_class), session))
    replace_final_save(module)
    fix_quantized_loading(module, codebase.model_global, codebase.keep_unquantised)
    default_tokenizer_legacy(module)
    for fix in codebase.runtime_fixes:
        fix(module)
    return session


def prepare_imports() -> None:
    """What must happen before the train module is imported (and before any Trainer exists)."""
    compat.make_trainer_importable()
    compat.round_zero3_bucket_sizes()


def uninstall() -> None:
    """Put back everything a training run changed in upstream's training code and its libraries (the train
    module's globals, the Trainer import fix, DeepSpeed's shm op, the families' runtime fixes)."""
    REGISTRY.restore_all()


@contextlib.contextmanager
def installed(module: Any, codebase: TrainingSpec) -> Iterator[Session]:
    """``install`` for the duration of a ``with`` block: on leaving it (an exception included) every change is put
    back (``uninstall``). ``meteor_plugin.disable()`` leaves training's changes alone."""
    try:
        yield install(module, codebase)
    finally:
        uninstall()
