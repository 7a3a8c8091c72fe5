"""meteor-plugin calibrate: encoder ranks and Stage 3's lambda, and budget validation against real counts."""

import json
import os
import subprocess
import sys

import pytest
import torch

import meteor_plugin
from meteor_plugin.calibrate import calibrate, encoder_ranks, pixels
from meteor_plugin.fidelity import scene_images
from meteor_plugin.testing.eagle_like import TinyEagleSpec, build_tiny_eagle, build_tiny_tokenizer, save_tiny_eagle
from meteor_plugin.testing.llava import make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ranks_are_deterministic_and_bounded_by_the_feature_matrix():
    model = build_tiny_eagle()
    images = pixels(model, scene_images(3, seed=1))
    first = encoder_ranks(model, images)
    assert list(first) == ["clip-448", "convnext-1024", "sam-1024", "pix2struct-1024"]
    assert first == encoder_ranks(model, pixels(model, scene_images(3, seed=1)))
    channels = TinyEagleSpec().tower_channels
    for name, rank in first.items():
        assert 1 <= rank <= channels[name]


def test_lambda_hits_the_target_average_before_clipping():
    model = build_tiny_eagle()
    tokenizer = build_tiny_tokenizer()
    images = pixels(model, scene_images(4))
    base = meteor_plugin.MeteorConfig(encoder=False, fusion=False)
    config = calibrate(model, images, base, tokenizer, target_keep=0.25)
    assert set(config.encoder_ranks) == {"clip-448", "convnext-1024", "sam-1024", "pix2struct-1024"}
    meteor_plugin.enable(config.replace(llm_min_keep=0, llm_max_keep=1.0))
    kept = []
    for i, prompt in enumerate(["what is in this image ?"] * 4):
        ids = torch.tensor([tokenizer("w5 w6").input_ids + [-200] + tokenizer("w7 w8", add_special_tokens=False).input_ids])
        with torch.no_grad():
            model(input_ids=ids, images=images[i:i + 1])
        kept.append(meteor_plugin.stats(model).stages[0]["llm"].left)
    # the calibration prompts differ from these, so the mean is near, not at, 25% of 1024
    assert 0.1 * 1024 < sum(kept) / len(kept) < 0.5 * 1024


def test_calibrate_command_writes_ranks_and_lambda(tmp_path):
    folder = save_tiny_eagle(str(tmp_path / "tiny-eagle"))
    out = tmp_path / "calibrated.json"
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    code = ("import sys; from meteor_plugin.testing.eagle_like import install; install(); "
            "from meteor_plugin.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "calibrate", "--model-path", folder, "--num-images", "2",
                           "--target-keep", "0.25", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads(out.read_text())
    assert set(written["encoder_ranks"]) == {"clip-448", "convnext-1024", "sam-1024", "pix2struct-1024"}
    assert written["llm_lambda"] > 0 and "llm_lambda" in done.stdout
    assert meteor_plugin.MeteorConfig.from_file(out).encoder_ranks == written["encoder_ranks"]
    # The effective rank by default: fractional and different per encoder (the numerical one saturates at
    # min(tokens, channels)); the lambda written is for the config's own budget signal.
    assert "encoder ranks (effective)" in done.stdout
    ranks = list(written["encoder_ranks"].values())
    assert len(set(ranks)) == 4 and any(r != int(r) for r in ranks)
    assert written["version"] == 6 and written["llm_budget_signal"] == "coverage" and written["spread_floor"] == 0.375


def test_stage_budgets_are_validated_against_the_real_token_counts(tiny_llava):
    from meteor_plugin.adapters.eagle import convert_to_post_projection

    model = build_tiny_eagle()
    convert_to_post_projection(model)
    ids, mask, images = make_batch([(2, 3)], [True], image_size=128)
    meteor_plugin.enable(encoder_keep=5000, llm=False)
    with pytest.raises(ValueError, match=r"encoder_keep=5000 is invalid for this model: 3648 visual tokens .*1\.\.3648"):
        model(input_ids=ids, attention_mask=mask, images=images)
    meteor_plugin.enable(encoder_keep=0.5, fusion_keep=2000, llm=False)
    with pytest.raises(ValueError, match=r"fusion_keep=2000 is invalid for this model: 1824 visual tokens"):
        model(input_ids=ids, attention_mask=mask, images=images)
    llava = tiny_llava()
    ids, mask, images = make_batch([(2, 3)], [True])
    meteor_plugin.enable(encoder_keep=100, llm=False)
    with pytest.raises(ValueError, match=r"encoder_keep=100 is invalid for this model: 64 visual tokens"):
        llava(input_ids=ids, attention_mask=mask, images=images)
    meteor_plugin.enable(encoder_keep=0.001, llm=False)
    with pytest.raises(ValueError, match="keeps no token of the 64"):
        llava(input_ids=ids, attention_mask=mask, images=images)


def test_calibrate_runs_on_the_shipped_fidelity_checkpoint_as_a_user_types_it(tmp_path):
    """No EAGLE checkout on the path and no plugin enabled beforehand: the command finds the stand-in, enables
    the plugin so the per-encoder projectors are built, and writes both encoders' ranks and a lambda."""
    from meteor_plugin.fidelity import checkpoint_path

    out = tmp_path / "fidelity.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "meteor_plugin.cli", "calibrate", "--model-path", checkpoint_path(),
                           "--num-images", "2", "--target-keep", "0.25", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads(out.read_text())
    assert set(written["encoder_ranks"]) == {"clip-448", "convnext-1024"}
    assert all(r > 1 for r in written["encoder_ranks"].values())
    assert written["llm_lambda"] > 0 and written["llm_lambda"] != meteor_plugin.MeteorConfig().llm_lambda


def test_calibrate_names_the_missing_codebase(tmp_path):
    folder = tmp_path / "eagle-ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "eagle_llama"}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "meteor_plugin.cli", "calibrate", "--model-path", str(folder),
                           "--out", str(tmp_path / "x.json")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is an EAGLE checkpoint (eagle_llama): calibrate loads it with EAGLE's own code" in done.stderr
    assert "put an NVlabs/EAGLE checkout on PYTHONPATH" in done.stderr
