"""Token scores of Stages 1 and 2 (pure tensor functions, no model knowledge).

- ``similarity_to_mean``: shallow-layer redundancy; the mean token stands for the low-frequency
  background, so tokens most similar to it are dropped first (METEOR, finding 1).
- ``cls_attention`` / ``received_attention``: deep-layer importance from one block's q/k; the
  second is for encoders without a CLS token (mean attention each token receives).
- ``cooperative_redundancy``: Stage 2's cross-encoder redundancy, the summed cosine similarity of a
  token to the surviving tokens of every other encoder, optionally after ``centre_per_owner``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def similarity_to_mean(x: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C). Cosine similarity of each token to the mean token, (B, N)."""
    mean = x.float().mean(dim=1, keepdim=True)
    return F.cosine_similarity(x.float(), mean, dim=-1)


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k: (B, H, T, d) with the CLS token at index 0. Attention of CLS to the other T-1 tokens,
    averaged over heads: (B, T-1)."""
    logits = torch.matmul(q[:, :, :1].float(), k.float().transpose(-1, -2)) * scale  # (B, H, 1, T)
    probs = torch.softmax(logits, dim=-1)[:, :, 0, 1:]
    return probs.mean(dim=1)


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 256) -> torch.Tensor:
    """q, k: (B, H, T, d). Mean attention each token receives over all queries and heads: (B, T)."""
    b, h, t, _ = q.shape
    total = torch.zeros(b, t, dtype=torch.float32, device=q.device)
    kt = k.float().transpose(-1, -2)
    for start in range(0, t, chunk):
        probs = torch.softmax(torch.matmul(q[:, :, start:start + chunk].float(), kt) * scale, dim=-1)
        total += probs.sum(dim=(1, 2))
    return total / (h * t)


def centre_per_owner(z: torch.Tensor, owner: torch.Tensor, alive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """z minus, per sample, the mean of its encoder's (alive) tokens. Separately trained projectors give
    each encoder's tokens their own common offset, and an uncentred cosine between two encoders then
    measures the offsets rather than the content."""
    z = z.float()
    weight = torch.ones(z.shape[:2], device=z.device) if alive is None else alive.float()
    out = z.clone()
    for j in owner.unique().tolist():
        cols = owner == j
        w = weight[:, cols].unsqueeze(-1)  # (B, n_j, 1)
        mean = (z[:, cols] * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1.0)
        out[:, cols] = z[:, cols] - mean
    return out


def cooperative_redundancy(z: torch.Tensor, owner: torch.Tensor, alive: Optional[torch.Tensor] = None,
                           centred: bool = False) -> torch.Tensor:
    """METEOR's mutual redundancy ``R_i = sum_{m of other encoders} cos(z_i, z_m)``.

    z: (B, T, D) projected tokens of all encoders, concatenated; owner: (T,) encoder index of each
    token; alive: (B, T) bool, the surviving tokens that count as others (default: all); centred: take
    the cosine after `centre_per_owner`. Returns (B, T); lower means the token adds more that the other
    encoders do not already cover.
    """
    owner = owner.to(z.device)
    if centred:
        z = centre_per_owner(z, owner, alive)
    zn = F.normalize(z.float(), dim=-1)
    sim = torch.matmul(zn, zn.transpose(-1, -2))  # (B, T, T)
    other = owner.view(-1, 1) != owner.view(1, -1)  # (T, T)
    weight = other.unsqueeze(0).float()
    if alive is not None:
        weight = weight * alive.unsqueeze(1).float()
    return (sim * weight).sum(dim=-1)
