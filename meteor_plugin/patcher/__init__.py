"""Patch a LLaVA or EAGLE checkout so its entry points run with METEOR (``meteor-plugin patch``).

    from meteor_plugin import patcher
    patcher.apply("/path/to/LLaVA")        # insert the [METEOR] lines (idempotent)
    patcher.check("/path/to/LLaVA")        # a Survey: what is applied, file by file
    patcher.revert("/path/to/LLaVA")       # remove them; the files come back byte for byte

Each edit point is found from the structure of the file (``anchors.py``); the edits per codebase are
declared in its family's adapter module (``adapters/``) and read through ``codebases.known()``;
``make_patches.py`` writes the same changes as the patch files in ``patches/``.
"""

from .codebases import NotACodebase, detect, known
from .edits import MARKER
from .tree import ABSENT, APPLIED, NOT_APPLIED, REFUSED, Outcome, PatchError, Survey, apply, check, patch_text, revert

__all__ = [
    "apply", "check", "revert", "patch_text", "detect", "PatchError", "NotACodebase", "Survey", "Outcome",
    "MARKER", "APPLIED", "NOT_APPLIED", "ABSENT", "REFUSED", "known",
]
