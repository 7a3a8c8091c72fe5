"""The upstream codebases training and conversion know, keyed by name: what differs between them.

LLaVA and EAGLE share the shape of their training script (EAGLE's root ``train.py`` is a renamed copy of
``llava/train/train.py``) and of their checkpoints; a ``Codebase`` records the names that differ and the
codebase-specific steps. Everything else (arguments, the Trainer, saving, LoRA, quantisation) is shared.

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
import importlib.util
import os
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
    notes: Dict[str, str] = field(default_factory=dict)

    def classes(self) -> Tuple[type, type]:
        """(CausalLM class, config class)."""
        module = importlib.import_module(self.model_module)
        return getattr(module, self.causal_lm), getattr(module, self.config_class)

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


REGISTRY: Dict[str, Codebase] = {}


def register(codebase: Codebase) -> Codebase:
    """Add or replace a codebase (the EAGLE conversion is registered by the Stage 2 code)."""
    REGISTRY[codebase.name] = codebase
    return codebase


def get(name: str) -> Codebase:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codebase {name!r}: choose from {', '.join(sorted(REGISTRY))}") from None


def for_checkpoint(config: Dict[str, Any], path: str = "") -> Codebase:
    """The codebase a checkpoint's config.json belongs to (by ``model_type``, then ``architectures``)."""
    model_type = config.get("model_type")
    for codebase in REGISTRY.values():
        if model_type in codebase.model_types:
            return codebase
    archs = config.get("architectures") or []
    for codebase in REGISTRY.values():
        if codebase.causal_lm in archs:
            return codebase
    known = ", ".join(f"{c.name} ({'/'.join(c.model_types)})" for c in REGISTRY.values())
    raise ValueError(
        f"{path or 'this checkpoint'} has model_type={model_type!r} and architectures={archs}: not a checkpoint of "
        f"a codebase meteor-plugin knows ({known})"
    )


def for_training(choice: str = "auto") -> Codebase:
    """The codebase whose ``train()`` to wrap: EAGLE when run from an EAGLE checkout, else LLaVA."""
    if choice != "auto":
        codebase = get(choice)
        if not codebase.available():
            raise RuntimeError(f"--meteor-codebase {choice}: {codebase.notes.get('unavailable', 'not installed')}")
        return codebase
    for name in ("eagle", "llava"):
        codebase = REGISTRY.get(name)
        if codebase is not None and codebase.available():
            return codebase
    raise RuntimeError(
        "meteor_plugin.train found no training code: install LLaVA (pip install --no-deps llava-torch==1.2.2.post1) "
        "or run from the root of an EAGLE checkout (where train.py and the eagle package are)"
    )


# LLaVA ---------------------------------------------------------------------------------------------------
def _llava_available() -> bool:
    from ..targets import LLAVA

    return LLAVA.is_installed() and importlib.util.find_spec("llava.train") is not None


def _load_delayed_tower(model: Any) -> None:
    """LLaVA builds its CLIP tower with delay_load: its weights come from ``mm_vision_tower`` on load."""
    get_tower = getattr(model, "get_vision_tower", None)
    tower = get_tower() if get_tower else None
    if tower is not None and not getattr(tower, "is_loaded", True):
        tower.load_model()


LLAVA = register(Codebase(
    name="llava", keyword="llava",
    model_module="llava.model.language_model.llava_llama", causal_lm="LlavaLlamaForCausalLM",
    config_class="LlavaConfig", model_types=("llava_llama", "llava"),
    train_module="llava.train.train", trainer_class="LLaVATrainer", model_global="LlavaLlamaForCausalLM",
    available=_llava_available, after_load=_load_delayed_tower,
    notes={"unavailable": "LLaVA is not installed (pip install --no-deps llava-torch==1.2.2.post1)"},
))


# EAGLE ---------------------------------------------------------------------------------------------------
def eagle_train_script() -> Optional[str]:
    """The path of an importable root ``train.py`` with EAGLE's structure, or None.

    Read as text, not imported (importing it builds nothing but pulls in all of EAGLE). Our own
    ``meteor_plugin/train.py`` never counts, in case it was run as a script from its folder.
    """
    spec = importlib.util.find_spec("train") if importlib.util.find_spec("eagle") is not None else None
    origin = getattr(spec, "origin", None)
    if not origin or not os.path.isfile(origin):
        return None
    if os.path.dirname(os.path.abspath(origin)) == os.path.dirname(os.path.dirname(os.path.abspath(__file__))):
        return None
    with open(origin, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    needed = ("def train(", "EagleTrainer", "class ModelArguments", "safe_save_model_for_hf_trainer")
    return origin if all(n in text for n in needed) else None


def _eagle_available() -> bool:
    from ..targets import EAGLE as EAGLE_TARGET

    return EAGLE_TARGET.is_installed() and eagle_train_script() is not None


def _eagle_fixes():
    from .eagle import alias_eagle_config

    return (alias_eagle_config,)


EAGLE = register(Codebase(
    name="eagle", keyword="eagle",
    model_module="eagle.model.language_model.eagle_llama", causal_lm="EagleLlamaForCausalLM",
    config_class="EagleConfig", model_types=("eagle_llama",),
    train_module="train", trainer_class="EagleTrainer", model_global="EagleLlamaForCausalLM",
    available=_eagle_available, runtime_fixes=_eagle_fixes(),
    # Stage 2's per-encoder projectors (eagle_projectors.py): added by convert, or split before training.
    convert_weights="meteor_plugin.training.eagle_projectors:convert_weights",
    weights_required=True,
    weights_missing_reason="converting an EAGLE checkpoint needs the per-encoder projectors of METEOR's Stage 2",
    before_training="meteor_plugin.training.eagle_projectors:before_training",
    # EAGLE trains every encoder (freeze_vision=False) and the projector: so do its LoRA runs, beside the adapters.
    fully_trained=("mm_projector", "vision_tower"),
    # transformers 4.44 skips a module only if "<name>." is in its path: "mm_projector" misses mm_projectors.N.
    keep_unquantised=("mm_projectors",),
    notes={"unavailable": "run from the root of an EAGLE checkout: its train.py and eagle/ must be importable"},
))
