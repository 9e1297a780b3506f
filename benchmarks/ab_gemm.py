"""GEMM-level rows of ``fp8lm bench`` for A/B runs of two code versions in alternating processes.

    python benchmarks/ab_gemm.py LABEL OUT.json

Two shapes (16384 x 2048->2048, host-bound, and 16384 x 2048->11264) plus 8192^3, compiled and eager,
recipe delayed, no torchao, interleaved rounds; prints each variant's ms and ratio to bf16. Which
``fp8lm`` runs is whatever is first on ``PYTHONPATH`` (runs/ab_old holds the older tree with this
session's bench.py, so the method is the same for both).
"""
import sys

import fp8lm
from fp8lm.bench import BenchConfig, run_bench


def main() -> int:
    label, out = sys.argv[1], sys.argv[2]
    shapes = ((16384, 2048, 2048), (16384, 2048, 11264), (8192, 8192, 8192))
    result = run_bench(BenchConfig(device="cuda", recipe="delayed", compile="on", step=False, torchao=False,
                                   gemm_shapes=shapes, out=out, progress=False))
    for row in result["gemm"]:
        for name, v in row["variants"].items():
            if "ms" in v:
                print(f"{label:<4} {row['label']:<20} {name:<20} {v['ms']:7.3f} ms  {v.get('ratio', 0):.3f}x "
                      f"({fp8lm.__file__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
