#!/usr/bin/env bash
# Two nodes x 8 GPUs under SLURM: one `accelerate launch` per node, each starting its 8 local ranks.
#   sbatch examples/slurm_multinode.sh accelerate_configs/multinode_deepspeed_zero3.yaml examples/configs/qwen2.5-72b-8xv100.yaml
#   sbatch examples/slurm_multinode.sh accelerate_configs/multinode_fsdp.yaml my.yaml --max_steps 1000
# The accelerate YAML's main_process_ip / machine_rank placeholders are overridden here from SLURM's
# allocation, so the same file serves every job. Everything after the training config is passed on as
# training-config overrides, each argument intact (quote them as for any command: --lora.target_modules "[q_proj, v_proj]").
#SBATCH --job-name=qwenloop
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it forks the 8 GPU ranks
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64           # CPU offload (ZeRO-3 offload, dataloaders) wants many cores
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=B:TERM@300          # SIGTERM 5 minutes before the time limit
set -euo pipefail

ACCEL_CONFIG=${1:?accelerate config yaml}
TRAIN_CONFIG=${2:?training config yaml}
shift 2

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
export NCCL_ASYNC_ERROR_HANDLING=1   # a dead rank aborts the job instead of hanging it

# Every value travels as its own argument, never pasted into a string a shell parses again: an override
# holding a quote, a space or `$(...)` reaches qwenloop exactly as typed, and nothing in it runs.
launch_args=(
  --config_file "$ACCEL_CONFIG"
  --num_machines "$SLURM_NNODES"
  --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))"
  --main_process_ip "$MAIN_HOST"
  --main_process_port "$MAIN_PORT"
  -m qwenloop train "$TRAIN_CONFIG" "$@"
)
# `srun` runs the command once per node; SLURM_NODEID (that node's machine rank) is known only there, so a
# fixed script (in single quotes: this shell expands nothing in it) reads it and takes the rest as "$@".
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' qwenloop-node "${launch_args[@]}"
