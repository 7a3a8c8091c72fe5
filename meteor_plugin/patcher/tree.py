"""Apply, check and revert the METEOR edits on a whole LLaVA or EAGLE tree.

Every file is read and judged first (``survey``); nothing is written unless every file is in a state
the operation can handle, so a refused tree is left exactly as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from .codebases import Codebase, Layout, detect, layout_of
from .diff import file_diff
from .edits import MARKER, FileSpec, Unrecognised, marker_lines, render, split_lines, strip

APPLIED = "applied"
NOT_APPLIED = "not applied"
ABSENT = "absent"  # an optional file the tree does not have
REFUSED = "refused"


class PatchError(Exception):
    """The operation was refused; the message names every file at fault. Nothing was written."""


@dataclass
class FileState:
    spec: FileSpec
    status: str
    problem: str = ""
    current: Optional[str] = None  # the file as it is
    original: Optional[str] = None  # the file without our lines
    patched: Optional[str] = None  # the file with our lines
    edits: List[str] = field(default_factory=list)  # names of the edits this file gets

    @property
    def path(self) -> str:
        return self.spec.path

    @property
    def has_markers(self) -> bool:
        return self.current is not None and MARKER in self.current


@dataclass
class Survey:
    root: str
    codebase: Codebase
    layout: Optional[Layout]
    files: List[FileState]

    def with_status(self, status: str) -> List[FileState]:
        return [f for f in self.files if f.status == status]

    @property
    def fully_applied(self) -> bool:
        return all(f.status in (APPLIED, ABSENT) for f in self.files)


@dataclass
class Outcome:
    survey: Survey
    changed: List[str]  # paths written (or that would be, with dry_run)
    diff: str


def _read(path: str) -> str:
    with open(path, "rb") as fh:
        data = fh.read()
    return data.decode("utf-8")


def _write(path: str, text: str) -> None:
    # Opening the existing file for writing keeps its permissions.
    with open(path, "wb") as fh:
        fh.write(text.encode("utf-8"))


def _hand_edit(original: str) -> Optional[str]:
    for number, line in enumerate(split_lines(original), 1):
        if "meteor_plugin" in line:
            return (f"line {number} already mentions meteor_plugin without the {MARKER} marker (edited by hand?); "
                    "remove that line or mark it, then run the patcher again")
    return None


def inspect_file(root: str, spec: FileSpec) -> FileState:
    """Judge one file: applied, not applied, absent, or refused (with the reason)."""
    full = os.path.join(root, *spec.path.split("/"))
    if not os.path.isfile(full):
        if spec.optional:
            return FileState(spec, ABSENT)
        return FileState(spec, REFUSED, "the file is missing")
    try:
        current = _read(full)
    except UnicodeDecodeError:
        return FileState(spec, REFUSED, "it is not UTF-8 text")
    original = strip(current) if MARKER in current else current
    state = FileState(spec, REFUSED, current=current, original=original)
    problem = _hand_edit(original)
    if problem:
        state.problem = problem
        return state
    try:
        state.patched, state.edits = render(spec, original)
    except Unrecognised as exc:
        state.problem = f"does not look as expected: {exc}"
        if state.has_markers:
            state.problem += f"; it also has {MARKER} lines (" + ", ".join(map(str, marker_lines(current))) + ")"
        return state
    if not state.has_markers:
        state.status = NOT_APPLIED
    elif state.patched == current:
        state.status = APPLIED
    else:
        first = _first_difference(current, state.patched)
        state.problem = (f"its {MARKER} lines differ from what the patcher inserts (first difference at line {first}): "
                         "edited by hand, patched twice, or patched by another version")
    return state


def _first_difference(a: str, b: str) -> int:
    la, lb = split_lines(a), split_lines(b)
    for number, (x, y) in enumerate(zip(la, lb), 1):
        if x != y:
            return number
    return min(len(la), len(lb)) + 1


def survey(root: str) -> Survey:
    root = os.fspath(root)
    codebase = detect(root)
    files = [inspect_file(root, spec) for spec in codebase.files]
    return Survey(root, codebase, layout_of(root, codebase), files)


def _refusal(action: str, s: Survey, bad: List[FileState]) -> PatchError:
    lines = [f"{s.root}: {action} refused; nothing was changed. The {s.codebase.title} file(s) at fault:"]
    lines += [f"  {f.path}: {f.problem}" for f in bad]
    return PatchError("\n".join(lines))


def apply(root: str, dry_run: bool = False) -> Outcome:
    """Insert the METEOR lines into every file that lacks them. Idempotent: applied files are left alone."""
    s = survey(root)
    bad = s.with_status(REFUSED)
    if bad:
        raise _refusal("patch apply", s, bad)
    todo = s.with_status(NOT_APPLIED)
    diff = "".join(file_diff(f.path, f.current, f.patched) for f in todo)
    if not dry_run:
        for f in todo:
            _write(os.path.join(s.root, *f.path.split("/")), f.patched)
    return Outcome(s, [f.path for f in todo], diff)


def revert(root: str, dry_run: bool = False, force: bool = False) -> Outcome:
    """Remove the METEOR lines, giving back the files byte for byte.

    A file whose marker lines are not exactly what the patcher inserts is refused (its original cannot
    be known for sure); ``force`` removes its marker lines anyway and keeps every other change.
    """
    s = survey(root)
    bad = [f for f in s.with_status(REFUSED) if f.has_markers]
    if bad and not force:
        error = _refusal("patch revert", s, bad)
        raise PatchError(f"{error}\nWith --force (force=True), revert removes every {MARKER} line anyway and keeps "
                         "all other changes.")
    todo = [f for f in s.files if f.has_markers]
    diff = "".join(file_diff(f.path, f.current, f.original) for f in todo)
    if not dry_run:
        for f in todo:
            _write(os.path.join(s.root, *f.path.split("/")), f.original)
    return Outcome(s, [f.path for f in todo], diff)


def check(root: str) -> Survey:
    """What is applied, file by file (see ``Survey.fully_applied``)."""
    return survey(root)


def patch_text(root: str, header: str = "", context: int = 0) -> str:
    """The patch that turns the unpatched tree into the patched one (for ``patches/``; see make_patches)."""
    s = survey(root)
    bad = s.with_status(REFUSED)
    if bad:
        raise _refusal("making a patch", s, bad)
    body = "".join(file_diff(f.path, f.original, f.patched, context) for f in s.files if f.status != ABSENT)
    return header + body
