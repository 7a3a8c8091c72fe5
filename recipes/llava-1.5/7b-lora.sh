#!/usr/bin/env bash
# METEOR fine-tuning of LLaVA-1.5-7B: LoRA (r 128, alpha 256, lr 2e-4, projector lr 2e-5) on the LLM, projector trained fully, ZeRO-3.
# Hardware: 1 node x 8 GPUs with 80 GB (A100/H100), as LLaVA's v1.5 LoRA runs; global batch 128 (16 per GPU).
#           Fewer or smaller GPUs: keep the global batch with BATCH and GRAD_ACCUM (e.g. BATCH=8 GRAD_ACCUM=2).
# Before:   meteor-plugin convert --model-path ./checkpoints/llava-v1.5-7b --out ./checkpoints/llava-v1.5-7b-meteor
# Usage:    DATA=... IMAGES=... bash recipes/llava-1.5/7b-lora.sh RUN_NAME [flags]   (launchers: recipes/lib/launch.sh)
# After:    meteor-plugin merge-lora --model-path ./checkpoints/llava-v1.5-7b-meteor-lora-RUN_NAME \
#               --out ./checkpoints/llava-v1.5-7b-meteor-RUN_NAME
NAME=${1:?usage: $0 RUN_NAME [more train.py flags]}; shift
SIZE=7b
MODE=lora
source "$(dirname "$0")/finetune.sh"
