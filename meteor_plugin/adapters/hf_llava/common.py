"""What transformers' LLaVA classes share on every transformers generation: Stage 1 inside the CLIP or SigLIP
tower, the pre-LLM baselines on each CLIP input's projected tokens (``Baseline``), LLaVA-NeXT's crops spread to
full grids and back, where the images landed in the prompt (Stage 3's
layout, with proportional attention's geometry), the refusals, and the family's per-call record (``shared.transformers_vlm.VlmCall``).
``v5.py`` (transformers 5.x, where the model takes ready-made features) and ``v4.py`` (4.x, where the adapter
splices the images itself) are built on these.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from ...compat.transformers import clip_layers
from ...core.budget import resolve_stage_budget
from ...core.token_scores import cls_attention, received_attention
from ...stages import baselines, proportional
from ...stages.encoder import selected_depth, vit_stage1
from ...stages.layout import VisualLayout, identity_geometry, query_mask, unpruned_geometry
from ...stages.vision import ImageTokens, VitParts
from ...stats import RunStats, StageCount
from ..shared import anyres
from ..shared.transformers_vlm import state


# Towers Stage 1 prunes between blocks: CLIP (a CLS token first) and SigLIP (none, every token a patch).
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")


def tower_patches(model: Any) -> int:
    """Patch tokens the vision tower gives one image (or one crop), CLS excluded."""
    vision = model.config.vision_config
    return (int(vision.image_size) // int(vision.patch_size)) ** 2


def is_anyres(model: Any) -> bool:
    """LLaVA-NeXT and OneVision: images are cut into crops and packed by ``pack_image_features``."""
    return hasattr(model, "pack_image_features")


def check_stage1(model: Any, cfg: Any) -> None:
    if not cfg.encoder or cfg.method in baselines.PRE_LLM:  # a pre-LLM baseline replaces Stage 1
        return
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise NotImplementedError(
            f"meteor-plugin Stage 1 on {type(model).__name__}: vision_feature_layer={layer!r} concatenates several "
            "layers of different lengths once pruned; set encoder=False")
    kind = getattr(model.config.vision_config, "model_type", "")
    if kind not in VISION_TYPES:
        raise NotImplementedError(f"meteor-plugin Stage 1 on transformers' LLaVA knows CLIP and SigLIP towers, not "
                                  f"{kind!r}; set encoder=False (Stage 3 runs)")
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    if not _has_cls(model) and strategy == "default":
        raise NotImplementedError(f"meteor-plugin Stage 1 on a {kind} tower needs vision_feature_select_strategy="
                                  "'full': it has no CLS token, so 'default' would drop a kept patch")
    if _has_cls(model) and strategy == "full" and is_anyres(model):
        raise NotImplementedError("meteor-plugin Stage 1 on LLaVA-NeXT with a CLIP tower needs "
                                  "vision_feature_select_strategy='default'")


def _has_cls(model: Any) -> bool:
    return getattr(model.config.vision_config, "model_type", "") == "clip_vision_model"


def tower_parts(model: Any) -> VitParts:
    """The CLIP or SigLIP tower as Stage 1 prunes it: its blocks up to ``vision_feature_layer``, CLS first on
    CLIP (SigLIP has none: the deep boundary is scored by the attention each patch receives)."""
    layers = clip_layers(model.vision_tower)
    depth = selected_depth(len(layers), int(model.config.vision_feature_layer))
    return VitParts(layers, tower_patches(model), depth, has_cls=_has_cls(model))


# Encoding images with Stage 1 -------------------------------------------------------------------------------
@contextlib.contextmanager
def stage1(model: Any, cfg: Any, registry: Any) -> Iterator[Any]:
    """Stage 1 inside ``model``'s vision tower for what runs in the block (yields its plan, whose
    ``positions`` are each CLIP input's kept patches afterwards), or nothing when Stage 1 is off."""
    if not cfg.encoder or cfg.method in baselines.PRE_LLM:
        yield None
        return
    check_stage1(model, cfg)
    track = proportional.wanted(cfg) and not is_anyres(model)
    if proportional.wanted(cfg) and not track:
        proportional.unavailable(cfg, model, f"does not run on {type(model).__name__}'s packed crops with Stage 1 yet "
                                 "(it runs with Stage 3 alone there, and on transformers' LLaVA with both)")
    vit = tower_parts(model)
    keep = resolve_stage_budget("encoder_keep", cfg.encoder_keep, vit.patches)
    mine = state()
    with vit_stage1(vit, keep, cfg, registry, track) as plan:
        mine.plan = plan
        try:
            yield plan
        finally:
            mine.plan = None
    mine.kept = plan.positions.tolist() if plan.positions is not None else None
    mine.stage = "encoder" if mine.kept is not None else None
    mine.sizes = plan.sizes if track else None


