"""Batched, deterministic token selection and compaction (no model knowledge).

Every function works on a whole batch at once with per-sample budgets, and breaks ties by position
(the lower index wins), so the same input always selects the same tokens.
"""

from __future__ import annotations

from typing import Tuple

import torch


def topk_mask(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Select the ``k[b]`` highest-scoring valid entries of each row.

    scores: (B, N) float; k: (B,) int; valid: (B, N) bool. Returns a (B, N) bool mask. Equal scores are
    ranked by index, so selection never depends on the sort kernel.
    """
    if scores.shape != valid.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} differ in shape")
    if scores.shape[1] == 0:
        return valid.clone()
    s = scores.float().masked_fill(~valid, float("-inf"))
    s = torch.nan_to_num(s, nan=float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return (rank < k.to(rank.device).view(-1, 1)) & valid


def bottomk_mask(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Select the ``k[b]`` lowest-scoring valid entries of each row (ties: lower index wins)."""
    return topk_mask(-scores.float(), k, valid)


def compaction_index(keep: torch.Tensor, align_right: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather indices that pack the kept positions of each row together, in their original order.

    keep: (B, L) bool. Returns ``index`` (B, L') long and ``valid`` (B, L') bool with
    L' = max kept per row. Rows with fewer kept positions are padded at the end, or at the start when
    ``align_right`` (left padding); pad slots point at index 0 and are marked invalid.
    """
    counts = keep.sum(dim=1)
    width = int(counts.max().item()) if keep.numel() else 0
    # A stable sort on "not kept" brings the kept positions first, in their original order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    slots = torch.arange(width, device=keep.device).unsqueeze(0)
    if align_right:
        shift = (width - counts).unsqueeze(1)
        src = (slots - shift).clamp(min=0)
        index = torch.gather(order, 1, src)
        valid = slots >= shift
    else:
        index = order
        valid = slots < counts.unsqueeze(1)
    index = index.masked_fill(~valid, 0)
    return index, valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, L, ...) gathered along dim 1 with index (B, L'). Broadcast batch dim 1 is allowed."""
    if x.shape[0] == 1 and index.shape[0] > 1:
        x = x.expand(index.shape[0], *x.shape[1:])
    view = index.view(*index.shape, *([1] * (x.dim() - 2)))
    return torch.gather(x, 1, view.expand(*index.shape, *x.shape[2:]))
