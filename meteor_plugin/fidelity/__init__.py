"""The fidelity testbed's data (v2): a procedural VQA task on which pruning methods can be compared.

Why this task: it has what makes pruning hard on real LLaVA/EAGLE models and that v1 lacked, and a small
two-encoder model with an 8-layer Llama learns it on 2 CPU cores in under 90 minutes:

- `scenes`: 96x96 images, textured backgrounds of four tints with clutter, 3-7 coloured shapes at
  arbitrary positions (no pooling grid lines them up) and an optional small digit; the `Scene` ground
  truth; `render`; dense per-token labels for each encoder's grid (`token_labels`), because the shared
  note ``synthetic-task.md`` found a per-token auxiliary loss essential (without it nothing was learned
  in 10 minutes).
- `questions`: four kinds that span visual demand: background (global, any few tokens), colour (one
  object), digit (one small glyph), count (every object of a colour); answers computed from the
  scene, generation conditioned on the answer, multi-turn packing (`pack_turns`), also found essential.
- `tokenizer`: a word-level tokenizer built in code.
- `batches`: LLaVA-style ``input_ids`` with -200 at the image, answer-only ``labels``, right padding.
- `datasets`: seeded train/val/test splits, `FidelityDataset`, and `iter_batches`.

The trained model and the benchmark (imported on use, they need torch models and transformers):
- `model`: the small EAGLE-like model (two encoders, per-encoder projectors, a small Llama);
- `llava_format`: the task in LLaVA's v1 conversation format and its Hugging Face tokenizer;
- `pretrain`: phase 1 of training (vision, dense per-token loss); `recipe`: both phases end to end;
- `evaluate`, `methods`, `plot`: accuracy per kind under each pruning method, and its plot;
- ``checkpoint/``: the shipped trained model (`checkpoint_path`).

Images are uint8 (3, 96, 96). Everything is deterministic per (seed, split, index).
"""

import os

from .batches import IGNORE_INDEX, build_llava_batch, conversation_ids
from .datasets import LABEL_GRIDS, SPLITS, FidelityDataset, Sample, collate, iter_batches, make_sample, sample_rng
from .questions import (ANSWERS, KINDS, Question, answer_for, answer_region, generate, pack_turns,
                        question_text, valid_questions, vocabulary)
from .scenes import (BACKGROUNDS, COLOURS, SHAPES, Digit, Scene, SceneObject, make_scene, render, token_labels)
from .tokenizer import IMAGE_TOKEN_INDEX, SPECIAL_TOKENS, WordTokenizer

CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint")


def scene_images(count: int, seed: int = 0) -> list:
    """``count`` validation scenes of the task as PIL images (what ``meteor-plugin calibrate`` measures without
    ``--images``)."""
    from PIL import Image

    return [Image.fromarray(make_sample("val", i, seed=seed).image.permute(1, 2, 0).numpy()) for i in range(count)]


def checkpoint_path() -> str:
    """The trained fidelity checkpoint shipped with the package (raises if it is missing)."""
    if not os.path.isfile(os.path.join(CHECKPOINT, "config.json")):
        raise FileNotFoundError(
            f"the fidelity checkpoint is missing from {CHECKPOINT}: reinstall meteor-plugin, or train one with "
            "`meteor-plugin bench fidelity --train`"
        )
    return CHECKPOINT


__all__ = [
    "CHECKPOINT", "checkpoint_path", "scene_images",
    "IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "SPECIAL_TOKENS", "SPLITS", "ANSWERS", "KINDS", "COLOURS", "SHAPES",
    "BACKGROUNDS", "LABEL_GRIDS", "Scene", "SceneObject", "Digit", "make_scene", "render", "token_labels",
    "Question", "question_text", "answer_for", "valid_questions", "answer_region", "generate", "pack_turns",
    "vocabulary", "WordTokenizer", "conversation_ids", "build_llava_batch",
    "Sample", "make_sample", "sample_rng", "FidelityDataset", "collate", "iter_batches",
]
