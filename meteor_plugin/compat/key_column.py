"""Proportional attention's key column (``core.key_column``) in transformers 5's attention.

transformers 5 routes every attention module through ``AttentionInterface.get_interface`` (SDPA,
FlashAttention-2 and registered functions alike), after the module has rotated its queries and keys and
updated the KV cache. While a decoder layer runs with a ``KeyColumn`` active (``active``, set around that
layer's call by Stage 3, per call), the function it gets widens the query, key and value by the column,
runs the kernel with the layer's own scale and the mask the layer was given (none for SDPA: padding rides
in the column, so the causal kernel runs; FlashAttention's 2-D padding mask), and slices the output back.

The KV cache (a ``DynamicCache``'s layers, which concatenate) stores the widened keys and values, so a
decoding step widens only its own new key and its query (``Cache.update`` is wrapped for that); any other
cache stores them as they are and the column is added to all of them at each step.

transformers 4.37 and 4.44 compute attention inline in their attention classes: there the decoder keeps the
additive float mask (``applies`` says where the column runs).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from .. import flops
from ..core import key_column as core
from . import transformers as compat


class KeyColumn:
    """One forward's key biases for the layers that share them: ``bias`` (B, Lk) per key, ``PAD_BIAS`` on padding
    keys, the last keys being those of the call's own tokens; ``valid`` (B, Lk), where the padding is in the
    column rather than in a mask (the FLOPs counter's needed pairs), else None."""

    def __init__(self, bias: torch.Tensor, valid: Optional[torch.Tensor]):
        self.bias = bias
        self.valid = valid
        self.used = False  # set by the attention function: a layer call that never reached it is refused


_ACTIVE: contextvars.ContextVar[Optional[KeyColumn]] = contextvars.ContextVar("meteor_key_column", default=None)


_FLOAT_MASK: contextvars.ContextVar[bool] = contextvars.ContextVar("meteor_key_column_off", default=False)


def applies(kind: str) -> bool:
    """Whether the key column runs here: transformers 5 (attention through ``AttentionInterface``), with a mask
    format of SDPA or FlashAttention (eager takes the additive mask; its kernel is not causal without one), and
    not inside ``float_mask()``."""
    return compat.generation() == "5" and kind in (compat.MASK_BOOL, compat.MASK_2D) and not _FLOAT_MASK.get()


@contextlib.contextmanager
def float_mask() -> Iterator[None]:
    """Inside it, proportional attention takes the additive float mask where the key column would run (SDPA then
    computes the full square; FlashAttention-2 refuses it): what the benchmarks and tests compare the column with."""
    token = _FLOAT_MASK.set(True)
    try:
        yield
    finally:
        _FLOAT_MASK.reset(token)


def current() -> Optional[KeyColumn]:
    """The key column of the decoder layer running now, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def active(column: Optional[KeyColumn]) -> Iterator[None]:
    """Around one decoder layer's call: its attention runs with ``column`` (None: as it is)."""
    if column is None:
        yield
        return
    column.used = False
    token = _ACTIVE.set(column)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
    if not column.used:
        raise RuntimeError(
            "meteor-plugin: proportional attention's key column was set for a decoder layer whose attention did not "
            "go through transformers' AttentionInterface, so its sizes and padding were not applied; set "
            "MeteorConfig.proportional_attention='off' for this model"
        )


def install(registry: Any) -> None:
    """Wrap ``AttentionInterface.get_interface`` and ``Cache.update`` (transformers 5; once, in the patch registry).
    Both run as they are outside a layer call with a column."""
    if compat.generation() != "5":
        return
    from transformers.cache_utils import Cache
    from transformers.modeling_utils import AttentionInterface

    if not registry.is_patched(AttentionInterface, "get_interface"):
        registry.patch(AttentionInterface, "get_interface", _get_interface(AttentionInterface.get_interface))
    if not registry.is_patched(Cache, "update"):
        registry.patch(Cache, "update", _cache_update(Cache.update))


_WIDENED: Dict[Callable, Callable] = {}


def _get_interface(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_interface(self, attn_implementation, default):
        fn = original(self, attn_implementation, default)
        if _ACTIVE.get() is None:
            return fn
        wrapped = _WIDENED.get(fn)
        if wrapped is None:
            wrapped = _WIDENED[fn] = _widened(fn)
        return wrapped

    return get_interface


def _widened(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def attention(module, query, key, value, attention_mask, *args, scaling=None, **kwargs):
        column = _ACTIVE.get()
        if column is None:
            return fn(module, query, key, value, attention_mask, *args, scaling=scaling, **kwargs)
        d = query.shape[-1]
        scale = float(scaling) if scaling is not None else d ** -0.5
        if key.shape[-1] == d:  # not widened in the cache: the column goes on every key now
            _check(column, key.shape[-2])
            key, value = core.widen_keys(key, value, column.bias[:, -key.shape[-2]:], core.width(d, query.device))
        query = core.widen_query(query, scale, key.shape[-1])
        with flops.attention_needs(d, column.valid):
            out, weights = fn(module, query, key, value, attention_mask, *args, scaling=scale, **kwargs)
        column.used = True
        return out[..., :d], weights

    return attention


def _check(column: KeyColumn, keys: int) -> None:
    if column.bias.shape[1] < keys:
        raise RuntimeError(
            f"meteor-plugin: proportional attention has biases for {column.bias.shape[1]} keys but the attention got "
            f"{keys}; the KV cache was changed outside the call that pruned it"
        )


def _cache_update(original: Callable) -> Callable:
    @functools.wraps(original)
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        column = _ACTIVE.get()
        if column is None or not _stores_widened(self, layer_idx, key_states.shape[-1]):
            return original(self, key_states, value_states, layer_idx, *args, **kwargs)
        _check(column, key_states.shape[-2])
        key_states, value_states = core.widen_keys(key_states, value_states, column.bias[:, -key_states.shape[-2]:],
                                                   core.width(key_states.shape[-1], key_states.device))
        return original(self, key_states, value_states, layer_idx, *args, **kwargs)

    return update


def _stores_widened(cache: Any, layer_idx: int, head_dim: int) -> bool:
    """Whether this cache layer concatenates what it gets (a ``DynamicLayer``), so widened keys can live in it."""
    from transformers.cache_utils import DynamicLayer

    if not STORE_WIDENED:
        return False
    layers = getattr(cache, "layers", None)
    if layers is None:
        return False
    if layer_idx >= len(layers):  # created by this update
        return getattr(cache, "layer_class_to_replicate", None) is DynamicLayer
    layer = layers[layer_idx]
    if type(layer) is not DynamicLayer:
        return False
    # a layer that already holds unwidened keys keeps them so (the column then goes on at each step)
    return not (layer.is_initialized and layer.keys.numel() and layer.keys.shape[-1] == head_dim)


STORE_WIDENED = True
