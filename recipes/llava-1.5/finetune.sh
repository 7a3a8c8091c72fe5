# Sourced by recipes/llava-1.5/*.sh: METEOR fine-tuning of a converted LLaVA-1.5 checkpoint with LoRA or
# QLoRA, the hyperparameters of LLaVA's scripts/v1_5/finetune_task_lora.sh (see each script's header).
# Set by the caller: NAME SIZE (7b|13b) MODE (lora|qlora). Environment:
#   DATA     LLaVA's instruction json (e.g. playground/data/llava_v1_5_mix665k.json)     [required]
#   IMAGES   its image folder (e.g. playground/data)                                     [required]
#   MODEL    the converted checkpoint (default ./checkpoints/llava-v1.5-$SIZE-meteor)
#   METEOR_CONFIG  a MeteorConfig file overriding the one stored by convert (optional)
#   BATCH / GRAD_ACCUM / LR   per-GPU batch (16), accumulation (1), learning rate (2e-4)
#   ZERO_CONFIG   another file of recipes/deepspeed/ (zero3_offload.json: optimizer and weights in CPU RAM)
#   and the launcher settings of recipes/lib/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/launch.sh"

require DATA "LLaVA's instruction-tuning json, e.g. playground/data/llava_v1_5_mix665k.json"
require IMAGES "the image folder the json refers to, e.g. playground/data"
MODEL=${MODEL:-./checkpoints/llava-v1.5-$SIZE-meteor}
if [ "${DRY_RUN:-0}" != 1 ] && [ ! -f "$MODEL/config.json" ]; then
  echo "no converted checkpoint at $MODEL: first run" >&2
  echo "  huggingface-cli download liuhaotian/llava-v1.5-$SIZE --local-dir ./checkpoints/llava-v1.5-$SIZE" >&2
  echo "  meteor-plugin convert --model-path ./checkpoints/llava-v1.5-$SIZE --out $MODEL" >&2
  exit 2
fi

case "$MODE" in
  lora)  zero=zero3.json; quant=() ;;
  qlora) zero=zero2.json; quant=(--bits 4) ;;  # ZeRO-3 cannot partition 4-bit weights
  *) echo "MODE must be lora or qlora" >&2; exit 2 ;;
esac

# "lora" and "llava" in the folder name: LLaVA's load_pretrained_model(..., model_base=MODEL) then takes its
# LoRA branch; `meteor-plugin merge-lora --model-path ./checkpoints/$NAME --out ...-merged` makes it standalone.
launch \
  ${METEOR_CONFIG:+--meteor-config "$METEOR_CONFIG"} \
  --deepspeed "$RECIPES/deepspeed/${ZERO_CONFIG:-$zero}" "${quant[@]}" \
  --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
  --model_name_or_path "$MODEL" --version v1 \
  --data_path "$DATA" --image_folder "$IMAGES" \
  --vision_tower openai/clip-vit-large-patch14-336 --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 \
  --mm_use_im_start_end False --mm_use_im_patch_token False \
  --image_aspect_ratio pad --group_by_modality_length True \
  --bf16 True --tf32 True \
  --output_dir "./checkpoints/llava-v1.5-$SIZE-meteor-$MODE-$NAME" \
  --num_train_epochs 1 --per_device_train_batch_size "${BATCH:-16}" --per_device_eval_batch_size 4 \
  --gradient_accumulation_steps "${GRAD_ACCUM:-1}" \
  --evaluation_strategy no --save_strategy steps --save_steps 50000 --save_total_limit 1 \
  --learning_rate "${LR:-2e-4}" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
  --logging_steps 1 --model_max_length 2048 --gradient_checkpointing True \
  --dataloader_num_workers 4 --lazy_preprocess True --report_to "${REPORT_TO:-wandb}" --run_name "$NAME" \
  "$@"  # flags after RUN_NAME are passed on (later ones win)
