#!/usr/bin/env bash
# Issue 5, 2026-11-23 (third session), the lent H100, from the repo root: `bash benchmarks/gpu_round6.sh`.
# 1. GPU tests: the fused AdamW step against its twin (O1 masters scaled from a bound: a small amax
#    pass instead of pass 1); 2. optimizer step times (optim_bench.py) and the O1 bound-vs-amax
#    A/B with host times (optim_diag.py); 3. fp8lm bench, compiled, delayed, step level: O0, O1,
#    torchao, O1 plain, O1 triton. (The run recorded in RESULTS.md also A/B-tested an FP8 norm
#    kernel for clip_grad_norm_, removed afterwards as neutral.)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_round6}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fused_adam.py tests/test_optim.py 2>&1 \
  | tee "$OUT/tests.log" | grep -E "FAILED|beyond|neighbour|passed|failed"
timeout 90 python3 benchmarks/optim_bench.py 2>&1 | grep -v "^W[0-9]" | tee "$OUT/optim_bench.txt" | tail -7
(cd benchmarks && timeout 90 python3 optim_diag.py) 2>&1 | grep -v "^W[0-9]" | tee "$OUT/optim_diag.txt" | tail -2
timeout 220 python3 -m fp8lm bench --compile on --recipe delayed --skip-gemm --levels O0,O1 --time-budget 190 \
  --out "$OUT/bench.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench.txt" | tail -8
