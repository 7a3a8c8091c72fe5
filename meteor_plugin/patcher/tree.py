"""Apply, check and revert the METEOR edits on a whole LLaVA or EAGLE tree.

Every file is read and judged first (``survey``); nothing is written unless every file is in a state
the operation can handle and can be written, so a refused tree is left exactly as it was. A path that
leads through a symbolic link out of the tree is refused: the patcher only changes the tree it is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .. import adapters
from ..adapters.family import Layout, PatcherSpec
from ..source_edits.edits import MARKER, FileSpec, Unrecognised, inserted, is_ours, marker_lines, our_lines, render, split_lines, strip
from .diff import file_diff
from .recognise import detect, layout_of

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
    ours: List[int] = field(default_factory=list)  # lines the patcher inserted (1-based)
    forced: List[int] = field(default_factory=list)  # lines ``revert --force`` removes: ours and stale ones
    outside: bool = False  # the path leads through a symbolic link out of the tree: never written

    @property
    def path(self) -> str:
        return self.spec.path

    @property
    def has_markers(self) -> bool:
        """Whether the file holds lines of ours (as inserted or edited), which revert would remove."""
        return bool(self.forced)


@dataclass
class Survey:
    root: str
    codebase: PatcherSpec
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


def _hand_edit(spec: FileSpec, current: str) -> Optional[str]:
    ours = inserted(spec)
    for number, line in enumerate(split_lines(current), 1):
        if "meteor_plugin" not in line or is_ours(line, ours):
            continue
        if MARKER in line:
            return (f"its {MARKER} lines differ from what the patcher inserts (first difference at line {number}): "
                    "edited by hand, patched twice, or patched by another version")
        return (f"line {number} already mentions meteor_plugin without the {MARKER} marker (edited by hand?); "
                "remove that line or mark it, then run the patcher again")
    return None


def _link_out(root: str, path: str) -> Optional[str]:
    """The first symbolic link on ``path`` (relative to ``root``) that leads out of the tree, described."""
    top = os.path.realpath(root)
    here = root
    for part in path.split("/"):
        here = os.path.join(here, part)
        if not os.path.islink(here):
            continue
        target = os.path.realpath(here)
        if os.path.commonpath([top, target]) != top:
            rel = os.path.relpath(here, root).replace(os.sep, "/")
            return f"{rel} is a symbolic link to {target}, outside the tree"
    return None


def inspect_file(root: str, spec: FileSpec) -> FileState:
    """Judge one file: applied, not applied, absent, or refused (with the reason)."""
    full = os.path.join(root, *spec.path.split("/"))
    link = _link_out(root, spec.path)
    if link:
        return FileState(spec, REFUSED, f"{link}; the patcher never writes outside {root}", outside=True)
    if not os.path.isfile(full):
        if spec.optional:
            return FileState(spec, ABSENT)
        return FileState(spec, REFUSED, "the file is missing")
    try:
        current = _read(full)
    except UnicodeDecodeError:
        return FileState(spec, REFUSED, "it is not UTF-8 text")
    original = strip(spec, current)
    state = FileState(spec, REFUSED, current=current, original=original, ours=our_lines(spec, current),
                      forced=our_lines(spec, current, force=True))
    problem = _hand_edit(spec, current)
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
    if not state.ours:
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
    codebase = detect(root, adapters.patcher_specs())
    files = [inspect_file(root, spec) for spec in codebase.files]
    return Survey(root, codebase, layout_of(root, codebase), files)


def _refusal(action: str, s: Survey, bad: List[FileState]) -> PatchError:
    lines = [f"{s.root}: {action} refused; nothing was changed. The {s.codebase.title} file(s) at fault:"]
    lines += [f"  {f.path}: {f.problem}" for f in bad]
    return PatchError("\n".join(lines))


def _write_all(action: str, s: Survey, texts: List[Tuple[FileState, str]]) -> None:
    """Write every file or none: all are checked first, and a write that fails anyway is rolled back."""
    full = {f.path: os.path.join(s.root, *f.path.split("/")) for f, _ in texts}
    locked = [f for f, _ in texts if not os.access(full[f.path], os.W_OK)]
    if locked:
        for f in locked:
            f.problem = "it cannot be written (no write permission)"
        raise _refusal(action, s, locked)
    done: List[FileState] = []
    for f, text in texts:
        try:
            _write(full[f.path], text)
        except OSError as exc:
            for g in done:  # put back what was written, so the tree is as it was
                _write(full[g.path], g.current)
            raise PatchError(f"{s.root}: {action} failed; nothing was changed (the {len(done)} file(s) written "
                             f"before it were restored). Writing {f.path} failed: {exc.strerror or exc}") from None
        done.append(f)


def apply(root: str, dry_run: bool = False) -> Outcome:
    """Insert the METEOR lines into every file that lacks them. Idempotent: applied files are left alone."""
    s = survey(root)
    bad = s.with_status(REFUSED)
    if bad:
        raise _refusal("patch apply", s, bad)
    todo = s.with_status(NOT_APPLIED)
    diff = "".join(file_diff(f.path, f.current, f.patched) for f in todo)
    if not dry_run:
        _write_all("patch apply", s, [(f, f.patched) for f in todo])
    return Outcome(s, [f.path for f in todo], diff)


def revert(root: str, dry_run: bool = False, force: bool = False) -> Outcome:
    """Remove the lines the patcher inserted, giving back the files byte for byte.

    A file whose lines of ours are not exactly what the patcher inserts is refused (its original cannot
    be known for sure); ``force`` removes them anyway (the inserted lines, and marked lines that call
    meteor_plugin) and keeps every other change, a user's own ``[METEOR]`` lines included.
    """
    s = survey(root)
    outside = [f for f in s.files if f.outside]
    if outside:
        raise _refusal("patch revert", s, outside)
    bad = [f for f in s.with_status(REFUSED) if f.has_markers]
    if bad and not force:
        error = _refusal("patch revert", s, bad)
        raise PatchError(f"{error}\nWith --force (force=True), revert removes the lines the patcher inserted, and "
                         f"{MARKER} lines that call meteor_plugin, anyway and keeps all other changes.")
    todo = [f for f in s.files if f.has_markers]
    texts = [(f, strip(f.spec, f.current, force=True) if force else f.original) for f in todo]
    diff = "".join(file_diff(f.path, f.current, text) for f, text in texts)
    if not dry_run:
        _write_all("patch revert", s, texts)
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
