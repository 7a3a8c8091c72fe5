#!/usr/bin/env bash
# METEOR fine-tuning of EAGLE-X5 (Vicuna-7B; encoders clip-448;convnext-1024;sam-1024;det-1024;pix2struct-1024):
#           all parameters (LLM, per-encoder projectors and the vision towers, as EAGLE's SFT), ZeRO-2.
# Hardware: 4 nodes x 8 GPUs with 80 GB (A100/H100), as EAGLE's SFT runs; global batch 128 (4 per GPU).
#           One node: NNODES=1 GRAD_ACCUM=4 keeps the global batch (4x the time).
# Before:   meteor-plugin convert --model-path PATH/TO/Eagle-X5-7B --out ./checkpoints/eagle-x5-7b-meteor
#           (the EAGLE conversion adds per-encoder projectors: Stage 2's post-projection fusion)
# Usage:    cd EAGLE && DATA=... IMAGES=... NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 \
#               bash /path/to/recipes/eagle/x5-7b-full.sh RUN_NAME [flags]     (recipes/lib/launch.sh)
NAME=${1:?usage: $0 RUN_NAME [more train.py flags]}; shift
ENCODERS="clip-448;convnext-1024;sam-1024;det-1024;pix2struct-1024"
VARIANT=x5
SIZE=7b
MODE=full
source "$(dirname "$0")/finetune.sh"
