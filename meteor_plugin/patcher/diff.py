"""Git-style unified diffs of the patcher's changes.

``context=3`` gives a diff for people (and for plain ``git apply`` on a fork); ``context=0`` gives the
patch files in ``patches/``, which hold only our lines and apply with ``git apply --unidiff-zero``.
"""

from __future__ import annotations

import difflib
from typing import List

from ..source_edits.edits import split_lines


def _range(start: int, stop: int) -> str:
    # As GNU diff and difflib write it: an empty range names the line before it.
    length = stop - start
    first = start + 1 if length else start
    return str(first) if length == 1 else f"{first},{length}"


def _line(prefix: str, line: str) -> str:
    if line.endswith("\n"):
        return prefix + line
    return prefix + line + "\n\\ No newline at end of file\n"


def file_diff(path: str, old: str, new: str, context: int = 3) -> str:
    """The diff turning ``old`` into ``new`` for the file at ``path`` (relative, with ``/``); "" if equal."""
    a, b = split_lines(old), split_lines(new)
    if a == b:
        return ""
    out: List[str] = [f"diff --git a/{path} b/{path}\n", f"--- a/{path}\n", f"+++ b/{path}\n"]
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for group in matcher.get_grouped_opcodes(context):
        out.append(f"@@ -{_range(group[0][1], group[-1][2])} +{_range(group[0][3], group[-1][4])} @@\n")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                out.extend(_line(" ", line) for line in a[i1:i2])
                continue
            out.extend(_line("-", line) for line in a[i1:i2])
            out.extend(_line("+", line) for line in b[j1:j2])
    return "".join(out)
