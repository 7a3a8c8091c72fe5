"""What training and conversion need to know about an upstream codebase, and how one is found.

LLaVA and EAGLE share the shape of their training script (EAGLE's root ``train.py`` is a renamed copy of
``llava/train/train.py``) and of their checkpoints; a ``Codebase`` records the names that differ and the
codebase-specific steps. Everything else (arguments, the Trainer, saving, LoRA, quantisation) is shared.
Each family's ``Codebase`` is declared in its adapter module (``adapters/llava.py``, ``adapters/eagle.py``)
beside what inference and the patcher know of it; ``REGISTRY`` is read from there.

Hooks a codebase fills in:
- ``runtime_fixes``: functions ``fix(train_module)`` applied before ``train()`` runs (EAGLE: the
  ``eagleConfig`` alias its LoRA loader imports);
- ``convert_weights``: ``fn(job)`` that rewrites a copied checkpoint's weights during ``meteor-plugin
  convert`` (EAGLE: per-encoder projectors); ``None`` means the conversion only stores the METEOR config,
  which is all LLaVA needs. ``weights_required=True`` makes a missing ``convert_weights`` an error.
  A ``"module:function"`` string is imported when a conversion needs it (no import cost otherwise);
- ``before_training``: ``fn(model, training_args)`` run when upstream ``train()`` builds its Trainer (the
  model is loaded, LoRA applied, the optimizer not yet built): where modules a checkpoint lacks are made
  and set trainable. Same string form;
- ``after_load``: what a loaded model still needs before it runs (LLaVA: load the delayed CLIP tower);
- ``fully_trained``: name fragments of parameters LoRA training must keep trainable next to the adapters;
- ``keep_unquantised``: more module-name fragments 4-bit loading must leave alone (``quant.skip_modules``;
  vision towers, ``*mm_projector*`` and ``lm_head`` always are, but transformers 4.44 only recognises a
  fragment followed by a dot: a projector called ``mm_projector_clip`` must be listed here).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple


@dataclass
class Codebase:
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
    convert_weights: Any = None  # callable(job), "module:function" or None
    weights_required: bool = False
    weights_missing_reason: str = ""
    before_training: Any = None  # callable(model, training_args), "module:function" or None
    after_load: Callable[[Any], None] = lambda model: None
    fully_trained: Tuple[str, ...] = ("mm_projector",)
    keep_unquantised: Tuple[str, ...] = ()
    notes: Dict[str, str] = field(default_factory=dict)  # "unavailable": why training cannot run; "install": how
    title: str = ""  # what a message calls it ("LLaVA")
    # where upstream's checkpoint loader lives (load_pretrained_model; get_model_name_from_path)
    builder_module: str = ""
    utils_module: str = ""
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


def resolve(hook: Any) -> Optional[Callable]:
    if hook is None or callable(hook):
        return hook
    module, sep, attr = str(hook).partition(":")
    if not sep:
        raise ValueError(f"a hook must be a callable or 'module:function', not {hook!r}")
    return getattr(importlib.import_module(module), attr)


def known() -> Dict[str, Codebase]:
    """Every family's training codebase by name (read from ``adapters``, which imports this module)."""
    from ..adapters import FAMILIES

    return {f.training.name: f.training for f in FAMILIES if f.training is not None}


def get(name: str) -> Codebase:
    try:
        return known()[name]
    except KeyError:
        raise ValueError(f"unknown codebase {name!r}: choose from {', '.join(sorted(known()))}") from None


def for_checkpoint(config: Dict[str, Any], path: str = "") -> Codebase:
    """The codebase a checkpoint's config.json belongs to (by ``model_type``, then ``architectures``)."""
    model_type = config.get("model_type")
    codebases = list(known().values())
    for codebase in codebases:
        if model_type in codebase.model_types:
            return codebase
    archs = config.get("architectures") or []
    for codebase in codebases:
        if codebase.causal_lm in archs:
            return codebase
    names = ", ".join(f"{c.name} ({'/'.join(c.model_types)})" for c in codebases)
    raise ValueError(
        f"{path or 'this checkpoint'} has model_type={model_type!r} and architectures={archs}: not a checkpoint of "
        f"a codebase meteor-plugin knows ({names})"
    )


def for_training(choice: str = "auto") -> Codebase:
    """The codebase whose ``train()`` to wrap: one trained from a checkout on the path (EAGLE) before an
    installed package (LLaVA)."""
    if choice != "auto":
        codebase = get(choice)
        if not codebase.available():
            raise RuntimeError(f"--meteor-codebase {choice}: {codebase.notes.get('unavailable', 'not installed')}")
        return codebase
    for codebase in sorted(known().values(), key=lambda c: not c.from_checkout):
        if codebase.available():
            return codebase
    raise RuntimeError(
        "meteor_plugin.train found no training code: install LLaVA (pip install --no-deps llava-torch==1.2.2.post1) "
        "or run from the root of an EAGLE checkout (where train.py and the eagle package are)"
    )
