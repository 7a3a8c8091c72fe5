"""The edits every family's entry scripts get from ``meteor-plugin patch`` (in ``source_edits`` terms).

Entry points get two lines that enable the plugin from ``--meteor-config PATH`` / ``--meteor-set FIELD=VALUE``
(taken out of ``sys.argv`` before the script's own parser sees them) or ``METEOR_CONFIG``, and do nothing without
either. They go where they run before the script parses its arguments and before it loads a model.
``patches/README.md`` explains the choices file by file. A family's ``patches.py`` lists its files with these.
"""

from __future__ import annotations

from typing import Tuple

from ...source_edits.anchors import AfterQuantizationKwargs, MainBlockStart
from ...source_edits.edits import Edit, FileSpec

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
