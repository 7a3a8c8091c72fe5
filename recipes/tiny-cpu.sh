#!/usr/bin/env bash
# Tiny METEOR fine-tuning on CPU: the same entry and flags as the real recipes, on a random tiny LLaVA.
#
# Hardware: any x86-64 Linux machine, no GPU; 2 processes (DeepSpeed's CPU accelerator, gloo backend);
#           about 30-60 s on 2 cores. Nothing is downloaded.
# What it does: (once per WORKDIR) builds a tiny LLaVA checkpoint with a tokenizer and 16 generated images,
#           converts it with `meteor-plugin convert`, then fine-tunes it for 4 steps with pruning active
#           (Stage 1 in CLIP, Stage 3 in the LLM, settings from the converted checkpoint's config.json).
# Usage:    bash recipes/tiny-cpu.sh [WORKDIR] [more train.py flags...]
# Env:      ZERO=2|3 (default 3)   OUT=folder (default WORKDIR/out-zeroN)
#           LORA=1 (LoRA r 8 on the LLM)   BITS=4 (QLoRA; CPU quantisation needs transformers 5.x here)
#           LAUNCHER=deepspeed (default) | torchrun | accelerate
#           ENTRY (default: the launcher's way to run meteor_plugin.train; tests put a wrapper script here)
set -euo pipefail
WORK=${1:-/tmp/meteor-tiny}
shift || true
ZERO=${ZERO:-3}
OUT=${OUT:-$WORK/out-zero$ZERO}
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
case "${LAUNCHER:-deepspeed}" in
  deepspeed)  launcher="${DEEPSPEED:-deepspeed} --num_gpus 2"; ENTRY=${ENTRY:---module meteor_plugin.train} ;;
  torchrun)   launcher="${TORCHRUN:-torchrun} --standalone --nproc_per_node 2"; ENTRY=${ENTRY:--m meteor_plugin.train} ;;
  accelerate) launcher="${ACCELERATE:-accelerate} launch --use_deepspeed --zero_stage $ZERO --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"
              ENTRY=${ENTRY:--m meteor_plugin.train} ;;
  *) echo "LAUNCHER must be deepspeed, torchrun or accelerate" >&2; exit 2 ;;
esac
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

MODEL=$WORK/models/tiny-llava-v1-meteor
if [ ! -f "$MODEL/config.json" ]; then
  mkdir -p "$WORK"
  "$PYTHON" -m meteor_plugin.training.tiny "$WORK" > "$WORK/prepared.json"
  "$PYTHON" -m meteor_plugin.cli convert --model-path "$WORK/models/tiny-llava-v1" --out "$MODEL" \
    ${METEOR_CONFIG_FILE:+--config "$METEOR_CONFIG_FILE"}
fi
TOWER=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['mm_vision_tower'])" "$MODEL/config.json")

extra=()
if [ "${LORA:-0}" = 1 ] || [ -n "${BITS:-}" ]; then
  extra+=(--lora_enable True --lora_r 8 --lora_alpha 16 --mm_projector_lr 1e-3)
fi
if [ -n "${BITS:-}" ]; then
  extra+=(--bits "$BITS")
fi

# shellcheck disable=SC2086  # the launcher and ENTRY are several words
$launcher $ENTRY \
  --deepspeed "$here/tiny/zero$ZERO.json" \
  --model_name_or_path "$MODEL" --version v1 \
  --data_path "$WORK/data/data.json" --image_folder "$WORK/data/images" \
  --vision_tower "$TOWER" --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 \
  --mm_use_im_start_end False --mm_use_im_patch_token False --image_aspect_ratio pad \
  --output_dir "$OUT" --num_train_epochs 1 --max_steps 4 \
  --per_device_train_batch_size 2 --gradient_accumulation_steps 1 \
  --learning_rate 1e-3 --weight_decay 0. --warmup_ratio 0. --lr_scheduler_type cosine \
  --logging_steps 1 --save_strategy steps --save_steps 2 \
  --model_max_length 256 --gradient_checkpointing True --dataloader_num_workers 0 \
  --report_to none --seed 0 \
  "${extra[@]}" "$@"
