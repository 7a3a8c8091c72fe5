"""The EAGLE stand-in's root train.py: LLaVA's training code run on EAGLE's names, with EAGLE's differences
(the vision towers' learning rate, the <image> fix, the final save that drops LoRA runs' trained weights),
found and driven by the training entry."""

import builtins
import dis
import os
import types

import pytest
import torch

from meteor_plugin.adapters import eagle
from meteor_plugin.adapters.eagle import training as eagle_training
from meteor_plugin import adapters
from meteor_plugin.training import hooks, lora
from meteor_plugin.training.deepspeed import cpu_training_flags
from meteor_plugin.testing.workspace import EAGLE_TOWERS


@pytest.fixture(scope="module")
def train():
    from meteor_plugin.testing.eagle_like import install

    install()
    hooks.prepare_imports()  # transformers 5: LLaVA's trainer module imports a name 5.x moved
    import train as module

    return module


@pytest.fixture
def tiny_eagle():
    from meteor_plugin.testing.eagle_like import TinyEagleSpec, build_tiny_eagle

    return lambda: build_tiny_eagle(TinyEagleSpec(vision_tower=EAGLE_TOWERS))


def _globals_loaded(code):
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            yield instruction.argval
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _globals_loaded(const)


def test_the_entry_finds_the_stand_ins_train_py_and_installs_into_it(train):
    from meteor_plugin.testing.eagle_like import ROOT

    assert train.__file__ == os.path.join(ROOT, "train.py") == eagle_training.eagle_train_script()
    assert adapters.spec_for_training("eagle") is eagle.TRAINING
    before = {n: getattr(train, n) for n in ("EagleTrainer", "EagleLlamaForCausalLM", "find_all_linear_names",
                                              "safe_save_model_for_hf_trainer", "TrainingArguments")}
    session = hooks.install(train, eagle.TRAINING)
    assert train.EagleTrainer.meteor_session is session and issubclass(train.EagleTrainer, before["EagleTrainer"])
    assert train.EagleLlamaForCausalLM.meteor_wrapped is before["EagleLlamaForCausalLM"]
    assert train.find_all_linear_names is lora.target_regex
    import eagle.model.language_model.eagle_llama as eagle_llama

    assert eagle_llama.eagleConfig is eagle_llama.EagleConfig  # the LoRA loader's import, fixed at run time
    hooks.uninstall()
    assert {n: getattr(train, n) for n in before} == before and not hasattr(eagle_llama, "eagleConfig")


def test_llavas_code_runs_on_eagles_names_here(train):
    import llava.train.train as llava_train

    functions = [v for v in vars(train).values() if isinstance(v, types.FunctionType) and v.__module__ == train.__name__]
    for cls in (train.LazySupervisedDataset, train.DataCollatorForSupervisedDataset):
        functions += [v for v in vars(cls).values() if isinstance(v, types.FunctionType) and v.__module__ == train.__name__]
    assert len(functions) > 20
    unresolved = {(f.__name__, g) for f in functions for g in _globals_loaded(f.__code__)
                  if g not in vars(train) and not hasattr(builtins, g)}
    assert unresolved == {("train", "LlavaMptForCausalLM")}  # EAGLE has no MPT model
    loaded = set(_globals_loaded(train._llava_train.__code__))
    assert {"EagleLlamaForCausalLM", "EagleTrainer"} <= loaded and not {"LlavaLlamaForCausalLM", "LLaVATrainer"} & loaded
    # nothing of LLaVA's model package is reachable from here, and the module's names are its own
    assert not [n for n, v in vars(train).items() if (getattr(v, "__module__", "") or "").startswith("llava.model")]
    assert train.conversation_lib.__name__ == "eagle.conversation"
    assert train.LazySupervisedDataset is not llava_train.LazySupervisedDataset
    assert not issubclass(train.LazySupervisedDataset, llava_train.LazySupervisedDataset)
    fields = set(train.TrainingArguments.__dataclass_fields__)
    assert {"vision_tower_lr", "vision_tower_layer_decay"} <= fields
    assert fields - {"vision_tower_lr", "vision_tower_layer_decay"} == set(llava_train.TrainingArguments.__dataclass_fields__)
    assert set(train.ModelArguments.__dataclass_fields__) == set(llava_train.ModelArguments.__dataclass_fields__)


