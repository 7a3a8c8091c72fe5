"""Stages 1 and 2 on a model's vision encoders, and what the vision side hands the language model.

A family states what its encoders are (``EncoderParts``: how to run one, whether Stage 1 prunes it between
its blocks or at its output, how its tokens reach the language model's width); ``encode_and_fuse`` decides
what to keep: Stage 1's budget split across the encoders by rank, each encoder pruned, Stage 2's cooperative
pruning of the projected tokens, and (with proportional attention) each kept token's place and size.

The records (``StageRecord``, ``ImageTokens``, ``VisionRecord``) carry what the vision side did in one call to
the language model's forward: per image, the tokens entering and leaving each stage, and the kept tokens'
places and sizes.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..core.budget import cap_budgets, rank_budgets, resolve_stage_budget
from ..core.token_sizes import kept_sizes
from . import proportional
from .encoder import HF_CLIP_BLOCK, VitBlock, prune_output, vit_stage1
from .fusion import cooperative_prune


# Records ------------------------------------------------------------------------------------------------------
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


# What a family says of its encoders ------------------------------------------------------------------------------
@dataclass
class VitParts:
    """A ViT encoder that Stage 1 prunes between its blocks."""

    layers: Sequence[torch.nn.Module]  # its blocks
    patches: int  # patch tokens entering them
    depth: int  # blocks up to the output the model uses
    has_cls: bool  # a CLS token leads the sequence (it scores the deep boundary, and is never dropped)
    block: VitBlock = HF_CLIP_BLOCK


@dataclass
class EncoderParts:
    """One vision encoder of a model, as its family states it (``InferenceTarget.encoders``)."""

    name: str  # what ``MeteorConfig.encoder_ranks`` calls it
    run: Callable[[torch.Tensor], torch.Tensor]  # images -> its output tokens (B, N, C)
    project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # its tokens -> the language model's width
    vit: Optional[VitParts] = None  # pruned between its blocks; None: pruned at its output


_WARNED_RANKS: "weakref.WeakSet[Any]" = weakref.WeakSet()  # models already told: once per model, not per call


def ranks_for(cfg: Any, names: Sequence[str], model: Any) -> List[Optional[float]]:
    """Each encoder's calibrated rank (None where there is none: the split is then uniform, and a warning says
    so once per model)."""
    ranks = [cfg.encoder_ranks.get(n) if cfg.encoder_ranks else None for n in names]
    missing = [n for n, r in zip(names, ranks) if r is None]
    if missing and model not in _WARNED_RANKS:
        _WARNED_RANKS.add(model)
        warnings.warn(
            f"meteor-plugin Stage 1: no encoder_ranks for {', '.join(missing)}; the token budget is split "
            "uniformly across encoders. Run `meteor-plugin calibrate` to split it by rank as METEOR does.",
            stacklevel=4,
        )
    return ranks


# Stages 1 and 2 --------------------------------------------------------------------------------------------------
def encode_and_fuse(parts: Sequence[EncoderParts], images: torch.Tensor, cfg: Any, record: VisionRecord,
                    registry: Any, model: Any) -> torch.Tensor:
    """Every encoder with Stage 1 (a rank-guided share of ``encoder_keep``, pruned inside a ViT or at the output
    of the others), each through its own projector, joined along the sequence, then Stage 2 (``fusion_keep`` by
    ``fusion_similarity``). Returns the tokens that reach the language model (B, K, D); ``record`` gets both
    stages' counts and, with proportional attention, each image's kept tokens."""
    names = [p.name for p in parts]
    # Encoders pruned at their output run first: their token counts are only known from the output.
    outputs: Dict[int, torch.Tensor] = {i: p.run(images) for i, p in enumerate(parts) if p.vit is None}
    counts = [outputs[i].shape[1] if i in outputs else int(p.vit.patches) for i, p in enumerate(parts)]
    if cfg.encoder:
        total = resolve_stage_budget("encoder_keep", cfg.encoder_keep, sum(counts))
        budgets = cap_budgets(rank_budgets(total, ranks_for(cfg, names, model)), counts)
    else:
        budgets = list(counts)
    b = images.shape[0]
    track = proportional.wanted(cfg)
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    features, owners, positions = [], [], {}
    where, sizes = [], []  # with proportional_attention: each kept token's place among all, and its size
    for i, p in enumerate(parts):
        if budgets[i] == 0:
            continue  # an encoder without budget is not run at all
        size = None
        if i in outputs:
            kept, index = prune_output(outputs[i], budgets[i], cfg.spread_floor)
            if track:
                size = kept_sizes(outputs[i], index)
        else:
            with vit_stage1(p.vit, budgets[i], cfg, registry, track) as plan:
                kept = p.run(images)
            index = plan.positions if plan.positions is not None else torch.arange(counts[i]).expand(b, -1)
            size = plan.sizes
        positions[p.name] = index
        features.append(p.project(kept))
        owners.append(torch.full((kept.shape[1],), i, dtype=torch.long))
        if track:
            where.append(index.to(kept.device) + offsets[i])
            sizes.append(size if size is not None else torch.ones(index.shape, device=kept.device))
    z = torch.cat(features, dim=1)
    owner = torch.cat(owners)
    per_encoder = {n: [c, k] for n, c, k in zip(names, counts, budgets)}
    # Per image, the grid position (row-major in that encoder's own grid) of each token Stage 1 kept, in the
    # order the tokens reach Stage 2: what the fusion stage's and Stage 3's kept indices point into.
    kept_at = [{"positions": {n: pos[j].tolist() for n, pos in positions.items()}} for j in range(b)]
    record.stage("encoder").add(sum(counts), z.shape[1], None, images=b, per_image=kept_at, per_encoder=per_encoder)
    if track:
        where, sizes = torch.cat(where, dim=1), torch.cat(sizes, dim=1)
    if cfg.fusion:
        keep = resolve_stage_budget("fusion_keep", cfg.fusion_keep, z.shape[1])
        entering = z.shape[1]
        quota = None
        if cfg.fusion_quota == "rank":  # the encoders that reach Stage 2 (one without budget never ran)
            quota = [r for r, n in zip(ranks_for(cfg, names, model), budgets) if n > 0]
        before = z
        z, index = cooperative_prune(z, owner, keep, cfg.fusion_similarity, cfg.spread_floor, quota)
        survivors = owner.to(index.device)[index]  # (B, keep)
        record.stage("fusion").add(entering, z.shape[1], index, per_image=[
            {"per_encoder": {n: int((s == i).sum()) for i, n in enumerate(names)}} for s in survivors])
        if track:
            sizes = kept_sizes(before, index, sizes, group=owner)
            where = torch.gather(where, 1, index.to(where.device))
    if track:
        record.tokens.extend(ImageTokens.batch(where, sizes, sum(counts)))
    return z
