"""LoRA: where adapters go, what the save keeps, and that reloading and merging give the trained model."""

import os

import pytest
import torch

import meteor_plugin
from meteor_plugin.training import lora, merge, save
from meteor_plugin.training.convert import ConversionError

from training_support import LLM_LINEAR, adapter_modules, load_trained, probe_forward, tower_dtype

LAYERS, LINEARS_PER_LAYER = 4, 7  # the tiny LLaVA: 4 decoder layers of q, k, v, o, gate, up, down


def test_adapters_sit_only_on_the_language_models_linear_layers(workspace):
    run = workspace.lora().require_success()
    assert run.probe["engine"] == "DeepSpeedEngine"
    for names in (run.probe["adapted"], adapter_modules(run.out)):
        assert len(names) == LAYERS * LINEARS_PER_LAYER, names
        assert all(LLM_LINEAR.search(n) for n in names), [n for n in names if not LLM_LINEAR.search(n)]
        assert not [n for n in names if "vision_tower" in n or "mm_projector" in n]


def test_upstream_leaf_names_would_adapt_the_vision_tower_and_target_regex_does_not(tiny_llava):
    """A tower built before get_peft_model (EAGLE builds its towers in __init__) has q/k/v_proj too."""
    from peft import LoraConfig, get_peft_model

    leaf = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    upstream = get_peft_model(tiny_llava(), LoraConfig(r=4, target_modules=leaf))
    assert any("vision_tower" in n for n in lora.adapted_modules(upstream))
    with pytest.raises(lora.LoraPlacementError, match="vision/projector"):
        lora.check_placement(upstream)

    model = tiny_llava()
    ours = get_peft_model(model, LoraConfig(r=4, target_modules=lora.target_regex(model)))
    adapted = lora.check_placement(ours)
    assert len(adapted) == LAYERS * LINEARS_PER_LAYER and all(LLM_LINEAR.search(n) for n in adapted)


def test_the_projectors_trained_weights_survive_the_save(workspace):
    from safetensors.torch import load_file

    run = workspace.lora().require_success()
    assert any("mm_projector" in n for n in run.probe["fully_trained"])
    saved = lora.strip_peft_prefix(torch.load(os.path.join(run.out, lora.NON_LORA_FILE), weights_only=True))
    trained = lora.strip_peft_prefix(run.probe["projector"])
    initial = load_file(os.path.join(workspace.model, "model.safetensors"))
    assert set(trained) == {k for k in saved if "mm_projector" in k} and len(trained) == 4  # two Linear layers
    for key, value in trained.items():
        assert torch.equal(saved[key], value), key
        assert not torch.allclose(initial[key], value), f"{key} did not train"
    # and the adapter-free intermediate checkpoints keep them too (resume without DeepSpeed, merge of step N)
    assert os.path.isfile(os.path.join(run.out, "checkpoint-4", lora.NON_LORA_FILE))


def test_reloading_and_merging_give_the_trained_logits(workspace, tmp_path):
    run = workspace.lora().require_success()
    dtype = tower_dtype(run.probe)
    meteor_plugin.enable()  # the run's stored config (encoder_keep=24), as in training

    reloaded = merge.load_adapted(run.out)  # base model from adapter_config.json, adapter unmerged
    reloaded.get_vision_tower().to(dtype=dtype)
    logits, kept = probe_forward(reloaded.eval(), run.probe)
    assert kept == run.probe["kept"]
    torch.testing.assert_close(logits, run.probe["logits"], atol=2e-4, rtol=1e-4)

    merged_dir = str(tmp_path / "tiny-llava-v1-merged")
    from meteor_plugin.cli import main

    assert main(["merge-lora", "--model-path", run.out, "--out", merged_dir]) == 0
    assert save.status(merged_dir) == "complete"
    merged = load_trained(merged_dir, dtype)
    assert not lora.adapted_modules(merged)
    logits, kept = probe_forward(merged, run.probe)
    assert kept == run.probe["kept"]
    torch.testing.assert_close(logits, run.probe["logits"], atol=1e-3, rtol=1e-3)


