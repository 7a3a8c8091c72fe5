"""Turning pruning on and off: the global switch (``enable``/``disable``), scopes (``enabled``/``disabled``) and
attached models (``attach``/``detach``); ``runtime.py`` says which config a model runs with under them.

The families' classes are patched (``adapters/``, recorded in ``registry.REGISTRY``) while anything needs them:
the global switch, a live ``enabled()`` scope in any thread, or an attached model; when the last of them ends,
every patched attribute is put back exactly. A patched class whose model nothing turned pruning on for runs as it
is. Library code (calibrate, bench, demo, training) uses scopes and attachments and never the global switch,
which is the user's.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Iterable, Iterator, Optional, Union

from . import adapters, runtime
from .adapters import refusal, support
from .compat import transformers as compat
from .config import ConfigError, MeteorConfig
from .percall import forget_stats
from .registry import REGISTRY
from .runtime import ACTIVE, restore_configs

ConfigLike = Union[MeteorConfig, dict, str, os.PathLike, None]


def _as_config(config: ConfigLike) -> Optional[MeteorConfig]:
    if config is None or isinstance(config, MeteorConfig):
        return config
    if isinstance(config, dict):
        return MeteorConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return MeteorConfig.from_file(config)
    raise TypeError(f"enable() takes a MeteorConfig, a dict or a path to a .json/.yaml file, not {type(config).__name__}")


# The patches, while anything needs them -------------------------------------------------------------------------
class _Users:
    """Who needs the patches: the global switch, live ``enabled()`` scopes, attached models."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.scopes = 0
        self.targets: set = set()  # families patched so far (until everything is put back)


_USERS = _Users()


def _chosen(targets: Optional[Iterable[str]]) -> list:
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
    return chosen


def _install(targets: Optional[Iterable[str]], allow_untested: Optional[bool]) -> list:
    """Patch the chosen families (what is patched already stays); returns them."""
    if allow_untested is None:
        allow_untested = os.environ.get("METEOR_ALLOW_UNTESTED_TRANSFORMERS", "") == "1"
    compat.check_version(allow_untested)
    chosen = _chosen(targets)
    with _USERS.lock:
        pruned = []
        for target in chosen:
            pruned.append((target, target.patch(REGISTRY)))
            _USERS.targets.add(target.name)
        refusal.install(REGISTRY, {cls: why for f in adapters.FAMILIES for cls, why in f.refused.items()})
        for target, classes in pruned:  # a method and switches a model cannot run are refused before it runs
            support.install(REGISTRY, target.target, classes)
        compat.patch_rotary_floor(REGISTRY)
    return chosen


def _release() -> None:
    """Put every patched attribute back once nothing needs the patches any more."""
    with _USERS.lock:
        if ACTIVE.enabled or _USERS.scopes or runtime.attached_count():
            return
        REGISTRY.restore_all()
        _USERS.targets.clear()


# The global switch --------------------------------------------------------------------------------------------
def enable(
    config: ConfigLike = None,
    *,
    targets: Optional[Iterable[str]] = None,
    allow_untested_transformers: Optional[bool] = None,
    **overrides: Any,
) -> MeteorConfig:
    """Turn pruning on for every model of a pruned class, in every thread (the families of ``adapters/``: the llava
    package, EAGLE, transformers' LLaVA; ``targets`` names a subset of them).

    While on, a forward of a vision-language model no family prunes raises ``UnsupportedModelError`` naming its
    class (``adapters/refusal.py``); text-only models run as usual.

    ``config`` applies to every model; without it each model uses its own (attached, or saved in its checkpoint as
    ``config.meteor``) or the defaults. ``overrides`` are MeteorConfig fields applied on top. Calling ``enable``
    again changes the config without patching twice. Returns the config that applies to models without one of
    their own. For one block of code use ``with enabled(...)``, for one model ``attach``.
    """
    cfg = _as_config(config)
    effective = (cfg or MeteorConfig()).replace(**overrides) if overrides else (cfg or MeteorConfig())
    chosen = _install(targets, allow_untested_transformers)
    ACTIVE.enabled = True
    ACTIVE.config = cfg
    ACTIVE.overrides = dict(overrides)
    ACTIVE.generation += 1
    ACTIVE.targets = [t.name for t in chosen]
    return effective


def disable() -> None:
    """Turn the global switch off and end every attachment; give every model config back the ``meteor`` entry it
    had before ``enable`` (a config the checkpoint carried or the user attached stays), and forget the stats of
    every run: ``meteor_plugin.stats(model)`` returns None until the next pruned run. Every patched attribute is
    put back, and every hook removed, unless an ``enabled()`` scope is still running in another thread (then when
    it ends)."""
    restore_configs()
    runtime.detach_all()
    forget_stats()
    ACTIVE.enabled = False
    ACTIVE.config = None
    ACTIVE.overrides = {}
    ACTIVE.generation += 1
    ACTIVE.targets = []
    _release()


