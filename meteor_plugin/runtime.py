"""Which METEOR config applies to a model.

``enable(config)`` sets one config for every model. ``enable()`` without a config lets each model use
the config saved in its checkpoint (``model.config.meteor``), or the defaults. Overrides given to
``enable`` apply on top of either. The resolved config is written back to ``model.config.meteor`` so
that ``save_pretrained`` stores it; ``disable()`` puts back what was there before (``restore_configs``).
What the plugin knows about a model's config is kept here, keyed weakly by the config object, never on
the model.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Optional

from torch.utils.weak import WeakIdKeyDictionary

from .config import MeteorConfig

_ABSENT = object()  # config.meteor did not exist


class _Active:
    def __init__(self) -> None:
        self.enabled = False
        self.config: Optional[MeteorConfig] = None
        self.overrides: Dict[str, Any] = {}
        self.targets: list = []
        self.generation = 0  # bumped by every enable/disable, invalidates per-model caches


ACTIVE = _Active()


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
    """What ``config_for`` knows about one model config object."""

    def __init__(self) -> None:
        self.written: Any = _ABSENT  # the dict config_for last wrote to config.meteor
        self.original: Any = _ABSENT  # what config.meteor held before (the checkpoint's or the user's)
        self.own: Optional[MeteorConfig] = None  # that, parsed
        self.generation = -1
        self.config: Optional[MeteorConfig] = None


_STATES = WeakIdKeyDictionary()  # model config object -> _ConfigState (configs compare by value: by identity here)
_LOCK = threading.Lock()


def config_for(model: Any) -> MeteorConfig:
    """The config that applies to ``model`` now (``model`` is any module with a ``config``).

    The config found in ``model.config.meteor`` that this function did not write (from the checkpoint,
    or set with ``attach``) is the model's own; what this function writes back there is not, so a later
    ``enable`` does not inherit the settings of an earlier one.
    """
    model_config = model.config
    current = getattr(model_config, "meteor", _ABSENT)
    with _LOCK:
        state = _STATES.get(model_config)
        if state is None:
            state = _STATES[model_config] = _ConfigState()
        if current is not state.written:  # not ours: the checkpoint's or the user's
            state.own = stored_config(model_config) if current is not _ABSENT else None
            state.original = current
            state.generation = -1
        if state.generation == ACTIVE.generation and state.config is not None:
            return state.config
        base = ACTIVE.config or state.own or MeteorConfig()
        cfg = base.replace(**ACTIVE.overrides) if ACTIVE.overrides else base
        state.written = cfg.to_dict()
        model_config.meteor = state.written
        state.generation, state.config = ACTIVE.generation, cfg
        return cfg


def restore_configs() -> None:
    """Give every model config back the ``meteor`` entry it had before ``config_for`` wrote one. An entry
    changed since (``attach`` while enabled) is the user's and stays."""
    with _LOCK:
        for model_config, state in list(_STATES.items()):
            if getattr(model_config, "meteor", _ABSENT) is state.written and state.written is not _ABSENT:
                if state.original is _ABSENT:
                    del model_config.meteor
                else:
                    model_config.meteor = state.original
        _STATES.clear()


def attach(model: Any, config: MeteorConfig) -> None:
    """Store ``config`` in ``model.config.meteor`` (saved with the checkpoint)."""
    model.config.meteor = config.to_dict()
