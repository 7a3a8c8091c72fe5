"""The edits ``meteor-plugin patch`` makes to a LLaVA checkout (``PATCHER``), and how its two known versions are
told apart."""

from __future__ import annotations

import os
from typing import Optional

from ..family import Layout, PatcherSpec
from ..shared.script_edits import QUANTIZATION_FIX, main_script

C121F04 = Layout("c121f04", "haotian-liu/LLaVA at c121f04", "llava-c121f04.patch",
                 commit="c121f0432da27facab705978f83c4ada465e46fd")
LLAVA_TORCH = Layout("llava-torch-1.2.2", "llava-torch 1.2.2 (PyPI)", "llava-torch-1.2.2.patch",
                     where="the folder that holds llava/ (e.g. site-packages)")
TOWER_BUILDER = "llava/model/multimodal_encoder/builder.py"


def _layout(root: str) -> Optional[Layout]:
    """LLaVA at c121f04 has the S2 vision tower that the llava-torch 1.2.2 wheel lacks."""
    path = os.path.join(root, *TOWER_BUILDER.split("/"))
    try:
        with open(path, encoding="utf-8") as fh:
            has_s2 = "CLIPVisionTowerS2" in fh.read()
    except OSError:
        return None
    return C121F04 if has_s2 else LLAVA_TORCH


PATCHER = PatcherSpec(
    name="llava",
    title="LLaVA",
    package="llava",
    files=(
        main_script("llava/train/train.py", "training", ("train",), extra=(QUANTIZATION_FIX,)),
        main_script("llava/train/train_mem.py", "training", ("train",)),
        main_script("llava/train/train_xformers.py", "training", ("train",), optional=True),
        main_script("llava/eval/model_vqa_loader.py", "evaluation", ("eval_model",)),
        main_script("llava/eval/model_vqa.py", "evaluation", ("eval_model",)),
        main_script("llava/eval/model_vqa_science.py", "evaluation", ("eval_model",)),
        main_script("llava/eval/model_vqa_mmbench.py", "evaluation", ("eval_model",), optional=True),
        main_script("llava/eval/run_llava.py", "evaluation", ("eval_model",)),
        main_script("llava/serve/cli.py", "demo", ("main",)),
        main_script("llava/serve/model_worker.py", "demo", ("ModelWorker",), optional=True),
    ),
    layouts=(C121F04, LLAVA_TORCH),
    recognise=_layout,
    landmarks=(TOWER_BUILDER,),
)
