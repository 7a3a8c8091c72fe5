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
    # Row indexing, not torch.gather with the index expanded over the features: the same rows, three
    # times faster on a CPU, and every stage gathers through here.
    rows = torch.arange(index.shape[0], device=index.device)[:, None]
    return x[rows, index]


def floor_count(share: float, k: int) -> int:
    """How many of ``k`` kept tokens a floor of ``share`` reserves: ``round(share * k)``, at least one when both
    are positive, and never all ``k`` while ``k`` > 1 (the stage's own score chooses the rest)."""
    if share <= 0 or k <= 0:
        return 0
    return min(max(1, int(round(share * k))), max(1, k - 1))


def spread(n: int, m: int, device=None) -> torch.Tensor:
    """(n,) bool: ``m`` of ``n`` positions, evenly spaced (the middle of each of m equal stretches)."""
    out = torch.zeros(n, dtype=torch.bool, device=device)
    if m > 0 and n > 0:
        out[((torch.arange(min(m, n), device=device) + 0.5) * n / min(m, n)).long().clamp(max=n - 1)] = True
    return out


def owner_spread(owner: torch.Tensor, m: int) -> torch.Tensor:
    """(T,) bool: exactly ``m`` positions (at most T), shared among the owners in proportion to their token
    counts (largest remainders; ties to the lower owner) and spread over each owner's own tokens.
    owner: (T,) encoder of each token, its tokens in their grid order."""
    out = torch.zeros(owner.shape[0], dtype=torch.bool, device=owner.device)
    m = min(m, owner.shape[0])
    if m <= 0:
        return out
    owners = owner.unique().tolist()
    counts = [int((owner == j).sum()) for j in owners]
    quotas = [m * c / owner.shape[0] for c in counts]
    shares = [int(q) for q in quotas]
    for i in sorted(range(len(owners)), key=lambda i: (shares[i] - quotas[i], i))[:m - sum(shares)]:
        shares[i] += 1
    for j, share in zip(owners, shares):
        cols = (owner == j).nonzero().flatten()
        out[cols] = spread(len(cols), share, owner.device)
    return out


def topk_beyond(scores: torch.Tensor, k: torch.Tensor, reserved: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The ``reserved`` valid entries of each row, and its other ``k[b]`` - (reserved) by ``scores``.
    reserved: (N,) or (B, N) bool, at most ``k[b]`` per row. Returns a (B, N) bool mask."""
    reserved = reserved.expand_as(valid) & valid
    if not reserved.any():
        return topk_mask(scores, k, valid)
    return reserved | topk_mask(scores, k.to(scores.device) - reserved.sum(dim=1), valid & ~reserved)
