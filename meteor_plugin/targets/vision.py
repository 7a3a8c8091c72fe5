"""Stage 1 inside LLaVA's CLIP tower, and the record that carries vision-side stats to the LLM forward.

``CLIPVisionTower.forward`` (llava/model/multimodal_encoder/clip_encoder.py) runs the HF CLIP with
``output_hidden_states=True`` and takes ``hidden_states[mm_vision_select_layer]``. The wrapper here
prunes between CLIP's blocks (``stages/encoder.py``) so that the selected layer already holds only the
kept patches; the three equal-depth segments count the blocks up to that selected layer. The model's
``encode_images`` asks for it through the call (``MeteorCall.encoder_request``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .. import percall
from ..core.budget import resolve_stage_budget
from ..stages import baselines
from ..stages.encoder import HF_CLIP_BLOCK, VitPruner, attention_importance


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
class VisionRecord:
    """What the vision side did during one ``encode_images`` call, stage by stage."""

    stages: Dict[str, StageRecord] = field(default_factory=dict)

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


def wrap_clip_tower_forward(original: Any, registry: Any) -> Any:
    @functools.wraps(original)
    def forward(self, images):
        call = percall.current()
        request: Optional[EncoderRequest] = call.encoder_request if call is not None else None
        if call is not None:
            call.encoder_request = None  # for this forward only
        if request is None or not request.config.encoder:
            return original(self, images)
        if isinstance(images, list):
            return [forward_one(self, image.unsqueeze(0), request) for image in images]
        return forward_one(self, images, request)

    def forward_one(tower, images, request):
        cfg = request.config
        layers = clip_layers(tower.vision_tower)
        depth = selected_depth(len(layers), tower.select_layer)
        patches = tower.num_patches
        keep = resolve_stage_budget("encoder_keep", cfg.encoder_keep, patches)
        pruner = VitPruner.attach(layers, HF_CLIP_BLOCK, registry)
        pruner.start(patches, keep, depth, cfg.encoder_shallow_share, has_cls=True, deep_score=cfg.encoder_deep_score,
                     spread_floor=cfg.spread_floor)
        with pruner.running() as plan:
            features = original(tower, images)
        request.record.stage("encoder").add(patches, keep, plan.positions)
        return features

    return forward


def llava_clip_encode(model: Any, images: Any, cfg: Any, record: VisionRecord, original: Any):
    """``encode_images`` of a LLaVA model: the CLIP tower runs Stage 1 when handed a request."""
    from .anyres import is_spatial, spread_to_grid

    spatial = is_spatial(model)
    if cfg.method in baselines.PRE_LLM:
        if spatial:
            raise NotImplementedError(
                f"meteor-plugin: the {cfg.method!r} baseline does not run on LLaVA-1.6's spatial merges "
                f"(mm_patch_merge_type={model.config.mm_patch_merge_type!r}); METEOR's stages do")
        return llava_baseline(model, images, cfg, record, original)
    if not cfg.encoder:
        return original(model, images)
    call = percall.current()
    call.encoder_request = EncoderRequest(cfg, record)
    try:
        features = original(model, images)
    finally:
        call.encoder_request = None
    if spatial:  # upstream reshapes full grids: the kept tokens go back to their patch positions
        patches = model.get_model().get_vision_tower().num_patches
        features = spread_to_grid(features, record.stage("encoder").kept[-features.shape[0]:], patches)
    return features


def llava_baseline(model: Any, images: Any, cfg: Any, record: VisionRecord, original: Any):
    """A pre-LLM baseline on LLaVA: CLIP unpruned, then ``fusion_keep`` of its projected tokens."""
    tower = model.get_model().get_vision_tower()
    layers = clip_layers(tower.vision_tower)
    depth = selected_depth(len(layers), tower.select_layer)
    features, importance = attention_importance(layers, HF_CLIP_BLOCK, depth - 1, lambda: original(model, images),
                                                has_cls=True)
    if features.shape[1] == importance.shape[1] + 1:  # 'cls_patch' features: CLS ranks first
        importance = torch.cat([torch.ones_like(importance[:, :1]), importance], dim=1)
    keep = resolve_stage_budget("fusion_keep", cfg.fusion_keep, features.shape[1])
    kept = baselines.select(cfg.method, [baselines.EncoderTokens(features, importance=importance)], keep, cfg.seed,
                            cfg.drop_encoder)
    record.stage("baseline").add(features.shape[1], kept.shape[1], None, images=features.shape[0], method=cfg.method)
    return kept


def patch_llava_clip(registry: Any) -> None:
    """Stage 1 for LLaVA's CLIP tower (class-level)."""
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    from .common import require

    require(CLIPVisionTower, ("forward", "num_patches", "feature_select"), "LLaVA's CLIPVisionTower")
    if not registry.is_patched(CLIPVisionTower, "forward"):
        registry.patch(CLIPVisionTower, "forward", wrap_clip_tower_forward(CLIPVisionTower.forward, registry))
    VISION_HANDLERS[CLIPVisionTower] = llava_clip_encode


# Vision tower class -> encode_images(model, images, config, record, original) running Stages 1 and 2.
VISION_HANDLERS: Dict[type, Any] = {}
