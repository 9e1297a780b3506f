"""Table of the distributed runs written by benchmarks/gpu_dist.sh: parity pairs and the fsdp comparison.

Usage: python benchmarks/dist_table.py DIR   (reads DIR/<name>.json, the `fp8lm train --metrics-out` files)
"""
import json
import sys
from pathlib import Path

PAIRS = [("o0_ddp_x2", "o0_x1"), ("o1_ddp_x2", "o1_x1"), ("o3_fsdp_x2", "o2_x1")]  # O0: the noise floor
BIG = ["big_o0_fsdp_x2", "big_o3_fsdp_x2"]


def load(folder: Path, name: str):
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def parity_rows(folder: Path) -> list[str]:
    rows = ["Parity (global-mean train loss; same seed and global batch)",
            f"{'run':<12} {'reference':<10} {'final':>8} {'ref final':>9} {'diff':>7} {'max |diff| over history':>24}"]
    for run, ref in PAIRS:
        a, b = load(folder, run), load(folder, ref)
        if a is None or b is None:
            rows.append(f"{run:<12} {ref:<10} missing")
            continue
        la, lb = a["loss_history"], b["loss_history"]
        worst = max(abs(x - y) / abs(y) for x, y in zip(la, lb))
        diff = (a["final_train_loss"] - b["final_train_loss"]) / b["final_train_loss"]
        rows.append(f"{run:<12} {ref:<10} {a['final_train_loss']:8.4f} {b['final_train_loss']:9.4f} {diff:+7.2%} {worst:24.2%}")
    return rows


def traffic(m: dict) -> str:
    """Counted bytes of the run, and one full-model all-gather per rank derived from the dtypes that travel."""
    d = m.get("distributed") or {}
    if d.get("dp") == "ddp":
        return f"grads {d['grad_bytes_per_step']:,} B/step ({d['all_grad_bytes_vs_bf16']:.1%} of BF16)"
    if d.get("dp") != "fsdp":
        return "-"
    world = d["world_size"]
    share = (world - 1) / world  # a rank receives (N-1)/N of a gathered tensor
    fp8_n, other_n = d["fp8_param_numel"], d["other_param_numel"]
    bf16_gather = 2 * (fp8_n + other_n) * share
    if not d.get("gathers"):
        return f"model all-gather {bf16_gather / 2**20:,.0f} MiB/rank (BF16)"
    o3_gather = (1 * fp8_n + 4 * other_n) * share  # FP8 linear weights, float32 the rest
    per_elem = d["fp8_bytes"] / max(1, d["fp8_numel"]) / share
    return (f"model all-gather {o3_gather / 2**20:,.0f} MiB/rank = {o3_gather / bf16_gather:.1%} of BF16 "
            f"(FP8 weights {per_elem:.2f} B/elem counted over {d['gathers']} gathers = 50% of BF16; "
            f"{other_n / 1e6:.0f}M other params float32); grad reduce-scatter {d.get('rs_bytes', 0):,} B counted")


def big_rows(folder: Path) -> list[str]:
    rows = ["llama-0.75b, 2 GPUs, fsdp (rank 0's peak memory)",
            f"{'run':<16} {'tokens/s':>10} {'peak GiB':>9} {'final loss':>10}  traffic"]
    for name in BIG:
        m = load(folder, name)
        if m is None:
            rows.append(f"{name:<16} missing")
            continue
        mem = m["peak_mem_bytes"] / 2**30 if m.get("peak_mem_bytes") else float("nan")
        rows.append(f"{name:<16} {m['tokens_per_s']:10,.0f} {mem:9.2f} {m['final_train_loss']:10.4f}  {traffic(m)}")
    return rows


def main() -> None:
    folder = Path(sys.argv[1])
    print("\n".join(parity_rows(folder) + [""] + big_rows(folder)))


if __name__ == "__main__":
    main()
