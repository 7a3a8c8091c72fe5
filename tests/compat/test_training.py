"""compat/training.py: the Trainer's API and flags across the transformers generations training meets."""

import transformers

from meteor_plugin.compat import training as compat
from meteor_plugin.compat.transformers import transformers_version
from meteor_plugin.training.deepspeed import cpu_training_flags, on_cpu


def transformers_major() -> int:
    return transformers_version()[0]


def test_renamed_training_flags_are_translated_for_this_transformers():
    import transformers

    argv = ["--warmup_ratio", "0.03", "--evaluation_strategy", "no", "--lr_scheduler_type", "cosine"]
    out = compat.translate_flags(argv, transformers.TrainingArguments)
    if transformers_major() >= 5:
        assert out == ["--warmup_steps", "0.03", "--eval_strategy", "no", "--lr_scheduler_type", "cosine"]
    else:
        assert out == argv
    if transformers.__version__.startswith("4.37"):
        assert compat.translate_flags(["--eval_strategy=no"], transformers.TrainingArguments) == ["--evaluation_strategy=no"]


def test_cpu_flags_follow_the_transformers_generation():
    assert compat.cpu_training_flags() == ({"use_cpu": True} if transformers_major() >= 5 else {})
    assert cpu_training_flags() == (compat.cpu_training_flags() if on_cpu() else {})


def test_from_pretrained_takes_the_dtype_under_this_generations_name():
    import inspect

    assert compat.dtype_keyword() == ("dtype" if transformers_major() >= 5 else "torch_dtype")
    source = inspect.getsource(transformers.PreTrainedModel.from_pretrained)
    assert compat.dtype_keyword() in source


def test_the_trainer_kwargs_name_the_tokenizer_as_this_trainer_takes_it():
    import inspect

    params = inspect.signature(transformers.Trainer.__init__).parameters
    out = compat.trainer_kwargs({"tokenizer": "tok", "args": None})
    assert ("processing_class" in out) == ("tokenizer" not in params) and out.get("args", 0) is None


