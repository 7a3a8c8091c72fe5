"""transformers' own LLaVA, LLaVA-NeXT and LLaVA-OneVision (the llava-hf checkpoints).

    common.py  what both transformers generations share: Stage 1 in the tower, crops, the layout, refusals
    v5.py      transformers 5.x: the model takes the features the adapter encoded (``mm_encoder_outputs``)
    v4.py      transformers 4.x (4.37, 4.44): the model splices images itself, so the adapter splices them
Inference only: training goes through the llava package's classes, and there is no checkout to patch.
"""

from __future__ import annotations

import importlib.util
from typing import Any, List, Optional

from ...compat import transformers as compat
from ...stages.vision import EncoderParts
from ..family import Family
from ..shared.transformers_vlm import chat_inputs, open_checkpoint
from ..support import ONE_ENCODER, Support
from . import v4, v5


class TransformersLlavaTarget:
    """What ``enable()`` patches here: ``v5``'s wrappers on transformers 5.x, ``v4``'s on 4.x."""

    name = "transformers-llava"

    def __init__(self) -> None:
        self.refused = {}
        if compat.generation() != "5":  # class name -> why it is not pruned
            self.refused["LlavaOnevisionForConditionalGeneration"] = (
                "transformers' LLaVA-OneVision is pruned on transformers 5.x only (4.x splices images inside the "
                "model)")

    def is_installed(self) -> bool:
        return importlib.util.find_spec(v5.CLASSES[0].module) is not None

    def patch(self, registry: Any) -> List[type]:
        return v5.patch(registry) if compat.generation() == "5" else v4.patch(registry)

    def support(self, model: Any) -> Support:
        """One vision tower: Stage 1 inside it (CLIP or SigLIP), Stage 3, and every baseline but drop_encoder."""
        return Support(type(model).__name__, frozenset({"encoder", "llm"}), {"drop_encoder": ONE_ENCODER},
                       {"fusion": "has nothing to fuse: it has one vision tower"})

    def encoders(self, model: Any) -> Optional[List[EncoderParts]]:
        """The vision tower as calibration measures it (one encoder: its selected layer's patch tokens)."""
        if type(model).__name__ not in {c.causal for c in v5.CLASSES} or not hasattr(model, "vision_tower"):
            return None
        layer = int(model.config.vision_feature_layer)
        kind = str(getattr(model.config.vision_config, "model_type", "vision")).replace("_vision_model", "")

        def run(images):
            return model.vision_tower(images, output_hidden_states=True).hidden_states[layer]

        return [EncoderParts(kind, run)]

    def open(self, path: str, config: dict) -> Optional[tuple]:
        """(processor, model) of one of its checkpoints (a llava-hf folder), or None."""
        return open_checkpoint(path, config, [c.causal for c in v5.CLASSES])

    def prompt(self, model: Any, processor: Any, image: Any, question: str, conv_mode: Optional[str] = None) -> dict:
        """``question`` about ``image`` through the checkpoint's processor and chat template (``conv_mode``: unused;
        the chat template is the checkpoint's)."""
        return chat_inputs(model, processor, image, question)


TARGET = TransformersLlavaTarget()
FAMILY = Family(name=TARGET.name, target=TARGET)
