"""LoRA for METEOR models: adapters on the language model only, everything else trained is saved beside.

Where adapters go. Upstream's ``find_all_linear_names`` returns *leaf* names ({q,k,v,o,gate,up,down}_proj),
which peft matches as suffixes anywhere in the model: a CLIP, EVA or SAM tower built before
``get_peft_model`` (EAGLE builds its towers in ``__init__``) gets adapters on its own ``q_proj``/``k_proj``/
``v_proj`` too. ``target_regex`` instead returns one regular expression over full module names, the
decoder layers' linear layers and nothing else; a string ``target_modules`` is matched with
``re.fullmatch`` by every peft version we support (0.13 to 0.21), unlike ``exclude_modules`` (0.14+).
Modules under a vision tower, a resampler or anything named ``*mm_projector*`` are never targeted.

What is saved. peft's ``save_pretrained`` keeps only ``lora_`` weights. The projectors (and any other
weight that was trained fully) go to ``non_lora_trainables.bin``, with the names LLaVA's loader expects
(``base_model.model.`` prefix); ZeRO-3 partitions are gathered first.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterable, List, Optional

import torch

from ..distributed import gathered_cpu

# The vision side of a LLaVA/EAGLE model, by module name: never adapted by LoRA, never quantised (quant.py).
VISUAL_MODULES = ("mm_projector", "vision_tower", "vision_resampler")
NON_LORA_FILE = "non_lora_trainables.bin"
_LAYER = re.compile(r"^(?P<prefix>(?:.+\.)?layers)\.(?P<index>\d+)\.(?P<suffix>.+)$")


class LoraPlacementError(ValueError):
    """Adapters were found (or would be put) where they must never be."""


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear)  # bitsandbytes' Linear4bit/Linear8bitLt subclass it


def language_model_linears(model: torch.nn.Module) -> List[str]:
    """Full names of the linear layers inside the language model's decoder layers."""
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module) or any(word in name for word in VISUAL_MODULES):
            continue
        if _LAYER.match(name):
            names.append(name)
    return names


def target_regex(model: torch.nn.Module) -> str:
    """A ``target_modules`` regex matching exactly ``language_model_linears(model)``."""
    prefixes, suffixes = set(), set()
    for name in language_model_linears(model):
        m = _LAYER.match(name)
        prefixes.add(m.group("prefix"))
        suffixes.add(m.group("suffix"))
    if not prefixes:
        raise LoraPlacementError(
            f"{type(model).__name__} has no linear layer inside numbered decoder layers (``...layers.N...``): "
            "meteor-plugin cannot tell where the language model is, so it will not place LoRA adapters"
        )
    alt = lambda items: "|".join(re.escape(x) for x in sorted(items))  # noqa: E731
    regex = rf"(?:{alt(prefixes)})\.\d+\.(?:{alt(suffixes)})"
    # The regex must not reach further than the list it was built from (prefix x suffix products could).
    wanted = set(language_model_linears(model))
    extra = [n for n, m in model.named_modules() if re.fullmatch(regex, n) and n not in wanted]
    if extra:
        raise LoraPlacementError(f"the LoRA target pattern would also match {extra[:5]}")
    return regex


def adapted_modules(model: torch.nn.Module) -> List[str]:
    """Names (as in ``model``) of the modules that carry LoRA adapters."""
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A) > 0]


def check_placement(model: torch.nn.Module) -> List[str]:
    """Raise if an adapter sits in a vision tower, resampler or projector; returns the adapted modules."""
    adapted = adapted_modules(model)
    wrong = [name for name in adapted if any(word in name for word in VISUAL_MODULES)]
    if wrong:
        raise LoraPlacementError(
            f"LoRA adapters were placed in {len(wrong)} vision/projector module(s), e.g. {wrong[:3]}: these are "
            "trained fully or frozen, never adapted. Use meteor_plugin.training.lora.target_regex(model) as "
            "target_modules"
        )
    return adapted


def train_fully(model: torch.nn.Module, keywords: Iterable[str] = ("mm_projector",)) -> List[str]:
    """Make every parameter whose name contains a keyword trainable (peft froze it); returns their names."""
    names = []
    for name, param in model.named_parameters():
        if "lora_" not in name and any(word in name for word in keywords):
            if param.is_floating_point():
                param.requires_grad_(True)
                names.append(name)
    return names


