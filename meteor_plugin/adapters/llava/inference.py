"""The llava package's models at inference: LLaVA-1.5 (flat merge) and LLaVA-1.6 (anyres, ``spatial_unpad`` /
``spatial``: ``shared/anyres.py``), on Vicuna/Llama and on Mistral.

``enable()`` patches the CausalLM and inner model classes (``shared/llava_arch.py``'s wrappers) and the CLIP
tower, which runs Stage 1 between its blocks. ``CLIPVisionTower.forward`` (llava/model/multimodal_encoder/
clip_encoder.py) runs the HF CLIP with ``output_hidden_states=True`` and takes
``hidden_states[mm_vision_select_layer]``; the wrapper here prunes between CLIP's blocks (``stages.encoder
.vit_stage1``) so that the selected layer already holds only the kept patches; the three equal-depth segments
count the blocks up to that selected layer.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from ... import percall
from ...compat.transformers import clip_layers
from ...core.budget import resolve_stage_budget
from ...stages import baselines, proportional
from ...stages.encoder import HF_CLIP_BLOCK, attention_importance, selected_depth, vit_stage1
from ...stages.vision import EncoderParts, ImageTokens, VisionRecord, VitParts
from ..family import require
from ..shared.anyres import is_spatial, spread_to_grid
from ..shared.llava_arch import VISION_HANDLERS, ArchTarget
from ..support import ONE_ENCODER, Support

MODEL_MODULE = "llava.model.language_model.llava_llama"
CAUSAL = "LlavaLlamaForCausalLM"


@dataclass
class EncoderRequest:
    """Handed by the model's ``encode_images`` wrapper to its CLIP tower for one call
    (``percall.MeteorCall.encoder_request``)."""

    config: Any
    record: VisionRecord


def clip_parts(tower: Any) -> VitParts:
    """LLaVA's CLIP tower as Stage 1 prunes it: its blocks up to ``mm_vision_select_layer``, CLS first."""
    layers = clip_layers(tower.vision_tower)
    return VitParts(layers, int(tower.num_patches), selected_depth(len(layers), tower.select_layer), has_cls=True)


# Stage 1 inside the CLIP tower -----------------------------------------------------------------------------
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
        vit = clip_parts(tower)
        patches = vit.patches
        keep = resolve_stage_budget("encoder_keep", cfg.encoder_keep, patches)
        with vit_stage1(vit, keep, cfg, registry, proportional.wanted(cfg)) as plan:
            features = original(tower, images)
        request.record.stage("encoder").add(patches, keep, plan.positions)
        if proportional.wanted(cfg):
            sizes = plan.sizes if plan.sizes is not None else torch.ones(plan.positions.shape)
            cls = getattr(tower, "select_feature", "patch") == "cls_patch"
            request.record.tokens.extend(ImageTokens.batch(plan.positions, sizes, patches, leading_cls=cls))
        return features

    return forward


def llava_clip_encode(model: Any, images: Any, cfg: Any, record: VisionRecord, original: Any):
    """``encode_images`` of a LLaVA model: the CLIP tower runs Stage 1 when handed a request."""
    spatial = is_spatial(model)
    if spatial and cfg.encoder and proportional.wanted(cfg):
        proportional.unavailable(cfg, model, "does not run on LLaVA-1.6's spatial merges (mm_patch_merge_type="
                                 f"{model.config.mm_patch_merge_type!r}) yet")
        cfg = cfg.replace(proportional_attention="off")
    if cfg.method in baselines.PRE_LLM:
        return llava_baseline(model, images, cfg, record, original, spatial)
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


