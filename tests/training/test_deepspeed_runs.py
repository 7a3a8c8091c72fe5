"""The tiny recipe under the deepspeed launcher (2 CPU processes, gloo): ZeRO-2 and ZeRO-3 full fine-tuning
with pruning active, a crash in the middle of a checkpoint save, resuming, and reloading the result."""

import os

import pytest
import torch

import meteor_plugin
from meteor_plugin.training import save

from training_support import ENCODER_KEPT, load_trained, probe_forward, tower_dtype


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_training_runs_under_deepspeed_with_pruning_and_the_loss_goes_down(workspace, stage):
    run = getattr(workspace, stage)().require_success()
    assert run.probe["engine"] == "DeepSpeedEngine"
    steps = [e for e in run.log_history() if "loss" in e]
    assert len(steps) == 4
    # Pruning was active in every step, with the config `convert` stored in the checkpoint.
    assert all(e["meteor/encoder_tokens_kept"] == ENCODER_KEPT for e in steps)
    assert all(0 < e["meteor/llm_tokens_kept"] < ENCODER_KEPT for e in steps)
    losses = [e["loss"] for e in steps]
    assert losses[-1] < losses[0] - 0.1, losses


def test_zero2_and_zero3_give_the_same_losses(workspace):
    zero2, zero3 = workspace.zero2().require_success(), workspace.zero3().require_success()
    # The ZeRO-2 run was killed at step 4 and resumed from checkpoint-2: its log holds steps 1-2 from
    # before the crash and 3-4 from after, which must still match an uninterrupted ZeRO-3 run.
    torch.testing.assert_close(torch.tensor(zero2.losses()), torch.tensor(zero3.losses()), rtol=2e-3, atol=0)


def test_a_crash_mid_save_leaves_a_checkpoint_that_is_never_taken_for_whole(workspace):
    crashed = workspace.zero2_crashed()
    assert crashed.returncode != 0 and "simulated crash while saving" in crashed.log, crashed.tail()
    # What the crash left (the resumed run has rewritten checkpoint-4 since: judge the log and checkpoint-2).
    assert "checkpoint-4" in crashed.log
    resumed = workspace.zero2().require_success()
    first = os.path.join(resumed.out, "checkpoint-2")
    assert resumed.probe["resumed_from"] == first
    assert "skipping incomplete checkpoint(s) checkpoint-4" in resumed.log
    assert save.status(first) == "complete"
    assert save.status(os.path.join(resumed.out, "checkpoint-4")) == "complete"
    assert save.status(resumed.out) == "complete" and not os.path.exists(save.staging_dir(resumed.out))


def test_the_crashed_checkpoint_is_refused_on_load_and_skipped_on_resume(workspace, tmp_path):
    """Rebuild exactly what the crash left (model files written, optimizer state missing, marker absent)."""
    import shutil

    run = workspace.zero2().require_success()
    out = tmp_path / "run"
    shutil.copytree(os.path.join(run.out, "checkpoint-2"), out / "checkpoint-2")
    broken = out / "checkpoint-4"
    save.begin(str(broken))
    shutil.copy2(os.path.join(run.out, "checkpoint-4", "model.safetensors"), broken / "model.safetensors")
    shutil.copy2(os.path.join(run.out, "checkpoint-4", "config.json"), broken / "config.json")
    assert save.status(str(broken)) == "incomplete"
    with pytest.raises(save.IncompleteCheckpointError, match="meteor-saving is present"):
        save.require_loadable(str(broken))
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        assert save.last_resumable(str(out)) == str(out / "checkpoint-2")
    from meteor_plugin.cli import main

    assert main(["merge-lora", "--model-path", str(broken), "--out", str(tmp_path / "m-llava")]) == 2


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_the_saved_model_reloads_with_the_trained_logits(workspace, stage):
    run = getattr(workspace, stage)().require_success()
    model = load_trained(run.out, tower_dtype(run.probe))
    assert model.config.meteor["encoder_keep"] == ENCODER_KEPT  # the stored config travelled with the model
    meteor_plugin.enable()  # no config: the checkpoint's own
    logits, kept = probe_forward(model, run.probe)
    assert kept == run.probe["kept"]
    torch.testing.assert_close(logits, run.probe["logits"], atol=2e-4, rtol=1e-4)
    # and training changed the model: the original checkpoint gives other logits
    original = load_trained(workspace.model, tower_dtype(run.probe))
    before, _ = probe_forward(original, run.probe)
    assert (before - logits).abs().max() > 1e-2


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_same_entry_runs_under_torchrun_and_accelerate_launch(workspace, launcher):
    run = workspace.launch(f"launcher-{launcher}", os.path.join(workspace.root, f"launcher-{launcher}"), probe=False,
                           args=("--max_steps", "2", "--save_strategy", "no"), LAUNCHER=launcher, ZERO="3")
    run.require_success()
    assert "meteor-plugin: training with DeepSpeedEngine, pruning on" in run.log
    steps = [e for e in run.log_history() if "loss" in e]
    assert len(steps) == 2 and all(e["meteor/encoder_tokens_kept"] == ENCODER_KEPT for e in steps)
    # the same first step as under the deepspeed launcher
    assert steps[0]["loss"] == pytest.approx(workspace.zero3().require_success().losses()[0], rel=1e-3)
