"""Baseline token selections, as plugin methods, for comparisons at equal budgets.

They act where the visual tokens enter the language model, on the projected tokens of every encoder
joined along the sequence, and keep exactly ``keep`` tokens per image (``fastv`` instead replaces Stage
3's scoring, in ``stages/decoder.py``):

- ``random``: a seeded uniform draw per image;
- ``avgpool``: each encoder's grid average-pooled to the smallest square grid with enough cells, then
  an even subsample of those cells (spatial coverage, like a lower-resolution encoder);
- ``visionzip``: VisionZip-style: the dominant tokens by the encoder's own attention importance, plus
  a few contextual tokens, each the mean of the remaining tokens closest to it;
- ``drop_encoder``: one encoder's tokens removed, the others evenly subsampled to the budget.

The budget is split across encoders in proportion to their token counts where a method works per
encoder (``avgpool``, ``drop_encoder``).

With ``proportional_attention='on'`` (``placed``), the baselines whose kept tokens are tokens of the image
(``random``, ``drop_encoder``, and ``visionzip``, whose contextual tokens sit at the token they merge into) also
say where each kept token sits among the unpruned ones and how many it stands for, as METEOR's stages do: the
comparison at equal cost then isolates the selection. ``avgpool`` cannot: its tokens are means over grid cells,
and its even subsample of the pooled cells leaves regions that no kept token stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core.budget import rank_budgets
from ..core.select import compaction_index, gather_tokens, topk_mask
from ..core.token_sizes import kept_sizes

PRE_LLM = ("random", "avgpool", "visionzip", "drop_encoder")
PLACED = ("random", "visionzip", "drop_encoder")  # the pre-LLM baselines that take proportional attention
CONTEXT_SHARE = 10 / 64  # VisionZip's default on LLaVA-1.5: 54 dominant + 10 contextual of 64 kept


@dataclass
class EncoderTokens:
    """One encoder's projected tokens entering the language model."""

    tokens: torch.Tensor  # (B, N, D)
    grid: Optional[int] = None  # side of its square token grid, when it has one
    importance: Optional[torch.Tensor] = None  # (B, N), for visionzip


def _even(n: int, k: int, device) -> torch.Tensor:
    """k indices spread evenly over range(n)."""
    if k >= n:
        return torch.arange(n, device=device)
    return torch.floor(torch.arange(k, device=device, dtype=torch.float64) * n / k).long()


def _random_index(b: int, n: int, keep: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.stack([torch.randperm(n, generator=g)[:keep].sort().values for _ in range(b)])


def random_keep(tokens: torch.Tensor, keep: int, seed: int) -> torch.Tensor:
    b, n, _ = tokens.shape
    return gather_tokens(tokens, _random_index(b, n, keep, seed).to(tokens.device))


def _pool(enc: EncoderTokens, keep: int) -> torch.Tensor:
    b, n, d = enc.tokens.shape
    if keep >= n:
        return enc.tokens
    side = enc.grid or int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"avgpool needs a square token grid per encoder, got {n} tokens")
    out = math.ceil(math.sqrt(keep))
    grid = enc.tokens.transpose(1, 2).reshape(b, d, side, side)
    pooled = F.adaptive_avg_pool2d(grid.float(), out).to(enc.tokens.dtype).flatten(2).transpose(1, 2)
    return pooled[:, _even(out * out, keep, pooled.device)]


def avgpool_keep(encoders: Sequence[EncoderTokens], keep: int) -> torch.Tensor:
    shares = rank_budgets(keep, [e.tokens.shape[1] for e in encoders])
    return torch.cat([_pool(e, k) for e, k in zip(encoders, shares) if k > 0], dim=1)


def visionzip_keep(encoders: Sequence[EncoderTokens], keep: int) -> torch.Tensor:
    tokens = torch.cat([e.tokens for e in encoders], dim=1)
    importance = torch.cat([_normalised(e) for e in encoders], dim=1)
    b, n, _ = tokens.shape
    if keep >= n:
        return tokens
    contextual = min(keep - 1, max(1, round(keep * CONTEXT_SHARE))) if keep > 1 else 0
    dominant = keep - contextual
    valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    top = topk_mask(importance, torch.full((b,), dominant, device=tokens.device), valid)
    index, _ = compaction_index(top)
    kept = gather_tokens(tokens, index)
    if contextual == 0:
        return kept
    rest_index, _ = compaction_index(~top)
    rest = gather_tokens(tokens, rest_index)  # (B, n - dominant, D)
    targets = rest[:, _even(rest.shape[1], contextual, rest.device)]
    sim = F.normalize(rest.float(), dim=-1) @ F.normalize(targets.float(), dim=-1).transpose(1, 2)
    assign = F.one_hot(sim.argmax(dim=-1), contextual).to(rest.dtype)  # (B, R, C)
    merged = assign.transpose(1, 2) @ rest / assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    return torch.cat([kept, merged], dim=1)


