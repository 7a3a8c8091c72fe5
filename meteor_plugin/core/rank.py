"""Ranks of an encoder's token-by-channel feature matrix, for Stage 1's budget split across encoders.

METEOR splits the token budget in proportion to each encoder's rank at its pruning boundary (the
paper's ``r_b[l]``, after HRank). Two definitions (``RANK_MEASURES``):

- ``numerical``: singular values above ``rtol * largest`` (numpy's default tolerance). Measured, it
  saturates at min(tokens, channels) on every encoder we tried (CLIP 63.94 and ConvNeXt 64.00 of 64 on the
  v1 fidelity model; min(N, C) on EAGLE-X4 sizes), so the split it gives is uniform. Kept for the paper.
- ``effective`` (the default): the effective rank of Roy and Vetterli (2007), ``exp(H(p))`` with
  ``p_i = s_i / sum(s)`` the normalised singular values, of the features after removing the mean token.
  It is the number of directions the tokens really spread over: a few for an encoder whose tokens share
  one pattern, close to min(N, C) for one that sees noise. Centring first removes the common offset that
  alone holds 58-69% of a projected encoder's energy and says nothing about content. No tolerance.

Ranks barely vary from image to image, so they are measured once (``meteor-plugin calibrate``) and stored.
"""

from __future__ import annotations

from typing import Optional

import torch

RANK_MEASURES = ("effective", "numerical")


def _batched(features: torch.Tensor) -> torch.Tensor:
    x = features.float()
    return x.unsqueeze(0) if x.dim() == 2 else x


def numerical_rank(features: torch.Tensor, rtol: Optional[float] = None) -> torch.Tensor:
    """features: (B, N, C) or (N, C). Rank of each token-by-channel matrix: singular values above
    ``rtol * largest`` (default: the dtype's epsilon times max(N, C), as numpy/torch do). Returns (B,)."""
    return torch.linalg.matrix_rank(_batched(features), rtol=rtol).float()


def effective_rank(features: torch.Tensor) -> torch.Tensor:
    """features: (B, N, C) or (N, C). Roy-Vetterli effective rank of each matrix after subtracting its mean
    token: ``exp(-sum p log p)``, ``p`` the singular values normalised to sum 1. In [1, min(N, C)]. (B,)."""
    x = _batched(features)
    x = x - x.mean(dim=1, keepdim=True)
    s = torch.linalg.svdvals(x.double())
    total = s.sum(dim=-1, keepdim=True)
    p = torch.where(total > 0, s / total.clamp(min=1e-300), torch.zeros_like(s))
    entropy = -(p * torch.log(p.clamp(min=1e-300))).sum(dim=-1)
    return torch.exp(entropy).float()


def encoder_rank(features: torch.Tensor, measure: str = "effective", rtol: Optional[float] = None) -> torch.Tensor:
    """The rank ``measure`` (one of ``RANK_MEASURES``) of each matrix in ``features``: (B,)."""
    if measure == "effective":
        return effective_rank(features)
    if measure == "numerical":
        return numerical_rank(features, rtol)
    raise ValueError(f"rank measure {measure!r} is invalid: allowed {', '.join(map(repr, RANK_MEASURES))}")

