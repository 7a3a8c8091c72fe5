"""enable() and disable(): patch every installed model family (adapters/), and put everything back."""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional, Union

from . import adapters
from .compat import transformers as compat
from .config import MeteorConfig
from .registry import REGISTRY
from .percall import forget_stats
from .runtime import ACTIVE, restore_configs
from .adapters import refusal

ConfigLike = Union[MeteorConfig, dict, str, os.PathLike, None]


def _as_config(config: ConfigLike) -> Optional[MeteorConfig]:
    if config is None or isinstance(config, MeteorConfig):
        return config
    if isinstance(config, dict):
        return MeteorConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return MeteorConfig.from_file(config)
    raise TypeError(f"enable() takes a MeteorConfig, a dict or a path to a .json/.yaml file, not {type(config).__name__}")


def enable(
    config: ConfigLike = None,
    *,
    targets: Optional[Iterable[str]] = None,
    allow_untested_transformers: Optional[bool] = None,
    **overrides: Any,
) -> MeteorConfig:
    """Patch the classes of every installed model family (``adapters/``: the llava package, EAGLE,
    transformers' LLaVA) so their models prune visual tokens; ``targets`` names a subset of them.

    While enabled, a forward of a vision-language model no family prunes raises
    ``UnsupportedModelError`` naming its class (``adapters/refusal.py``); text-only models run as usual.

    ``config`` applies to every model; without it each model uses the config saved in its checkpoint
    (``config.meteor``) or the defaults. ``overrides`` are MeteorConfig fields applied on top.
    Calling ``enable`` again changes the config without patching twice. Returns the config that
    applies to models without a saved one.
    """
    if allow_untested_transformers is None:
        allow_untested_transformers = os.environ.get("METEOR_ALLOW_UNTESTED_TRANSFORMERS", "") == "1"
    compat.check_version(allow_untested_transformers)
    cfg = _as_config(config)
    effective = (cfg or MeteorConfig()).replace(**overrides) if overrides else (cfg or MeteorConfig())
    names = list(targets) if targets is not None else [f.name for f in adapters.FAMILIES]
    unknown = [n for n in names if n not in adapters.BY_NAME]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}: choose from {sorted(adapters.BY_NAME)}")
    chosen = [adapters.BY_NAME[n] for n in names if adapters.BY_NAME[n].is_installed()]
    if not chosen:
        raise RuntimeError(
            "meteor-plugin found nothing to patch: install LLaVA (pip install --no-deps llava-torch==1.2.2.post1) "
            "or put an EAGLE checkout (its `eagle` package) on the Python path"
        )
    for target in chosen:
        target.patch(REGISTRY)
    refusal.install(REGISTRY, {cls: why for f in adapters.FAMILIES for cls, why in f.refused.items()})
    compat.patch_rotary_floor(REGISTRY)
    ACTIVE.enabled = True
    ACTIVE.config = cfg
    ACTIVE.overrides = dict(overrides)
    ACTIVE.generation += 1
    ACTIVE.targets = [t.name for t in chosen]
    return effective


def disable() -> None:
    """Restore every patched attribute and remove every hook, give every model config back the ``meteor``
    entry it had before ``enable`` (a config the checkpoint carried or the user attached stays), and forget
    the stats of every run: ``meteor_plugin.stats(model)`` returns None until the next pruned run."""
    REGISTRY.restore_all()
    restore_configs()
    forget_stats()
    ACTIVE.enabled = False
    ACTIVE.config = None
    ACTIVE.overrides = {}
    ACTIVE.generation += 1
    ACTIVE.targets = []


def is_enabled() -> bool:
    return ACTIVE.enabled


# Options by which a command line chooses its config itself. The code that reads that command line
# (``meteor_plugin.run``, ``meteor_plugin.train``, a patched entry point) then enables the plugin, so the
# import leaves METEOR_CONFIG alone: an explicit option wins over the environment, even a stale one.
EXPLICIT_OPTIONS = ("--meteor-config", "--meteor_config", "--meteor-off", "--meteor_off")


def names_config(argv: Iterable[str]) -> bool:
    return any(arg.partition("=")[0] in EXPLICIT_OPTIONS for arg in argv)


def env_config_path() -> Optional[str]:
    return os.environ.get("METEOR_CONFIG") or None


def enable_from_env() -> Optional[MeteorConfig]:
    """Enable with the config file named by METEOR_CONFIG, if that variable is set.

    Not in the ``meteor-plugin`` tool itself: its subcommands take explicit configs, and ``patch`` must
    work on a machine where the codebase it patches is not installed yet. Not when the command line
    names a config (``EXPLICIT_OPTIONS``): that one wins.
    """
    path = env_config_path()
    argv = sys.argv or [""]
    if not path or os.path.basename(argv[0]) == "meteor-plugin" or names_config(argv[1:]):
        return None
    return enable(MeteorConfig.from_file(path))
