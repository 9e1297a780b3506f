#!/usr/bin/env bash
# Issue 5, 2026-11-24 (tenth session), the lent H100, from the repo root: `bash benchmarks/gpu_round13.sh [STAGE ...]`.
# Stages: sweep (benchmarks/cast_sweep.py: the cast kernel's tiles, orders, loops), tests (GPU tests: $TESTS or the
# cast, SwiGLU-cast and compile files), probe (benchmarks/layer_probe.py at 2048->11264 and 8192^3), gemm (fp8lm bench
# GEMM level), bench (fp8lm bench step level O0, O1, torchao and the alternative rows), profile (profile_step O1),
# modes (benchmarks/compile_modes.py $MODES: Inductor options per block).
# Carry .whl (torchao) for the torchao columns.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_round13}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(sweep)
for stage in "${stages[@]}"; do
  case $stage in
    sweep) timeout ${SWEEP_TIMEOUT:-560} python3 benchmarks/cast_sweep.py --budget ${SWEEP_BUDGET:-420} 2>&1 \
             | grep -v "^W[0-9]" > "$OUT/cast_sweep.txt"; sed -n '/== best per shape/,$p' "$OUT/cast_sweep.txt" ;;
    tests) timeout 400 python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_cast.py \
             tests/test_swiglu_cast.py tests/test_compile.py} 2>&1 | tee "$OUT/tests.log" \
             | grep -E "FAILED|passed|failed|Error" ;;
    probe) timeout 300 python3 benchmarks/layer_probe.py 16384,2048,11264 8192,8192,8192 2>&1 | grep -v "^W[0-9]" \
             > "$OUT/layer_probe.txt"; grep "==" "$OUT/layer_probe.txt"; tail -3 "$OUT/layer_probe.txt" ;;
    gemm) timeout 300 python3 -m fp8lm bench --compile on --recipe delayed --skip-step --time-budget 240 \
            --out "$OUT/gemm.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/gemm.txt" | tail -12 ;;
    bench) timeout 470 python3 -m fp8lm bench --compile on --recipe delayed --skip-gemm --levels O0,O1 --time-budget 370 \
             --out "$OUT/bench.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench.txt" | tail -11 ;;
    modes) timeout ${MODES_TIMEOUT:-560} python3 benchmarks/compile_modes.py ${MODES:-default coord multikernel} 2>&1 \
             | grep -v "^W[0-9]" > "$OUT/compile_modes.txt"; grep -E "ms/step|Error|^setting|x  " "$OUT/compile_modes.txt" ;;
    profile) timeout 280 python3 benchmarks/profile_step.py O1 --recipe=delayed --rows=45 --width=200 2>&1 \
               | grep -v "^W[0-9]" > "$OUT/profile.txt"; grep "^== GPU" "$OUT/profile.txt" ;;
  esac
done
