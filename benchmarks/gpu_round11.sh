#!/usr/bin/env bash
# Issue 5, 2026-11-24 (seventh session), the lent H100, from the repo root: `bash benchmarks/gpu_round11.sh [STAGE ...]`.
# Stages: xtests (the cross entropy tests alone), tests (GPU tests of the cross entropy kernels, fused AdamW,
# SwiGLU cast, test_gpu), xent (benchmarks/xent_bench.py), optim (benchmarks/optim_bench.py), bench (fp8lm bench,
# compiled, delayed, step level: O0, O1, torchao and the alternative rows), profile (profile_step O1 O0), gemm
# (GEMM level, interleaved), slack (benchmarks/host_slack.py O0 O1), layouts (benchmarks/bf16_layouts.py),
# o2 (fp8lm bench step level, O0 and O2), gb (benchmarks/compile_check.py O1 with graph-break logs), align (benchmarks/scale_align.py),
# abnew (benchmarks/ab_step.py on this tree alone), ab (ab_step.py on runs/ab_old and on this tree, alternating,
# two processes each), abgemm (benchmarks/ab_gemm.py, runs/ab_old then this tree).
# runs/ab_old (ignored; carry it with the call) holds an older fp8lm for the A/B stages, made with
#   mkdir -p runs/ab_old && git archive COMMIT fp8lm | tar -x -C runs/ab_old
# (this session: COMMIT 2a2c869, plus this session's fp8lm/bench.py copied in for abgemm).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_round11}
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
    slack) timeout 300 python3 benchmarks/host_slack.py O0 O1 2>&1 | grep -v "^W[0-9]" > "$OUT/slack.txt"; \
             sed -n '/== summary/,$p' "$OUT/slack.txt" ;;
    ab) for i in 1 2; do  # the sixth session's code (runs/ab_old, carried) against this tree, alternating processes
          PYTHONPATH=$PWD/runs/ab_old:$PYTHONPATH timeout 200 python3 benchmarks/ab_step.py old 2>&1 | grep -E "^old " | tee -a "$OUT/ab.txt"
          timeout 200 python3 benchmarks/ab_step.py new 2>&1 | grep -E "^new " | tee -a "$OUT/ab.txt"
        done ;;
    align) timeout 60 python3 benchmarks/scale_align.py 2>&1 | tee "$OUT/scale_align.txt" | grep scale_align ;;
    abnew) timeout 200 python3 benchmarks/ab_step.py new 2>&1 | grep -E "^new " | tee -a "$OUT/ab.txt" ;;
    gb) TORCH_LOGS=graph_breaks,recompiles timeout 200 python3 benchmarks/compile_check.py O1 2>&1 | grep -v "^W[0-9]" \
          > "$OUT/compile_check.txt"; grep -v "^ *$" "$OUT/compile_check.txt" | cut -c1-300 | tail -40 ;;
    abgemm) for v in old new; do  # GEMM level, the old tree (with this bench.py) and this one
              pp=$PYTHONPATH; [ $v = old ] && pp=$PWD/runs/ab_old:$PYTHONPATH
              PYTHONPATH=$pp timeout 200 python3 benchmarks/ab_gemm.py $v "$OUT/abgemm_$v.json" 2>&1 \
                | grep -E "^$v " | tee -a "$OUT/abgemm.txt" | grep -E "compiled|bf16  "
            done ;;
    o2) timeout 400 python3 -m fp8lm bench --compile on --recipe delayed --skip-gemm --levels O0,O2 --no-torchao \
          --time-budget 330 --out "$OUT/bench_o2.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench_o2.txt" | tail -5 ;;
    layouts) timeout 120 python3 benchmarks/bf16_layouts.py 2>&1 | tee "$OUT/bf16_layouts.txt" | grep bf16_layouts | cut -c1-150 ;;
    profile) timeout 280 python3 benchmarks/profile_step.py O1 O0 --recipe=delayed --rows=60 --width=200 2>&1 \
               | grep -v "^W[0-9]" > "$OUT/profile.txt"; grep "^==" "$OUT/profile.txt" ;;
  esac
done
