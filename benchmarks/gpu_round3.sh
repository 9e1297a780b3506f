#!/usr/bin/env bash
# Issue 5, third GPU call of 2026-11-23 (the lent H100), from the repo root: `bash benchmarks/gpu_round3.sh`.
# The Triton kernels' GPU tests after the FP32-transpose workaround and the optimizer tests' tolerance
# fix; fp8lm bench with the fused optimizer step now the default (no --fused-optimizer) and the delayed
# recipe; then where the O1 step's time goes (profile_step.py, delayed).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_round3}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cast.py tests/test_fused_adam.py tests/test_gpu.py 2>&1 \
  | tee "$OUT/tests.log" | grep -E "FAILED|beyond|neighbour|passed|failed"
timeout 200 python3 -m fp8lm bench --compile on --recipe delayed --skip-gemm --time-budget 170 \
  --out "$OUT/bench_delayed_default_optim.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench.txt" | tail -8
timeout 150 python3 benchmarks/profile_step.py O1 --recipe=delayed 2>&1 | grep -v "^W[0-9]" | tee "$OUT/profile_o1.txt" | tail -32
