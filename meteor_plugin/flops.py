"""FLOPs of a forward, counted from the shapes of the ops it runs (torch's FlopCounterMode).

Matmuls, convolutions and attention are counted; SDPA's CPU kernel is not in torch's table, so its
formula (2 matmuls of 2*B*H*Lq*Lk*d each) is added here. Elementwise work is not counted.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, lq, d = query_shape
    return 4 * b * h * lq * key_shape[-2] * d


def flop_counter() -> FlopCounterMode:
    """torch's counter with the SDPA CPU kernels added (the one `count_flops` and the profile use)."""
    return FlopCounterMode(display=False, custom_mapping=_custom())


def _custom():
    ops = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops[op] = _sdpa_flops
    return ops


def count_flops(fn: Callable[[], object]) -> float:
    with flop_counter() as counter:
        fn()
    return float(counter.get_total_flops())
