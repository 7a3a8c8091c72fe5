# Sourced by recipes/eagle/*.sh: METEOR fine-tuning of a converted EAGLE checkpoint, Stages 1 and 2 active,
# run from the root of an EAGLE checkout (NVlabs/EAGLE: its train.py and eagle/ package are what trains).
# Hyperparameters: EAGLE's SFT scripts (scripts/finetune-eagle-x{4,5}-vicuna-{7,13}b-1.8m.sh): ZeRO-2, lr 2e-5,
# 4 per GPU on 32 GPUs (global batch 128), bf16, 2048 tokens, gradient checkpointing, FlashAttention-2.
# EAGLE has no LoRA script; the LoRA variants take LLaVA-1.5's (r 128, alpha 256, lr 2e-4, projector lr 2e-5,
# ZeRO-3). Set by the caller: NAME ENCODERS SIZE (7b|13b) VARIANT (x4|x5) MODE (full|lora). Environment:
#   DATA     EAGLE's SFT json (eagle-sft-v1-1_8m.json)                         [required]
#   IMAGES   its image folder                                                  [required]
#   MODEL    the converted checkpoint (default ./checkpoints/eagle-$VARIANT-$SIZE-meteor)
#   METEOR_CONFIG  a MeteorConfig file overriding the one stored by convert (optional)
#   BATCH / GRAD_ACCUM / LR   per-GPU batch (4), accumulation (1), learning rate (2e-5 full, 2e-4 LoRA)
#   ZERO_CONFIG   another file of recipes/deepspeed/ (zero3_offload.json: optimizer and weights in CPU RAM)
#   and the launcher settings of recipes/lib/launch.sh (EAGLE's runs: NNODES=4, GPUS_PER_NODE=8)
source "$(dirname "${BASH_SOURCE[0]}")/../lib/launch.sh"

require DATA "EAGLE's SFT json, e.g. \$PATH_TO_SFT_DATA/eagle-sft-v1-1_8m.json"
require IMAGES "its image folder, e.g. \$PATH_TO_SFT_DATA/images"
MODEL=${MODEL:-./checkpoints/eagle-$VARIANT-$SIZE-meteor}
if [ "${DRY_RUN:-0}" != 1 ]; then
  if [ ! -f train.py ] || [ ! -d eagle ]; then
    echo "run from the root of an EAGLE checkout (train.py and eagle/ here); now in $(pwd)" >&2; exit 2
  fi
  if [ ! -f "$MODEL/config.json" ]; then
    echo "no converted checkpoint at $MODEL: first run" >&2
    echo "  meteor-plugin convert --model-path PATH/TO/Eagle-${VARIANT^^}-${SIZE^^} --out $MODEL" >&2
    exit 2
  fi
fi

case "$MODE" in
  full) zero=zero2.json; lora=(); lr=2e-5 ;;
  lora) zero=zero3.json; lora=(--lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5); lr=2e-4 ;;
  *) echo "MODE must be full or lora" >&2; exit 2 ;;
esac

launch \
  --meteor-codebase eagle --meteor-attn "${ATTN:-flash_attention_2}" \
  ${METEOR_CONFIG:+--meteor-config "$METEOR_CONFIG"} \
  --deepspeed "$RECIPES/deepspeed/${ZERO_CONFIG:-$zero}" "${lora[@]+"${lora[@]}"}" \
  --model_name_or_path "$MODEL" --version v1 \
  --data_path "$DATA" --image_folder "$IMAGES" \
  --vision_tower "$ENCODERS" --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 \
  --mm_use_im_start_end False --mm_use_im_patch_token False \
  --image_aspect_ratio pad --group_by_modality_length True \
  --bf16 True --tf32 True \
  --output_dir "./checkpoints/eagle-$VARIANT-$SIZE-meteor-$MODE-$NAME" \
  --num_train_epochs 1 --per_device_train_batch_size "${BATCH:-4}" --per_device_eval_batch_size 4 \
  --gradient_accumulation_steps "${GRAD_ACCUM:-1}" \
  --evaluation_strategy no --save_strategy steps --save_steps 500 --save_total_limit 1 \
  --learning_rate "${LR:-$lr}" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
  --logging_steps 1 --model_max_length 2048 --gradient_checkpointing True \
  --dataloader_num_workers 4 --lazy_preprocess True --report_to "${REPORT_TO:-wandb}" --run_name "$NAME" \
  "$@"  # flags after RUN_NAME are passed on (later ones win)
