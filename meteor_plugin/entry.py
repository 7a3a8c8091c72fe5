"""Enabling the plugin from a script's command line: what patched LLaVA/EAGLE entry points call.

``enable_from_argv()`` takes the METEOR options out of ``sys.argv`` before the script's own parser (argparse
or ``HfArgumentParser``, which reject unknown flags) sees them, and enables the plugin with them; without
any it falls back to ``METEOR_CONFIG``; with neither it does nothing and the script runs unpruned.
``--meteor-config`` wins over ``METEOR_CONFIG``; ``--meteor-set`` alone applies on top of ``METEOR_CONFIG``.

Options (``--meteor-x`` or ``--meteor_x``, value as the next word or after ``=``):
``--meteor-config PATH``, ``--meteor-encoder|fusion|llm true|false``, ``--meteor-set FIELD=VALUE``
(repeatable; VALUE is read as JSON when it parses, e.g. ``0.25``, ``true``, ``{"clip": 3}``).
The training entry adds a few of its own (``training/arguments.py``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import MeteorConfig
from .patching import enable, env_config_path, is_enabled

# name, takes a value, help
Option = Tuple[str, bool, str]
OPTIONS: Tuple[Option, ...] = (
    ("config", True, "METEOR config (.json/.yaml). Default: the 'meteor' entry of the checkpoint's config.json "
                     "(written by `meteor-plugin convert`), else MeteorConfig's defaults"),
    ("encoder", True, "Stage 1 (pruning inside each vision encoder): true or false, overrides the config"),
    ("fusion", True, "Stage 2 (cooperative pruning at the fusion of encoders): true or false"),
    ("llm", True, "Stage 3 (text-guided pruning inside the language model): true or false"),
    ("set", True, "FIELD=VALUE: set any MeteorConfig field (repeatable), e.g. --meteor-set llm_max_keep=0.25"),
)
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass
class ParsedOptions:
    config: Optional[str] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)  # values of options beyond OPTIONS, as given

    @property
    def given(self) -> bool:
        return self.config is not None or bool(self.overrides)


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_field(flag: str, text: str) -> Tuple[str, Any]:
    """``FIELD=VALUE`` (the value read as JSON where it parses) as (field, value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SystemExit(f"{flag} takes FIELD=VALUE, got {text!r}")
    return key.strip(), parse_value(raw)


def _bool(flag: str, text: str) -> bool:
    try:
        return _BOOL[text.strip().lower()]
    except KeyError:
        raise SystemExit(f"{flag} takes true or false, got {text!r}") from None


def pop_options(argv: List[str], extra: Sequence[Option] = ()) -> ParsedOptions:
    """Remove the METEOR options (and ``extra`` ones) from ``argv`` in place and return what they say."""
    spellings = {}
    for name, takes_value, _ in tuple(OPTIONS) + tuple(extra):
        spellings[f"--meteor-{name}"] = spellings[f"--meteor_{name}"] = (name, takes_value)
    out = ParsedOptions()
    i = 0
    while i < len(argv):
        flag, has_inline, inline = argv[i].partition("=")
        spec = spellings.get(flag)
        if spec is None:
            i += 1
            continue
        name, takes_value = spec
        if not takes_value:
            if has_inline:
                raise SystemExit(f"{flag} takes no value")
            del argv[i]
            value: Any = True
        elif has_inline:
            value = inline
            del argv[i]
        else:
            if i + 1 >= len(argv):
                raise SystemExit(f"{flag} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
        if name == "config":
            out.config = value
        elif name in ("encoder", "fusion", "llm"):
            out.overrides[name] = _bool(flag, value)
        elif name == "set":
            key, parsed = parse_field(flag, value)
            out.overrides[key] = parsed
        else:
            out.extra[name] = value
    return out


def config_path(config: Optional[str]) -> Optional[str]:
    """The config file a command line runs with: its ``--meteor-config``, else ``METEOR_CONFIG``, else None."""
    return config if config is not None else env_config_path()


def enable_from_argv(argv: Optional[List[str]] = None) -> Optional[MeteorConfig]:
    argv = sys.argv if argv is None else argv
    options = pop_options(argv)
    if options.config is None and not options.overrides and is_enabled():
        return None  # enabled already, by meteor_plugin.run's options or by the import from METEOR_CONFIG
    path = config_path(options.config)
    if path is None and not options.overrides:
        return None
    return enable(path, **options.overrides)
