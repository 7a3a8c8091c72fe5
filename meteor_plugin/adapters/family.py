"""The ``Family`` record: all that the plugin, training, calibration and the patcher know of one model family.

Each family is one folder under ``adapters/`` whose ``__init__.py`` defines ``FAMILY``; ``adapters/__init__.py``
(the registry) is the one module that imports them all. Everything else reaches a family only through this
record, never by importing an adapter or testing a family's name:

- ``target`` (``InferenceTarget``): what ``enable()`` patches, the classes refused by name, the family's vision
  encoders as ``stages.vision.EncoderParts`` (what ``meteor-plugin calibrate`` measures), and how its tools open a
  checkpoint and ask it a question (``open``, ``prompt``: ``meteor-plugin calibrate --questions``),
  and what each model runs (``support``: its stages and refused methods, ``adapters/support.py``);
- ``training`` (``TrainingSpec``): what ``meteor_plugin.train``, ``convert``, ``merge-lora`` and ``calibrate``
  need of the upstream codebase the family trains and loads through; None where there is none;
- ``patcher`` (``PatcherSpec``): the edits ``meteor-plugin patch`` makes to a checkout; None where there is no
  checkout to patch.

``missing_parts(family)`` says what a family folder fails to provide (the registry's test runs it on every one).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

IMAGE_TOKEN_INDEX = -200  # the llava and EAGLE codebases' placeholder id for an image in input_ids


class StructureError(RuntimeError):
    """The model does not look like the codebase the adapter was written for."""


def require(obj: Any, names: Sequence[str], what: str) -> None:
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise StructureError(
            f"meteor-plugin: {what} has no {', '.join(missing)}; this version of the code is not one the "
            "plugin recognises, so it cannot prune it (nothing was patched)"
        )


# Inference ------------------------------------------------------------------------------------------------------
@runtime_checkable
class InferenceTarget(Protocol):
    """What ``enable()`` patches for a family."""

    name: str  # what enable(targets=[...]) takes
    refused: Dict[str, str]  # class name -> why a forward of it raises while enabled

    def is_installed(self) -> bool:
        """Whether the family's upstream code is importable (found without importing it)."""

    def patch(self, registry: Any) -> List[type]:
        """Patch the family's classes in ``registry``; returns the causal classes now pruned."""

    def encoders(self, model: Any) -> Optional[List[Any]]:
        """``model``'s vision encoders as ``stages.vision.EncoderParts``, or None if it is not this family's."""

    def open(self, path: str, config: Dict[str, Any]) -> Optional[tuple]:
        """(processor or tokenizer, model) of a checkpoint folder of this family loaded for inference, or None (a
        family whose checkpoints load through its codebase's loader, ``TrainingSpec.loader``, returns None)."""

    def prompt(self, model: Any, processor: Any, image: Any, question: str, conv_mode: Optional[str] = None) -> dict:
        """The inputs of ``model.generate`` asking ``question`` about a PIL ``image``, as the family's own tools build
        them (``meteor-plugin calibrate --questions``)."""

    def support(self, model: Any) -> Any:
        """What ``model`` runs (``adapters.support.Support``): the stages that prune on it and the methods it
        refuses. Checked before every ``generate`` and ``forward`` of a pruned class (``support.install``)."""


# Training -------------------------------------------------------------------------------------------------------
def resolve(hook: Any) -> Optional[Callable]:
    """A hook given as a callable, or as ``"module:function"`` (imported when first needed), or None."""
    if hook is None or callable(hook):
        return hook
    module, sep, attr = str(hook).partition(":")
    if not sep:
        raise ValueError(f"a hook must be a callable or 'module:function', not {hook!r}")
    return getattr(importlib.import_module(module), attr)


def _no_context(model_config: Dict[str, Any]) -> ContextManager:
    import contextlib

    return contextlib.nullcontext()