def lora_state(model: torch.nn.Module, bias: str = "none") -> Dict[str, torch.Tensor]:
    """Adapter weights (gathered), chosen the way peft and LLaVA choose them for ``lora_bias``."""
    named = list(model.named_parameters())
    if bias == "none":
        chosen = [(k, p) for k, p in named if "lora_" in k]
    elif bias == "all":
        chosen = [(k, p) for k, p in named if "lora_" in k or "bias" in k]
    elif bias == "lora_only":
        adapted = {k.split("lora_")[0] for k, _ in named if "lora_" in k}
        chosen = [(k, p) for k, p in named if "lora_" in k or (k.endswith("bias") and k[: -len("bias")] in adapted)]
    else:
        raise ValueError(f"lora_bias={bias!r} is invalid: allowed 'none', 'all' or 'lora_only'")
    return gathered_cpu(chosen)


def non_lora_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every trainable weight that is not an adapter (projectors, trained towers, plugin modules), gathered."""
    return gathered_cpu((k, p) for k, p in model.named_parameters() if "lora_" not in k and p.requires_grad)


def save_adapter(model: Any, output_dir: str, bias: str, is_main: bool) -> None:
    """LLaVA's LoRA layout: ``config.json``, the adapter, and ``non_lora_trainables.bin``.

    Every rank must call this (ZeRO-3 gathers are collective); only the main process writes.
    """
    adapter = lora_state(model, bias)
    others = non_lora_state(model)
    if not adapter:
        raise LoraPlacementError("the model has no LoRA weights to save: was get_peft_model applied?")
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        model.config.save_pretrained(output_dir)
        model.save_pretrained(output_dir, state_dict=adapter)
        torch.save(others, os.path.join(output_dir, NON_LORA_FILE))


def strip_peft_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``base_model.model.X`` -> ``X``: names of the bare model (as LLaVA's loader strips them)."""
    out = {}
    for key, value in state.items():
        if key.startswith("base_model.model."):
            key = key[len("base_model.model."):]
        elif key.startswith("base_model."):
            key = key[len("base_model."):]
        out[key] = value
    return out


def read_non_lora(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a ``non_lora_trainables.bin``; an empty or corrupt file is refused by name."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty: the save that wrote it did not finish; save the run's weights again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise ValueError(f"{path} cannot be read as saved PyTorch tensors: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a mapping of weight names to tensors")
    return state


def load_non_lora(model: torch.nn.Module, lora_dir: str) -> List[str]:
    """Load ``non_lora_trainables.bin`` into the bare model; every key must land (returns them)."""
    path = os.path.join(lora_dir, NON_LORA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{lora_dir} has no {NON_LORA_FILE}: the projectors and other fully trained weights of this LoRA run "
            "were not saved (EAGLE's own train.py drops them; train through python -m meteor_plugin.train)"
        )
    state = strip_peft_prefix(read_non_lora(path))
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise KeyError(f"{NON_LORA_FILE} holds weights the model does not have: {unknown[:5]}")
    wrong = sorted(k for k, v in state.items() if tuple(own[k].shape) != tuple(v.shape))
    if wrong:
        raise ValueError(f"{NON_LORA_FILE} weights have other shapes than the model's: {wrong[:5]}")
    model.load_state_dict(state, strict=False)
    return sorted(state)


def attach_adapter(model: torch.nn.Module, lora_dir: str) -> Any:
    """The bare model (non-LoRA weights already loaded) wrapped with the saved adapter, unmerged."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, lora_dir)


def merged(peft_model: Any) -> torch.nn.Module:
    model = peft_model.merge_and_unload()
    leftovers = adapted_modules(model)
    if leftovers:
        raise RuntimeError(f"merge_and_unload left adapters in {leftovers[:3]}")
    return model


def adapter_base(lora_dir: str) -> Optional[str]:
    """The base model the adapter was trained on, as peft recorded it."""
    from ..checkpoint_files import read_json_object

    path = os.path.join(lora_dir, "adapter_config.json")
    if not os.path.isfile(path):
        return None
    return read_json_object(path, "peft's adapter config object").get("base_model_name_or_path")
