"""The edits ``meteor-plugin patch`` makes to an EAGLE checkout (``PATCHER``)."""

from __future__ import annotations

from ...source_edits.anchors import AfterClass, AfterImportsBefore, class_named, statement_calling
from ...source_edits.edits import Edit, FileSpec
from ..family import Layout, PatcherSpec
from ..shared.script_edits import QUANTIZATION_FIX, enable_edit, main_script

EAGLE_CONFIG_ALIAS = Edit(
    name="eagleConfig-alias",
    anchor=AfterClass("EagleConfig"),
    code=("eagleConfig = EagleConfig  # [METEOR] the LoRA branch of eagle/model/builder.py imports this misspelt name",),
    why="LoRA checkpoints: builder.py imports `eagleConfig`, which did not exist (ImportError)",
)

PATCHER = PatcherSpec(
    name="eagle",
    title="EAGLE",
    package="eagle",
    files=(
        main_script("train.py", "training", ("train",), extra=(QUANTIZATION_FIX,)),
        main_script("train_mem.py", "training", ("train",)),
        main_script("eagle/eval/model_vqa_loader.py", "evaluation", ("eval_model",)),
        main_script("eagle/eval/model_vqa.py", "evaluation", ("eval_model",)),
        main_script("eagle/eval/model_vqa_science.py", "evaluation", ("eval_model",)),
        main_script("eagle/eval/model_vqa_mmbench.py", "evaluation", ("eval_model",), optional=True),
        main_script("eagle/eval/model_vqa_mmmu.py", "evaluation", ("main",), optional=True),
        main_script("eagle/eval/run_eagle.py", "evaluation", ("eval_model",)),
        FileSpec("lmms_eval/models/eagle.py", "evaluation",
                 (enable_edit(AfterImportsBefore("`class Eagle`", class_named("Eagle")), loud=True),)),
        FileSpec("predict_demo.py", "demo",
                 (enable_edit(AfterImportsBefore("the call to load_pretrained_model()",
                                                 statement_calling("load_pretrained_model"))),)),
        FileSpec("gradio_demo.py", "demo",
                 (enable_edit(AfterImportsBefore("the argument parsing or model loading",
                                                 statement_calling("parse_args", "load_pretrained_model"))),),
                 optional=True),
        FileSpec("eagle/model/language_model/eagle_llama.py", "fix", (EAGLE_CONFIG_ALIAS,)),
    ),
    layouts=(Layout("fef95f1", "NVlabs/EAGLE at fef95f1", "eagle-fef95f1.patch",
                    commit="fef95f103b5e9899acbbe2c237e5b99147ab7e8e"),),
)
