"""Whether a model prunes now, and with which config: the global switch, scopes and attached models.

Three ways to turn pruning on, from the widest to the narrowest (``patching.py`` is the public side):

- the global switch, ``enable(config)`` / ``disable()``: every model of a pruned class, in every thread;
- a scope, ``with enabled(config):`` / ``with disabled():``: the code inside the block, in the thread (or
  asyncio task) that entered it; scopes nest, and leaving one gives back exactly what was there before;
- an attached model, ``attach(model, config)`` / ``detach(model)``: that model only (other instances of its class
  run unpruned), wherever it runs.

``pruning_config(model)`` answers for one model: None (run it as it is) inside ``disabled()``, or when nothing
turned pruning on for it; else its config. An explicit config (of the scope, or else of the global switch) wins
over the model's own (the one attached, else the one its checkpoint carries in ``config.meteor``), which wins over
the defaults; the scope's or switch's overrides apply on top. Under the global switch the config in force is
written to ``model.config.meteor`` (so ``save_pretrained`` stores it) and ``disable()`` puts back what was there
(``restore_configs``); scopes write nothing. What the plugin knows about a model's config is kept here, keyed
weakly by the config object (which a model shares with its inner model), never on the model.
"""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from torch.utils.weak import WeakIdKeyDictionary

from .config import MeteorConfig

_ABSENT = object()  # config.meteor did not exist


class _Active:
    """The global switch (``enable`` / ``disable``)."""

    def __init__(self) -> None:
        self.enabled = False
        self.config: Optional[MeteorConfig] = None
        self.overrides: Dict[str, Any] = {}
        self.targets: list = []
        self.generation = 0  # bumped by every enable/disable, invalidates per-model caches


ACTIVE = _Active()


@dataclass(frozen=True)
class Scope:
    """One ``enabled()`` or ``disabled()`` block."""

    on: bool
    config: Optional[MeteorConfig] = None
    overrides: Dict[str, Any] = field(default_factory=dict)


_SCOPE: contextvars.ContextVar[Optional[Scope]] = contextvars.ContextVar("meteor_scope", default=None)


def current_scope() -> Optional[Scope]:
    return _SCOPE.get()


def enter_scope(scope: Scope) -> contextvars.Token:
    return _SCOPE.set(scope)


def leave_scope(token: contextvars.Token) -> None:
    _SCOPE.reset(token)


def pruning_on() -> bool:
    """Whether pruning is on here for every model of a pruned class (a scope, else the global switch); attached
    models prune whatever this says, except inside ``disabled()``."""
    scope = _SCOPE.get()
    return scope.on if scope is not None else ACTIVE.enabled


def stored_config(model_config: Any) -> Optional[MeteorConfig]:
    data = getattr(model_config, "meteor", None)
    if data is None:
        return None
    if isinstance(data, MeteorConfig):
        return data
    try:
        return MeteorConfig.from_dict(dict(data))
    except ValueError as exc:
        raise ValueError(f"the METEOR config stored in this checkpoint (config.meteor) is invalid: {exc}") from exc


class _ConfigState:
    """What this module knows about one model config object."""

    def __init__(self) -> None:
        self.written: Any = _ABSENT  # the dict pruning_config last wrote to config.meteor (global switch)
        self.original: Any = _ABSENT  # what config.meteor held before (the checkpoint's or the user's)
        self.own: Optional[MeteorConfig] = None  # that, parsed
        self.attached: Optional[MeteorConfig] = None  # attach(model, config)
        self.before_attach: Any = _ABSENT  # config.meteor before attach wrote it (detach puts it back)
        self.cache: Dict[Any, tuple] = {}  # (id of the explicit config, overrides, generation) -> (it, config)


_STATES = WeakIdKeyDictionary()  # model config object -> _ConfigState (configs compare by value: by identity here)
_LOCK = threading.RLock()


