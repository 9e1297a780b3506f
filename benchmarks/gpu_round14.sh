#!/usr/bin/env bash
# Issue 5, 2026-11-24 (eleventh session), the lent H100, from the repo root: `bash benchmarks/gpu_round14.sh [STAGE ...]`.
# Stages: tests (GPU tests: $TESTS or the SwiGLU-cast, compile and activation files), bench (fp8lm bench step level
# O0, O1, O2, torchao and the alternative rows, with the compiled-gradient check), profile (profile_step $LEVEL,
# default O2), optimab (optim_bench.py's fused rows, runs/ab_old's fp8lm against this tree's, alternating
# processes), compare (fp8lm compare of $PRESET, default gpt-125m, on python-all: $LEVELS default O0,O2, $STEPS
# default 560, more flags in $COMPARE_ARGS), gemm (fp8lm bench GEMM level). Carry .whl (torchao) for torchao.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_round14}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(tests)
for stage in "${stages[@]}"; do
  case $stage in
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_swiglu_cast.py \
             tests/test_compile.py tests/test_activations.py} 2>&1 | tee "$OUT/tests.log" \
             | grep -E "FAILED|passed|failed|Error" ;;
    bench) timeout ${BENCH_TIMEOUT:-560} python3 -m fp8lm bench --compile on --recipe delayed --skip-gemm \
             --levels ${LEVELS:-O0,O1,O2} --time-budget ${BENCH_BUDGET:-430} --out "$OUT/bench.json" 2>&1 \
             | grep -v "^W[0-9]" | tee "$OUT/bench.txt" | tail -16 ;;
    profile) timeout 280 python3 benchmarks/profile_step.py ${LEVEL:-O2} --recipe=delayed --rows=45 --width=200 2>&1 \
               | grep -v "^W[0-9]" > "$OUT/profile.txt"; grep "^== " "$OUT/profile.txt" ;;
    compare) timeout 570 python3 -m fp8lm compare --preset ${PRESET:-gpt-125m} --levels ${LEVELS:-O0,O2} --device cuda \
               --corpus python-all --steps ${STEPS:-560} ${COMPARE_ARGS:-} --out "$OUT/cmp" --no-progress 2>&1 \
               | grep -v "^W[0-9]" \
               | tee "$OUT/compare.txt" | tail -12 ;;
    optimab) for i in 1 2 3; do for tree in old new; do  # runs/ab_old: another tree's fp8lm (carried)
               if [ $tree = old ]; then path=$PWD/runs/ab_old; else path=$PWD; fi
               echo "$tree $i: $(PYTHONPATH=$path${PYTHONPATH:+:$PYTHONPATH} timeout 120 python3 benchmarks/optim_bench.py \
                 --rows "O1 fused,O2 fused" 2>&1 | grep -E "^(torch|O1|O2) fused " | tail -3 | tr -s ' ' | paste -sd,)"
             done; done | tee "$OUT/optim_ab.txt" ;;
    gemm) timeout 300 python3 -m fp8lm bench --compile on --recipe delayed --skip-step --time-budget 240 \
            --out "$OUT/gemm.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/gemm.txt" | tail -12 ;;
  esac
done
