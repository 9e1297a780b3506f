"""Where a step's GPU time goes (a GPU debugging aid): torch.profiler over compiled llama-0.75b steps.

Usage: python benchmarks/profile_step.py [LEVEL ...] [--recipe=NAME] [--rows=N] [--width=N]
(default O1, recipe current, 25 kernel rows, kernel names cut at 90 characters).
A LEVEL ending in "-triton" (O1-triton) runs with every cast of Float8Linear fused (Triton),
"-plain" (O1-plain, the default) with none, "-tgrad" with only the output gradients' casts fused.
Prints, per level, the median
time of each phase (forward+backward, clip_grad_norm_, optimizer.step, zero_grad; CUDA events) and
the top CUDA kernels of two profiled steps.
"""
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from fp8lm.bench import BenchConfig, _build
from fp8lm.nn.linear import set_fused_cast
from fp8lm.optim import clip_grad_norm_


def phases(model, optimizer, x, y, steps: int = 5) -> dict:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = ("fwd+bwd", "clip", "optim", "zero_grad")
    times = {n: [] for n in names}
    for _ in range(steps):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
        ev[0].record()
        _, loss = model(x, y)
        loss.backward()
        ev[1].record()
        clip_grad_norm_(params, 1.0)
        ev[2].record()
        optimizer.step()
        ev[3].record()
        optimizer.zero_grad(set_to_none=True)
        ev[4].record()
        torch.cuda.synchronize()
        for i, n in enumerate(names):
            times[n].append(ev[i].elapsed_time(ev[i + 1]))
    return {n: statistics.median(t) for n, t in times.items()}


def small_kernels(prof, steps: int, under_us: float = 5.0, top: int = 20) -> str:
    """The CUDA kernels under ``under_us`` each (scale math, amax histories): one summary line (calls and
    time per step), then the ``top`` most frequent names with their calls per step."""
    calls = total = 0.0
    names = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time < under_us:
            calls, total = calls + 1, total + e.device_time
            names[e.name] = names.get(e.name, 0) + 1
    lines = [f"== kernels under {under_us:g} us: {calls / steps:.0f} per step, "
             f"{total / steps / 1e3:.2f} ms of GPU time per step"]
    for name, n in sorted(names.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"   {n / steps:6.0f}  {name[:150]}")
    return "\n".join(lines)


def idle_gaps(prof, steps: int, top: int = 15, min_us: float = 3.0) -> str:
    """Where the GPU waits: kernel intervals merged into busy time over the profiled span, the idle total in
    gaps of at least ``min_us`` per step, and the ``top`` longest gaps with the kernels on either side."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    if not kernels:
        return "== no CUDA kernels recorded"
    gaps, busy, end, last = [], 0.0, kernels[0][0], kernels[0][2]
    for start, stop, name in kernels:
        if start > end:
            gaps.append((start - end, last, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, last = stop, name
    span = end - kernels[0][0]
    idle = sum(g for g, _, _ in gaps if g >= min_us)
    lines = [f"== GPU busy {busy / steps / 1e3:.1f} ms of {span / steps / 1e3:.1f} ms per step; "
             f"idle in gaps of {min_us:g} us or more: {idle / steps / 1e3:.2f} ms per step "
             f"({sum(1 for g, _, _ in gaps if g >= min_us) / steps:.0f} gaps)"]
    for g, before, after in sorted(gaps, reverse=True)[:top]:
        lines.append(f"   {g:8.1f} us  after {before[:70]}  before {after[:70]}")
    return "\n".join(lines)


def main() -> None:
    recipe = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--recipe=")), "current")
    rows = int(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--rows=")), "25"))
    width = int(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--width=")), "90"))
    levels = [a for a in sys.argv[1:] if not a.startswith("--")] or ["O1"]
    for level in levels:
        torch._dynamo.reset()
        base, _, fused = level.partition("-")
        set_fused_cast({"": False, "tgrad": "grad", "plain": False, "triton": True}[fused])
        cfg = BenchConfig(device="cuda", preset="llama-0.75b", batch_size=8, seq_len=2048, recipe=recipe)
        model, optimizer = _build(cfg, base)
        for block in model.layers:
            block.compile()
        vocab = model.config.vocab_size
        x = torch.randint(0, vocab, (8, 2048), device="cuda")  # (B, T)
        y = torch.randint(0, vocab, (8, 2048), device="cuda")  # (B, T)
        ph = phases(model, optimizer, x, y, steps=3)  # warm-up (compiles)
        ph = phases(model, optimizer, x, y)
        print(f"== {level}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ph.items()), flush=True)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                _, loss = model(x, y)
                loss.backward()
                clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=width), flush=True)
        print(small_kernels(prof, steps=2), flush=True)
        print(idle_gaps(prof, steps=2), flush=True)
        del model, optimizer


if __name__ == "__main__":
    main()
