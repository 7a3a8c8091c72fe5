"""lmms-eval under ``python -m meteor_plugin.run`` (docs/lmms-eval.md): the loader and
``generate`` calls its ``llava`` and ``llava_hf`` models make (``tests/lmms_eval_harness.py``; lmms-eval
itself needs torchvision and timm, which do not install here), run through the runner in a fresh process,
prune, and give the answers the same config gives in-process."""

import json
import os
import subprocess
import sys

import pytest

import meteor_plugin
from meteor_plugin.compat.transformers import generation
from meteor_plugin.testing.checkpoint import save_tiny_llava_checkpoint
from meteor_plugin.testing.llava import HF_IMAGE_TOKEN, TinyLlavaSpec, build_tiny_hf_llava
from tests import lmms_eval_harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"encoder_keep": 32, "llm_layer": 1, "llm_min_keep": 4, "llm_max_keep": 12}


def _run(tmp_path, kind, checkpoint, config=CONFIG, runner=True):
    """The harness in a fresh process, through the runner with ``config`` (or plainly, without the plugin)."""
    path = tmp_path / "meteor.json"
    path.write_text(json.dumps(config))
    out = tmp_path / f"{kind}-{len(os.listdir(tmp_path))}.json"
    head = ["-m", "meteor_plugin.run", "--meteor-config", str(path)] if runner else ["-m"]
    done = subprocess.run(
        [sys.executable, *head, "tests.lmms_eval_harness", kind, checkpoint, str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
    )
    return done, (json.loads(out.read_text()) if out.exists() else None)


def _in_process(kind, checkpoint):
    meteor_plugin.enable(CONFIG)
    try:
        answers, stats = getattr(lmms_eval_harness, kind)(checkpoint)
    finally:
        meteor_plugin.disable()
    return json.loads(json.dumps({"answers": answers, "stats": stats}))


def _pruned(stats, visual=64, stage1=True):
    for run in stats:
        counts = run["samples"][0]
        if stage1:
            assert (counts["encoder"]["in"], counts["encoder"]["out"]) == (visual, CONFIG["encoder_keep"])
        assert CONFIG["llm_min_keep"] <= counts["llm"]["out"] <= CONFIG["llm_max_keep"] < counts["llm"]["in"]
        # the layers after llm_layer ran on the kept visual tokens
        assert run["layer_seq_len"][CONFIG["llm_layer"] + 1] < run["layer_seq_len"][0]


def test_lmms_evals_llava_model_is_pruned_through_the_runner(tmp_path):
    checkpoint = save_tiny_llava_checkpoint(str(tmp_path))
    done, result = _run(tmp_path, "llava", checkpoint)
    assert done.returncode == 0, done.stderr[-3000:]
    _pruned(result["stats"])
    assert result == _in_process("llava", checkpoint)


def _save_hf(tmp_path):
    spec = TinyLlavaSpec()
    model = build_tiny_hf_llava(spec)
    folder = str(tmp_path / "llava-hf-tiny")
    model.save_pretrained(folder)
    per_image = spec.visual_tokens if generation() == "5" else 1  # 4.x's processor: one token, spliced by the model
    prompts = [[1] + list(range(10 + q, 13 + q)) + [HF_IMAGE_TOKEN] * per_image + [20, 21 + q]
               for q in range(lmms_eval_harness.QUESTIONS)]
    with open(os.path.join(folder, "prompts.json"), "w", encoding="utf-8") as fh:
        json.dump(prompts, fh)
    return folder, prompts


def test_lmms_evals_llava_hf_model_is_pruned_and_keeps_the_prompt_it_slices_off(tmp_path):
    folder, prompts = _save_hf(tmp_path)
    done, result = _run(tmp_path, "llava_hf", folder)
    assert done.returncode == 0, done.stderr[-3000:]
    _pruned(result["stats"], stage1=True)
    for prompt, answer in zip(prompts, result["answers"]):
        # lmms-eval keeps cont[:, len(prompt):]: the prompt must come back whole for that to be the answer
        assert answer["full"][:len(prompt)] == prompt
        assert answer["full"][len(prompt):] == answer["answer"] and len(answer["answer"]) > 0
    assert result == _in_process("llava_hf", folder)


def test_through_the_runner_with_every_stage_off_the_answers_are_lmms_evals_own(tmp_path):
    """The harness alone neither imports nor enables the plugin; with the stages off the runner changes nothing."""
    checkpoint = save_tiny_llava_checkpoint(str(tmp_path))
    plain_run, plain = _run(tmp_path, "llava", checkpoint, runner=False)
    if "unexpected keyword argument 'cache_position'" in plain_run.stderr:
        pytest.skip("llava-torch 1.2.2's generate does not run unpatched on this transformers (cache_position); "
                    "the plugin's wrapper drops that argument, so there is no plain run to compare with")
    off_run, off = _run(tmp_path, "llava", checkpoint, config={"encoder": False, "fusion": False, "llm": False})
    assert plain_run.returncode == 0 and off_run.returncode == 0, plain_run.stderr[-2000:] + off_run.stderr[-2000:]
    assert plain["stats"] == [None] * lmms_eval_harness.QUESTIONS
    assert off["answers"] == plain["answers"]
    assert all(run["samples"][0] == {} or "llm" not in run["samples"][0] for run in off["stats"])
