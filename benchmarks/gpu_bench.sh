#!/usr/bin/env bash
# Issue 5 GPU record (the lent H100), from the repo root: `bash benchmarks/gpu_bench.sh [BUDGET_S] [LIMIT_S]`.
# 1. GPU tests: Triton casts and fused AdamW step against their plain-torch twins, FP8 GEMM numerics
#    (fast accumulation included); 2. the optimizer-step micro-benchmark; 3. `fp8lm bench`, compiled,
#    with the fused optimizer step; 4. O1 again with fast accumulation (table printed last each time).
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
timeout 180 python3 -m pytest -q -rA -p no:cacheprovider tests/test_cast.py tests/test_fused_adam.py tests/test_gpu.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | grep -E "fast_accum relative error|FAILED|ERROR|passed|failed"
echo "== optimizer step (benchmarks/optim_bench.py)"
timeout 120 python3 benchmarks/optim_bench.py 2>&1 | tee "$OUT/optim.txt" | tail -12
echo "== fp8lm bench --compile on --fused-optimizer"
timeout "${2:-300}" python3 -m fp8lm bench --compile on --fused-optimizer --time-budget "${1:-200}" \
  --out "$OUT/bench.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench.txt" | tail -25
echo "== O1 with fast accumulation"
timeout 150 python3 -m fp8lm bench --compile on --fused-optimizer --fast-accum --skip-gemm --levels O0,O1 --no-torchao \
  --out "$OUT/bench_fast_accum.json" 2>&1 | grep -v "^W[0-9]" | tail -8
