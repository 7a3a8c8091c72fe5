"""What training, conversion, merging and calibration need of the llava package (``TRAINING``): its train
module and Trainer, its checkpoint types and loader, and the delayed CLIP load."""

from __future__ import annotations

import importlib.util
from typing import Any

from ..family import TrainingSpec
from .inference import CAUSAL, MODEL_MODULE, TARGET


def _trainable() -> bool:
    return TARGET.is_installed() and importlib.util.find_spec("llava.train") is not None


def _load_delayed_tower(model: Any) -> None:
    """LLaVA builds its CLIP tower with delay_load: its weights come from ``mm_vision_tower`` on load."""
    get_tower = getattr(model, "get_vision_tower", None)
    tower = get_tower() if get_tower else None
    if tower is not None and not getattr(tower, "is_loaded", True):
        tower.load_model()


TRAINING = TrainingSpec(
    name="llava", keyword="llava",
    model_module=MODEL_MODULE, causal_lm=CAUSAL,
    config_class="LlavaConfig", model_types=("llava_llama", "llava"),
    train_module="llava.train.train", trainer_class="LLaVATrainer", model_global=CAUSAL,
    available=_trainable, after_load=_load_delayed_tower,
    builder_module="llava.model.builder", utils_module="llava.mm_utils",
    # train_mem is upstream's FlashAttention-2 entry
    entry_modules={"llava.train.train_mem": "flash_attention_2", "llava.train.train": "sdpa",
                   "llava.train.train_xformers": "sdpa"},
    title="LLaVA",
    notes={"unavailable": "LLaVA is not installed (pip install --no-deps llava-torch==1.2.2.post1)",
           "install": "pip install --no-deps llava-torch"},
)
