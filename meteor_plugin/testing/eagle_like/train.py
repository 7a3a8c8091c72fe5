"""EAGLE's root ``train.py`` (NVlabs/EAGLE at fef95f1), for the stand-in: what ``python -m meteor_plugin.train``
drives when the stand-in plays the EAGLE checkout (``install()`` puts this folder on ``sys.path``, so this
file is the importable ``train`` module next to the ``eagle`` package, as at the root of an EAGLE checkout).

EAGLE's ``train.py`` is a renamed copy of LLaVA's ``llava/train/train.py``. Instead of restating it, this
module is assembled at import time from the installed ``llava.train.train``:

- every function LLaVA's module defines is rebound to this module's globals
  (``types.FunctionType(code, globals())``), with two global names renamed in its code objects:
  ``LlavaLlamaForCausalLM`` -> ``EagleLlamaForCausalLM`` and ``LLaVATrainer`` -> ``EagleTrainer``. So
  ``train()`` builds EAGLE's model, tokenises with ``eagle.mm_utils`` and ``eagle.conversation``, and looks
  ``EagleLlamaForCausalLM``, ``EagleTrainer``, ``ModelArguments``, ``find_all_linear_names`` and
  ``safe_save_model_for_hf_trainer`` up in this module when it runs, which is where ``meteor_plugin.train``
  replaces them (``meteor_plugin/training/hooks.py``), exactly as in EAGLE's file;
- the imports LLaVA's module made from outside the ``llava`` package (torch, transformers, PIL, ...) are
  taken over; nothing from ``llava.model`` is, so no LLaVA class can be used by mistake;
- the argument dataclasses are small subclasses of LLaVA's: ``ModelArguments`` and ``DataArguments`` keep
  LLaVA's fields (EAGLE's are the same), ``TrainingArguments`` adds EAGLE's ``vision_tower_lr`` and
  ``vision_tower_layer_decay``; the dataset and collator are copies of LLaVA's classes (same bases) whose
  methods are rebound too.

What EAGLE does differently, and how it is reproduced here:
- ``preprocess_multimodal`` puts ``<image>`` in front of a first turn that lacks it (a wrapper around
  LLaVA's);
- ``EagleTrainer`` gives the parameters whose name contains ``vision_tower`` their own learning rate with
  ``--vision_tower_lr``, unless ``--mm_projector_lr`` is set (then LLaVA's projector groups win, as in
  EAGLE); ``--vision_tower_layer_decay`` asks the fusion tower for ``get_layer_decay_parameter_group``,
  which EAGLE's tower does not have (AttributeError, as in EAGLE);
- ``train()`` ends with ``safe_save_model_for_hf_trainer`` whatever ``--lora_enable`` says (EAGLE's LoRA save
  is commented out), so a LoRA run keeps only the adapter and loses the projectors and towers. LLaVA's
  ``train()``, which runs here, picks its final save by ``training_args.lora_enable`` right after
  ``trainer.save_state()``; ``EagleTrainer.save_state`` clears that flag once training is over, so the
  LLaVA code takes the path EAGLE always takes;
- there is no MPT model: ``LlavaMptForCausalLM`` is not defined here.
Not reproduced: the ``<pad>`` token EAGLE adds when a tokenizer has neither pad nor unk token (the tiny
tokenizers have ``<unk>``), the ``align_stages`` parameters it re-enables (no such modules), the black
image that stands in for an unreadable file, and ``train_mem.py``.

Importing this module imports LLaVA's ``llava.train.train``; on transformers 5.x that needs
``meteor_plugin.compat.training.make_trainer_importable()`` first (``meteor_plugin.train`` does it; EAGLE's
own ``eagle_trainer.py`` fails on 5.x in the same place).
"""

import os
import types
from dataclasses import dataclass, field
from typing import Optional

import llava.train.train as _llava
import transformers
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

# Names train() and its helpers find in their module, taken over from LLaVA's where they come from
# outside the llava package (os, torch, transformers, PIL's Image, typing names, local_rank, ...).
for _name, _value in vars(_llava).items():
    _origin = getattr(_value, "__module__", None) or getattr(_value, "__name__", "")
    if not _name.startswith("__") and not (isinstance(_origin, str) and _origin.split(".")[0] == "llava"):
        globals()[_name] = _value
del _name, _value, _origin