# The pre-LLM baselines ------------------------------------------------------------------------------------------
@dataclass
class Baseline:
    """A pre-LLM baseline (``random``, ``avgpool``, ``visionzip``) for one encoding: it keeps ``fusion_keep`` of each
    CLIP input's patch tokens after the projector (the base image and every crop alike, as VisionZip does on
    LLaVA-NeXT), at known patch positions, so that LLaVA-NeXT's crops go through their packing as Stage 1's do.
    With ``visionzip`` the tower's selected block is watched for its attention (CLS attention on CLIP, attention
    received on SigLIP)."""

    model: Any
    cfg: Any
    captured: Dict[str, Any] = field(default_factory=dict)
    kept: List[List[int]] = field(default_factory=list)  # per CLIP input, in encoding order: its kept patches

    def select(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(inputs, N, D) projected tokens -> (inputs, k, D) kept ones (a leading CLS token, where the select
        strategy keeps it, stays in front) and (inputs, k) the patch each kept one sits at."""
        model, cfg = self.model, self.cfg
        patches = tower_patches(model)
        cls = features.shape[1] == patches + 1
        if features.shape[1] != patches + int(cls):
            raise NotImplementedError(f"meteor-plugin: the {cfg.method!r} baseline on {type(model).__name__} needs "
                                      f"{patches} patch tokens per image, got {features.shape[1]}")
        body = features[:, 1:] if cls else features
        keep = resolve_stage_budget("fusion_keep", cfg.fusion_keep, patches)
        side = math.isqrt(patches)
        kept, anchors = baselines.keep_each(cfg.method, body, keep, (side, side), self.importance(), cfg.seed)
        self.kept.extend(anchors.tolist())
        return (torch.cat([features[:, :1], kept], dim=1) if cls else kept), anchors

    def importance(self) -> Optional[torch.Tensor]:
        hidden = self.captured.get("hidden")
        if hidden is None:
            return None
        vit = tower_parts(self.model)
        with torch.no_grad():
            q, k, scale = vit.block.qk(vit.layers[vit.depth - 1], hidden)
            return cls_attention(q, k, scale) if vit.has_cls else received_attention(q, k, scale)


def check_baseline(model: Any, cfg: Any, layer: Any = None) -> None:
    """Refuse by name what a pre-LLM baseline cannot read: visionzip scores with the selected block of a CLIP or
    SigLIP tower, and needs one selected layer."""
    layer = model.config.vision_feature_layer if layer is None else layer
    kind = getattr(model.config.vision_config, "model_type", "")
    if cfg.method == "visionzip" and (kind not in VISION_TYPES or not isinstance(layer, int)):
        raise NotImplementedError(
            f"meteor-plugin: the 'visionzip' baseline on {type(model).__name__} scores tokens by the attention of "
            f"one selected block of a CLIP or SigLIP tower; this model has a {kind!r} tower and vision_feature_layer="
            f"{layer!r}: choose random or avgpool")


@contextlib.contextmanager
def baseline(model: Any, cfg: Any) -> Iterator[Optional[Baseline]]:
    """A pre-LLM baseline for the encoding that runs in the block (yields it; ``Baseline.select`` is called on the
    projected tokens), or nothing when ``cfg`` runs none."""
    if cfg.method not in baselines.PRE_LLM:
        yield None
        return
    check_baseline(model, cfg)
    request, mine, handle = Baseline(model, cfg), state(), None
    if cfg.method == "visionzip":
        vit = tower_parts(model)

        def grab(module, args, kwargs):
            request.captured["hidden"] = args[0] if args else kwargs["hidden_states"]

        handle = vit.layers[vit.depth - 1].register_forward_pre_hook(grab, with_kwargs=True)
    mine.baseline = request
    try:
        yield request
    finally:
        mine.baseline = None
        if handle is not None:
            handle.remove()
    mine.kept, mine.stage, mine.sizes = request.kept, "baseline", None


def spread_crops(image_features: Any, positions: List[List[int]], patches: int) -> List[torch.Tensor]:
    """Stage 1's kept tokens of each image's crops (``(crops, keep, D)``, crops in the order the tower saw them)
    put back at their patch positions, NaN rows elsewhere, for LLaVA-NeXT's ``pack_image_features``."""
    spread, at = [], 0
    for feature in image_features:
        spread.append(anyres.spread_to_grid(feature, positions[at:at + feature.shape[0]], patches))
        at += feature.shape[0]
    return spread


def drop_pruned(packed: Any) -> List[torch.Tensor]:
    """Each packed image's features less the NaN rows `spread_crops` put at pruned patches."""
    return [p[~torch.isnan(p).all(dim=-1)] for p in packed]


def build_layout(model: Any, cfg: Any, ids: torch.Tensor, mask: Optional[torch.Tensor], features: List[torch.Tensor],
                 crops: List[int], runs: List[Tuple[int, int, int]]) -> VisualLayout:
    """Visual tokens = image-token positions less the row separators; stats of Stages 1 and the crops."""
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    visual = torch.zeros_like(valid)
    newlines = torch.zeros_like(valid)
    line = getattr(model, "image_newline", None)
    stats = RunStats(ids.shape[0])
    patches = tower_patches(model)
    mine = state()
    kept = list(mine.kept or [])
    pruned = mine.stage if kept else None  # "encoder" (Stage 1) or "baseline" kept those patches
    keep = len(kept[0]) if pruned else patches
    geometry = _unpruned_geometry(model, cfg, valid, runs, kept, mine.sizes)
    for (i, start, end), feature, n in zip(runs, features, crops):
        visual[i, start:end] = True
        if line is not None:
            newlines[i, start:end] = (feature == line.to(feature.dtype).view(1, -1)).all(dim=-1).to(newlines.device)
        sample = stats.stages[i]
        if pruned:
            count = sample.setdefault(pruned, StageCount(0, 0, {"kept": []}))
            count.entered += n * patches
            count.left += sum(len(k) for k in kept[:n])
            count.detail["kept"] += kept[:n]  # per CLIP input (base image, then crops): the patches kept
            if pruned == "baseline":
                count.detail["method"] = cfg.method
            kept = kept[n:]
        if is_anyres(model):
            rows = int(newlines[i, start:end].sum())
            base = keep if n > 1 else end - start - rows
            entry = sample.setdefault("anyres", StageCount(0, 0, {"base": 0, "crops": 0, "newlines": 0}))
            entry.entered += n * patches
            entry.left += end - start - rows
            for key, value in (("base", base), ("crops", end - start - rows - base), ("newlines", rows)):
                entry.detail[key] += value
    visual &= ~newlines
    layout = VisualLayout(visual=visual, valid=valid, stats=stats,
                          query=query_mask(visual | newlines, valid, None, cfg.text_query))
    if geometry is not None:
        layout.positions, layout.key_bias = geometry(visual)
    return layout


def _unpruned_geometry(model: Any, cfg: Any, valid: torch.Tensor, runs: List[Tuple[int, int, int]],
                       kept: List[List[int]], sizes: Optional[torch.Tensor]) -> Any:
    """With proportional attention, a function of the visual mask giving the layout's (positions, key_bias); None
    without it. With Stage 1, each kept patch sits at its place among its image's patches, with its size
    (``stages.layout.unpruned_geometry``); without, every token at its own place with size 1, for Stage 3."""
    if not proportional.wanted(cfg) or (cfg.encoder and is_anyres(model)):  # stage1() has warned or refused
        return None
    if not cfg.encoder or not kept:
        return lambda visual: identity_geometry(valid)
    where = torch.tensor(kept, dtype=torch.long)
    sizes = sizes.float().cpu() if sizes is not None else torch.ones(where.shape)
    cls = _has_cls(model) and getattr(model.config, "vision_feature_select_strategy", "default") == "full"
    tokens = ImageTokens.batch(where, sizes, tower_patches(model), leading_cls=cls)
    return lambda visual: unpruned_geometry(visual, valid, [i for i, _, _ in runs], tokens)


def prunes(cfg: Any) -> bool:
    """Whether ``cfg`` removes tokens at all (Stage 2 has nothing to fuse in a one-tower LLaVA)."""
    return bool(cfg.encoder or cfg.llm or cfg.method in baselines.PRE_LLM)
