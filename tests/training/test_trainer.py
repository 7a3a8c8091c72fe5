"""The Trainer mixin in one process, without a launcher: the codebase hook, the placement checks."""

import dataclasses

import pytest
import transformers

from meteor_plugin.adapters import llava
from meteor_plugin.training import hooks, lora
from meteor_plugin.training.deepspeed import cpu_training_flags
from meteor_plugin.training.trainer import make_trainer


def _args(tmp_path, **extra):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", **cpu_training_flags())
    for key, value in extra.items():
        setattr(args, key, value)  # upstream's TrainingArguments fields (lora_enable, bits, ...)
    return args


def test_the_before_training_hook_sees_the_model_before_the_optimizer(tiny_llava, tmp_path, monkeypatch):
    calls = []
    codebase = dataclasses.replace(llava.TRAINING, before_training=lambda model, args: calls.append((model, args)))
    session = hooks.Session(codebase)
    model = tiny_llava()
    args = _args(tmp_path)
    trainer = make_trainer(transformers.Trainer, session)(model=model, args=args)
    assert calls == [(model, args)] and trainer.optimizer is None and session.trainer is trainer


def test_a_trainer_with_adapters_in_the_vision_tower_is_refused(tiny_llava, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llava(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cls = make_trainer(transformers.Trainer, hooks.Session(llava.TRAINING))
    with pytest.raises(lora.LoraPlacementError, match="vision/projector"):
        cls(model=model, args=_args(tmp_path, lora_enable=True))


def test_lora_runs_keep_the_projector_trainable(tiny_llava, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_llava()
    model = get_peft_model(model, LoraConfig(r=4, target_modules=lora.target_regex(model)))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "mm_projector" in n)  # peft froze it
    session = hooks.Session(llava.TRAINING)
    make_trainer(transformers.Trainer, session)(model=model, args=_args(tmp_path, lora_enable=True))
    assert session.fully_trained and all("mm_projector" in n for n in session.fully_trained)
    assert all(p.requires_grad for n, p in model.named_parameters() if "mm_projector" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)


def test_trainable_weights_get_one_half_dtype_under_deepspeed_as_zero_needs(tiny_llava, tmp_path):
    """peft keeps adapters in float32 on a bfloat16 model; ZeRO-3 flattens a group's weights into one buffer
    and refuses mixed dtypes (what --bf16 --lora_enable with zero3.json, the LoRA recipes, would meet)."""
    import types

    import torch
    from deepspeed.runtime.zero.utils import defragment
    from peft import LoraConfig, get_peft_model

    from meteor_plugin.training.trainer import one_half_dtype

    model = tiny_llava().to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=lora.target_regex(model)))
    lora.train_fully(model)
    trainable = lambda: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    assert {p.dtype for p in trainable()} == {torch.float32, torch.bfloat16}
    with pytest.raises(AssertionError):
        defragment([p.data.flatten().clone() for p in trainable()])
    assert one_half_dtype(model, types.SimpleNamespace(deepspeed=None, bf16=True)) == []  # no DeepSpeed: as is
    assert one_half_dtype(model, types.SimpleNamespace(deepspeed="z3.json", bf16=False, fp16=False)) == []
    cast = one_half_dtype(model, types.SimpleNamespace(deepspeed="z3.json", bf16=True, fp16=False))
    assert cast and all("lora_" in n for n in cast)
    assert {p.dtype for p in trainable()} == {torch.bfloat16}
    defragment([p.data.flatten().clone() for p in trainable()])