def test_eagles_preprocessing_puts_the_image_first(train):
    import llava.train.train as llava_train

    args = train.DataArguments(is_multimodal=True)
    args.mm_use_im_start_end = False
    sample = lambda: [[{"from": "human", "value": "what is in the image ?"}, {"from": "gpt", "value": "a square ."}]]  # noqa
    assert train.preprocess_multimodal(sample(), args)[0][0]["value"] == "<image>\nwhat is in the image ?"
    assert llava_train.preprocess_multimodal(sample(), args)[0][0]["value"] == "what is in the image ?"
    args.is_multimodal = False
    assert train.preprocess_multimodal(sample(), args)[0][0]["value"] == "what is in the image ?"


def _args(train, tmp_path, **fields):
    return train.TrainingArguments(output_dir=str(tmp_path), report_to="none", learning_rate=1e-3,
                                   **cpu_training_flags(), **fields)


def _learning_rates(trainer):
    optimizer = trainer.create_optimizer()
    by_id = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(trainer.model.named_parameters())
    assert len(by_id) == sum(p.requires_grad for p in names.values())  # each trainable weight once
    return {n: by_id[id(p)] for n, p in names.items() if p.requires_grad}


def test_eagle_trainer_gives_the_vision_towers_their_learning_rate(train, tiny_eagle, tmp_path):
    lrs = _learning_rates(train.EagleTrainer(model=tiny_eagle(), args=_args(train, tmp_path, vision_tower_lr=1e-5)))
    assert {lr for n, lr in lrs.items() if "vision_tower" in n} == {1e-5}
    assert {lr for n, lr in lrs.items() if "vision_tower" not in n} == {1e-3}
    assert sum("vision_tower" in n for n in lrs) > 50
    # with --mm_projector_lr, EAGLE builds LLaVA's projector groups and the towers get the base rate
    lrs = _learning_rates(train.EagleTrainer(model=tiny_eagle(), args=_args(
        train, tmp_path, vision_tower_lr=1e-5, mm_projector_lr=2e-5)))
    assert {lr for n, lr in lrs.items() if "mm_projector" in n} == {2e-5}
    assert {lr for n, lr in lrs.items() if "mm_projector" not in n} == {1e-3}
    # --vision_tower_layer_decay: EAGLE's fusion tower has no get_layer_decay_parameter_group
    trainer = train.EagleTrainer(model=tiny_eagle(), args=_args(train, tmp_path, vision_tower_layer_decay=0.9))
    with pytest.raises(AttributeError, match="get_layer_decay_parameter_group"):
        trainer.create_optimizer()


@pytest.mark.filterwarnings("ignore:Could not find a config file")  # peft, on a model built in memory
def test_eagles_own_final_save_keeps_only_the_adapter_and_the_entrys_keeps_everything(train, tiny_eagle, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_eagle()
    model = get_peft_model(model, LoraConfig(r=4, target_modules=lora.target_regex(model)))
    trained = lora.train_fully(model, eagle.TRAINING.fully_trained)
    trainer = train.EagleTrainer(model=model, args=_args(train, tmp_path / "run", lora_enable=True))
    trainer.save_state()  # the end of training: from here train() saves as EAGLE does, LoRA or not
    assert trainer.args.lora_enable is False

    eagles = tmp_path / "eagle-save"
    train.safe_save_model_for_hf_trainer(trainer=trainer, output_dir=str(eagles))
    assert "adapter_model.safetensors" in os.listdir(eagles) and lora.NON_LORA_FILE not in os.listdir(eagles)
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(eagles / "adapter_model.safetensors"))  # towers, projector: lost

    hooks.replace_final_save(train)  # what meteor_plugin.train installs
    ours = tmp_path / "meteor-save"
    train.safe_save_model_for_hf_trainer(trainer=trainer, output_dir=str(ours))
    saved = torch.load(ours / lora.NON_LORA_FILE, weights_only=True)
    assert set(saved) == set(trained) and any("vision_tower" in k for k in saved)
