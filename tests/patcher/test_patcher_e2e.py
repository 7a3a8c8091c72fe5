"""The installed ``llava`` package (llava-torch 1.2.2), copied and patched, runs with METEOR end to end.

The patched entry points run in a subprocess on a tiny LLaVA checkpoint saved to disk; the harness
(``patcher_entry_harness.py``) never imports the plugin, so pruning in the stats can only come from the
[METEOR] lines of the patched script (or, for the unpatched copy, from ``python -m meteor_plugin.run``).
Also: the installed package regenerates the committed ``patches/llava-torch-1.2.2.patch`` byte for
byte, and that patch applies to a copy of it with git.
"""

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from patcher_fixtures import snapshot

from meteor_plugin import patcher
from meteor_plugin.patcher import make_patches
from meteor_plugin.adapters.llava import PATCHER as LLAVA

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HARNESS = os.path.join(HERE, "patcher_entry_harness.py")
LLAVA_TORCH = LLAVA.layouts[1]


def _installed_llava():
    spec = importlib.util.find_spec("llava")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llava (llava-torch) is not installed")
    return list(spec.submodule_search_locations)[0]


def _copy_llava(dest):
    shutil.copytree(_installed_llava(), os.path.join(dest, "llava"), ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image
    from patcher_tiny_checkpoint import save_tiny_llava_checkpoint

    work = str(tmp_path_factory.mktemp("e2e"))
    tree = _copy_llava(os.path.join(work, "patched"))
    patcher.apply(tree)
    assert patcher.check(tree).fully_applied
    checkpoint = save_tiny_llava_checkpoint(work)
    os.makedirs(os.path.join(work, "images"))
    Image.new("RGB", (40, 30), (200, 30, 60)).save(os.path.join(work, "images", "red.png"))
    with open(os.path.join(work, "questions.jsonl"), "w") as fh:
        fh.write(json.dumps({"question_id": 7, "image": "red.png", "text": "what is in this image ?"}) + "\n")
    config = os.path.join(work, "meteor.json")
    with open(config, "w") as fh:
        json.dump({"encoder_keep": 32, "llm_layer": 2, "llm_max_keep": 0.25}, fh)
    return {"work": work, "tree": tree, "checkpoint": checkpoint, "config": config}


def _run(tree, work, name, module, args, stdin=None, **env):
    stats = os.path.join(work, f"{name}.json")
    environ = {k: v for k, v in os.environ.items() if k != "METEOR_CONFIG"}  # only what the test sets
    environ.update(PYTHONPATH=os.pathsep.join([tree, ROOT]), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", **env)
    done = subprocess.run([sys.executable, HARNESS, stats, module] + args, input=stdin, capture_output=True,
                          text=True, env=environ, timeout=240)
    report = None
    if os.path.exists(stats):
        with open(stats) as fh:
            report = json.load(fh)
    return done, report


def _assert_pruned(done, report, tree):
    assert done.returncode == 0, done.stderr[-4000:]
    assert report["llava_file"].startswith(tree)  # the patched copy ran, not the installed package
    assert report["loads"] == [{"plugin_enabled": True}]  # enabled before the model was loaded
    stats = report["stats"]
    encoder, llm = stats["samples"][0]["encoder"], stats["samples"][0]["llm"]
    assert encoder["in"] == 64 and encoder["out"] == 32  # 8x8 patches; encoder_keep=32 inside CLIP
    assert llm["in"] == 32 and llm["out"] == 8  # llm_max_keep=0.25
    full = stats["layer_seq_len"][0]
    assert stats["layer_seq_len"] == [full, full, full - 24, full - 24]  # layers from llm_layer=2 on are shorter


def test_patched_model_vqa_loader_prunes_with_meteor_config(setup):
    answers = os.path.join(setup["work"], "answers", "loader.jsonl")
    args = ["--model-path", setup["checkpoint"], "--image-folder", os.path.join(setup["work"], "images"),
            "--question-file", os.path.join(setup["work"], "questions.jsonl"), "--answers-file", answers,
            "--temperature", "0", "--max_new_tokens", "3", "--meteor-config", setup["config"]]
    done, report = _run(setup["tree"], setup["work"], "loader", "llava.eval.model_vqa_loader", args)
    _assert_pruned(done, report, setup["tree"])
    assert "--meteor-config" not in report["argv_seen_by_script"]  # taken out before argparse saw it
    with open(answers) as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["question_id"] for r in rows] == [7] and rows[0]["model_id"] == "tiny-llava-v1"


def test_patched_cli_demo_prunes_with_meteor_config_env(setup):
    args = ["--model-path", setup["checkpoint"], "--image-file", os.path.join(setup["work"], "images", "red.png"),
            "--device", "cpu", "--temperature", "0", "--max-new-tokens", "3"]
    done, report = _run(setup["tree"], setup["work"], "cli", "llava.serve.cli", args,
                        stdin="what is in this image ?\n", METEOR_CONFIG=setup["config"])
    _assert_pruned(done, report, setup["tree"])


@pytest.fixture(scope="module")
def unpatched(setup):
    return _copy_llava(os.path.join(setup["work"], "unpatched"))


def test_unpatched_entry_point_rejects_the_flag(setup, unpatched):
    tree = unpatched
    args = ["--model-path", setup["checkpoint"], "--image-file", "x.png", "--query", "q",
            "--meteor-config", setup["config"]]
    done, report = _run(tree, setup["work"], "unpatched", "llava.eval.run_llava", args)
    assert done.returncode == 2 and "unrecognized arguments: --meteor-config" in done.stderr
    assert report["loads"] == []


def test_meteor_plugin_run_drives_the_unpatched_model_vqa_loader(setup, unpatched):
    # python -m meteor_plugin.run MODULE: runs the module as __main__, where model_vqa_loader sets the
    # module-global `args` its dataset reads.
    answers = os.path.join(setup["work"], "answers", "run.jsonl")
    args = ["--meteor-config", setup["config"], "llava.eval.model_vqa_loader", "--model-path", setup["checkpoint"],
            "--image-folder", os.path.join(setup["work"], "images"),
            "--question-file", os.path.join(setup["work"], "questions.jsonl"), "--answers-file", answers,
            "--temperature", "0", "--max_new_tokens", "3"]
    done, report = _run(unpatched, setup["work"], "run", "meteor_plugin.run", args)
    _assert_pruned(done, report, unpatched)
    with open(answers) as fh:
        assert [json.loads(line)["question_id"] for line in fh] == [7]


def _llava_torch_version():
    try:
        return importlib.metadata.version("llava-torch")
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(not (_llava_torch_version() or "").startswith("1.2.2"), reason="needs llava-torch 1.2.2")
def test_installed_llava_torch_regenerates_the_committed_patch_and_git_applies_it(tmp_path):
    with open(os.path.join(ROOT, "patches", LLAVA_TORCH.patch_file), encoding="utf-8", newline="") as fh:
        committed = fh.read()
    folder = os.path.dirname(_installed_llava())
    assert patcher.check(folder).layout == LLAVA_TORCH
    assert patcher.patch_text(folder, make_patches.header(LLAVA_TORCH)) == committed
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    by_git = _copy_llava(str(tmp_path / "git"))
    by_patcher = _copy_llava(str(tmp_path / "patcher"))
    patch_file = os.path.join(ROOT, "patches", LLAVA_TORCH.patch_file)
    for extra in (["--check"], []):
        done = subprocess.run(["git", "apply", "--unidiff-zero"] + extra + [patch_file], cwd=by_git,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    patcher.apply(by_patcher)
    assert snapshot(by_git) == snapshot(by_patcher)