def is_enabled() -> bool:
    """Whether pruning is on here for every model of a pruned class: the innermost ``enabled()``/``disabled()``
    scope of this thread, else the global switch."""
    return runtime.pruning_on()


# Scopes -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def enabled(config: ConfigLike = None, *, targets: Optional[Iterable[str]] = None,
            allow_untested_transformers: Optional[bool] = None, **overrides: Any) -> Iterator[MeteorConfig]:
    """Pruning on inside the block, for the thread (or asyncio task) that enters it, as ``enable`` would turn it
    on; on leaving it (an exception included) exactly what was there before is back: the enclosing scope, or the
    global switch's state, and no patched attribute the block added. Scopes nest. Yields the config that applies
    to models without one of their own.

    A thread started inside the block does not inherit it (each thread has its own context): a server whose
    worker threads run the model needs ``enable()`` or ``attach(model)``.
    """
    cfg = _as_config(config)
    effective = (cfg or MeteorConfig()).replace(**overrides) if overrides else (cfg or MeteorConfig())
    with _USERS.lock:
        _USERS.scopes += 1
    try:
        _install(targets, allow_untested_transformers)
        token = runtime.enter_scope(runtime.Scope(True, cfg, dict(overrides)))
    except BaseException:
        with _USERS.lock:
            _USERS.scopes -= 1
        _release()
        raise
    try:
        yield effective
    finally:
        runtime.leave_scope(token)
        with _USERS.lock:
            _USERS.scopes -= 1
        _release()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """No pruning inside the block, for the thread (or asyncio task) that enters it: every model runs as it is,
    attached ones too; the enclosing state is back on leaving it."""
    token = runtime.enter_scope(runtime.Scope(False))
    try:
        yield
    finally:
        runtime.leave_scope(token)


# Attached models ----------------------------------------------------------------------------------------------
class Attachment:
    """What ``attach`` returns: ``detach()`` ends it, and so does leaving a ``with`` block on it."""

    def __init__(self, model: Any, config: MeteorConfig):
        self.model = model
        self.config = config

    def detach(self) -> None:
        detach(self.model)

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def attach(model: Any, config: ConfigLike = None, **overrides: Any) -> Attachment:
    """Prune ``model`` (and only it: other instances of its class run as they are) with ``config`` (default: the
    one its checkpoint carries, else the defaults) and ``overrides`` on top, wherever it runs, until ``detach``.
    The config is stored in ``model.config.meteor``, so ``save_pretrained`` keeps it; ``detach`` puts back what
    was there. Attaching an attached model again changes its config. A model no family prunes is refused by name
    (``UnsupportedModelError``)."""
    if not hasattr(model, "config"):
        raise TypeError(f"attach() takes a model with a config, not {type(model).__name__}")
    base = _as_config(config) or runtime.stored_config(model.config) or MeteorConfig()
    cfg = base.replace(**overrides) if overrides else base
    with _USERS.lock:
        _install(None, None)
        if not refusal.is_pruned_class(type(model), REGISTRY):
            _release()
            raise refusal.UnsupportedModelError(
                f"meteor-plugin cannot attach to {type(model).__module__}.{type(model).__name__}: no family prunes "
                f"it (pruned: {', '.join(refusal.pruned_classes(REGISTRY)) or 'none'})")
        runtime.attach_config(model, cfg)
    return Attachment(model, cfg)


def detach(model: Any) -> bool:
    """End ``attach(model)``: the model runs as it is again (unless the global switch or a scope prunes it), and its
    ``config.meteor`` is what it was before ``attach``. True if it was attached."""
    found = runtime.detach_config(model)
    _release()
    return found


# The environment and the command line ---------------------------------------------------------------------------
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
    try:
        return enable(MeteorConfig.from_file(path))
    except ConfigError as exc:
        error = ConfigError(f"METEOR_CONFIG: {exc}")
        one_line_if_uncaught(error)
        raise error from None


def one_line_if_uncaught(error: BaseException) -> None:
    """If ``error`` ends the program uncaught, print ``meteor-plugin: <its message>`` instead of a traceback.

    A user's mistake in a config reached through an import (``METEOR_CONFIG`` read by ``import meteor_plugin``)
    must fail the import: running unpruned would be silent. The exception itself is raised as usual, so code that
    catches it (a notebook, a server) sees it; only the interpreter's last report of it is one line. Any other
    uncaught exception goes to the hook that was there before (a bug keeps its traceback)."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if value is error:
            print(f"meteor-plugin: {value}", file=sys.stderr)
        else:
            previous(kind, value, traceback)

    sys.excepthook = hook
