"""A per-key bias on the attention logits, carried by the dot product instead of a mask (no model knowledge).

Proportional attention adds ``b_j`` (log of the tokens key j stands for) to every query's logit of key j.
With one more channel on every query, the constant ``1 / scale``, and on every key, ``b_j``, the kernel's
``scale * q.k`` gains exactly ``b_j``: the attention then runs with no additive mask, so SDPA keeps its
causal kernel and FlashAttention-2 can run it at all. The keys' channel does not depend on the scale, so
keys widened once (in the KV cache) serve every later step. A padding key gets ``PAD_BIAS``, so a mask is
not needed for padding either.
Values get zero channels, and the output's extra channels (zeros) are sliced off by the caller. The scale
passed to the kernel must stay the one of the original head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD_BIAS = -1.0e4  # a padding key's logit bias: exp(-1e4) is 0 in every float format, and -1e4 fits float16


def width(head_dim: int, device: torch.device) -> int:
    """The head width the kernel runs on: one channel more; on GPUs rounded up to a multiple of 8, which SDPA's
    CUDA kernels and FlashAttention-2 need (the CPU kernel takes any width, and every channel costs there)."""
    if device.type == "cpu":
        return head_dim + 1
    return -(-(head_dim + 1) // 8) * 8


def widen_query(query: torch.Tensor, scale: float, to: int) -> torch.Tensor:
    """(..., L, d) -> (..., L, to): the constant channel ``1 / scale`` at channel d, zeros after it."""
    d = query.shape[-1]
    out = F.pad(query, (0, to - d))
    out[..., d] = 1.0 / scale
    return out


def widen_keys(key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, to: int):
    """Keys and values (B, H, L, d) -> (B, H, L, to): each key's ``bias`` (B, L) at channel d, values padded with
    zeros. ``scale * widen_query(q, scale) . widen_keys(k)`` is then ``scale * q.k + bias``."""
    d = key.shape[-1]
    keys = F.pad(key, (0, to - d))
    keys[..., d] = bias.to(key.dtype)[:, None, :]
    return keys, F.pad(value, (0, to - value.shape[-1]))


def with_padding(bias: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Key biases (B, L) with ``PAD_BIAS`` on the keys that are padding (``valid`` False)."""
    return bias.float().masked_fill(~valid.bool(), PAD_BIAS)
