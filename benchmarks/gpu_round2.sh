#!/usr/bin/env bash
# Issue 5, second GPU call of 2026-11-23 (the lent H100), from the repo root: `bash benchmarks/gpu_round2.sh`.
# Cast-kernel transpose modes, the Triton kernels' GPU tests, then fp8lm bench with the delayed recipe
# (scales from the history alone after the first step) and O1 with the current recipe for comparison.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_round2}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout 60 python3 benchmarks/cast_debug.py 2>&1 | tee "$OUT/cast_debug.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cast.py tests/test_fused_adam.py 2>&1 \
  | tee "$OUT/tests.log" | grep -E "FAILED|beyond|neighbour|passed|failed"
timeout 280 python3 -m fp8lm bench --compile on --fused-optimizer --recipe delayed --time-budget 220 \
  --out "$OUT/bench_delayed.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench_delayed.txt" | tail -22
timeout 100 python3 -m fp8lm bench --compile on --fused-optimizer --recipe current --skip-gemm --levels O1 --no-torchao \
  --out "$OUT/bench_current.json" 2>&1 | grep -v "^W[0-9]" | tail -5
