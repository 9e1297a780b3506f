#!/usr/bin/env bash
# Issue 5, 2026-11-23 (fifth session), the lent H100, from the repo root: `bash benchmarks/gpu_round9.sh [STAGE ...]`.
# Stages: tests (GPU tests of the SwiGLU backward cast, cast, fused AdamW and linear), sweep (benchmarks/kernel_sweep.py),
# bench (fp8lm bench, compiled, delayed, step level: O0, O1, torchao, O1 grad, O1 triton), profile (profile_step O1),
# gemm (fp8lm bench, compiled, delayed, GEMM level), probe (benchmarks/gemm_probe.py host: GPU and host time per call).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_round9}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(tests sweep bench)
for stage in "${stages[@]}"; do
  case $stage in
    tests) timeout 260 python3 -m pytest -q -p no:cacheprovider tests/test_swiglu_cast.py tests/test_cast.py tests/test_fused_adam.py \
             tests/test_linear.py tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" | grep -E "FAILED|passed|failed|Error" ;;
    sweep) (cd benchmarks && timeout 150 python3 kernel_sweep.py) 2>&1 | grep -v "^W[0-9]" | tee "$OUT/kernel_sweep.txt" | tail -48 ;;
    bench) timeout 330 python3 -m fp8lm bench --compile on --recipe delayed --skip-gemm --levels O0,O1 --time-budget 260 \
             --out "$OUT/bench.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench.txt" | tail -8 ;;
    gemm) timeout 300 python3 -m fp8lm bench --compile on --recipe delayed --skip-step --time-budget 240 \
            --out "$OUT/gemm.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/gemm.txt" | tail -12 ;;
    probe) timeout 200 python3 benchmarks/gemm_probe.py host 2>&1 | grep -v "^W[0-9]" | tee "$OUT/probe.txt" | tail -6 ;;
    profile) timeout 120 python3 benchmarks/profile_step.py O1 --recipe=delayed --rows=45 --width=200 2>&1 \
               | grep -v "^W[0-9]" > "$OUT/profile.txt"; grep "^==" "$OUT/profile.txt" ;;
  esac
done
