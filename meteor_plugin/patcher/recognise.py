"""How the patcher recognises a checkout: which family's tree a folder is, and which known version of it.

The candidates are the families' ``PatcherSpec`` records (``adapters.family``), handed in by the caller (the
registry's ``adapters.patcher_specs()``); nothing here knows a family.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from ..adapters.family import Layout, PatcherSpec


class NotACodebase(Exception):
    """The path is not a LLaVA or EAGLE tree the patcher knows."""


def _landmark(root: str, codebase: PatcherSpec) -> str:
    return os.path.join(root, codebase.package, "model", "builder.py")


def detect(root: str, codebases: Sequence[PatcherSpec]) -> PatcherSpec:
    """The codebase among ``codebases`` whose tree ``root`` is (the folder that holds ``llava/`` or ``eagle/``)."""
    if not os.path.isdir(root):
        raise NotACodebase(f"{root}: no such directory")
    found = [c for c in codebases if os.path.isfile(_landmark(root, c))]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise NotACodebase(f"{root} holds both llava/ and eagle/; patch each checkout on its own")
    inside = os.path.basename(os.path.normpath(root))
    hint = ""
    if inside in {c.package for c in codebases}:
        hint = f" (give the folder that contains {inside}/, not {inside}/ itself)"
    landmarks = " nor ".join(f"{c.package}/model/builder.py" for c in codebases)
    names = " or ".join(c.title for c in codebases)
    raise NotACodebase(f"{root} is not a {names} tree: found neither {landmarks}{hint}")


def layout_of(root: str, codebase: PatcherSpec) -> Optional[Layout]:
    """Which known version the tree looks like (informational: the edits are the same for every layout)."""
    if codebase.recognise is None:
        return codebase.layouts[0]
    return codebase.recognise(root)
