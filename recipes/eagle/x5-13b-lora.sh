#!/usr/bin/env bash
# METEOR fine-tuning of EAGLE-X5 (Vicuna-13B; encoders clip-448;convnext-1024;sam-1024;det-1024;pix2struct-1024):
#           LoRA on the LLM (r 128, alpha 256, lr 2e-4), projectors and towers trained fully, ZeRO-3.
# Hardware: 1-4 nodes x 8 GPUs with 40 GB or more; global batch 128 at 4 nodes (4 per GPU), else raise GRAD_ACCUM.
#           (LoRA on the LLM; projectors and towers are still trained fully, as EAGLE trains them.)
# Before:   meteor-plugin convert --model-path PATH/TO/Eagle-X5-13B --out ./checkpoints/eagle-x5-13b-meteor
#           (the EAGLE conversion adds per-encoder projectors: Stage 2's post-projection fusion)
# Usage:    cd EAGLE && DATA=... IMAGES=... NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 \
#               bash /path/to/recipes/eagle/x5-13b-lora.sh RUN_NAME [flags]     (recipes/lib/launch.sh)
NAME=${1:?usage: $0 RUN_NAME [more train.py flags]}; shift
ENCODERS="clip-448;convnext-1024;sam-1024;det-1024;pix2struct-1024"
VARIANT=x5
SIZE=13b
MODE=lora
source "$(dirname "$0")/finetune.sh"
# After:    meteor-plugin merge-lora --model-path ./checkpoints/eagle-x5-13b-meteor-lora-RUN_NAME --out ./checkpoints/eagle-x5-13b-meteor-RUN_NAME
