"""Graph breaks and recompiles of ``fp8lm bench``'s compiled step (a GPU debugging aid).

    TORCH_LOGS=graph_breaks,recompiles python benchmarks/compile_check.py [LEVEL] [PRESET]

Builds the level's model as the bench does (default O1, llama-0.75b on CUDA, recipe delayed), compiles
each block, runs 3 steps and prints Dynamo's graph-break counters and graph statistics.
"""
import sys

import torch
from torch._dynamo.utils import counters

from fp8lm.bench import BenchConfig, _step_fn, resolve, step_setup


def main() -> int:
    level = sys.argv[1] if len(sys.argv) > 1 else "O1"
    preset = sys.argv[2] if len(sys.argv) > 2 else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = resolve(BenchConfig(device=device, recipe="delayed", compile="on", levels=(level,), preset=preset))
    model, opt, x, y = step_setup(cfg, level, compiled=True)
    step = _step_fn(model, opt, x, y, None)
    for _ in range(3):
        step()
    print("compile_check graph breaks:", dict(counters["graph_break"]))
    print("compile_check stats:", dict(counters["stats"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