def _normalised(enc: EncoderTokens) -> torch.Tensor:
    """Per-image importance in [0, 1]: the encoder's attention score, or the feature norm of a CNN."""
    s = enc.importance if enc.importance is not None else enc.tokens.float().norm(dim=-1)
    lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values
    return (s - lo) / (hi - lo).clamp(min=1e-12)


def drop_encoder_keep(encoders: Sequence[EncoderTokens], keep: int, drop: int) -> torch.Tensor:
    index = _drop_encoder_index(encoders, keep, drop)
    return gather_tokens(torch.cat([e.tokens for e in encoders], dim=1), index)


def _drop_encoder_index(encoders: Sequence[EncoderTokens], keep: int, drop: int) -> torch.Tensor:
    """(B, keep) indices among all encoders' joined tokens: the others' tokens evenly subsampled, in order."""
    if not 0 <= drop < len(encoders):
        raise ValueError(f"MeteorConfig.drop_encoder={drop} is invalid: allowed 0..{len(encoders) - 1} (the encoders)")
    rest = [e for i, e in enumerate(encoders) if i != drop]
    available = sum(e.tokens.shape[1] for e in rest)
    if keep > available:
        raise ValueError(
            f"drop_encoder keeps {keep} tokens but only {available} remain without encoder {drop}: lower fusion_keep"
        )
    shares = rank_budgets(keep, [e.tokens.shape[1] for e in rest])
    offsets = [sum(e.tokens.shape[1] for e in encoders[:i]) for i in range(len(encoders))]
    rest_offsets = [o for i, o in enumerate(offsets) if i != drop]
    device = encoders[0].tokens.device
    index = torch.cat([o + _even(e.tokens.shape[1], k, device) for e, k, o in zip(rest, shares, rest_offsets) if k > 0])
    return index.expand(encoders[0].tokens.shape[0], -1)