def _state(model_config: Any) -> _ConfigState:
    state = _STATES.get(model_config)
    if state is None:
        state = _STATES[model_config] = _ConfigState()
    return state


def pruning_config(model: Any) -> Optional[MeteorConfig]:
    """The config ``model`` runs with now, or None to run it as it is (``model``: any module with a ``config``)."""
    scope = _SCOPE.get()
    if scope is not None and not scope.on:
        return None
    model_config = model.config
    with _LOCK:
        state = _STATES.get(model_config)
        attached = state.attached if state is not None else None
        if scope is not None:
            explicit, overrides, writes = scope.config, scope.overrides, False
        elif ACTIVE.enabled:
            explicit, overrides, writes = ACTIVE.config, ACTIVE.overrides, True
        elif attached is not None:
            explicit, overrides, writes = None, {}, False
        else:
            return None
        if state is None:
            state = _state(model_config)
        current = getattr(model_config, "meteor", _ABSENT)
        if current is not state.written:  # not ours: the checkpoint's, the user's or attach's
            state.own = stored_config(model_config) if current is not _ABSENT else None
            state.original = current
            state.cache.clear()
        key = (id(explicit), repr(sorted(overrides.items())), ACTIVE.generation)
        found = state.cache.get(key)
        if found is not None and found[0] is explicit:
            cfg = found[1]
        else:
            base = explicit or state.attached or state.own or MeteorConfig()
            cfg = base.replace(**overrides) if overrides else base
            state.cache[key] = (explicit, cfg)
        if writes and (current is not state.written or state.written != cfg.to_dict()):
            state.written = cfg.to_dict()
            model_config.meteor = state.written
        return cfg


def restore_configs() -> None:
    """Give every model config back the ``meteor`` entry it had before the global switch wrote one. An entry
    changed since (``attach`` while enabled) is the user's and stays."""
    with _LOCK:
        for model_config, state in list(_STATES.items()):
            if getattr(model_config, "meteor", _ABSENT) is state.written and state.written is not _ABSENT:
                if state.original is _ABSENT:
                    del model_config.meteor
                else:
                    model_config.meteor = state.original
            state.written, state.original = _ABSENT, _ABSENT
            state.cache.clear()
            if state.attached is None:
                del _STATES[model_config]


# Attached models ------------------------------------------------------------------------------------------------
def attach_config(model: Any, config: MeteorConfig) -> bool:
    """``model`` prunes with ``config`` from now on (stored in ``model.config.meteor``, so a saved checkpoint
    carries it); True if it was not attached before."""
    model_config = model.config
    with _LOCK:
        state = _state(model_config)
        first = state.attached is None
        if first:
            state.before_attach = getattr(model_config, "meteor", _ABSENT)
        state.attached = config
        model_config.meteor = config.to_dict()
        state.cache.clear()
        return first


def detach_config(model: Any) -> bool:
    """``model`` no longer prunes on its own; its ``config.meteor`` is what it was before ``attach``. True if it
    was attached."""
    model_config = model.config
    with _LOCK:
        state = _STATES.get(model_config)
        if state is None or state.attached is None:
            return False
        if state.before_attach is _ABSENT:
            if hasattr(model_config, "meteor"):
                del model_config.meteor
        else:
            model_config.meteor = state.before_attach
        state.attached, state.before_attach = None, _ABSENT
        state.written, state.original = _ABSENT, _ABSENT
        state.cache.clear()
        return True


def is_attached(model: Any) -> bool:
    state = _STATES.get(model.config)
    return state is not None and state.attached is not None


def attached_count() -> int:
    with _LOCK:
        return sum(1 for state in _STATES.values() if state.attached is not None)


def detach_all() -> int:
    """End every attachment (``disable()``); returns how many there were. The configs stay in ``config.meteor``."""
    with _LOCK:
        count = 0
        for model_config, state in list(_STATES.items()):
            if state.attached is not None:
                state.attached, state.before_attach = None, _ABSENT
                state.cache.clear()
                count += 1
        return count
