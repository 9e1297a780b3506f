#!/usr/bin/env bash
# Issue 5, 2026-11-24 (sixth session), the lent H100, from the repo root: `bash benchmarks/gpu_round10.sh [STAGE ...]`.
# Stages: xtests (the cross entropy tests alone), tests (GPU tests of the cross entropy kernels, fused AdamW, SwiGLU cast, test_gpu), xent (benchmarks/xent_bench.py),
# optim (benchmarks/optim_bench.py; the 23_/24_ runs had a --state-iters sweep, since reverted), bench (fp8lm bench, compiled,
# delayed, step level: O0, O1, torchao and the alternative rows), profile (profile_step O1), gemm (GEMM level).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_round10}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(tests xent bench)
for stage in "${stages[@]}"; do
  case $stage in
    xtests) timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cross_entropy.py 2>&1 | tee "$OUT/xent_tests.log" \
              | grep -E "FAILED|passed|failed|Error" ;;
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cross_entropy.py tests/test_fused_adam.py \
             tests/test_swiglu_cast.py tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" | grep -E "FAILED|passed|failed|Error" ;;
    xent) timeout 150 python3 benchmarks/xent_bench.py 2>&1 | grep -v "^W[0-9]" | tee "$OUT/xent_bench.txt" | tail -14 ;;
    optim) timeout 100 python3 benchmarks/optim_bench.py 2>&1 | tee "$OUT/optim_bench.txt" | tail -11 ;;
    bench) timeout 470 python3 -m fp8lm bench --compile on --recipe delayed --skip-gemm --levels O0,O1 --time-budget 370 \
             --out "$OUT/bench.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench.txt" | tail -11 ;;
    gemm) timeout 300 python3 -m fp8lm bench --compile on --recipe delayed --skip-step --time-budget 240 \
            --out "$OUT/gemm.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/gemm.txt" | tail -12 ;;
    profile) timeout 280 python3 benchmarks/profile_step.py O1 O0 --recipe=delayed --rows=60 --width=200 2>&1 \
               | grep -v "^W[0-9]" > "$OUT/profile.txt"; grep "^==" "$OUT/profile.txt" ;;
  esac
done