# The same selections as mixes of one image's tokens: (k, n) rows whose product with its (n, D) tokens gives the kept
# tokens, and the token each kept one sits at (its "anchor"), so that a family can put the kept tokens back at
# their places (a packed crop grid, multimodal positions). The tests check them against the functions above.
def random_rows(n: int, k: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(k, n) one-hot rows: ``random_keep``'s draw, read off an identity matrix; and their tokens."""
    rows = random_keep(torch.eye(n)[None], k, seed)[0]
    return rows, rows.argmax(dim=1)


def pooled_rows(h: int, w: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(k, h*w) rows averaging the cells of an adaptive average pooling of the (h, w) grid to the smallest grid of
    its aspect with k cells or more (``avgpool_keep`` pools square grids only), then an even subsample of
    k of those cells; and the cell at the middle of each pooled region."""
    ph = min(h, math.ceil(math.sqrt(k * h / w)))
    pw = min(w, max(math.ceil(math.sqrt(k * w / h)), math.ceil(k / ph)))
    ph = max(ph, math.ceil(k / pw))
    rows = torch.zeros(ph * pw, h * w)
    middle = torch.zeros(ph * pw, dtype=torch.long)
    for a in range(ph):
        r0, r1 = (a * h) // ph, -((-(a + 1) * h) // ph)
        for b in range(pw):
            c0, c1 = (b * w) // pw, -((-(b + 1) * w) // pw)
            cell = torch.zeros(h, w)
            cell[r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
            rows[a * pw + b] = cell.flatten()
            middle[a * pw + b] = ((r0 + r1 - 1) // 2) * w + (c0 + c1 - 1) // 2
    pick = _even(ph * pw, k, None)
    return rows[pick], middle[pick]


def visionzip_rows(features: torch.Tensor, importance: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(k, n) rows of ``visionzip_keep`` on one image (its dominant tokens by importance, then its
    contextual tokens, each the mean of the remaining tokens most like it; the tests check the two agree), and
    the tokens they sit at: a dominant token at itself, a contextual one at the token it was merged into."""
    n = features.shape[0]
    if k >= n:
        return torch.eye(n), torch.arange(n)
    contextual = min(k - 1, max(1, round(k * CONTEXT_SHARE))) if k > 1 else 0
    top = topk_mask(importance.float().cpu()[None], torch.tensor([k - contextual]), torch.ones(1, n, dtype=torch.bool))[0]
    rows, anchors = [torch.eye(n)[top]], [torch.nonzero(top).flatten()]
    if contextual:
        rest = torch.nonzero(~top).flatten()
        targets = rest[_even(rest.shape[0], contextual, None)]
        feats = features.float().cpu()
        sim = F.normalize(feats[rest], dim=-1) @ F.normalize(feats[targets], dim=-1).T
        assign = F.one_hot(sim.argmax(dim=-1), contextual).float()  # (R, C)
        merged = torch.zeros(contextual, n)
        merged[:, rest] = assign.T / assign.sum(dim=0).clamp(min=1)[:, None]
        rows.append(merged)
        anchors.append(targets)
    return torch.cat(rows), torch.cat(anchors)


def keep_each(method: str, tokens: torch.Tensor, keep: int, grid: Tuple[int, int],
              importance: Optional[torch.Tensor] = None, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``method`` on each of ``tokens``' (n, N, D) inputs (one encoder's grid each, ``grid`` = (rows, columns)):
    (n, keep, D) kept tokens and the (n, keep) token each sits at. ``importance`` (n, N): visionzip's score
    (without it, the feature norm). ``random`` draws with ``seed + i`` for input i."""
    rows_per_input = []
    for i, feats in enumerate(tokens):
        if method == "random":
            rows, anchors = random_rows(feats.shape[0], keep, seed + i)
        elif method == "avgpool":
            rows, anchors = pooled_rows(grid[0], grid[1], keep)
        elif method == "visionzip":
            score = importance[i] if importance is not None else feats.float().norm(dim=-1)
            rows, anchors = visionzip_rows(feats, score, keep)
        else:
            raise ValueError(f"{method!r} is not a baseline that keeps tokens of each input: allowed random, avgpool, "
                             "visionzip")
        rows_per_input.append((rows, anchors))
    mix = torch.stack([r for r, _ in rows_per_input]).to(tokens.device, torch.float32)
    kept = (mix @ tokens.float()).to(tokens.dtype)
    return kept, torch.stack([a for _, a in rows_per_input]).to(tokens.device)


def placed(method: str, encoders: Sequence[EncoderTokens], keep: int, seed: int = 0, drop: Optional[int] = None
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``select`` (the same kept tokens) with, for proportional attention, where each sits among the encoders'
    joined tokens (B, keep) and how many tokens it stands for (B, keep; each row sums to the tokens entering).
    ``random`` and ``drop_encoder`` give each dropped token to the kept token most like it (of its own encoder
    where that keeps any: ``core.token_sizes``); ``visionzip``'s dominant tokens stand for themselves and each
    contextual token for the tokens it is the mean of."""
    tokens = torch.cat([e.tokens for e in encoders], dim=1)
    b, n, _ = tokens.shape
    owner = torch.cat([torch.full((e.tokens.shape[1],), i, dtype=torch.long) for i, e in enumerate(encoders)])
    if method in ("random", "drop_encoder"):
        index = (_random_index(b, n, min(keep, n), seed) if method == "random" else
                 _drop_encoder_index(encoders, keep, drop if drop is not None else -1)).to(tokens.device)
        return gather_tokens(tokens, index), index, kept_sizes(tokens, index, group=owner)
    if method == "visionzip":
        importance = torch.cat([_normalised(e) for e in encoders], dim=1)
        rows, anchors = zip(*(visionzip_rows(tokens[i], importance[i], keep) for i in range(b)))
        mix = torch.stack(rows).to(tokens.device)
        kept = (mix @ tokens.float()).to(tokens.dtype)
        return kept, torch.stack(anchors).to(tokens.device), (mix > 0).sum(dim=2).float()
    raise ValueError(f"the {method!r} baseline cannot run with proportional attention: allowed {', '.join(PLACED)} "
                     "(avgpool's tokens are means over grid cells, and regions it drops have no kept token standing "
                     "for them)")


def select(method: str, encoders: Sequence[EncoderTokens], keep: int, seed: int = 0,
           drop: Optional[int] = None) -> torch.Tensor:
    """Apply a pre-LLM baseline; returns (B, keep, D)."""
    if method == "random":
        return random_keep(torch.cat([e.tokens for e in encoders], dim=1), keep, seed)
    if method == "avgpool":
        return avgpool_keep(encoders, keep)
    if method == "visionzip":
        return visionzip_keep(encoders, keep)
    if method == "drop_encoder":
        return drop_encoder_keep(encoders, keep, drop if drop is not None else -1)
    raise ValueError(f"{method!r} is not a pre-LLM baseline: allowed {', '.join(PRE_LLM)}")
