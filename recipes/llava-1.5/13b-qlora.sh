#!/usr/bin/env bash
# METEOR fine-tuning of LLaVA-1.5-13B: QLoRA: the LLM in 4 bits (NF4, double quantisation), LoRA as in the LoRA recipe, ZeRO-2.
#           LLaVA's only QLoRA script (scripts/finetune_qlora.sh, LLaVA v1) uses lr 2e-5 with the default
#           r 64 / alpha 16; this one keeps v1.5's LoRA settings for a v1.5 model (LR=2e-5 to match v1).
# Hardware: 1 node x 8 GPUs with 24 GB or more (the LLM in 4-bit NF4); global batch 128 (16 per GPU).
#           bitsandbytes must support the GPUs; vision tower, projector and lm_head stay in bf16.
# Before:   meteor-plugin convert --model-path ./checkpoints/llava-v1.5-13b --out ./checkpoints/llava-v1.5-13b-meteor
# Usage:    DATA=... IMAGES=... bash recipes/llava-1.5/13b-qlora.sh RUN_NAME [flags]   (launchers: recipes/lib/launch.sh)
# After:    meteor-plugin merge-lora --model-path ./checkpoints/llava-v1.5-13b-meteor-qlora-RUN_NAME \
#               --out ./checkpoints/llava-v1.5-13b-meteor-RUN_NAME
NAME=${1:?usage: $0 RUN_NAME [more train.py flags]}; shift
SIZE=13b
MODE=qlora
source "$(dirname "$0")/finetune.sh"
