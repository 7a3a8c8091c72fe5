"""Run-time fixes for EAGLE's training and LoRA loading (NVlabs/EAGLE at fef95f1), applied without
editing the checkout. The patched trees of ``patches/`` carry the first two as source edits too; every
fix here is idempotent with them.

1. ``eagle/model/builder.py``'s LoRA branch does ``from eagle.model.language_model.eagle_llama import
   eagleConfig``; the class is ``EagleConfig`` (ImportError): ``alias_eagle_config`` adds the alias.
2. ``train.py --bits 4/8`` passes ``load_in_4bit``/``load_in_8bit`` beside a ``quantization_config``, which
   transformers 4.44 (EAGLE's pin) refuses: ``hooks.fix_quantized_loading`` (shared with LLaVA, which
   meets the same on transformers 5) cleans the kwargs and sets the modules kept unquantised.
3. ``train.py`` has its LoRA save commented out and always calls ``safe_save_model_for_hf_trainer``, which
   for a ``PeftModel`` keeps only the adapter: the projectors and trained towers are lost.
   ``hooks.replace_final_save`` (shared) writes the adapter and ``non_lora_trainables.bin`` as LLaVA does.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

from ..registry import REGISTRY

EAGLE_LLAMA = "eagle.model.language_model.eagle_llama"


def alias_eagle_config(train_module: Any = None, llama_module: Optional[Any] = None) -> bool:
    """Give ``eagle_llama`` the ``eagleConfig`` name its LoRA loader imports; True if it was missing.

    ``train_module`` is unused (the signature of a codebase runtime fix); ``llama_module`` defaults to
    the installed ``eagle.model.language_model.eagle_llama``. Recorded in the patch registry, so
    ``meteor_plugin.disable()`` removes it again.
    """
    module = llama_module if llama_module is not None else importlib.import_module(EAGLE_LLAMA)
    if not hasattr(module, "EagleConfig"):
        raise AttributeError(f"{module.__name__} has no EagleConfig: not EAGLE's eagle_llama.py")
    if hasattr(module, "eagleConfig"):
        return False
    REGISTRY.patch(module, "eagleConfig", module.EagleConfig)
    return True
