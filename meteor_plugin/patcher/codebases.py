"""The codebases the patcher knows, how a tree is recognised as one, and what is inserted in each file.

Entry points get two lines that enable the plugin from ``--meteor-config PATH`` / ``--meteor-set
FIELD=VALUE`` (taken out of ``sys.argv`` before the script's own parser sees them) or ``METEOR_CONFIG``,
and do nothing without either. They go where they run before the script parses its arguments and
before it loads a model. ``patches/README.md`` explains the choices file by file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

from .anchors import (
    AfterClass,
    AfterImportsBefore,
    AfterQuantizationKwargs,
    MainBlockStart,
    class_named,
    statement_calling,
)
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

EAGLE_CONFIG_ALIAS = Edit(
    name="eagleConfig-alias",
    anchor=AfterClass("EagleConfig"),
    code=("eagleConfig = EagleConfig  # [METEOR] the LoRA branch of eagle/model/builder.py imports this misspelt name",),
    why="LoRA checkpoints: builder.py imports `eagleConfig`, which did not exist (ImportError)",
)


def _enable(anchor, loud: bool = False) -> Edit:
    return Edit(name="enable", anchor=anchor, code=ENABLE_LOUD_CODE if loud else ENABLE_CODE, why=ENABLE_WHY)


def _main_script(path: str, role: str, calls: Tuple[str, ...], optional: bool = False, extra=()) -> FileSpec:
    return FileSpec(path, role, (_enable(MainBlockStart(calls)),) + tuple(extra), optional)


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

    def spec(self, path: str) -> FileSpec:
        return next(f for f in self.files if f.path == path)


LLAVA = Codebase(
    name="llava",
    title="LLaVA",
    package="llava",
    files=(
        _main_script("llava/train/train.py", "training", ("train",), extra=(QUANTIZATION_FIX,)),
        _main_script("llava/train/train_mem.py", "training", ("train",)),
        _main_script("llava/train/train_xformers.py", "training", ("train",), optional=True),
        _main_script("llava/eval/model_vqa_loader.py", "evaluation", ("eval_model",)),
        _main_script("llava/eval/model_vqa.py", "evaluation", ("eval_model",)),
        _main_script("llava/eval/model_vqa_science.py", "evaluation", ("eval_model",)),
        _main_script("llava/eval/model_vqa_mmbench.py", "evaluation", ("eval_model",), optional=True),
        _main_script("llava/eval/run_llava.py", "evaluation", ("eval_model",)),
        _main_script("llava/serve/cli.py", "demo", ("main",)),
        _main_script("llava/serve/model_worker.py", "demo", ("ModelWorker",), optional=True),
    ),
    layouts=(
        Layout("c121f04", "haotian-liu/LLaVA at c121f04", "llava-c121f04.patch"),
        Layout("llava-torch-1.2.2", "llava-torch 1.2.2 (PyPI)", "llava-torch-1.2.2.patch"),
    ),
)

EAGLE = Codebase(
    name="eagle",
    title="EAGLE",
    package="eagle",
    files=(
        _main_script("train.py", "training", ("train",), extra=(QUANTIZATION_FIX,)),
        _main_script("train_mem.py", "training", ("train",)),
        _main_script("eagle/eval/model_vqa_loader.py", "evaluation", ("eval_model",)),
        _main_script("eagle/eval/model_vqa.py", "evaluation", ("eval_model",)),
        _main_script("eagle/eval/model_vqa_science.py", "evaluation", ("eval_model",)),
        _main_script("eagle/eval/model_vqa_mmbench.py", "evaluation", ("eval_model",), optional=True),
        _main_script("eagle/eval/model_vqa_mmmu.py", "evaluation", ("main",), optional=True),
        _main_script("eagle/eval/run_eagle.py", "evaluation", ("eval_model",)),
        FileSpec("lmms_eval/models/eagle.py", "evaluation",
                 (_enable(AfterImportsBefore("`class Eagle`", class_named("Eagle")), loud=True),)),
        FileSpec("predict_demo.py", "demo",
                 (_enable(AfterImportsBefore("the call to load_pretrained_model()",
                                             statement_calling("load_pretrained_model"))),)),
        FileSpec("gradio_demo.py", "demo",
                 (_enable(AfterImportsBefore("the argument parsing or model loading",
                                             statement_calling("parse_args", "load_pretrained_model"))),),
                 optional=True),
        FileSpec("eagle/model/language_model/eagle_llama.py", "fix", (EAGLE_CONFIG_ALIAS,)),
    ),
    layouts=(Layout("fef95f1", "NVlabs/EAGLE at fef95f1", "eagle-fef95f1.patch"),),
)

CODEBASES = (LLAVA, EAGLE)


def _landmark(root: str, codebase: Codebase) -> str:
    return os.path.join(root, codebase.package, "model", "builder.py")


def detect(root: str) -> Codebase:
    """The codebase whose tree ``root`` is (the folder that holds ``llava/`` or ``eagle/``)."""
    if not os.path.isdir(root):
        raise NotACodebase(f"{root}: no such directory")
    found = [c for c in CODEBASES if os.path.isfile(_landmark(root, c))]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise NotACodebase(f"{root} holds both llava/ and eagle/; patch each checkout on its own")
    inside = os.path.basename(os.path.normpath(root))
    hint = ""
    if inside in {c.package for c in CODEBASES}:
        hint = f" (give the folder that contains {inside}/, not {inside}/ itself)"
    raise NotACodebase(
        f"{root} is not a LLaVA or EAGLE tree: found neither llava/model/builder.py nor eagle/model/builder.py{hint}"
    )


def layout_of(root: str, codebase: Codebase) -> Optional[Layout]:
    """Which known version the tree looks like (informational: the edits are the same for every layout).

    LLaVA at c121f04 has the S2 vision tower that the llava-torch 1.2.2 wheel lacks.
    """
    if codebase is EAGLE:
        return EAGLE.layouts[0]
    path = os.path.join(root, "llava", "model", "multimodal_encoder", "builder.py")
    try:
        with open(path, encoding="utf-8") as fh:
            has_s2 = "CLIPVisionTowerS2" in fh.read()
    except OSError:
        return None
    return LLAVA.layouts[0] if has_s2 else LLAVA.layouts[1]
