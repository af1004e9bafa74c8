#!/usr/bin/env bash
# Train on this machine under any Accelerate config file (CPU, one GPU, all GPUs, FSDP, DeepSpeed):
#   launch/train_local.sh accelerate_configs/single_gpu.yaml --output_dir outputs/run1 [train options]
#   launch/train_local.sh accelerate_configs/cpu_ddp.yaml --global_batch_size 32 ...   # 2 processes on CPU
# Relative paths in the train options are taken from the current folder, not from the repository.
# Exit status: 0 done; under a one-process config `accelerate launch` turns every failure (2, 3, 75) into 1
# (--quiet drops its CalledProcessError traceback); run `python -m peft_agnews.train` to keep the trainer's own.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ $# -lt 1 || ! -f "$1" ]]; then
  echo "error: the first argument must be an Accelerate config file, e.g. $repo/accelerate_configs/cpu.yaml" >&2
  echo "usage: $0 CONFIG.yaml [train options]" >&2
  exit 2
fi
config=$1
shift
exec accelerate launch --quiet --config_file "$config" "$repo/peft_agnews/train.py" "$@"
