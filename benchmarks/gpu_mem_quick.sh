set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__)"
for L in O0 O2 O2:off O1; do
  python3 -m fp8lm train --preset llama-0.75b --level ${L%%:*} --steps 4 --device cuda --eval-every 4 \
    --eval-batches 1 --no-progress --metrics-out "$OUT/mem_$L.json" \
    $([ "$L" = O2:off ] && echo --fp8-activations off) 2>&1 | grep -v Warning | tail -1
done
python3 - "$OUT" <<'PY'
import json, sys, os
rows = {L: json.load(open(f"{sys.argv[1]}/mem_{L}.json")) for L in ("O0", "O1", "O2", "O2:off") if os.path.exists(f"{sys.argv[1]}/mem_{L}.json")}
o0 = rows["O0"]["peak_mem_bytes"]
print("level   peak GiB  vs O0   tokens/s")
for L, m in rows.items():
    print(f"{L:6}  {m['peak_mem_bytes'] / 2**30:8.2f}  {m['peak_mem_bytes'] / o0:5.1%}  {m['tokens_per_s']:,.0f}")
PY
