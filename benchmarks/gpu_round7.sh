#!/usr/bin/env bash
# Issue 5, 2026-11-23 (third session), the lent H100, from the repo root: `bash benchmarks/gpu_round7.sh`.
# 1. GPU tests of the FP8 norm kernel and fp8lm.optim.clip_grad_norm_; 2. the clip A/B inside O1
# steps (clip_ab.py); 3. fp8lm bench, compiled, delayed, step level: O0, O1, torchao (the extra
# O1 rows are left out by the time budget).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_round7}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_norm.py tests/test_clip.py 2>&1 \
  | tee "$OUT/tests.log" | grep -E "FAILED|passed|failed"
(cd benchmarks && timeout 110 python3 clip_ab.py) 2>&1 | grep -v "^W[0-9]" | tee "$OUT/clip_ab.txt" | tail -3
timeout 170 python3 -m fp8lm bench --compile on --recipe delayed --skip-gemm --levels O0,O1 --time-budget 100 \
  --out "$OUT/bench.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench.txt" | tail -8
