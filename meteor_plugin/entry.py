"""Enabling the plugin from a script's command line: what patched LLaVA/EAGLE entry points call.

``enable_from_argv()`` takes ``--meteor-config PATH`` and ``--meteor-set FIELD=VALUE`` (repeatable) out of
``sys.argv`` before the script's own parser sees them, and enables the plugin with them; without either
it falls back to ``METEOR_CONFIG``; with neither it does nothing and the script runs unpruned.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Optional

from .config import MeteorConfig
from .patching import enable, enable_from_env


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def pop_meteor_args(argv: List[str]) -> tuple:
    """Remove the METEOR options from argv in place; returns (config path or None, overrides)."""
    path: Optional[str] = None
    overrides: Dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        for flag in ("--meteor-config", "--meteor-set"):
            if arg == flag or arg.startswith(flag + "="):
                if arg == flag:
                    if i + 1 >= len(argv):
                        raise SystemExit(f"{flag} needs a value")
                    value = argv[i + 1]
                    del argv[i:i + 2]
                else:
                    value = arg.split("=", 1)[1]
                    del argv[i]
                if flag == "--meteor-config":
                    path = value
                else:
                    if "=" not in value:
                        raise SystemExit(f"--meteor-set takes FIELD=VALUE, got {value!r}")
                    key, raw = value.split("=", 1)
                    overrides[key.strip()] = _parse_value(raw)
                break
        else:
            i += 1
    return path, overrides


def enable_from_argv(argv: Optional[List[str]] = None) -> Optional[MeteorConfig]:
    argv = sys.argv if argv is None else argv
    path, overrides = pop_meteor_args(argv)
    if path is not None or overrides:
        return enable(path, **overrides)
    return enable_from_env()
