"""Training METEOR models: conversion, the training entry, DeepSpeed, LoRA/QLoRA, saving and merging.

    meteor-plugin convert --model-path SRC --out DST [--config cfg.json] [--calibration-images DIR]
    deepspeed --module meteor_plugin.train [--meteor-...] <LLaVA's or EAGLE's train.py flags>
    meteor-plugin merge-lora --model-path LORA_RUN --out MERGED [--model-base BASE]

A family is reached through its ``TrainingSpec`` (``adapters.family``; the registry's lookups find it for a
checkpoint or a training run), never by importing the family. Modules:
- ``convert.py``    ``meteor-plugin convert`` (the family's ``convert_weights``, calibration on images)
- ``hooks.py``      what the entry replaces in upstream's train module (``install``); ``arguments.py``: flags
- ``trainer.py``    the Trainer mixin: checks, markers, resume, staging, stats, one half dtype, transformers 5.x
- ``save.py``       completeness markers and staged publishing: a crashed save never looks whole
- ``lora.py``       adapter placement and the adapter + ``non_lora_trainables.bin`` layout; ``merge.py``
- ``quant.py``      QLoRA loading that keeps vision towers, projectors and ``lm_head`` unquantised
- ``deepspeed.py``  DeepSpeed's set-up on GPU and on CPU (gloo)
Shared with the families' own training code, below this package: ``distributed.py`` (ranks, ZeRO-3 gathers) and
``checkpoint_files.py`` (tensors of a checkpoint folder without the model); the Trainer's API drift across
transformers generations is ``compat/training.py``; the tiny CPU workspace is ``testing/workspace.py``.
"""
