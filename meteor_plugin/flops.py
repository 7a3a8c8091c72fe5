"""FLOPs of a forward: the work that is needed, counted from the ops it runs (torch's FlopCounterMode).

Matmuls and convolutions count as torch counts them; elementwise work is not counted. Attention kernels
(SDPA's CPU and CUDA kernels, FlashAttention-2's) count 2 x (key width + value width) FLOPs per (query, key)
pair that is needed, per head:

- a causal call (``is_causal``, FlashAttention's ``causal``) needs its lower triangle: for L queries over L keys
  the L(L+1)/2 pairs (i, j <= i); a block of queries at the end of a longer key sequence (decoding) the keys
  each query can see;
- a masked call needs the pairs its mask lets through: padding keys, and anything else masked, are not needed;
- where padding (or a bias) rides outside any mask, the kernel call that knows it says so with
  ``attention_needs`` (proportional attention's key column: its padding keys and its extra head width are not
  needed).

What a kernel executes beyond that is counted apart, as overhead (``Counter.overhead``), never in the total:
a mask makes SDPA compute the full square of queries by keys, where the causal kernel skips the upper
triangle; a widened head computes its extra columns. Attention written as matmuls (eager) counts as those
matmuls: what it executes, the full square.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

# (head width, key validity (B, Lk) or None) of the attention kernel call running now, where its caller knows
# more about what is needed than the kernel's arguments say.
_NEEDS: contextvars.ContextVar[Optional[Tuple[int, Optional[torch.Tensor]]]] = contextvars.ContextVar(
    "meteor_attention_needs", default=None)


@contextlib.contextmanager
def attention_needs(head_dim: int, key_valid: Optional[torch.Tensor] = None) -> Iterator[None]:
    """Around one attention kernel call whose query, key and value were widened (padded) from ``head_dim``
    channels, and whose padding keys (``key_valid`` False, (B, Lk)) are kept out by other means than a mask."""
    token = _NEEDS.set((int(head_dim), key_valid))
    try:
        yield
    finally:
        _NEEDS.reset(token)


def _pairs_square(lq: int, lk: int) -> int:
    return lq * lk


def _pairs_top_left(lq: int, lk: int) -> int:
    """SDPA's ``is_causal``: query i sees keys 0..i."""
    full = min(lq, lk)
    return full * (full + 1) // 2 + max(0, lq - lk) * lk


def _pairs_bottom_right(lq: int, lk: int) -> int:
    """Queries at the end of the key sequence (FlashAttention's causal): query i sees keys 0..lk - lq + i."""
    if lk >= lq:
        return lq * (lk - lq) + lq * (lq + 1) // 2
    return lk * (lk + 1) // 2  # the first lq - lk queries see no key


def _pairs_valid(key_valid: torch.Tensor, lq: int) -> int:
    """Pairs of real queries and the real keys at or before them, the queries being the last ``lq`` keys;
    summed over the batch."""
    valid = key_valid.bool()
    seen = valid.long().cumsum(dim=1)[:, -lq:]  # real keys up to each query's own position
    return int((seen * valid[:, -lq:]).sum())


def _pairs_masked(mask: torch.Tensor, b: int, h: int, lq: int, lk: int) -> int:
    """Pairs a boolean or additive mask lets through, over the batch and the heads."""
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return int(torch.broadcast_to(visible, (b, h, lq, lk)).sum())


