"""What the patcher inserts into one file, and how a patched file is told apart from a hand-edited one.

Every edit only *inserts* whole lines, and every inserted line carries the ``[METEOR]`` marker. So the
original file is the patched file minus the lines the patcher inserts (``strip``; matched by their exact
text, since a user's own line may carry the marker too), and a file is exactly "our patch applied" when
inserting our lines into its stripped text gives back its current text. Revert relies on that: it
writes the stripped text only after checking ``render(strip(text)) == text``, which makes the result
byte-identical to the file before ``apply``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple

from .anchors import NotFound, Spot

MARKER = "[METEOR]"


class Unrecognised(Exception):
    """A file does not look like the upstream file the edits were written for."""


@dataclass(frozen=True)
class Edit:
    """Lines inserted at one anchor, written exactly as they appear (minus the anchor's indentation)."""

    name: str
    anchor: object  # one of the classes in anchors.py
    code: Tuple[str, ...]
    why: str

    def __post_init__(self) -> None:
        for line in self.code:
            if MARKER not in line or "\n" in line or "\r" in line:
                raise ValueError(f"edit {self.name!r}: every inserted line must be one line carrying {MARKER}")

    def lines(self, spot: Spot, newline: str) -> List[str]:
        return [spot.indent + code + newline for code in self.code]


@dataclass(frozen=True)
class FileSpec:
    """The edits for one file of a codebase, relative to the tree's root (always with ``/``)."""

    path: str
    role: str  # "training", "evaluation", "demo" or "fix": what the file is, for reports
    edits: Tuple[Edit, ...]
    optional: bool = False  # a fork without this file is still patched; a present file must match


def split_lines(text: str) -> List[str]:
    """Lines with their endings, split on ``\\n`` only (``str.splitlines`` also splits on form feeds)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def marker_lines(text: str) -> List[int]:
    """1-based numbers of the lines carrying the marker."""
    return [i for i, line in enumerate(split_lines(text), 1) if MARKER in line]


def inserted(spec: FileSpec) -> FrozenSet[str]:
    """The lines the patcher inserts into this file, without indentation and line ending."""
    return frozenset(code.strip() for edit in spec.edits for code in edit.code)


def is_ours(line: str, ours: FrozenSet[str]) -> bool:
    """Whether ``line`` is one the patcher inserts (a user's own ``[METEOR]`` line is not)."""
    return MARKER in line and line.strip() in ours


def is_stale(line: str) -> bool:
    """A marked line that calls into the plugin: it cannot run once the patcher's import line is gone."""
    return MARKER in line and "meteor_plugin" in line


def _removes(spec: FileSpec, force: bool):
    ours = inserted(spec)
    return lambda line: is_ours(line, ours) or (force and is_stale(line))


def our_lines(spec: FileSpec, text: str, force: bool = False) -> List[int]:
    """1-based numbers of the lines ``strip`` removes from ``text``."""
    removes = _removes(spec, force)
    return [i for i, line in enumerate(split_lines(text), 1) if removes(line)]


def strip(spec: FileSpec, text: str, force: bool = False) -> str:
    """The text without the lines the patcher inserts: the original of a file it (or our patch file) patched.

    ``force`` also drops marked lines that mention meteor_plugin (ours, edited by hand); every other
    line, a user's own ``[METEOR]`` line included, stays.
    """
    removes = _removes(spec, force)
    return "".join(line for line in split_lines(text) if not removes(line))


def _parse(text: str) -> ast.Module:
    if "\r" in text.replace("\r\n", ""):
        raise Unrecognised("it has carriage returns that are not part of \\r\\n line endings")
    try:
        return ast.parse(text.lstrip("\ufeff"))
    except SyntaxError as exc:
        raise Unrecognised(f"it is not valid Python (line {exc.lineno}: {exc.msg})") from None


def plan(spec: FileSpec, original: str) -> List[Tuple[int, List[str], str]]:
    """Where each edit goes in ``original`` (an unpatched text): [(index, lines, edit name)], in file order.

    Raises ``Unrecognised`` naming the missing landmark.
    """
    module = _parse(original)
    lines = split_lines(original)
    placed = []
    for order, edit in enumerate(spec.edits):
        try:
            spot: Optional[Spot] = edit.anchor.locate(module, lines)
        except NotFound as exc:
            raise Unrecognised(f"{exc}; the {edit.name!r} edit goes at the {edit.anchor.description}") from None
        if spot is None:
            continue
        before = lines[spot.index - 1] if spot.index > 0 else ""
        newline = "\r\n" if before.endswith("\r\n") else "\n"
        if spot.index > 0 and not before.endswith("\n"):
            raise Unrecognised(f"line {spot.index} has no line ending, right where the {edit.name!r} edit goes")
        placed.append((spot.index, order, edit.lines(spot, newline), edit.name))
    placed.sort(key=lambda p: (p[0], p[1]))
    return [(index, new, name) for index, _, new, name in placed]


def render(spec: FileSpec, original: str) -> Tuple[str, List[str]]:
    """``original`` with every edit inserted, and the names of the edits that were needed."""
    lines = split_lines(original)
    out: List[str] = []
    done = 0
    names = []
    for index, new, name in plan(spec, original):
        out.extend(lines[done:index])
        out.extend(new)
        done = index
        names.append(name)
    out.extend(lines[done:])
    return "".join(out), names