@dataclass
class TrainingSpec:
    """What training, conversion, merging and calibration need of the upstream codebase a family trains through.

    LLaVA and EAGLE share the shape of their training script (EAGLE's root ``train.py`` is a renamed copy of
    ``llava/train/train.py``) and of their checkpoints; a spec records the names that differ and the family's own
    steps. Hooks:
    - ``runtime_fixes``: ``fix(train_module)`` applied before ``train()`` runs;
    - ``convert_weights``: ``fn(job)`` rewriting a copied checkpoint's weights in ``meteor-plugin convert``; None
      when the conversion only stores the METEOR config (``weights_required=True`` makes None an error);
    - ``before_training``: ``fn(model, training_args)`` when upstream ``train()`` builds its Trainer (the model
      loaded, LoRA applied, no optimizer yet), with the model unwrapped of DeepSpeed and peft;
    - ``after_load``: what a loaded model still needs before it runs;
    - ``loading``: ``fn(model_config)``, a context around loading a checkpoint of this family with its own or
      upstream's loader (where a converted checkpoint's extra modules must be built);
    - ``fully_trained``: parameter-name fragments LoRA training keeps trainable next to the adapters;
    - ``keep_unquantised``: more module-name fragments 4-bit loading leaves alone.
    A hook may be a ``"module:function"`` string, imported only when it is needed.
    """

    name: str
    keyword: str  # what upstream loaders need in a checkpoint folder's name
    model_module: str
    causal_lm: str
    config_class: str
    model_types: Tuple[str, ...]  # config.json "model_type" values of this codebase's checkpoints
    train_module: str
    trainer_class: str  # the name of the Trainer subclass inside the train module
    model_global: str  # the name train() calls .from_pretrained on
    available: Callable[[], bool]
    runtime_fixes: Tuple[Callable[[Any], None], ...] = ()
    convert_weights: Any = None
    weights_required: bool = False
    weights_missing_reason: str = ""
    before_training: Any = None
    after_load: Callable[[Any], None] = lambda model: None
    loading: Callable[[Dict[str, Any]], ContextManager] = _no_context
    fully_trained: Tuple[str, ...] = ("mm_projector",)
    keep_unquantised: Tuple[str, ...] = ()
    notes: Dict[str, str] = field(default_factory=dict)  # "unavailable": why training cannot run; "install": how
    title: str = ""  # what a message calls it ("LLaVA")
    builder_module: str = ""  # where upstream's load_pretrained_model lives
    utils_module: str = ""  # and get_model_name_from_path
    # training modules `python -m meteor_plugin.run` hands to meteor_plugin.train -> attention they run
    entry_modules: Dict[str, str] = field(default_factory=dict)
    from_checkout: bool = False  # trained from a checkout on the path: chosen before an installed package

    def classes(self) -> Tuple[type, type]:
        """(CausalLM class, config class)."""
        module = importlib.import_module(self.model_module)
        return getattr(module, self.causal_lm), getattr(module, self.config_class)

    def loader(self) -> Tuple[Callable, Callable]:
        """(load_pretrained_model, get_model_name_from_path) from the codebase's own code."""
        builder = importlib.import_module(self.builder_module)
        utils = importlib.import_module(self.utils_module)
        return builder.load_pretrained_model, utils.get_model_name_from_path

    def import_train_module(self):
        return importlib.import_module(self.train_module)

    def hook(self, name: str) -> Optional[Callable]:
        """The hook ``name`` as a callable (imported if given as ``"module:function"``), or None."""
        return resolve(getattr(self, name))


# The patcher ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """One version of a codebase: what the patch file for it is called and how it is recognised."""

    name: str  # e.g. "c121f04"
    title: str  # e.g. "haotian-liu/LLaVA at c121f04"
    patch_file: str
    commit: str = ""  # the upstream commit the patch file is written from (a git checkout), if any
    where: str = "the root of the checkout"  # where a user runs `git apply` with the patch file


@dataclass(frozen=True)
class PatcherSpec:
    """The edits ``meteor-plugin patch`` makes to a checkout of one codebase (``source_edits`` terms)."""

    name: str
    title: str
    package: str  # the top-level package a tree must contain
    files: Tuple[Any, ...]  # source_edits.edits.FileSpec
    layouts: Tuple[Layout, ...]
    # which layout a tree is (informational: the edits are the same for every layout); default: the first
    recognise: Optional[Callable[[str], Optional[Layout]]] = None
    # files besides ``files`` that ``recognise`` reads (the patch-file writer copies them out of upstream)
    landmarks: Tuple[str, ...] = ()

    def spec(self, path: str) -> Any:
        return next(f for f in self.files if f.path == path)


# The record -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    name: str  # what enable(targets=[...]) takes
    target: Any  # InferenceTarget
    training: Optional[TrainingSpec] = None
    patcher: Optional[PatcherSpec] = None

    def is_installed(self) -> bool:
        return self.target.is_installed()

    def patch(self, registry: Any) -> list:
        return self.target.patch(registry)

    @property
    def refused(self) -> Dict[str, str]:
        return dict(getattr(self.target, "refused", {}))


def missing_parts(family: Any) -> List[str]:
    """What a family record lacks of the protocol (empty when complete)."""
    if not isinstance(family, Family):
        return [f"FAMILY is a {type(family).__name__}, not an adapters.family.Family"]
    missing = []
    if not family.name:
        missing.append("a name")
    target = family.target
    for attr in ("name", "refused"):
        if not hasattr(target, attr):
            missing.append(f"target.{attr}")
    for method in ("is_installed", "patch", "encoders", "open", "prompt", "support"):
        if not callable(getattr(target, method, None)):
            missing.append(f"target.{method}()")
    if getattr(target, "name", family.name) != family.name:
        missing.append(f"target.name equal to the family's name {family.name!r}")
    if family.training is not None and not isinstance(family.training, TrainingSpec):
        missing.append("training as an adapters.family.TrainingSpec")
    if family.patcher is not None and not isinstance(family.patcher, PatcherSpec):
        missing.append("patcher as an adapters.family.PatcherSpec")
    if callable(getattr(target, "patch", None)) and len(inspect.signature(target.patch).parameters) != 1:
        missing.append("target.patch(registry)")
    return missing
