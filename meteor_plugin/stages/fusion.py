"""Stage 2: cooperative pruning where several encoders meet.

Post-projection fusion (METEOR): each encoder has its own projector into the LLM width and the encoders'
tokens are joined along the sequence, and ``fusion_keep`` of them are kept by ``fusion_similarity``:
- ``duplicate`` (default): greedy; a token is redundant when a token of another encoder already kept
  carries the same content (``core.token_scores.duplicate_aware_mask``). The paper's sum below measured,
  on the v1 fidelity model, the encoders' projector offsets rather than duplication and kept background.
- ``cosine`` (the paper's): redundancy is the summed cosine similarity to the surviving tokens of every
  *other* encoder; the least redundant are kept. ``centred_cosine``: the same after subtracting each
  encoder's mean token.

Training-free mode, for checkpoints still fused EAGLE's way (channel concatenation on a shared grid,
one shared projector): every encoder scores each grid position, the scores are summed with rank
weights, and the best positions are kept.

Also here: building the per-encoder projectors from a shared one by splitting its first layer's input
columns per encoder (an approximation: the shared GELU saw the sum, so they still need training).
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import FUSION_SIMILARITIES
from ..core.budget import bounded_shares, rank_weights
from ..core.select import compaction_index, floor_count, gather_tokens, owner_spread, spread, topk_beyond
from ..core.token_scores import cooperative_redundancy, duplicate_aware_mask, similarity_to_mean


def cooperative_prune(z: torch.Tensor, owner: torch.Tensor, keep: int, similarity: str = "cosine",
                      spread_floor: float = 0.0, quota_ranks: Optional[Sequence[Optional[float]]] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """z: (B, T, D) projected tokens of all encoders (joined along the sequence); owner: (T,) encoder
    of each; similarity: ``MeteorConfig.fusion_similarity``. Keeps ``keep`` tokens: a ``spread_floor`` share
    evenly spaced over each encoder's tokens (``core.select.owner_spread``), the rest by that similarity (see
    the module docstring), in their original order. ``quota_ranks`` (one per encoder, in owner order; the
    ``fusion_quota="rank"`` option): each encoder keeps a share of ``keep`` in proportion to its rank, and the
    selection runs within the shares. Returns (kept tokens (B, keep, D), their index into T (B, keep))."""
    if similarity not in FUSION_SIMILARITIES:
        raise ValueError(f"similarity={similarity!r} is invalid: allowed {', '.join(map(repr, FUSION_SIMILARITIES))}")
    b, t, _ = z.shape
    if keep >= t:
        return z, torch.arange(t, device=z.device).expand(b, t)
    owner = owner.to(z.device)
    floor = owner_spread(owner, floor_count(spread_floor, keep))
    quota = None
    if quota_ranks is not None:
        owners = owner.unique().tolist()
        if len(quota_ranks) != len(owners):
            raise ValueError(f"quota_ranks has {len(quota_ranks)} entries for {len(owners)} encoders")
        quota = bounded_shares(keep, quota_ranks, [int(floor[owner == j].sum()) for j in owners],
                               [int((owner == j).sum()) for j in owners])
    with torch.no_grad():
        if similarity == "duplicate":
            mask = duplicate_aware_mask(z, owner, keep, floor, quota)
        else:
            redundancy = cooperative_redundancy(z, owner, centred=similarity == "centred_cosine")
            valid = torch.ones(b, t, dtype=torch.bool, device=z.device)
            if quota is None:
                mask = topk_beyond(-redundancy, torch.full((b,), keep, device=z.device), floor, valid)
            else:  # the same ranking within each encoder's share
                mask = torch.zeros_like(valid)
                for j, share in zip(owner.unique().tolist(), quota):
                    mask |= topk_beyond(-redundancy, torch.full((b,), share, device=z.device), floor & (owner == j),
                                        valid & (owner == j))
        index, _ = compaction_index(mask)
    return gather_tokens(z, index), index


def position_importance(grid_features: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, N) in [0, 1] per image: 1 for the token least like the mean token."""
    s = -similarity_to_mean(grid_features)
    lo = s.min(dim=1, keepdim=True).values
    hi = s.max(dim=1, keepdim=True).values
    return (s - lo) / (hi - lo).clamp(min=1e-12)


def rank_weighted_positions(per_encoder: Sequence[torch.Tensor], ranks: Sequence, keep: int,
                            spread_floor: float = 0.0) -> torch.Tensor:
    """Training-free selection of shared grid positions. per_encoder: (B, N, C_l) features of each
    encoder on the same N positions; a ``spread_floor`` share of the kept positions evenly spaced over the
    grid. Returns the kept positions (B, keep), in grid order."""
    b, n = per_encoder[0].shape[:2]
    if keep >= n:
        return torch.arange(n, device=per_encoder[0].device).expand(b, n)
    weights = rank_weights(list(ranks))  # uniform when uncalibrated
    with torch.no_grad():
        score = sum(w * position_importance(f) for w, f in zip(weights, per_encoder))
        mask = topk_beyond(score, torch.full((b,), keep, device=score.device),
                           spread(n, floor_count(spread_floor, keep), score.device),
                           torch.ones(b, n, dtype=torch.bool, device=score.device))
        index, _ = compaction_index(mask)
    return index


def split_projector(shared: nn.Module, channels: Sequence[int]) -> nn.ModuleList:
    """Per-encoder projectors from a shared one whose input is the encoders' channels concatenated.

    Encoder l's first layer gets the shared first layer's input columns of its channel slice and the
    shared bias; the layers after it are copied. Works for ``linear`` and ``mlpNx_gelu`` projectors.
    """
    if isinstance(shared, nn.Linear):
        first, rest = shared, []
    elif isinstance(shared, nn.Sequential) and len(shared) and isinstance(shared[0], nn.Linear):
        first, rest = shared[0], list(shared)[1:]
    else:
        raise ValueError(
            f"per-encoder projectors can be split from a Linear or an mlpNx_gelu Sequential projector, not "
            f"{type(shared).__name__}"
        )
    if sum(channels) != first.in_features:
        raise ValueError(
            f"the encoders' channels {list(channels)} sum to {sum(channels)}, but the shared projector takes "
            f"{first.in_features} input channels"
        )
    projectors = nn.ModuleList()
    offset = 0
    for width in channels:
        layer = nn.Linear(width, first.out_features, bias=first.bias is not None,
                          device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(first.weight[:, offset:offset + width])
            if first.bias is not None:
                layer.bias.copy_(first.bias)
        offset += width
        projectors.append(nn.Sequential(layer, *copy.deepcopy(rest)) if rest else nn.Sequential(layer))
    return projectors


def empty_projectors(channels: Sequence[int], hidden: int, projector_type: str) -> nn.ModuleList:
    """Per-encoder projectors of the right shapes, to be filled from a checkpoint."""
    import re

    depth = 1 if projector_type == "linear" else None
    match = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if match:
        depth = int(match.group(1))
    if depth is None:
        raise ValueError(f"per-encoder projectors support 'linear' and 'mlpNx_gelu', not {projector_type!r}")
    out = nn.ModuleList()
    for width in channels:
        layers: List[nn.Module] = [nn.Linear(width, hidden)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        out.append(nn.Sequential(*layers))
    return out