def test_llavas_own_loaders_open_the_lora_run_and_the_merged_model(workspace, tmp_path):
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    run = workspace.lora().require_success()
    merged_dir = str(tmp_path / "tiny-llava-v1-merged")
    merge.merge_lora(run.out, merged_dir)
    reference = load_trained(merged_dir).state_dict()

    def same_weights(model):
        own = model.state_dict()
        checked = [k for k in reference if "vision_tower" not in k]
        for key in checked:
            torch.testing.assert_close(own[key].float(), reference[key].float(), atol=2e-3, rtol=2e-3, msg=key)
        return len(checked)

    _, standalone, processor, _ = load_pretrained_model(merged_dir, None, get_model_name_from_path(merged_dir),
                                                        device="cpu", device_map="cpu")
    assert processor is not None and same_weights(standalone) > 30
    # LLaVA's LoRA branch ("llava" and "lora" in the name, a --model-base): non_lora_trainables + adapter, merged.
    _, from_lora, _, _ = load_pretrained_model(run.out, workspace.model, get_model_name_from_path(run.out),
                                               device="cpu", device_map="cpu")
    same_weights(from_lora)


def test_merge_lora_refuses_what_it_cannot_merge_faithfully(workspace, tmp_path):
    import shutil

    from meteor_plugin.cli import main

    run = workspace.lora().require_success()
    out = str(tmp_path / "m-llava")
    assert main(["merge-lora", "--model-path", run.out, "--out", str(tmp_path / "merged-lora-llava")]) == 2
    assert main(["merge-lora", "--model-path", run.out, "--out", str(tmp_path / "merged")]) == 2  # no 'llava'
    assert main(["merge-lora", "--model-path", workspace.model, "--out", out]) == 2  # not an adapter

    dropped = tmp_path / "eagle-style-lora"  # what EAGLE's own train.py leaves: the adapter only
    shutil.copytree(run.out, dropped, ignore=shutil.ignore_patterns("checkpoint-*", lora.NON_LORA_FILE, save.COMPLETE))
    with pytest.raises(merge.ConversionError, match="non_lora_trainables.bin"):
        merge.merge_lora(str(dropped), out)

    renamed = tmp_path / "renamed-lora"  # a projector weight under a name the model does not have
    shutil.copytree(run.out, renamed, ignore=shutil.ignore_patterns("checkpoint-*"))
    state = torch.load(renamed / lora.NON_LORA_FILE, weights_only=True)
    state = {k.replace("mm_projector", "mm_projektor"): v for k, v in state.items()}
    torch.save(state, renamed / lora.NON_LORA_FILE)
    save.finish(str(renamed))
    with pytest.raises(KeyError, match="mm_projektor"):
        merge.merge_lora(str(renamed), out)
    assert not os.path.exists(out)


def test_an_empty_or_corrupt_non_lora_file_is_refused_naming_it(tmp_path):
    run = tmp_path / "run-lora"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    (run / "config.json").write_text("{}")
    (run / lora.NON_LORA_FILE).write_bytes(b"")
    with pytest.raises(merge.ConversionError, match=f"{run / lora.NON_LORA_FILE} is empty"):
        merge.check_adapter_folder(str(run))
    with pytest.raises(ValueError, match=f"{run / lora.NON_LORA_FILE} is empty"):
        lora.read_non_lora(str(run / lora.NON_LORA_FILE))
    (run / lora.NON_LORA_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=f"{run / lora.NON_LORA_FILE} cannot be read as saved PyTorch tensors"):
        lora.read_non_lora(str(run / lora.NON_LORA_FILE))


def test_merge_lora_takes_a_checkpoint_folder(workspace, tmp_path):
    """checkpoint-4 is the last step of the 4-step run: merged alone it gives the run's final weights. A
    checkpoint saved before they held their config takes the run folder's."""
    import shutil

    run = workspace.lora().require_success()
    checkpoint = os.path.join(run.out, "checkpoint-4")
    assert os.path.isfile(os.path.join(checkpoint, "config.json"))
    final = str(tmp_path / "final-llava-merged")
    merge.merge_lora(run.out, final)
    reference = load_trained(final).state_dict()
    old_run = tmp_path / "old-run"
    shutil.copytree(checkpoint, old_run / "checkpoint-4")
    shutil.copy(os.path.join(run.out, "config.json"), old_run / "config.json")
    os.remove(old_run / "checkpoint-4" / "config.json")
    for source in (checkpoint, str(old_run / "checkpoint-4")):
        out = str(tmp_path / f"merged-llava-{len(os.listdir(tmp_path))}")
        merge.merge_lora(source, out)
        merged = load_trained(out).state_dict()
        for key, value in reference.items():
            torch.testing.assert_close(merged[key], value, msg=key)
    os.remove(old_run / "config.json")
    with pytest.raises(ConversionError, match="nor has its run folder"):
        merge.merge_lora(str(old_run / "checkpoint-4"), str(tmp_path / "never-llava"))
