"""What one forward or one ``generate`` carries from the vision tower to the language model.

A ``MeteorCall`` is created by the outermost patched method a user calls (``generate``, ``forward``,
``encode_images``, ``prepare_inputs_labels_for_multimodal``, a vision tower's or language model's
``forward``) and held in a context variable until that method returns; the methods it calls find it
with ``current()``. Nothing of a call lives on a model, a module or a class: one model serves many
threads at once (LLaVA's model worker runs several), and a deep copy is an independent model.

Three things outlive a call, each tied to what needs it rather than to a model:
- a layer recomputed by gradient checkpointing during backward (after the call returned, maybe on
  another thread) finds its step by its input's storage (``remember_step`` / ``recomputed_step``);
  the call is kept alive by the autograd graph of the call's output;
- the visual layout of an ``inputs_embeds`` tensor that ``prepare_inputs_labels_for_multimodal``
  returned to its caller travels with that tensor to the caller's ``forward(inputs_embeds=...)``;
- the stats of the last run, per thread, for ``meteor_plugin.stats(model)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class MeteorCall:
    """The state of one call, from the vision tower to the last decoding step."""

    grad: bool  # autograd was on when the call began: checkpointed layers may be recomputed later
    vision: Any = None  # VisionRecord of the last encode_images (Stages 1-2 stats)
    features: Optional[int] = None  # tokens per image the last encode_images produced
    encoder_request: Any = None  # what a CLIP tower's forward is asked to do (Stage 1 config and record)
    vit: Dict[int, Tuple[Any, int]] = field(default_factory=dict)  # id(ViT block) -> (VitPlan, block index)
    layout: Any = None  # VisualLayout spliced by prepare, waiting for the language model's forward
    defer_labels: bool = False  # forward takes the loss itself: prepare hands labels to the layout
    in_generate: bool = False
    decoder: Any = None  # DecoderPruner of this call's language model (its plan and pruned prefix)
    embeds_from_elsewhere: bool = False  # forward(inputs_embeds=...) the plugin did not build
    kept: List[Any] = field(default_factory=list)  # recompute steps this call must keep alive
    # A multimodal model whose language model is a module of its own (transformers' classes): the language model
    # this call prunes and the config it runs (``stages.decoder.patch_language_model``).
    language_model: Any = None
    language_config: Any = None
    family: Any = None  # what the model's family adapter carries through the call (its own typed record)


_CURRENT: contextvars.ContextVar[Optional[MeteorCall]] = contextvars.ContextVar("meteor_call", default=None)


def current() -> Optional[MeteorCall]:
    return _CURRENT.get()


@contextlib.contextmanager
def new_call() -> Iterator[MeteorCall]:
    """A call that lasts as long as the ``with`` block."""
    call = MeteorCall(grad=torch.is_grad_enabled())
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)


def entry(fn: Callable) -> Callable:
    """Run ``fn`` inside a call: the caller's if there is one, else a new one that ends with ``fn``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _CURRENT.get() is not None:
            return fn(*args, **kwargs)
        with new_call() as call:
            out = fn(*args, **kwargs)
        if call.kept:
            _keep_with_graph(call, out)
        return out

    return wrapper


# Gradient checkpointing: layers recomputed after the call -----------------------------------------------
_STEPS: "weakref.WeakValueDictionary[tuple, Any]" = weakref.WeakValueDictionary()


def _key(layer: torch.nn.Module, hidden: torch.Tensor) -> tuple:
    # Checkpointing recomputes a layer on its saved input, or a detached alias of it: same storage.
    return id(layer), hidden.data_ptr(), tuple(hidden.shape), tuple(hidden.stride())


class Step:
    """What one layer did in a call, kept for its recomputation in backward."""

    def __init__(self, value: Any):
        self.value = value


def remember_step(call: MeteorCall, layer: torch.nn.Module, hidden: torch.Tensor, value: Any) -> None:
    """Remember what ``layer`` does in this call (None: nothing) for a recomputation in backward."""
    if not call.grad:
        return
    step = Step(value)
    call.kept.append(step)
    _STEPS[_key(layer, hidden)] = step


def recomputed_step(layer: torch.nn.Module, hidden: torch.Tensor) -> Any:
    """The value a layer remembered in the forward being recomputed now (outside any call), or None.

    Only during backward: outside it a layer is never recomputed, and a remembered input's storage
    may since have been freed and reused by an unrelated tensor."""
    if torch._C._current_graph_task_id() == -1:
        return None
    step = _STEPS.get(_key(layer, hidden))
    return step.value if step is not None else None


def _keep_with_graph(call: MeteorCall, out: Any) -> None:
    """Keep ``call`` (and so its steps) alive as long as the autograd graph of ``out``."""
    for tensor in _tensors(out):
        if tensor.grad_fn is not None:
            tensor.grad_fn.metadata["meteor_call"] = call
            return


def _tensors(out: Any):
    if torch.is_tensor(out):
        yield out
    elif isinstance(out, dict) or hasattr(out, "values") and hasattr(out, "keys"):
        for value in out.values():
            yield from _tensors(value)
    elif isinstance(out, (tuple, list)):
        for value in out:
            yield from _tensors(value)


# prepare_inputs_labels_for_multimodal -> forward(inputs_embeds=...) ------------------------------------------
_LAYOUTS = WeakIdKeyDictionary()  # tensor -> VisualLayout (a plain WeakKeyDictionary compares tensors by value)


def hand_over(embeds: torch.Tensor, layout: Any) -> None:
    """``embeds`` leaves the call that spliced it: its layout goes with it to the next forward."""
    _LAYOUTS[embeds] = layout


def handed_over(embeds: Any) -> Any:
    if not torch.is_tensor(embeds):
        return None
    return _LAYOUTS.pop(embeds, None)


# Stats of the last run, per thread --------------------------------------------------------------------------
class _LastRuns(threading.local):
    def __init__(self) -> None:
        self.by_model: "weakref.WeakKeyDictionary[Any, Tuple[int, Any]]" = weakref.WeakKeyDictionary()


_LAST = _LastRuns()
_EPOCH = [0]  # bumped by disable(): stats of runs before it are forgotten in every thread


def record_stats(model: Any, stats: Any) -> None:
    _LAST.by_model[model] = (_EPOCH[0], stats)


def last_stats(model: Any) -> Any:
    found = _LAST.by_model.get(model)
    if found is None or found[0] != _EPOCH[0]:
        return None
    return found[1]


def forget_stats() -> None:
    _EPOCH[0] += 1
