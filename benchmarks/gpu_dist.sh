#!/usr/bin/env bash
# Issue 4 on the lent 2-GPU machine (nvidia-h200-x2), from the repo root: `bash benchmarks/gpu_dist.sh`.
# 1. NCCL parity: tiny O1 ddp x2 vs O1 x1, and O3 fsdp x2 vs O2 x1 (same seed, same global batch);
# 2. llama-0.75b O0+fsdp (BF16 FSDP2) vs O3+fsdp: tokens/s, peak memory per GPU, bytes per step.
# Table printed last (benchmarks/dist_table.py). DEVICE=cpu runs a gloo smoke version.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-runs/gpu_dist}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else '-')"
run() {  # run NAME ARGS...: one training run, its metrics in $OUT/NAME.json, its summary lines prefixed
  local name=$1; shift
  timeout "${RUN_LIMIT:-240}" python3 -m fp8lm train --device "$DEVICE" --no-progress --metrics-out "$OUT/$name.json" "$@" \
    2>&1 | grep -v "^W1123\|^\s*$" | tail -3 | sed "s/^/[$name] /"
}
# lr 1e-3 with 5 warm-up steps, as the CI parity tests (tests/gloo_runs.py): at the preset's 3e-3 a loss spike
# in one run and not its twin (seen on this machine and on CPUs, at O0 too) says nothing about communication.
small="--preset tiny --steps ${SMALL_STEPS:-60} --eval-every 30 --seed 1337 --lr 1e-3 --warmup 5"
run o0_x1 --level O0 $small
run o0_ddp_x2 --level O0 --nproc 2 --dp ddp $small
run o1_x1 --level O1 $small
run o1_ddp_x2 --level O1 --nproc 2 --dp ddp $small
run o2_x1 --level O2 $small
run o3_fsdp_x2 --level O3 --nproc 2 --dp fsdp $small
if [ "$DEVICE" = cuda ] && [ "${BIG:-1}" = 1 ]; then
  big="--preset llama-0.75b --steps ${BIG_STEPS:-8} --batch-size 8 --eval-every 1000 --eval-batches 1"
  run big_o0_fsdp_x2 --level O0 --nproc 2 --dp fsdp $big
  run big_o3_fsdp_x2 --level O3 --nproc 2 --dp fsdp $big
fi
python3 benchmarks/dist_table.py "$OUT"
