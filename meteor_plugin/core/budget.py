"""Token budgets: count-or-ratio resolution, METEOR's adaptive K, and rank-proportional splits."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch

Budget = Union[int, float]


def resolve_budget(budget: Budget, available: int) -> int:
    """Tokens that a count (int) or ratio (float) budget allows out of ``available`` entering tokens."""
    if isinstance(budget, float):
        return min(available, int(math.floor(budget * available + 0.5)))
    return min(available, int(budget))


def resolve_stage_budget(field: str, budget: Budget, available: int) -> int:
    """Like ``resolve_budget`` for a fixed stage budget, but a count larger than the tokens entering
    the stage, or a budget that keeps nothing, is an error naming the field and the allowed range."""
    if isinstance(budget, int) and budget > available:
        raise ValueError(
            f"MeteorConfig.{field}={budget} is invalid for this model: {available} visual tokens enter that "
            f"stage, allowed 1..{available} or a ratio in (0, 1]"
        )
    keep = resolve_budget(budget, available)
    if keep < 1 and available > 0:
        raise ValueError(
            f"MeteorConfig.{field}={budget!r} keeps no token of the {available} entering that stage: allowed "
            f"1..{available} or a ratio of at least {1 / (2 * available):.4f}"
        )
    return keep


def resolve_budget_per_sample(budget: Budget, available: torch.Tensor) -> torch.Tensor:
    """Vectorised ``resolve_budget`` for a (B,) tensor of entering token counts."""
    available = available.long()
    if isinstance(budget, float):
        return torch.minimum(torch.floor(available.double() * budget + 0.5).long(), available)
    return available.clamp(max=int(budget))


def adaptive_keep(
    mass: torch.Tensor,
    scale: float,
    available: torch.Tensor,
    min_keep: Budget,
    max_keep: Budget,
) -> torch.Tensor:
    """METEOR's Stage 3 budget: ``K = scale * mass``, clipped per sample.

    mass: (B,) summed visual attention of the selected heads; available: (B,) visual tokens entering.
    The clip is ``[min_keep, max_keep]`` resolved against each sample's own count; where a count
    and a ratio cross for some sample, ``max_keep`` wins (it bounds the cost).
    """
    raw = torch.floor(mass.double() * scale + 0.5).long()
    lo = resolve_budget_per_sample(min_keep, available)
    hi = resolve_budget_per_sample(max_keep, available)
    return torch.minimum(torch.maximum(raw, lo), hi).clamp(min=0)


def rank_weights(ranks: Sequence[Optional[float]]) -> List[float]:
    """Normalised weights ``r_l / sum(r)``; uniform if any rank is missing (None) or all are 0."""
    if any(r is not None and (not math.isfinite(float(r)) or float(r) < 0) for r in ranks):
        raise ValueError(f"encoder ranks must be finite and >= 0, got {list(ranks)}")
    n = len(ranks)
    if any(r is None for r in ranks) or sum(float(r) for r in ranks) <= 0:
        return [1.0 / n] * n
    s = sum(float(r) for r in ranks)
    return [float(r) / s for r in ranks]


def rank_budgets(total: int, ranks: Sequence[Optional[float]]) -> List[int]:
    """Split ``total`` tokens across encoders in proportion to their ranks: ``k_l = k * r_l / sum(r)``.

    The shares are rounded by largest remainder so they sum exactly to ``total`` (ties go to the
    lower index). A missing rank (None) means "no calibration": every encoder then gets an equal
    share. An encoder of rank 0 gets nothing; if every rank is 0 the split is uniform.
    """
    if total < 0:
        raise ValueError(f"total budget must be >= 0, got {total}")
    if not ranks:
        return []
    exact = [total * w for w in rank_weights(ranks)]
    shares = [int(math.floor(e)) for e in exact]
    left = total - sum(shares)
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[:left]:
        shares[i] += 1
    return shares


def cap_budgets(shares: Sequence[int], capacity: Sequence[int]) -> List[int]:
    """Move budget that exceeds an encoder's token count to the others, keeping the total.

    Redistribution goes in proportion to each encoder's original share (lower index first on ties).
    """
    shares = list(shares)
    capacity = list(capacity)
    total = min(sum(shares), sum(capacity))
    out = [min(s, c) for s, c in zip(shares, capacity)]
    spare = total - sum(out)
    while spare > 0:
        room = [i for i in range(len(out)) if out[i] < capacity[i]]
        if not room:
            break
        weights = [max(shares[i], 1) for i in room]
        extra = rank_budgets(spare, weights)
        for i, e in zip(room, extra):
            take = min(e, capacity[i] - out[i])
            out[i] += take
            spare -= take
    return out


def bounded_shares(total: int, ranks: Sequence[Optional[float]], low: Sequence[int], high: Sequence[int]) -> List[int]:
    """``rank_budgets`` of ``total`` with each share kept within [low, high] (what an encoder already has
    reserved, what it has), still summing to ``total``. Needs sum(low) <= total <= sum(high)."""
    if not sum(low) <= total <= sum(high):
        raise ValueError(f"total={total} is invalid for shares between {list(low)} and {list(high)}")
    shares = [max(s, lo) for s, lo in zip(cap_budgets(rank_budgets(total, ranks), high), low)]
    for _ in range(sum(shares) - total):  # raising to the floors overshot: take from the largest slack
        i = max(range(len(shares)), key=lambda j: (shares[j] - low[j], -j))
        shares[i] -= 1
    return shares


def clipped_budgets(signals: torch.Tensor, scale: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``adaptive_keep``'s per-sample budgets ``clip(round(scale * signal), low, high)`` for (N,) signals and bounds."""
    raw = torch.floor(signals.double() * scale + 0.5)
    return torch.minimum(torch.maximum(raw, low.double()), high.double())


def solve_scale(signals: Sequence[float], target: float, low: Sequence[float], high: Sequence[float]) -> float:
    """The scale (``llm_lambda``) whose clipped budgets (``clipped_budgets``) average ``target`` over ``signals``, by
    bisection (the mean grows with the scale). Raises when no signal is positive or the bounds cannot reach it."""
    s = torch.tensor(list(signals), dtype=torch.float64)
    lo, hi = torch.tensor(list(low), dtype=torch.float64), torch.tensor(list(high), dtype=torch.float64)
    if s.numel() == 0 or float(s.max()) <= 0:
        raise ValueError("Stage 3 recorded no budget signal on the calibration questions")
    if not float(lo.mean()) <= target <= float(hi.mean()):
        raise ValueError(f"an average of {target:.1f} tokens lies outside the per-question bounds "
                         f"({float(lo.mean()):.1f} to {float(hi.mean()):.1f} on average)")
    a, b = 0.0, 1.0
    while float(clipped_budgets(s, b, lo, hi).mean()) < target and b < 1e9:
        b *= 2
    for _ in range(60):
        mid = (a + b) / 2
        if float(clipped_budgets(s, mid, lo, hi).mean()) < target:
            a = mid
        else:
            b = mid
    return b
