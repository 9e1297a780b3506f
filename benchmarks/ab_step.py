"""Step times of some levels in one process, for A/B runs of two code versions in alternating processes.

    python benchmarks/ab_step.py LABEL [LEVEL ...]        (default levels: O0 O1; also bench's rows, e.g. "O1 weight")

Each level: ``fp8lm bench``'s step (``bench_step_one``: llama-0.75b, 8 x 2048 tokens, per-block compile, recipe
delayed), 20 timed steps after 3 warm-up; prints one line per level and the O1/O0 ratio. Which code runs
is whatever ``fp8lm`` imports first on ``PYTHONPATH`` (put an older tree first to time it).
"""
import sys

import torch

import fp8lm
from fp8lm.bench import BenchConfig, bench_step_one, resolve


def main() -> int:
    label, levels = sys.argv[1], sys.argv[2:] or ["O0", "O1"]
    base = tuple(dict.fromkeys(level.split()[0] for level in levels))  # "O1 weight" -> "O1" (bench's row suffixes)
    cfg = resolve(BenchConfig(device="cuda", recipe="delayed", compile="on", steps=20, levels=base))
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    rows = {level: bench_step_one(cfg, level, True) for level in levels}
    for level, r in rows.items():
        print(f"{label:<6} {level:<9} {r['ms_per_step']:8.2f} ms/step  fwd+bwd {r['fwd_bwd_ms']:7.2f}  "
              f"optim {r['optimizer_ms']:6.2f}  peak {r['peak_mem_gib']:6.2f} GiB  ({fp8lm.__file__})")
    if "O0" in rows and "O1" in rows:
        print(f"{label:<6} O1/O0 {rows['O0']['ms_per_step'] / rows['O1']['ms_per_step']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
