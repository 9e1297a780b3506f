#!/usr/bin/env bash
# Issue 5, 2026-11-23 (third session), the lent H100, from the repo root: `bash benchmarks/gpu_round4.sh`.
# 1. GPU tests of the Triton casts (every operand fused, or the output gradients only; eager and
#    compiled); 2. fp8lm bench, compiled, recipe delayed, step level only: O0, O1, torchao, O1 triton
#    (every cast fused) and O1 triton-g (only the output gradients' casts fused); 3. where the
#    O1-tgrad step's time goes (profile_step.py), to set against run 4's O1 profile.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_round4}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cast.py 2>&1 \
  | tee "$OUT/tests.log" | grep -E "FAILED|passed|failed"
timeout 260 python3 -m fp8lm bench --compile on --recipe delayed --skip-gemm --levels O0,O1 --time-budget 230 \
  --out "$OUT/bench.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench.txt" | tail -9
timeout 150 python3 benchmarks/profile_step.py O1-tgrad --recipe=delayed 2>&1 | grep -v "^W[0-9]" \
  | tee "$OUT/profile_o1_tgrad.txt" | grep "^=="
