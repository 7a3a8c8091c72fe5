"""Which Qwen-VL classes ``enable()`` patches, and from which transformers on.

The three classes exist from transformers 4.45 (Qwen2-VL), 4.49 (Qwen2.5-VL) and 4.57 (Qwen3-VL); the plugin
prunes them on transformers 5.x, where the inner model takes ready-made image features (``mm_encoder_outputs``)
and the processor's ``mm_token_type_ids`` (tested: 5.23.0). The stacks of 4.x the plugin supports (4.37.2,
4.44.2) have none of them: nothing is patched there and ``enable()`` says nothing. A 5.x whose classes lack what
the adapter needs leaves them unpatched, and a forward of one while enabled is refused with the reason
(``refused``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ...compat import transformers as compat
from ..family import require
from ...stages.vision import EncoderParts
from ..shared.transformers_vlm import chat_inputs, open_checkpoint, wrap_causal_forward
from ..support import ONE_ENCODER, Support
from .inference import wrap_generate, wrap_inner_forward


@dataclass(frozen=True)
class QwenClasses:
    module: str
    causal: str
    inner: str
    since: str  # the transformers release that added the class


CLASSES = (
    QwenClasses("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLModel",
                "4.45"),
    QwenClasses("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                "Qwen2_5_VLModel", "4.49"),
    QwenClasses("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLModel",
                "4.57"),
)


def _present(classes: QwenClasses) -> bool:
    try:
        return importlib.util.find_spec(classes.module) is not None
    except ModuleNotFoundError:
        return False


def missing(inner: type) -> Optional[str]:
    """What the adapter needs that this inner model class lacks, or None."""
    if compat.generation() != "5":
        return "it is pruned on transformers 5.x only"
    if "mm_encoder_outputs" not in inspect.signature(inner.forward).parameters:
        return "this transformers' forward takes no ready-made image features (mm_encoder_outputs)"
    rope = getattr(inner, "get_rope_index", None)
    if rope is None or "mm_token_type_ids" not in inspect.signature(rope).parameters:
        return "this transformers' get_rope_index takes no mm_token_type_ids"
    return None


class QwenVLTarget:
    """What ``enable()`` patches here (the interface of ``llava_arch.ArchTarget``)."""

    name = "transformers-qwen-vl"

    def __init__(self) -> None:
        self._refused: Dict[str, str] = {}

    @property
    def refused(self) -> Dict[str, str]:
        return dict(self._refused)

    def is_installed(self) -> bool:
        return any(_present(c) for c in CLASSES)

    def patch(self, registry: Any) -> List[type]:
        pruned = []
        for classes in CLASSES:
            if not _present(classes):
                continue
            module = importlib.import_module(classes.module)
            require(module, (classes.causal, classes.inner), classes.module)
            causal, inner = getattr(module, classes.causal), getattr(module, classes.inner)
            why = missing(inner)
            if why is not None:
                self._refused[classes.causal] = f"{why} (meteor-plugin prunes it on transformers 5.23)"
                continue
            require(inner, ("forward", "get_rope_index", "get_image_features"), classes.inner)
            if not registry.is_patched(causal, "generate"):
                registry.patch(causal, "generate", wrap_generate(causal.generate, registry))
                registry.patch(causal, "forward", wrap_causal_forward(causal.forward))
            if not registry.is_patched(inner, "forward"):
                registry.patch(inner, "forward", wrap_inner_forward(inner.forward, registry))
            pruned.append(causal)
        return pruned

    def support(self, model: Any) -> Support:
        """One vision tower: Stage 1 inside it, Stage 3, and the baselines but drop_encoder."""
        return Support(type(model).__name__, frozenset({"encoder", "llm"}), {"drop_encoder": ONE_ENCODER},
                       {"fusion": "has nothing to fuse: it has one vision tower"})

    def encoders(self, model: Any) -> Optional[List[EncoderParts]]:
        """Its one vision tower. Calibration cannot run it on an image batch (it takes packed patches with each image's
        ``image_grid_thw``): with one encoder there is no budget split for ranks to set, so none is measured."""
        if type(model).__name__ not in {c.causal for c in CLASSES}:
            return None

        def run(images):
            raise NotImplementedError(
                f"meteor-plugin calibrate measures encoder ranks on towers that take an image batch; "
                f"{type(model).__name__}'s takes packed patches with image_grid_thw, and its one tower has no budget "
                "split to calibrate")

        return [EncoderParts("visual", run)]

    def open(self, path: str, config: dict) -> Optional[tuple]:
        """(processor, model) of one of its checkpoints, or None."""
        return open_checkpoint(path, config, [c.causal for c in CLASSES])

    def prompt(self, model: Any, processor: Any, image: Any, question: str, conv_mode: Optional[str] = None) -> dict:
        """``question`` about ``image`` through the checkpoint's processor and chat template."""
        return chat_inputs(model, processor, image, question)


TARGET = QwenVLTarget()
