# Shared by the GPU recipes: how to start `python -m meteor_plugin.train` on one node or many.
# A recipe sets its flags and calls `launch FLAGS...`. Environment (all optional):
#   LAUNCHER      torchrun (default) | deepspeed | accelerate
#   GPUS_PER_NODE processes per node (default 8)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (defaults 1, 0, 127.0.0.1, 25031);
#                 under SLURM they default to SLURM_NNODES / SLURM_PROCID and the first host of the job
#   HOSTFILE      deepspeed only: run once on the first node, it starts every node listed (over pdsh/ssh)
#   DRY_RUN=1     print the command instead of running it
# Multi-node, one line per node (torchrun, the way EAGLE's scripts launch):
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 bash recipes/eagle/x5-7b-full.sh RUN_NAME
# or under SLURM (srun starts one task per node): srun --ntasks-per-node 1 bash recipes/eagle/x5-7b-full.sh RUN_NAME
# or DeepSpeed from the first node:  LAUNCHER=deepspeed HOSTFILE=hostfile bash recipes/llava-1.5/13b-lora.sh RUN_NAME
set -euo pipefail

if [ -n "${SLURM_NNODES:-}" ]; then
  NNODES=${NNODES:-$SLURM_NNODES}
  NODE_RANK=${NODE_RANK:-${SLURM_PROCID:-0}}
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-25031}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RECIPES=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

launch() {
  local cmd
  case "${LAUNCHER:-torchrun}" in
    torchrun)
      cmd=(torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
           --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m meteor_plugin.train) ;;
    deepspeed)
      cmd=(deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
      if [ -z "${HOSTFILE:-}" ]; then cmd+=(--num_gpus "$GPUS_PER_NODE"); fi
      cmd+=(--module meteor_plugin.train) ;;
    accelerate)
      cmd=(accelerate launch --num_machines "$NNODES" --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR"
           --main_process_port "$MASTER_PORT" --num_processes $((GPUS_PER_NODE * NNODES)) -m meteor_plugin.train) ;;
    *) echo "LAUNCHER must be torchrun, deepspeed or accelerate, not '${LAUNCHER}'" >&2; return 2 ;;
  esac
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}" "$@"; echo
  else
    "${cmd[@]}" "$@"
  fi
}

require() {  # require VAR "what it is": fail early, naming the missing setting
  if [ -z "${!1:-}" ]; then echo "set $1: $2" >&2; exit 2; fi
}
