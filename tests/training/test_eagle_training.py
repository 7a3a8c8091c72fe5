"""EAGLE through the training entry: the stand-in's train.py (EAGLE's structure) driven by
``python -m meteor_plugin.train`` under the deepspeed launcher (2 CPU processes, gloo), with Stages 1 and 2
(post-projection fusion over per-encoder projectors) and Stage 3 active. Three launches serve every test:
ZeRO-2 from the converted checkpoint, ZeRO-3 from the original one (projectors split in training) and LoRA
under ZeRO-3."""

import os

import pytest
import torch

import meteor_plugin
from meteor_plugin.adapters.eagle.training import alias_eagle_config
from meteor_plugin.training import lora, merge, save

from training_support import (EAGLE_KEPT, LLM_LINEAR, adapter_modules, load_trained_eagle, probe_forward,
                              tower_dtype)

ENCODERS = ["clip-448", "convnext-1024", "pix2struct-1024"]
PER_ENCODER_TENSORS = len(ENCODERS) * 4  # mlp2x_gelu: two Linear layers, weight and bias


def _steps(run):
    return [e for e in run.log_history() if "loss" in e]


def _tower_params_moved(model, reference) -> list:
    """For each encoder, whether any of its weights differs from ``reference``'s."""
    ref = dict(reference.named_parameters())
    moved = []
    for i, _ in enumerate(ENCODERS):
        prefix = f"model.vision_tower.vision_towers.{i}."
        moved.append(any(not torch.equal(p.float(), ref[n].float()) for n, p in model.named_parameters()
                         if n.startswith(prefix)))
    return moved


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_eagle_trains_under_deepspeed_with_stages_1_and_2_and_the_loss_goes_down(eagle_workspace, stage):
    run = getattr(eagle_workspace, stage)().require_success()
    assert run.probe["engine"] == "DeepSpeedEngine"
    assert "meteor-plugin: training with DeepSpeedEngine, pruning on" in run.log
    steps = _steps(run)
    assert len(steps) == 4
    # Stage 1 kept 192 tokens of the three encoders, Stage 2 48 of them, Stage 3 at most half: every step.
    assert all(e["meteor/encoder_tokens_kept"] == EAGLE_KEPT["encoder"] for e in steps)
    assert all(e["meteor/fusion_tokens_kept"] == EAGLE_KEPT["fusion"] for e in steps)
    assert all(0 < e["meteor/llm_tokens_kept"] <= EAGLE_KEPT["fusion"] // 2 for e in steps)
    losses = [e["loss"] for e in steps]
    assert losses[-1] < losses[0] - 0.1, losses


def test_zero3_from_the_original_checkpoint_splits_the_projector_in_training_as_convert_does(eagle_workspace):
    zero2, zero3 = eagle_workspace.zero2().require_success(), eagle_workspace.zero3().require_success()
    assert zero2.probe["split_in_training"] is None  # its checkpoint was converted by meteor-plugin convert
    # The shared projector's 4 tensors were gathered from their ZeRO-3 partitions (a split of the empty local
    # slices would fail), and the 12 new tensors partitioned like the rest of the model.
    assert zero3.probe["split_in_training"] == {"gathered": 4, "partitioned": PER_ENCODER_TENSORS,
                                                "created": PER_ENCODER_TENSORS}
    assert "ZeRO-3: 4 gathered, 12 partitioned" in zero3.log
    # The same losses: ZeRO-2 and ZeRO-3 agree, and so do the offline and the in-training conversion.
    torch.testing.assert_close(torch.tensor(zero2.losses()), torch.tensor(zero3.losses()), rtol=2e-3, atol=0)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_the_saved_eagle_model_rebuilds_its_projectors_on_load_and_gives_the_trained_logits(eagle_workspace, stage):
    run = getattr(eagle_workspace, stage)().require_success()
    meteor_plugin.enable()  # no config: the checkpoint's own; the plugin builds mm_projectors at load time
    model = load_trained_eagle(run.out, tower_dtype(run.probe))
    assert model.config.meteor_fusion["encoders"] == ENCODERS
    assert model.config.meteor["fusion_keep"] == EAGLE_KEPT["fusion"]
    own = dict(model.named_parameters())
    trained = run.probe["projector"]
    assert sum("mm_projectors" in k for k in trained) == PER_ENCODER_TENSORS
    for key, value in trained.items():
        assert torch.equal(own[key], value), key
    logits, kept = probe_forward(model, run.probe)
    assert kept == run.probe["kept"] and all(kept["fusion"])
    torch.testing.assert_close(logits, run.probe["logits"], atol=2e-4, rtol=1e-4)
    # EAGLE trains every encoder: each one's weights moved from the starting checkpoint's
    assert _tower_params_moved(model, load_trained_eagle(eagle_workspace.model)) == [True] * len(ENCODERS)


def test_eagle_lora_adapts_only_the_llm_and_trains_projectors_and_towers_fully(eagle_workspace):
    run = eagle_workspace.lora().require_success()
    assert run.probe["engine"] == "DeepSpeedEngine"
    for names in (run.probe["adapted"], adapter_modules(run.out)):
        assert len(names) == 4 * 7 and all(LLM_LINEAR.search(n) for n in names), names
    # What EAGLE trains besides the adapters: every projector (shared and per-encoder) and every tower weight.
    fully = set(run.probe["fully_trained"])
    visual = {k for k in run.probe["trained"] if "vision_tower" in k or "mm_projector" in k}
    assert fully == visual == set(run.probe["trained"])
    assert sum("mm_projectors" in k for k in fully) == PER_ENCODER_TENSORS
    assert all(any(f"vision_towers.{i}." in k for k in fully) for i in range(len(ENCODERS)))
    steps = _steps(run)
    assert len(steps) == 4 and steps[-1]["loss"] < steps[0]["loss"]


def test_eagle_lora_save_keeps_every_trained_weight_eagles_own_save_drops(eagle_workspace):
    run = eagle_workspace.lora().require_success()
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", lora.NON_LORA_FILE} <= set(
        os.listdir(run.out))
    assert save.status(run.out) == "complete"
    saved = torch.load(os.path.join(run.out, lora.NON_LORA_FILE), weights_only=True)
    assert set(saved) == set(run.probe["trained"])
    for key, value in run.probe["trained"].items():
        assert torch.equal(saved[key], value), key
    # and they trained: the per-encoder projectors moved from the converted checkpoint's
    from eagle.model.language_model.eagle_llama import EagleLlamaForCausalLM

    meteor_plugin.enable()
    start = dict(EagleLlamaForCausalLM.from_pretrained(eagle_workspace.model).named_parameters())
    bare = lora.strip_peft_prefix(saved)
    assert all(not torch.equal(bare[k].float(), start[k].float()) for k in bare if "mm_projectors" in k)


