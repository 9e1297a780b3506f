"""Host time of a training step against its GPU time, and where the host spends it (a GPU debugging aid).

    python benchmarks/host_time.py [LEVEL ...]        (default: O0 O1)

For each level, the step of ``fp8lm bench`` (``bench_step_one``'s model, optimizer, data; compiled per
block, recipe delayed): after warm-up, the median over 10 steps of (a) the host's time to enqueue one
step (wall clock from a synchronized start to the return of ``step()``, no synchronization inside) and
(b) the step's GPU time (CUDA events), then a cProfile of 3 steps: the 25 functions with the most own
time. A host time near the GPU time means the GPU waits for the host somewhere in the step.
"""
import cProfile
import pstats
import statistics
import sys
import time

import torch

from fp8lm.bench import BenchConfig, _step_fn, resolve, step_setup


def main() -> int:
    levels = sys.argv[1:] or ["O0", "O1"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = resolve(BenchConfig(device=device, recipe="delayed", compile="on", levels=("O0", "O1")))
    summary = []
    for level in levels:
        model, optimizer, x, y = step_setup(cfg, level, compiled=True)
        step = _step_fn(model, optimizer, x, y, None)
        for _ in range(3):
            step()
        host, gpu = [], []
        for _ in range(10):
            if device == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e3)
            if device == "cuda":
                end.record()
                torch.cuda.synchronize()
                gpu.append(start.elapsed_time(end))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(3):
            step()
        profiler.disable()
        if device == "cuda":
            torch.cuda.synchronize()
        h, g = statistics.median(host), (statistics.median(gpu) if gpu else float("nan"))
        summary.append((level, h, g))
        print(f"== {level}: host {h:.1f} ms per step to enqueue, GPU {g:.1f} ms per step", flush=True)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        del model, optimizer, step
    print(f"{'level':<8}{'host ms':>9}{'GPU ms':>9}")
    for level, h, g in summary:
        print(f"{level:<8}{h:9.1f}{g:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