from eagle import conversation as conversation_lib  # noqa: E402,F401 (a module global of EAGLE's train.py)
from eagle.constants import (  # noqa: E402,F401
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from eagle.mm_utils import tokenizer_image_token  # noqa: E402,F401
from eagle.model import EagleConfig, EagleLlamaForCausalLM  # noqa: E402,F401

RENAMED = {"LlavaLlamaForCausalLM": "EagleLlamaForCausalLM", "LLaVATrainer": "EagleTrainer"}


def _renamed(code: types.CodeType) -> types.CodeType:
    consts = tuple(_renamed(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_names=tuple(RENAMED.get(n, n) for n in code.co_names), co_consts=consts)


def _rebound(fn: types.FunctionType) -> types.FunctionType:
    """LLaVA's function ``fn``, looking its global names up in this module."""
    new = types.FunctionType(_renamed(fn.__code__), globals(), fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    new.__module__ = __name__
    return new


def _written_in_llava_train(fn) -> bool:
    """Defined in LLaVA's train.py (not generated by ``dataclass``, not imported from elsewhere)."""
    return isinstance(fn, types.FunctionType) and _same_file(fn.__code__.co_filename, _llava.__file__)


def _same_file(a: str, b: str) -> bool:
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _copied_class(cls: type) -> type:
    """A copy of LLaVA's class ``cls`` (same bases) whose methods and property getters run on this module's
    names. Not a subclass: its methods call ``super(ClassName, self)``, which must find this copy."""
    namespace = {name: value for name, value in vars(cls).items() if name not in ("__dict__", "__weakref__")}
    for name, value in namespace.items():
        if _written_in_llava_train(value):
            namespace[name] = _rebound(value)
        elif isinstance(value, property) and _written_in_llava_train(value.fget):
            namespace[name] = property(_rebound(value.fget))
    namespace["__module__"] = __name__
    return type(cls.__name__, cls.__bases__, namespace)


_LLAVA_FUNCTIONS = {name: value for name, value in vars(_llava).items() if _written_in_llava_train(value)}
globals().update({name: _rebound(fn) for name, fn in _LLAVA_FUNCTIONS.items()})
_llava_preprocess_multimodal = _rebound(_LLAVA_FUNCTIONS["preprocess_multimodal"])
_llava_train = _rebound(_LLAVA_FUNCTIONS["train"])


@dataclass
class ModelArguments(_llava.ModelArguments):
    """EAGLE's model arguments: LLaVA's fields."""


@dataclass
class DataArguments(_llava.DataArguments):
    """EAGLE's data arguments: LLaVA's fields."""


@dataclass
class TrainingArguments(_llava.TrainingArguments):
    """LLaVA's training arguments and EAGLE's two learning-rate options for the vision towers."""

    vision_tower_layer_decay: Optional[float] = field(default=None)
    vision_tower_lr: Optional[float] = field(default=None)


LazySupervisedDataset = _copied_class(_llava.LazySupervisedDataset)
DataCollatorForSupervisedDataset = _copied_class(_llava.DataCollatorForSupervisedDataset)


def preprocess_multimodal(sources, data_args):
    """EAGLE's: a first turn without ``<image>`` gets it in front, then LLaVA's processing."""
    if data_args.is_multimodal and DEFAULT_IMAGE_TOKEN not in sources[0][0]["value"]:
        sources[0][0]["value"] = DEFAULT_IMAGE_TOKEN + "\n" + sources[0][0]["value"]
    return _llava_preprocess_multimodal(sources, data_args)


class EagleTrainer(_llava.LLaVATrainer):
    """EAGLE's trainer: LLaVA's, plus the vision towers' learning rate (see the module docstring)."""

    def create_optimizer(self):
        args = self.args
        tower_options = getattr(args, "vision_tower_lr", None) or getattr(args, "vision_tower_layer_decay", None)
        if self.optimizer is not None or args.mm_projector_lr is not None or not tower_options:
            return super().create_optimizer()  # EAGLE's other two cases are LLaVA's code
        model = self.model
        if not args.vision_tower_lr:
            # EAGLE's layer-decay path: its fusion tower has no such method, so this raises AttributeError.
            model.model.vision_tower.get_layer_decay_parameter_group(
                args.learning_rate, args.vision_tower_layer_decay, weight_decay=args.weight_decay)
        decayed = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
        groups = []
        for in_tower in (False, True):
            for decay in (True, False):
                group = {"params": [p for n, p in model.named_parameters()
                                    if p.requires_grad and ("vision_tower" in n) == in_tower and (n in decayed) == decay],
                         "weight_decay": args.weight_decay if decay else 0.0}
                if in_tower:
                    group["lr"] = args.vision_tower_lr
                groups.append(group)
        optimizer_cls, optimizer_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def save_state(self):
        super().save_state()
        # EAGLE's train() saves through safe_save_model_for_hf_trainer next, LoRA or not; LLaVA's (running
        # here) reads this flag to choose its own LoRA save instead.
        self.args.lora_enable = False


def train(attn_implementation=None):
    """EAGLE's ``train()``: LLaVA's, running on this module's names (see the module docstring)."""
    return _llava_train(attn_implementation)


# What meteor_plugin.train (and EAGLE's own train_mem.py) use from this module: fail here, not mid-run.
EAGLE_NAMES = ("ModelArguments", "DataArguments", "TrainingArguments", "EagleTrainer", "EagleLlamaForCausalLM",
               "find_all_linear_names", "safe_save_model_for_hf_trainer", "make_supervised_data_module", "train")
_missing = [n for n in EAGLE_NAMES if n not in globals()]
if _missing:
    raise ImportError(f"the EAGLE stand-in's train.py could not assemble {_missing} from llava.train.train")

if __name__ == "__main__":
    train()
