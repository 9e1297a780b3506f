#!/usr/bin/env bash
# Issue 5 GPU record (the lent H100), from the repo root: `bash benchmarks/gpu_bench.sh [BUDGET_S]`.
# GPU tests of the Triton casts, the cast micro-benchmark, then `fp8lm bench` (table printed last).
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
echo "== GPU tests (Triton casts vs their twin)"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_cast.py 2>&1 | tail -4
echo "== cast bench"
timeout 60 python3 benchmarks/cast_bench.py 2>/dev/null | tee "$OUT/cast.txt"
echo "== fp8lm bench"
timeout "${2:-250}" python3 -m fp8lm bench --compile both --time-budget "${1:-150}" --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
# a run stopped by its time limit still wrote its JSON after every configuration: print what it has
[ -f "$OUT/bench.txt" ] && grep -q "^Step level" "$OUT/bench.txt" || python3 -c "
import json, sys; from fp8lm.bench import format_tables
print(format_tables(json.load(open(sys.argv[1]))))" "$OUT/bench.json"
