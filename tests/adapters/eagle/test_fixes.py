"""The run-time fixes for EAGLE's training script and LoRA loader, on small stand-ins of EAGLE's modules
(the stand-ins reproduce the behaviour the anatomy notes describe, not EAGLE's code)."""

import os
import types

import pytest
import torch

import meteor_plugin
from meteor_plugin.adapters.eagle import training as eagle
from meteor_plugin.adapters.eagle import TRAINING as EAGLE
from meteor_plugin.training import hooks, lora


def _fake_eagle_llama():
    module = types.ModuleType("fake_eagle_llama")

    class EagleConfig:
        model_type = "eagle_llama"

    module.EagleConfig = EagleConfig
    return module


def test_the_eagleConfig_alias_makes_the_lora_loaders_import_work_and_is_undone():
    module = _fake_eagle_llama()
    with pytest.raises(AttributeError):
        module.eagleConfig  # what builder.py's LoRA branch imports
    assert eagle.alias_eagle_config(llama_module=module) is True
    assert module.eagleConfig is module.EagleConfig
    assert eagle.alias_eagle_config(llama_module=module) is False  # a patched tree, or a second call
    meteor_plugin.disable()  # the user's switch leaves training's fixes alone
    assert module.eagleConfig is module.EagleConfig
    hooks.uninstall()  # training's own scope ends
    assert not hasattr(module, "eagleConfig")
    with pytest.raises(AttributeError, match="no EagleConfig"):
        eagle.alias_eagle_config(llama_module=types.ModuleType("not_eagle"))


def test_the_alias_is_one_of_the_eagle_codebase_fixes():
    assert eagle.alias_eagle_config in EAGLE.runtime_fixes


class _Eagle444Model:
    """from_pretrained as transformers 4.44 checks it for EAGLE's --bits path."""

    calls = []
    config_class = "EagleConfig"

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        if kwargs.get("quantization_config") is not None and ("load_in_4bit" in kwargs or "load_in_8bit" in kwargs):
            raise ValueError("You can't pass `load_in_4bit`or `load_in_8bit` as a kwarg when passing "
                             "`quantization_config` argument at the same time.")
        cls.calls.append((path, kwargs))
        return "model"


def test_bits_4_loads_after_the_fix_with_the_visual_modules_unquantised():
    class Quant:
        load_in_4bit, load_in_8bit, llm_int8_skip_modules = True, False, ["mm_projector"]

    train = types.SimpleNamespace(EagleLlamaForCausalLM=_Eagle444Model)
    upstream_kwargs = dict(load_in_4bit=True, load_in_8bit=False, quantization_config=Quant(), device_map={"": "cpu"})
    with pytest.raises(ValueError, match="can't pass"):
        train.EagleLlamaForCausalLM.from_pretrained("ckpt", **upstream_kwargs)
    hooks.fix_quantized_loading(train, "EagleLlamaForCausalLM")
    assert train.EagleLlamaForCausalLM.from_pretrained("ckpt", **upstream_kwargs) == "model"
    path, kwargs = _Eagle444Model.calls[-1]
    assert set(kwargs) == {"quantization_config", "device_map"}
    skip = kwargs["quantization_config"].llm_int8_skip_modules
    assert {"mm_projector", "vision_tower", "lm_head"} <= set(skip)
    assert train.EagleLlamaForCausalLM.config_class == "EagleConfig"  # the rest of the class shows through
    hooks.fix_quantized_loading(train, "EagleLlamaForCausalLM")  # twice: still one level of wrapping
    assert train.EagleLlamaForCausalLM.meteor_wrapped is _Eagle444Model
    hooks.uninstall()
    assert train.EagleLlamaForCausalLM is _Eagle444Model


class _Args:
    tune_mm_mlp_adapter = False
    lora_bias = "none"
    should_save = True
    local_rank = -1


class _Trainer:
    """What EAGLE's safe_save_model_for_hf_trainer sees: with DeepSpeed it calls save_model, which for a
    PeftModel keeps only the adapter."""

    def __init__(self, model, deepspeed=False):
        self.model, self.args, self.is_deepspeed_enabled, self.saved = model, _Args(), deepspeed, []

    def save_model(self, output_dir):
        self.saved.append(output_dir)


@pytest.mark.filterwarnings("ignore:Could not find a config file")  # peft, on a model built in memory
def test_the_lora_save_keeps_projectors_and_other_trained_weights(tiny_llava, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_llava()
    model = get_peft_model(model, LoraConfig(r=4, target_modules=lora.target_regex(model)))
    trained = lora.train_fully(model, EAGLE.fully_trained)  # EAGLE trains its towers and projectors
    assert any("mm_projector" in n for n in trained) and any("vision_tower" in n for n in trained)

    upstream_calls = []
    train = types.SimpleNamespace(safe_save_model_for_hf_trainer=lambda trainer, output_dir: upstream_calls.append(output_dir))
    hooks.replace_final_save(train)
    out = str(tmp_path / "eagle-x4-lora")
    trainer = _Trainer(model, deepspeed=True)
    train.safe_save_model_for_hf_trainer(trainer=trainer, output_dir=out)
    assert upstream_calls == [] and trainer.saved == []
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", lora.NON_LORA_FILE} <= set(os.listdir(out))
    others = lora.strip_peft_prefix(torch.load(os.path.join(out, lora.NON_LORA_FILE), weights_only=True))
    bare = dict(model.base_model.model.named_parameters())
    assert {k for k in others if "mm_projector" in k} == {k for k in bare if "mm_projector" in k}
    assert any("vision_tower" in k for k in others) and not any("lora_" in k for k in others)
    for key, value in others.items():
        assert torch.equal(value, bare[key].detach()), key

    # without LoRA, DeepSpeed: the Trainer's save (no torch.cuda.synchronize on a CPU machine)
    plain = _Trainer(tiny_llava(), deepspeed=True)
    train.safe_save_model_for_hf_trainer(trainer=plain, output_dir="x")
    assert plain.saved == ["x"] and upstream_calls == []
    # without either: upstream's own function
    train.safe_save_model_for_hf_trainer(trainer=_Trainer(tiny_llava()), output_dir="y")
    assert upstream_calls == ["y"]
    hooks.uninstall()
    assert not hasattr(train.safe_save_model_for_hf_trainer, "meteor_original")


def test_install_names_what_a_training_script_lacks():
    train = types.ModuleType("train")
    train.train = lambda attn_implementation=None: None
    with pytest.raises(RuntimeError, match="has no ModelArguments, TrainingArguments.*EagleTrainer"):
        hooks.install(train, EAGLE)
