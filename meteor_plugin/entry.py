"""Enabling the plugin from a script's command line: what patched LLaVA/EAGLE entry points call.

``enable_from_argv()`` takes the METEOR options out of ``sys.argv`` before the script's own parser (argparse
or ``HfArgumentParser``, which reject unknown flags) sees them, and enables the plugin with them; without
any it falls back to ``METEOR_CONFIG``; with neither it does nothing and the script runs unpruned.
``--meteor-config`` wins over ``METEOR_CONFIG``; ``--meteor-set`` alone applies on top of ``METEOR_CONFIG``.

Options (``--meteor-x`` or ``--meteor_x``, value as the next word or after ``=``):
``--meteor-config PATH``, ``--meteor-encoder|fusion|llm true|false``, ``--meteor-set FIELD=VALUE``
(repeatable; VALUE is read as the field's kind: ``true``, ``2``, ``0.25``, ``all``, ``cosine``,
``{"clip-448": 3}``, ``none``; ``parse_field``). A mistake in the config or an option ends the program with one
line naming the file or the option and the field (``checked``).
The training entry adds a few of its own (``training/arguments.py``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import ConfigError, MeteorConfig
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


_NONE = ("none", "null", "")


def _as_int(text: str) -> int:
    value = float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(text)
        value = int(value)
    return value


def _as_budget(text: str) -> Any:
    """A budget as written: ``all``, a count (``64``; the bare ``1`` is refused by the config as ambiguous) or a
    ratio (``0.25``, ``1.0``)."""
    if text.lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        return float(text)


def _as_mapping(text: str) -> Any:
    """JSON (``{"clip-448": 3}``), or YAML's flow style (``{clip-448: 3}``), or none/null."""
    if text.lower() in _NONE:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(text) from None


# How a --meteor-set value is read, by the field's annotation in MeteorConfig; another annotation (a field added
# later) is read as JSON where it parses, else as text.
_READERS = {
    "bool": lambda text: _BOOL[text.lower()],
    "int": _as_int,
    "Optional[int]": lambda text: None if text.lower() in _NONE else _as_int(text),
    "float": float,
    "Budget": _as_budget,
    "Optional[Budget]": lambda text: None if text.lower() in _NONE else _as_budget(text),
    "str": lambda text: text[1:-1] if len(text) > 1 and text[0] == text[-1] == '"' else text,
    "Optional[Dict[str, float]]": _as_mapping,
}
_WHAT = {"bool": "true or false", "int": "an integer", "Optional[int]": "an integer or none", "float": "a number",
         "Budget": "a ratio in (0, 1], a count or all", "Optional[Budget]": "a ratio, a count, all or none",
         "Optional[Dict[str, float]]": 'a mapping such as {"clip-448": 3} (JSON or YAML) or none'}


def parse_field(flag: str, text: str) -> Tuple[str, Any]:
    """``FIELD=VALUE`` as (field, value), the value read as that MeteorConfig field's kind: a bool (true/false,
    yes/no, 1/0), an int, a number, a budget (a ratio, a count, ``all``), a choice, a mapping (``encoder_ranks``,
    JSON or YAML flow style) or an optional one (``none``). The field and the value are checked here: a mistake
    raises ``ConfigError`` naming the option, the field and what it takes."""
    import dataclasses

    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"{flag} takes FIELD=VALUE, got {text!r}")
    kinds = {f.name: str(f.type) for f in dataclasses.fields(MeteorConfig)}
    if key not in kinds:
        raise ConfigError(f"{flag} {text}: MeteorConfig has no field {key!r}; its fields: {', '.join(sorted(kinds))}")
    reader = _READERS.get(kinds[key], parse_value)
    try:
        value = reader(raw)
    except (KeyError, ValueError):
        raise ConfigError(f"{flag} {text}: {key} takes {_WHAT.get(kinds[key], 'another value')}, got {raw!r}") from None
    try:
        MeteorConfig().replace(**{key: value})
    except ConfigError as exc:  # about this field's value; one about its partners waits for the whole config
        if str(exc).startswith(f"MeteorConfig.{key}=") and " is invalid: " in str(exc):
            raise ConfigError(f"{flag} {text}: {exc}") from None
    return key, value


def checked(path: Optional[str], overrides: Dict[str, Any], prog: str) -> None:
    """Read and check the config a command line runs with (the file ``path``, with ``overrides`` from
    ``--meteor-set`` and the stage switches on top) before the program does anything: a user's mistake ends it with
    one line naming the file or the option and the field (``SystemExit``); a bug keeps its traceback."""
    try:
        base = MeteorConfig.from_file(path) if path is not None else MeteorConfig()
    except ConfigError as exc:
        raise SystemExit(f"{prog}: error: {exc}") from None
    try:
        base.replace(**overrides)
    except ConfigError as exc:
        given = " ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise SystemExit(f"{prog}: error: --meteor-set/--meteor-encoder/--meteor-fusion/--meteor-llm ({given}) on "
                         f"{path or 'the defaults'}: {exc}") from None


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
            try:
                key, parsed = parse_field(flag, value)
            except ConfigError as exc:
                raise SystemExit(str(exc)) from None
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
    checked(path, options.overrides, "meteor-plugin")
    return enable(path, **options.overrides)
