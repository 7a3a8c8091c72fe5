"""What the adapters' vision sides share: the record that carries vision-side stats to the LLM forward,
the request a model's ``encode_images`` hands its tower through the call (``MeteorCall.encoder_request``),
CLIP's block list across transformers versions, and the table of vision-tower handlers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch



@dataclass
class StageRecord:
    """Per image: visual tokens entering and leaving a stage, the kept positions, and details."""

    entered: List[int] = field(default_factory=list)
    left: List[int] = field(default_factory=list)
    kept: List[Optional[List[int]]] = field(default_factory=list)
    detail: List[Dict[str, Any]] = field(default_factory=list)

    def add(self, entered: int, left: int, kept: Optional[torch.Tensor] = None, images: Optional[int] = None,
            per_image: Optional[List[Dict[str, Any]]] = None, **shared: Any) -> None:
        """One call per batch of images: ``kept`` is (images, n) or None (then give ``images``)."""
        count = kept.shape[0] if kept is not None else int(images)
        for i in range(count):
            self.entered.append(int(entered))
            self.left.append(int(left))
            self.kept.append(kept[i].tolist() if kept is not None else None)
            self.detail.append({**shared, **(per_image[i] if per_image else {})})


@dataclass
class ImageTokens:
    """For ``proportional_attention``: where one image's kept tokens sit among its unpruned ones, and how
    many tokens each stands for."""

    positions: torch.Tensor  # (K,) long: index among the image's ``total`` unpruned tokens, in the order kept
    sizes: torch.Tensor  # (K,) float: tokens each stands for (sums to ``total``)
    total: int

    @classmethod
    def batch(cls, positions: torch.Tensor, sizes: torch.Tensor, total: int, leading_cls: bool = False
              ) -> List["ImageTokens"]:
        """One per image of (images, K) ``positions`` and ``sizes``; ``leading_cls``: the image's features start
        with its CLS token, which sits first and stands for itself (positions are then among ``total`` + 1)."""
        sizes = sizes.float()
        if leading_cls:
            positions = torch.cat([torch.zeros_like(positions[:, :1]), positions + 1], dim=1)
            sizes = torch.cat([torch.ones_like(sizes[:, :1]), sizes], dim=1)
        return [cls(p, s, int(total) + int(leading_cls)) for p, s in zip(positions, sizes)]


@dataclass
class VisionRecord:
    """What the vision side did during one ``encode_images`` call, stage by stage, and (with
    ``proportional_attention``) each image's kept tokens, in the order the images were encoded."""

    stages: Dict[str, StageRecord] = field(default_factory=dict)
    tokens: List[ImageTokens] = field(default_factory=list)

    def stage(self, name: str) -> StageRecord:
        return self.stages.setdefault(name, StageRecord())


@dataclass
class EncoderRequest:
    """Handed by the model's ``encode_images`` wrapper to its vision tower for one call."""

    config: Any
    record: VisionRecord


def clip_layers(clip: torch.nn.Module):
    """CLIP's encoder blocks: ``vision_model.encoder.layers`` in transformers 4.x, ``encoder.layers`` in 5.x."""
    inner = getattr(clip, "vision_model", clip)
    return inner.encoder.layers


def selected_depth(layers: int, select_layer: int) -> int:
    """Blocks that feed ``hidden_states[select_layer]`` (index 0 is the embeddings)."""
    depth = layers + 1 + select_layer if select_layer < 0 else select_layer
    if not 0 < depth <= layers:
        raise ValueError(f"mm_vision_select_layer={select_layer} is outside a CLIP of {layers} layers")
    return depth


# Vision tower class -> encode_images(model, images, config, record, original) running Stages 1 and 2.
VISION_HANDLERS: Dict[type, Any] = {}
