"""Completeness markers and staged publishing (meteor_plugin/training/save.py)."""

import os

import pytest

from meteor_plugin.training import save


def _write(folder, name, data=b"0123456789"):
    os.makedirs(os.path.dirname(os.path.join(folder, name)) or folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as fh:
        fh.write(data)


def test_a_marked_save_is_complete_and_any_change_makes_it_incomplete(tmp_path):
    folder = str(tmp_path / "checkpoint-2")
    calls = []
    with save.marked_save(folder, is_main=True, barrier=lambda: calls.append("barrier")):
        assert save.status(folder) == "incomplete"  # a crash here leaves it so
        _write(folder, "model.safetensors")
        _write(folder, "global_step2/zero_pp_rank_0_mp_rank_00_model_states.pt")
    assert calls == ["barrier"] * 3
    assert save.status(folder) == "complete"
    _write(folder, "model.safetensors", b"012")  # truncated after the fact
    assert save.status(folder) == "incomplete"
    assert save.problems(folder) == ["model.safetensors has 3 bytes, 10 were written"]
    os.remove(os.path.join(folder, "global_step2", "zero_pp_rank_0_mp_rank_00_model_states.pt"))
    assert "global_step2/zero_pp_rank_0_mp_rank_00_model_states.pt is missing" in save.problems(folder)
    with pytest.raises(save.IncompleteCheckpointError, match="interrupted"):
        save.require_loadable(folder)


def test_a_finished_checkpoint_whose_json_the_user_edited_stays_complete(tmp_path):
    folder = str(tmp_path / "checkpoint-3")
    with save.marked_save(folder, is_main=True, barrier=lambda: None):
        _write(folder, "model.safetensors")
        _write(folder, "config.json", b'{"model_type": "llava_llama"}')
    _write(folder, "config.json", b'{"model_type": "llava_llama", "tokenizer_padding_side": "left"}')
    assert save.status(folder) == "complete"
    save.require_loadable(folder)
    _write(folder, "config.json", b'{"model_type": "lla')  # cut short: not valid JSON any more
    assert save.status(folder) == "incomplete"
    assert save.problems(folder) == ["config.json has 19 bytes, 29 were written"]


def test_only_the_main_process_writes_markers_and_foreign_folders_are_unknown(tmp_path):
    folder = str(tmp_path / "checkpoint-1")
    os.makedirs(folder)
    with save.marked_save(folder, is_main=False, barrier=lambda: None):
        _write(folder, "model.safetensors")
    assert save.status(folder) == "unknown"
    save.require_loadable(folder)  # not ours: nothing to check, no error


def test_resume_takes_the_newest_whole_checkpoint(tmp_path):
    run = str(tmp_path)
    for step in (2, 4, 6):
        with save.marked_save(os.path.join(run, f"checkpoint-{step}"), True, lambda: None):
            _write(os.path.join(run, f"checkpoint-{step}"), "model.safetensors")
    save.begin(os.path.join(run, "checkpoint-6"))  # a later save of step 6 died
    save.begin(os.path.join(run, "checkpoint-8"))
    with pytest.warns(UserWarning, match=r"skipping incomplete checkpoint\(s\) checkpoint-8, checkpoint-6"):
        assert save.last_resumable(run) == os.path.join(run, "checkpoint-4")
    assert [os.path.basename(p) for p in save.checkpoints(run)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6",
                                                                    "checkpoint-8"]
    for step in (2, 4):
        save.begin(os.path.join(run, f"checkpoint-{step}"))
    with pytest.warns(UserWarning, match="every checkpoint .* is incomplete"):
        assert save.last_resumable(run) is None


def test_publish_moves_config_json_last_so_an_interrupted_publish_does_not_load(tmp_path, monkeypatch):
    target = str(tmp_path / "out")
    _write(target, "config.json", b"old")  # a previous run's final save
    _write(target, "checkpoint-2/model.safetensors")
    staging = save.staging_dir(target)
    for name in ("config.json", "model.safetensors", "adapter_model.safetensors"):
        _write(staging, name)

    moved = []
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(src) == "config.json":
            raise OSError("node lost")
        moved.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(save.os, "replace", replace)
    with pytest.raises(OSError, match="node lost"):
        save.publish(staging, target)
    assert moved == ["adapter_model.safetensors", "model.safetensors"]
    assert not os.path.exists(os.path.join(target, "config.json"))  # no loader opens it now
    assert save.status(target) == "unknown"

    monkeypatch.setattr(save.os, "replace", real_replace)
    save.publish(staging, target)
    assert save.status(target) == "complete" and not os.path.exists(staging)
    # the marker covers the final save only: later changes to checkpoints do not make it incomplete
    os.remove(os.path.join(target, "checkpoint-2", "model.safetensors"))
    assert save.status(target) == "complete"