def test_eagle_lora_reloads_merges_and_opens_in_eagles_own_loader(eagle_workspace, tmp_path):
    from eagle.mm_utils import get_model_name_from_path
    from eagle.model.builder import load_pretrained_model

    run = eagle_workspace.lora().require_success()
    dtype = tower_dtype(run.probe)
    meteor_plugin.enable()  # the run's stored config, as in training

    reloaded = merge.load_adapted(run.out)  # base from adapter_config.json, non_lora_trainables, adapter
    reloaded.get_vision_tower().to(dtype=dtype)
    logits, kept = probe_forward(reloaded.eval(), run.probe)
    assert kept == run.probe["kept"]
    torch.testing.assert_close(logits, run.probe["logits"], atol=2e-4, rtol=1e-4)

    merged_dir = str(tmp_path / "tiny-eagle-x3-merged")
    from meteor_plugin.cli import main

    meteor_plugin.disable()  # merge-lora builds a converted checkpoint's projectors itself (the family's loading)
    assert main(["merge-lora", "--model-path", run.out, "--out", merged_dir]) == 0
    assert save.status(merged_dir) == "complete"
    meteor_plugin.enable()
    merged = load_trained_eagle(merged_dir, dtype)
    assert not lora.adapted_modules(merged) and merged.get_model().mm_projectors is not None
    logits, kept = probe_forward(merged, run.probe)
    assert kept == run.probe["kept"]
    torch.testing.assert_close(logits, run.probe["logits"], atol=1e-3, rtol=1e-3)
    reference = merged.state_dict()

    def same_weights(model):
        own = model.state_dict()
        checked = [k for k in reference if "vision_tower" not in k]  # the loader casts towers to fp16
        for key in checked:
            torch.testing.assert_close(own[key].float(), reference[key].float(), atol=2e-3, rtol=2e-3, msg=key)
        return checked

    tokenizer, standalone, processor, _ = load_pretrained_model(
        merged_dir, None, get_model_name_from_path(merged_dir), device="cpu", device_map="cpu")
    assert processor is not None and tokenizer is not None
    assert sum("mm_projectors" in k for k in same_weights(standalone)) == PER_ENCODER_TENSORS

    # EAGLE's LoRA branch ("eagle" and "lora" in the name, a base): its eagleConfig import fails on its own,
    # and loads the run (non_lora_trainables.bin included) once meteor-plugin's alias is there.
    name = get_model_name_from_path(run.out)
    with pytest.raises(ImportError, match="eagleConfig"):
        load_pretrained_model(run.out, eagle_workspace.model, name, device="cpu", device_map="cpu")
    alias_eagle_config()
    _, from_lora, _, _ = load_pretrained_model(run.out, eagle_workspace.model, name, device="cpu", device_map="cpu")
    same_weights(from_lora)


def test_the_eagle_recipe_with_the_default_config_trains_and_a_too_short_max_length_is_refused(eagle_workspace):
    """As a newcomer runs it (``CODEBASE=eagle bash recipes/tiny-cpu.sh`` with the default config): most of the
    656 fused tokens reach the LLM, the recipe's model_max_length fits them and the loss goes down; at 256 every
    answer is cut away, and the run stops with an error instead of training 4 steps at loss 0."""
    defaults = ("--save_strategy", "no", "--meteor-set", "encoder_keep=0.5", "--meteor-set", "fusion_keep=0.5",
                "--meteor-set", "llm=false")
    run = eagle_workspace.launch("eagle-defaults", os.path.join(eagle_workspace.root, "defaults"),
                                 args=defaults).require_success()
    steps = _steps(run)
    assert len(steps) == 4 and all(e["meteor/fusion_tokens_kept"] > 256 for e in steps)
    losses = [e["loss"] for e in steps]
    assert losses[-1] < losses[0] - 0.1, losses
    short = eagle_workspace.launch("eagle-short", os.path.join(eagle_workspace.root, "short"),
                                   args=defaults + ("--model_max_length", "256"))
    assert short.returncode != 0
    assert "every label of this batch is masked" in short.log and "--model_max_length" in short.log
