"""Training METEOR models: conversion, the training entry, DeepSpeed, LoRA/QLoRA, saving and merging.

    meteor-plugin convert --model-path SRC --out DST [--config cfg.json] [--calibration-images DIR]
    deepspeed --module meteor_plugin.train [--meteor-...] <LLaVA's or EAGLE's train.py flags>
    meteor-plugin merge-lora --model-path LORA_RUN --out MERGED [--model-base BASE]

Modules:
- ``codebases.py``  what training needs of a codebase (each family's record is in ``adapters/``) and lookups
- ``convert.py``    ``meteor-plugin convert``; ``calibration.py``: the hook the calibrator fills
- ``eagle_projectors.py``  EAGLE's per-encoder projectors: on disk for convert, split before training
  (ZeRO-3 gathered), on load for merge; ``checkpoint_files.py``: read and add tensors without the model
- ``hooks.py``      what the entry replaces in upstream's train module (``install``); ``arguments.py``: flags
- ``trainer.py``    the Trainer mixin: checks, markers, resume, staging, stats, one half dtype, transformers 5.x
- ``save.py``       completeness markers and staged publishing: a crashed save never looks whole
- ``lora.py``       adapter placement and the adapter + ``non_lora_trainables.bin`` layout; ``merge.py``
- ``quant.py``      QLoRA loading that keeps vision towers, projectors and ``lm_head`` unquantised
- ``deepspeed.py``  DeepSpeed on GPU and on CPU (gloo), ZeRO-3 gathers; ``compat.py``: Trainer API drift
- ``tiny.py``       the tiny workspace of the CPU recipe and tests (EAGLE's run-time fix: ``adapters/eagle.py``)
"""
