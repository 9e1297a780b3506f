#!/usr/bin/env bash
# Issue 5 GPU record (the lent H100), from the repo root: `bash benchmarks/gpu_bench.sh [BUDGET_S] [LIMIT_S]`.
# 1. GPU tests: the Triton casts (eager and inside torch.compile; every cast, or the output gradients'
#    only) and the fused AdamW step against their plain-torch twins, FP8 GEMM numerics;
# 2. `fp8lm bench`, compiled, recipe delayed: GEMM level, then step rows O0, O1, O2 (output-gradient
#    casts fused, the CUDA default), torchao, O1 plain (no fused casts), O1 triton (every cast fused,
#    the operator fp8lm::cast_transpose_amax); table printed last.
# torchao is optional: wheels in .whl/ (carried to the device) are installed to /tmp/site if present.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
echo "== GPU tests (Triton kernels vs their twins, FP8 GEMM numerics)"
timeout 200 python3 -m pytest -q -rA -p no:cacheprovider tests/test_cast.py tests/test_fused_adam.py tests/test_gpu.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | grep -E "FAILED|ERROR|passed|failed"
echo "== fp8lm bench --compile on --recipe delayed"
timeout "${2:-330}" python3 -m fp8lm bench --compile on --recipe delayed --time-budget "${1:-260}" \
  --out "$OUT/bench.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench.txt" | tail -25
