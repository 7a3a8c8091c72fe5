#!/usr/bin/env bash
# Tiny METEOR fine-tuning on CPU: the same entry and flags as the real recipes, on a random tiny LLaVA
# (or, with CODEBASE=eagle, a random tiny EAGLE-like model trained through EAGLE's train.py structure).
#
# Hardware: any x86-64 Linux machine, no GPU; 2 processes (DeepSpeed's CPU accelerator, gloo backend);
#           about 30-60 s on 2 cores. Nothing is downloaded.
# What it does: (once per WORKDIR) builds a tiny checkpoint with a tokenizer and 16 generated images,
#           converts it with `meteor-plugin convert`, then fine-tunes it for 4 steps with pruning active
#           (LLaVA: Stage 1 in CLIP, Stage 3 in the LLM; EAGLE: Stages 1 and 2 with per-encoder projectors,
#           and Stage 3; settings from the converted checkpoint's config.json).
# Usage:    bash recipes/tiny-cpu.sh [WORKDIR] [more train.py flags...]
# Env:      ZERO=2|3 (default 3)   OUT=folder (default WORKDIR/out-CODEBASE-zeroN: each codebase its own)
#           LORA=1 (LoRA r 8 on the LLM)   BITS=4 (QLoRA; CPU quantisation needs transformers 5.x here)
#           LAUNCHER=deepspeed (default) | torchrun | accelerate
#           CODEBASE=llava (default) | eagle: EAGLE's code is the test stand-in of
#           meteor_plugin.testing.eagle_like (an eagle package and a train.py laid out like EAGLE's; only it
#           builds the tiny encoders), whose folder is put on PYTHONPATH as an EAGLE checkout's root would be
#           METEOR_CONFIG_FILE: the MeteorConfig `convert` stores (first run in a WORKDIR only)
#           ENTRY (default: the launcher's way to run meteor_plugin.train; tests put a wrapper script here)
set -euo pipefail
WORK=${1:-/tmp/meteor-tiny}
shift || true
ZERO=${ZERO:-3}
OUT=${OUT:-$WORK/out-${CODEBASE:-llava}-zero$ZERO}
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
# One thread per process (torchrun sets this, the deepspeed launcher does not): two processes with a thread
# per core each oversubscribe a small CPU, which made a tiny EAGLE step 15x slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

extra=()
case "${CODEBASE:-llava}" in
  # Long enough for the visual tokens plus the text: LLaVA's 4x4 = 16 patches, EAGLE's 656 fused tokens
  # (a shorter limit cuts every answer away and the entry refuses the all-masked batches).
  llava) ORIGINAL=$WORK/models/tiny-llava-v1; MAXLEN=256 ;;
  eagle) ORIGINAL=$WORK/models/tiny-eagle-x3; MAXLEN=1024
         EAGLE_ROOT=$("$PYTHON" -c "from meteor_plugin.testing.eagle_like import ROOT; print(ROOT)")
         export PYTHONPATH="$EAGLE_ROOT${PYTHONPATH:+:$PYTHONPATH}"
         extra+=(--meteor-codebase eagle) ;;
  *) echo "CODEBASE must be llava or eagle" >&2; exit 2 ;;
esac
MODEL=$ORIGINAL-meteor
if [ ! -f "$MODEL/config.json" ]; then
  mkdir -p "$WORK"
  "$PYTHON" -m meteor_plugin.testing.workspace "$WORK" --codebase "${CODEBASE:-llava}" > "$WORK/prepared.json"
  "$PYTHON" -m meteor_plugin.cli convert --model-path "$ORIGINAL" --out "$MODEL" \
    ${METEOR_CONFIG_FILE:+--config "$METEOR_CONFIG_FILE"}
fi
TOWER=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['mm_vision_tower'])" "$MODEL/config.json")

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
  --model_max_length $MAXLEN --gradient_checkpointing True --dataloader_num_workers 0 \
  --report_to none --seed 0 \
  "${extra[@]}" "$@"
