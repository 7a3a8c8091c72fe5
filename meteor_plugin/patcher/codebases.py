"""What the patcher needs of a codebase, the edits codebases share, and how a tree is recognised.

Each family's ``Codebase`` (its files and versions) is declared in its adapter module
(``adapters/llava.py``, ``adapters/eagle.py``); ``known()`` reads them from there.

Entry points get two lines that enable the plugin from ``--meteor-config PATH`` / ``--meteor-set
FIELD=VALUE`` (taken out of ``sys.argv`` before the script's own parser sees them) or ``METEOR_CONFIG``,
and do nothing without either. They go where they run before the script parses its arguments and
before it loads a model. ``patches/README.md`` explains the choices file by file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from .anchors import AfterQuantizationKwargs, MainBlockStart
from .edits import Edit, FileSpec


class NotACodebase(Exception):
    """The path is not a LLaVA or EAGLE tree the patcher knows."""


ENABLE_CODE = (
    "import meteor_plugin.entry  # [METEOR] --meteor-config PATH or METEOR_CONFIG turns visual-token pruning on",
    "meteor_plugin.entry.enable_from_argv()  # [METEOR]",
)
ENABLE_WHY = "enable METEOR from --meteor-config / --meteor-set / METEOR_CONFIG before arguments are parsed"

# lmms_eval/models/__init__.py imports each model class under `except ImportError: pass`: a missing
# meteor_plugin would silently unregister the model, so the import error is turned into a loud one.
ENABLE_LOUD_CODE = (
    "try:  # [METEOR] lmms_eval/models/__init__.py hides ImportErrors, so fail loudly instead",
    "    import meteor_plugin.entry  # [METEOR]",
    "except ImportError as _meteor_error:  # [METEOR]",
    "    raise RuntimeError(f\"this lmms_eval is patched for METEOR but meteor_plugin does not import: "
    "{_meteor_error}\") from _meteor_error  # [METEOR]",
    "meteor_plugin.entry.enable_from_argv()  # [METEOR]",
)

QUANTIZATION_FIX = Edit(
    name="bits-fix",
    anchor=AfterQuantizationKwargs(),
    code=(
        'bnb_model_from_pretrained_args.pop("load_in_4bit", None)  # [METEOR] transformers>=4.44 refuses it beside '
        "quantization_config",
        'bnb_model_from_pretrained_args.pop("load_in_8bit", None)  # [METEOR]',
    ),
    why="--bits 4/8: drop load_in_4bit/load_in_8bit beside quantization_config (a ValueError on transformers>=4.44)",
)

def enable_edit(anchor, loud: bool = False) -> Edit:
    """The two lines that enable the plugin, at ``anchor`` (``loud``: for a file that hides ImportErrors)."""
    return Edit(name="enable", anchor=anchor, code=ENABLE_LOUD_CODE if loud else ENABLE_CODE, why=ENABLE_WHY)


def main_script(path: str, role: str, calls: Tuple[str, ...], optional: bool = False, extra=()) -> FileSpec:
    """A script whose ``__main__`` block calls one of ``calls``: the plugin is enabled first thing in it."""
    return FileSpec(path, role, (enable_edit(MainBlockStart(calls)),) + tuple(extra), optional)


@dataclass(frozen=True)
class Layout:
    """One version of a codebase: what the patch file for it is called and how it is recognised."""

    name: str  # e.g. "c121f04"
    title: str  # e.g. "haotian-liu/LLaVA at c121f04"
    patch_file: str


@dataclass(frozen=True)
class Codebase:
    name: str
    title: str
    package: str  # the top-level package a tree must contain
    files: Tuple[FileSpec, ...]
    layouts: Tuple[Layout, ...]
    # which layout a tree is (informational: the edits are the same for every layout); default: the first
    recognise: Optional[Callable[[str], Optional[Layout]]] = None

    def spec(self, path: str) -> FileSpec:
        return next(f for f in self.files if f.path == path)


def known() -> Tuple[Codebase, ...]:
    """Every family's patcher codebase (read from ``adapters``, which imports this module)."""
    from ..adapters import FAMILIES

    return tuple(f.patcher for f in FAMILIES if f.patcher is not None)


def _landmark(root: str, codebase: Codebase) -> str:
    return os.path.join(root, codebase.package, "model", "builder.py")


def detect(root: str) -> Codebase:
    """The codebase whose tree ``root`` is (the folder that holds ``llava/`` or ``eagle/``)."""
    if not os.path.isdir(root):
        raise NotACodebase(f"{root}: no such directory")
    codebases = known()
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


def layout_of(root: str, codebase: Codebase) -> Optional[Layout]:
    """Which known version the tree looks like (informational: the edits are the same for every layout)."""
    if codebase.recognise is None:
        return codebase.layouts[0]
    return codebase.recognise(root)
