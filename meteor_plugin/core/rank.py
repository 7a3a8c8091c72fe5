"""Numerical rank of an encoder's token-by-channel feature matrix (HRank style), for Stage 1 budgets.

METEOR splits the token budget across encoders in proportion to these ranks. They barely vary from
image to image, so they are measured once on a few images (``meteor-plugin calibrate``) and stored.
"""

from __future__ import annotations

from typing import Optional

import torch


def numerical_rank(features: torch.Tensor, rtol: Optional[float] = None) -> torch.Tensor:
    """features: (B, N, C) or (N, C). Rank of each token-by-channel matrix: singular values above
    ``rtol * largest`` (default: the dtype's epsilon times max(N, C), as numpy/torch do). Returns (B,)."""
    x = features.float()
    if x.dim() == 2:
        x = x.unsqueeze(0)
    return torch.linalg.matrix_rank(x, rtol=rtol).float()


def mean_rank(features: torch.Tensor, rtol: Optional[float] = None) -> float:
    return float(numerical_rank(features, rtol).mean())
