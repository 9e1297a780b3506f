#!/usr/bin/env bash
# Issue 5, 2026-11-24 (ninth session), the lent H100, from the repo root: `bash benchmarks/gpu_round12.sh [STAGE ...]`.
# Stages: tests (GPU tests of the casts, SwiGLU cast, compile), probe (benchmarks/layer_probe.py at 2048->11264 and
# 8192^3), ab / ba (benchmarks/ab_step.py, levels $AB_LEVELS or O1, on runs/ab_old then this tree / the other order), gb (benchmarks/compile_check.py O1 with graph-break logs), gemm (fp8lm bench GEMM level),
# bench (fp8lm bench step level O0, O1, torchao and the alternative rows), profile (profile_step O1),
# forms (benchmarks/amax_forms.py).
# runs/ab_old (ignored; carry it with the call) holds the previous fp8lm, made with
#   mkdir -p runs/ab_old && git archive e1ab8c3 fp8lm | tar -x -C runs/ab_old   (the eighth session's last commit)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_round12}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(tests probe)
for stage in "${stages[@]}"; do
  case $stage in
    tests) timeout 400 python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_cast.py \
             tests/test_swiglu_cast.py tests/test_gpu.py tests/test_compile.py} 2>&1 | tee "$OUT/tests.log" \
             | grep -E "FAILED|passed|failed|Error" ;;
    probe) timeout 300 python3 benchmarks/layer_probe.py 16384,2048,11264 8192,8192,8192 2>&1 | grep -v "^W[0-9]" \
             > "$OUT/layer_probe.txt"; grep "==" "$OUT/layer_probe.txt"; tail -3 "$OUT/layer_probe.txt" ;;
    ab|ba) for v in $([ $stage = ab ] && echo old new || echo new old); do  # one process each, O1 unless AB_LEVELS says
          pp=$PYTHONPATH; [ $v = old ] && pp=$PWD/runs/ab_old:$PYTHONPATH
          PYTHONPATH=$pp timeout 250 python3 benchmarks/ab_step.py $v ${AB_LEVELS:-O1} 2>&1 | grep -E "^$v " | tee -a "$OUT/ab.txt"
        done ;;
    forms) timeout 300 python3 benchmarks/amax_forms.py 2>&1 | grep -v "^W[0-9]" > "$OUT/amax_forms.txt"; \
             sed -n '/== amax forms/,$p' "$OUT/amax_forms.txt" ;;
    oldcompile) (cd runs/ab_old && PYTHONPATH=$PWD:$PYTHONPATH timeout 200 python3 -m pytest -q -p no:cacheprovider \
                  ../../tests/test_compile.py -k "equals_eager or saved_attention" 2>&1 | tail -3; \
                  python3 -c "import fp8lm; print(fp8lm.__file__)") | tee "$OUT/oldcompile.log" ;;
    # abforms, probechunks: the amax-form experiment; they need benchmarks/results/bench_h100/51_amax_form_switch.patch
    # applied (git apply; reverted after the runs), without it every form runs the committed row maxima
    abforms) for form in rows chunks chunks_wg; do  # the amax form by environment (an experiment), O1 alone
               FP8LM_AMAX_FORM=$form timeout 200 python3 benchmarks/ab_step.py $form O1 2>&1 | grep -E "^$form " \
                 | tee -a "$OUT/ab_forms.txt"
             done ;;
    probechunks) FP8LM_AMAX_FORM=chunks timeout 300 python3 benchmarks/layer_probe.py 16384,2048,11264 2>&1 \
                   | grep -v "^W[0-9]" > "$OUT/layer_probe_chunks.txt"; grep "==" "$OUT/layer_probe_chunks.txt" | grep -v GPU; \
                   tail -1 "$OUT/layer_probe_chunks.txt" ;;
    gb) TORCH_LOGS=graph_breaks,recompiles timeout 200 python3 benchmarks/compile_check.py O1 2>&1 | grep -v "^W[0-9]" \
          > "$OUT/compile_check.txt"; grep -v "^ *$" "$OUT/compile_check.txt" | cut -c1-300 | tail -20 ;;
    gemm) timeout 300 python3 -m fp8lm bench --compile on --recipe delayed --skip-step --time-budget 240 \
            --out "$OUT/gemm.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/gemm.txt" | tail -12 ;;
    bench) timeout 470 python3 -m fp8lm bench --compile on --recipe delayed --skip-gemm --levels O0,O1 --time-budget 370 \
             --out "$OUT/bench.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench.txt" | tail -11 ;;
    profile) timeout 280 python3 benchmarks/profile_step.py O1 --recipe=delayed --rows=40 --width=200 2>&1 \
               | grep -v "^W[0-9]" > "$OUT/profile.txt"; grep -A12 "^== kernels under" "$OUT/profile.txt"; grep "^== GPU" "$OUT/profile.txt" ;;
  esac
done
