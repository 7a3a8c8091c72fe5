"""Which METEOR config applies to a model.

``enable(config)`` sets one config for every model. ``enable()`` without a config lets each model use
the config saved in its checkpoint (``model.config.meteor``), or the defaults. Overrides given to
``enable`` apply on top of either. The resolved config is written back to ``model.config.meteor`` so
that ``save_pretrained`` stores it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from .config import MeteorConfig


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


def config_for(model: Any) -> MeteorConfig:
    """The config that applies to ``model`` now (``model`` is any module with a ``config``).

    The config found in ``model.config.meteor`` the first time (from the checkpoint, or set with
    ``attach``) is the model's own; what this function writes back there afterwards is not, so a
    later ``enable`` does not inherit the settings of an earlier one.
    """
    model_config = model.config
    current = getattr(model_config, "meteor", None)
    cache = model.__dict__.get("_meteor_config_cache")
    if cache is not None and cache[0] == ACTIVE.generation and cache[1] == current:
        return cache[2]
    if cache is None or cache[1] != current:
        model._meteor_own_config = stored_config(model_config)
    base = ACTIVE.config or model.__dict__.get("_meteor_own_config") or MeteorConfig()
    cfg = base.replace(**ACTIVE.overrides) if ACTIVE.overrides else base
    model_config.meteor = cfg.to_dict()
    model._meteor_config_cache = (ACTIVE.generation, model_config.meteor, cfg)
    return cfg


def attach(model: Any, config: MeteorConfig) -> None:
    """Store ``config`` in ``model.config.meteor`` (saved with the checkpoint)."""
    model.config.meteor = config.to_dict()
