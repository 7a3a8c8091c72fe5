"""QLoRA: 4-bit (or 8-bit) language model, everything visual kept in full precision.

Upstream ``train()`` builds ``from_pretrained(..., load_in_4bit=..., load_in_8bit=..., quantization_config=
BitsAndBytesConfig(..., llm_int8_skip_modules=["mm_projector"]))``. Two things go wrong:

- transformers 4.44 (EAGLE's pin) and 5.x refuse ``load_in_4bit``/``load_in_8bit`` next to a
  ``quantization_config`` (ValueError), so ``--bits 4`` does not run at all; the config already carries
  them, so they are dropped here;
- which modules ``llm_int8_skip_modules`` protects depends on the version: 4.37 looks for the name
  anywhere in the module path, 4.44 for ``name + "."`` in it, 5.x matches a regex from the start of the
  path (or a suffix), so ``"mm_projector"`` no longer protects ``model.mm_projector.0`` there. Passing a list replaces the
  default that keeps ``lm_head`` too. ``skip_modules`` gives patterns for both readings that keep every
  vision tower, resampler, ``*mm_projector*`` module and ``lm_head`` unquantised (EAGLE builds its towers
  inside ``from_pretrained``, so they would be quantised otherwise).

bitsandbytes quantises on CPU only with transformers >= 4.45 or so (4.37: "No GPU found. A GPU is needed
for quantization"); on a GPU every version works.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List

import torch

from .lora import VISUAL_MODULES

KEEP_UNQUANTISED = VISUAL_MODULES


def skip_modules(extra: Iterable[str] = ()) -> List[str]:
    """``llm_int8_skip_modules`` that work under the 4.x and the 5.x matching rules at once.

    Each keyword appears twice: as itself (4.x: found inside the path, 4.44 followed by a dot) and as a
    regex ``.*keyword[^.]*`` (5.x: matched from the start up to a module boundary). Under the other
    generations' rules each form matches nothing it should not.
    """
    words = list(KEEP_UNQUANTISED) + [w for w in extra if w not in KEEP_UNQUANTISED]
    return words + [rf".*{w}[^.]*" for w in words] + ["lm_head"]


def fix_from_pretrained_kwargs(kwargs: Dict[str, Any], extra_skip: Iterable[str] = ()) -> Dict[str, Any]:
    """The ``from_pretrained`` kwargs of upstream's ``--bits`` path, made valid on every version."""
    config = kwargs.get("quantization_config")
    if config is None:
        return kwargs
    kwargs = dict(kwargs)
    for key in ("load_in_4bit", "load_in_8bit"):
        value = kwargs.pop(key, None)
        if value and not getattr(config, key, False):
            raise ValueError(f"{key}=True was passed but the quantization_config does not set it")
    config.llm_int8_skip_modules = skip_modules(extra_skip)
    return kwargs


def quantized_modules(model: torch.nn.Module) -> List[str]:
    """Names of the bitsandbytes-quantised linear layers (found by class, without importing bitsandbytes).

    peft's LoRA wrappers of such layers share their class names; they hold the real one as ``base_layer``
    and are reported under their own name, once."""
    names = []
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt") and not hasattr(module, "base_layer"):
            names.append(name[: -len(".base_layer")] if name.endswith(".base_layer") else name)
    return names


def check_quantization(model: torch.nn.Module) -> List[str]:
    """Raise if a vision tower, projector or ``lm_head`` was quantised; returns the quantised modules."""
    quantized = quantized_modules(model)
    wrong = [n for n in quantized if any(w in n for w in KEEP_UNQUANTISED) or n.split(".")[-1] == "lm_head"]
    if wrong:
        raise RuntimeError(
            f"{len(wrong)} module(s) that must stay in full precision were quantised, e.g. {wrong[:3]}; "
            "pass llm_int8_skip_modules=meteor_plugin.training.quant.skip_modules()"
        )
    return quantized