class Counter(FlopCounterMode):
    """torch's counter with attention counted as needed; ``overhead`` holds what the attention kernels executed
    beyond that (FLOPs), ``get_total_flops()`` the needed FLOPs."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=_mapping(self))
        self.overhead = 0

    def attention(self, b: int, h: int, lq: int, lk: int, dk: int, dv: int, causal: Optional[str],
                  mask: Optional[torch.Tensor] = None, per_sequence: Optional[list] = None) -> int:
        """Needed FLOPs of one kernel call (returned) and its overhead (added to ``overhead``).

        ``causal``: None, "top-left" (SDPA) or "bottom-right" (FlashAttention); ``per_sequence``: the (lq, lk) of
        each sequence of a variable-length call (then b = 1)."""
        def executed_pairs(q: int, k: int) -> int:
            if causal == "top-left" and mask is None:
                return _pairs_top_left(q, k)
            if causal == "bottom-right":
                return _pairs_bottom_right(q, k)
            return _pairs_square(q, k)

        shapes = per_sequence or [(lq, lk)] * b
        executed = h * sum(executed_pairs(q, k) for q, k in shapes)
        needs = _NEEDS.get()
        width = (needs[0], needs[0]) if needs is not None else (dk, dv)
        key_valid = needs[1] if needs is not None else None
        if mask is not None:
            needed = _pairs_masked(mask, b, h, lq, lk)
        elif key_valid is not None and per_sequence is None and tuple(key_valid.shape) == (b, lk):
            needed = h * _pairs_valid(key_valid, lq) if (causal or lq == 1) else h * int(key_valid.sum()) * lq
        else:
            needed = executed
        flops_needed = 2 * needed * sum(width)
        self.overhead += max(0, 2 * executed * (dk + dv) - flops_needed)
        return flops_needed


def _bind(op: Any, args: tuple, kwargs: dict) -> Dict[str, Any]:
    names = [a.name for a in op.default._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _sdpa_formula(counter: Counter, op: Any) -> Callable:
    """SDPA's kernels: (B, H, L, D) query, key and value; ``is_causal`` is aligned top-left."""
    def formula(*args, out_val=None, **kwargs):
        a = _bind(op, args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        mask = a.get("attn_mask", a.get("attn_bias"))
        b, h, lq, dk = q.shape
        return counter.attention(b, h, lq, k.shape[-2], dk, v.shape[-1], "top-left" if a.get("is_causal") else None,
                                 mask if torch.is_tensor(mask) else None)

    formula._get_raw = True  # type: ignore[attr-defined]
    return formula


def _flash_formula(counter: Counter, op: Any, varlen: bool) -> Callable:
    """FlashAttention-2's ops: (B, L, H, D), or (total, H, D) with cumulative sequence lengths; causal is aligned
    bottom-right; padding is never in the call (it is unpadded first)."""
    def formula(*args, out_val=None, **kwargs):
        a = _bind(op, args, kwargs)
        q, k, v = a["q"], a["k"], a["v"]
        causal = "bottom-right" if a.get("causal") else None
        if not varlen:
            b, lq, h, dk = q.shape
            return counter.attention(b, h, lq, k.shape[1], dk, v.shape[-1], causal)
        cq, ck = a["cu_seqlens_q"].tolist(), a["cu_seqlens_k"].tolist()
        seqs = [(cq[i + 1] - cq[i], ck[i + 1] - ck[i]) for i in range(len(cq) - 1)]
        return counter.attention(1, q.shape[1], 0, 0, q.shape[-1], v.shape[-1], causal, per_sequence=seqs)

    formula._get_raw = True  # type: ignore[attr-defined]
    return formula


SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable",
            "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention")


def _mapping(counter: Counter) -> Dict[Any, Callable]:
    ops: Dict[Any, Callable] = {}
    for name in SDPA_OPS:
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops[op] = _sdpa_formula(counter, op)
    for name, varlen in (("_flash_attn_forward", False), ("_flash_attn_varlen_forward", True)):
        try:  # registered by the flash_attn package once imported (2.6+), on GPUs
            op = getattr(torch.ops.flash_attn, name)
        except (AttributeError, RuntimeError):
            continue
        ops[op] = _flash_formula(counter, op, varlen)
    return ops


def flop_counter() -> Counter:
    """The counter ``count_flops``, the benches and the profile use."""
    return Counter()


def count(fn: Callable[[], object]) -> Tuple[float, float]:
    """(needed FLOPs, attention FLOPs executed beyond them) of ``fn()``."""
    with flop_counter() as counter:
        fn()
    return float(counter.get_total_flops()), float(counter.overhead)


def count_flops(fn: Callable[[], object]) -> float:
    """Needed FLOPs of ``fn()``."""
    return count(fn)[0]
