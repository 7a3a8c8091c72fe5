"""Patch a LLaVA or EAGLE checkout so its entry points run with METEOR (``meteor-plugin patch``).

    from meteor_plugin import patcher
    patcher.apply("/path/to/LLaVA")        # insert the [METEOR] lines (idempotent)
    patcher.check("/path/to/LLaVA")        # a Survey: what is applied, file by file
    patcher.revert("/path/to/LLaVA")       # remove them; the files come back byte for byte

The edits are stated by each family (its ``patches.py``, a ``PatcherSpec`` in ``source_edits`` terms: each edit
point is found from the structure of the file); the patcher reads the families' specs from the registry
(``adapters.patcher_specs()``), recognises a tree (``recognise.py``), and applies, checks and reverts the edits on
it (``tree.py``); ``make_patches.py`` writes the same changes as the patch files in ``patches/``.
"""

from typing import Tuple

from .. import adapters
from ..adapters.family import PatcherSpec
from ..source_edits.edits import MARKER
from . import recognise
from .recognise import NotACodebase
from .tree import ABSENT, APPLIED, NOT_APPLIED, REFUSED, Outcome, PatchError, Survey, apply, check, patch_text, revert


def known() -> Tuple[PatcherSpec, ...]:
    """Every family's patcher spec, in the registry's order."""
    return adapters.patcher_specs()


def detect(root: str) -> PatcherSpec:
    """The family spec whose tree ``root`` is (the folder that holds ``llava/`` or ``eagle/``)."""
    return recognise.detect(root, known())


__all__ = [
    "apply", "check", "revert", "patch_text", "detect", "PatchError", "NotACodebase", "Survey", "Outcome",
    "MARKER", "APPLIED", "NOT_APPLIED", "ABSENT", "REFUSED", "known",
]
