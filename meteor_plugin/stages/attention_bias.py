"""Proportional attention's key biases in a decoder layer's call: a key column where the attention takes one,
an additive float mask elsewhere.

The key column (``core.key_column``, run by ``compat.key_column``) carries each key's log(size), and the
padding, through the dot product: SDPA then gets no mask at all and runs its causal kernel, FlashAttention-2
gets its 2-D padding mask as without proportional attention. It runs on transformers 5 with SDPA or
FlashAttention (registered functions with their mask formats included); on 4.37 and 4.44, whose attention
classes compute inline, and with eager attention, the biases go in an additive float mask, which makes SDPA
compute the full square of queries by keys.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Tuple

import torch

from ..compat import key_column
from ..compat import transformers as compat
from ..core.key_column import with_padding


def runs_with(kind: str) -> bool:
    """Whether proportional attention can run with this mask format: everywhere but FlashAttention-2 on 4.x."""
    return kind != compat.MASK_2D or key_column.applies(kind)


def layer_mask(kind: str, query_valid: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype,
               bias: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], Optional[key_column.KeyColumn]]:
    """(the layer's attention mask, its key column or None) for queries ``query_valid`` (B, Q), the last Q of the keys
    ``key_valid`` (B, K), with per-key ``bias`` (B, K) or None (no proportional attention). SDPA gets no mask where
    none is needed (no padding, or padding in the column), so its causal kernel runs."""
    q, k = query_valid.shape[1], key_valid.shape[1]
    causal = kind == compat.MASK_BOOL and (q == k or q == 1)  # SDPA with no mask: its causal kernel (or one step)
    if bias is None:
        if causal and bool(key_valid.all()):
            return None, None
        return compat.build_mask(kind, query_valid, key_valid, dtype), None
    if not key_column.applies(kind):
        return compat.build_mask(kind, query_valid, key_valid, dtype, bias), None
    biases = with_padding(bias, key_valid)
    if causal:  # the padding rides in the column
        return None, key_column.KeyColumn(biases, key_valid)
    return compat.build_mask(kind, query_valid, key_valid, dtype), key_column.KeyColumn(biases, None)


@contextlib.contextmanager
def around(call: compat.LayerCall, column: Optional[key_column.KeyColumn]) -> Iterator[None]:
    """Around one decoder layer's call: its rotary floor (4.37) and its key column."""
    with compat.rotary_floor(call), key_column.active(column):
        yield


def install(registry: Any) -> None:
    key_column.install(registry)