def llava_baseline(model: Any, images: Any, cfg: Any, record: VisionRecord, original: Any, spatial: bool = False):
    """A pre-LLM baseline on LLaVA: CLIP unpruned, then ``fusion_keep`` of its projected tokens. On LLaVA-1.6's
    spatial merges, of each CLIP input's (base image and crops alike, as VisionZip does), put back at their patches
    in full grids (NaN elsewhere) for upstream's merge, as Stage 1's are."""
    vit = clip_parts(model.get_model().get_vision_tower())
    features, importance = attention_importance(vit.layers, HF_CLIP_BLOCK, vit.depth - 1,
                                                lambda: original(model, images), has_cls=True)
    if spatial:
        if cfg.method == "drop_encoder":
            raise NotImplementedError("meteor-plugin: drop_encoder removes one of several encoders; LLaVA has one")
        patches = vit.patches
        if features.shape[1] != patches:
            raise NotImplementedError(f"meteor-plugin: the {cfg.method!r} baseline on LLaVA-1.6's spatial merges "
                                      f"takes its {patches} patch tokens per CLIP input, got {features.shape[1]}")
        keep = resolve_stage_budget("fusion_keep", cfg.fusion_keep, patches)
        side = math.isqrt(patches)
        kept, anchors = baselines.keep_each(cfg.method, features, keep, (side, side), importance, cfg.seed)
        record.stage("baseline").add(patches, keep, anchors, method=cfg.method)
        return spread_to_grid(kept, anchors.tolist(), patches)
    if features.shape[1] == importance.shape[1] + 1:  # 'cls_patch' features: CLS ranks first
        importance = torch.cat([torch.ones_like(importance[:, :1]), importance], dim=1)
    keep = resolve_stage_budget("fusion_keep", cfg.fusion_keep, features.shape[1])
    encoders = [baselines.EncoderTokens(features, importance=importance)]
    if proportional.placed(cfg):  # the kept tokens' places among the image's tokens, and their sizes
        kept, where, sizes = baselines.placed(cfg.method, encoders, keep, cfg.seed, cfg.drop_encoder)
        record.tokens.extend(ImageTokens.batch(where, sizes, features.shape[1]))
    else:
        kept = baselines.select(cfg.method, encoders, keep, cfg.seed, cfg.drop_encoder)
    record.stage("baseline").add(features.shape[1], kept.shape[1], None, images=features.shape[0], method=cfg.method)
    return kept


def patch_llava_clip(registry: Any) -> None:
    """Stage 1 for LLaVA's CLIP tower (class-level)."""
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    require(CLIPVisionTower, ("forward", "num_patches", "feature_select"), "LLaVA's CLIPVisionTower")
    if not registry.is_patched(CLIPVisionTower, "forward"):
        registry.patch(CLIPVisionTower, "forward", wrap_clip_tower_forward(CLIPVisionTower.forward, registry))
    VISION_HANDLERS[CLIPVisionTower] = llava_clip_encode


def encoders(model: Any) -> List[EncoderParts]:
    """A LLaVA model's one encoder, its CLIP tower, as calibration measures it."""
    tower = model.get_model().get_vision_tower()
    return [EncoderParts("clip", run=tower)]


def support(model: Any) -> Support:
    """One CLIP tower: Stage 1 inside it and Stage 3, every baseline but drop_encoder; no Stage 2. The baselines
    keep their tokens' places under proportional attention on one grid per image, not on LLaVA-1.6's crops."""
    placed = frozenset() if is_spatial(model) else frozenset(baselines.PLACED) - {"drop_encoder"}
    return Support(type(model).__name__, frozenset({"encoder", "llm"}), {"drop_encoder": ONE_ENCODER},
                   {"fusion": "has nothing to fuse: LLaVA has one vision encoder"}, placed)


TARGET = ArchTarget(
    name="llava",
    module=MODEL_MODULE,
    causal=CAUSAL,
    llm="LlavaLlamaModel",
    vision=(patch_llava_clip,),
    encoders=encoders,
    support=support,
    # llava-v1.6-mistral: the same llava_arch on MistralModel, whose decoder layers are Llama's
    variants=(("llava.model.language_model.llava_mistral", "LlavaMistralForCausalLM", "LlavaMistralModel"),),
    refused={"LlavaMptForCausalLM": "its upstream forward does not run in llava-torch 1.2.2 (MPT's "
                                    "transformers port changed under it), and MPT's blocks are not Llama's"},
)
