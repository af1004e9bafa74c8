#!/usr/bin/env bash
# DDP with torchrun and no Accelerate config: torchrun starts the processes; Accelerate inside the trainer reads
# torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Precision is the trainer's
# --mixed_precision (auto: bf16 or fp16 on GPU, bf16 on bf16 CPUs, else fp32). Without GPUs the ranks form a gloo
# group on CPU, each on the physical cores divided by NPROC (torchrun's OMP_NUM_THREADS=1 is not taken as a request).
#   NPROC=4 launch/torchrun.sh --global_batch_size 128 [train options]          # one machine, 4 processes
#   NNODES=2 NODE_RANK=$RANK MASTER_ADDR=host0 NPROC=8 launch/torchrun.sh ...   # on each of 2 machines
# NPROC defaults to the GPU count (1 without GPUs); MASTER_PORT to 29500.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
nproc=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$nproc" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  "$repo/peft_agnews/train.py" "$@"
