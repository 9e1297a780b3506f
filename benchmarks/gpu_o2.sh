#!/usr/bin/env bash
# Issue 3 GPU record (the lent H100): `bash benchmarks/gpu_o2.sh memory` then
# `bash benchmarks/gpu_o2.sh quality STEPS`. Outputs under $OUT (or runs/gpu_o2).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-runs/gpu_o2}
mkdir -p "$OUT"
case "$1" in
memory)
  nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"
  echo "== GPU tests"
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -2
  echo "== llama-0.75b peak memory, same batch, O0 / O1 / O2 / O2 without FP8 saved activations"
  for L in O0 O1 O2 O2:off; do
    python3 -m fp8lm train --preset llama-0.75b --level ${L%%:*} --steps 8 --device cuda --eval-every 8 \
      --eval-batches 1 --no-progress --metrics-out "$OUT/mem_$L.json" \
      $([ "$L" = O2:off ] && echo --fp8-activations off) 2>&1 | grep -v Warning | tail -3
  done
  echo "== gpt-125m speed probe, 40 steps per level"
  for L in O0 O1 O2; do
    python3 -m fp8lm train --preset gpt-125m --level $L --steps 40 --device cuda --eval-every 40 \
      --eval-batches 1 --no-progress --corpus python-all 2>&1 | tail -1
  done
  python3 - "$OUT" <<'PY'
import json, sys
rows = {L: json.load(open(f"{sys.argv[1]}/mem_{L}.json")) for L in ("O0", "O1", "O2", "O2:off")}
o0 = rows["O0"]["peak_mem_bytes"]
print("level  peak GiB  vs O0   tokens/s")
for L, m in rows.items():
    print(f"{L:5}  {m['peak_mem_bytes'] / 2**30:8.2f}  {m['peak_mem_bytes'] / o0:5.1%}  {m['tokens_per_s']:,.0f}")
PY
  ;;
quality)
  python3 -m fp8lm compare --preset gpt-125m --levels O0,O1,O2 --steps "${2:-600}" --device cuda \
    --corpus python-all --out "$OUT/cmp_125m" --no-progress 2>&1 | tail -6
  cp "$OUT"/cmp_125m/* "$OUT"/ 2>/dev/null
  ;;
*) echo "usage: $0 memory | quality STEPS"; exit 2 ;;
esac
