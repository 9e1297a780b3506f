"""Which phase of a training step waits for the host (a GPU debugging aid).

    python benchmarks/host_slack.py [LEVEL ...]        (default: O0 O1)

For each level, the step of ``fp8lm bench`` (``step_setup``: the model and optimizer compiled per block,
recipe delayed), split into three phases: forward, backward, clip + optimizer + zero_grad. Printed:

* ``host``: the host's time to enqueue each phase (wall clock, no synchronization inside the step);
* ``gpu``: each phase's GPU time with the host out of the way: a ``torch.cuda._sleep`` kernel long
  enough to cover the whole enqueue goes first, so every kernel of the phase is queued before the
  GPU reaches it and the events around the phase see only GPU work;
* ``stream``: each phase's time between events in steps run back to back (what ``fp8lm bench``
  measures): above ``gpu`` where the GPU waited for the host;
* slack tests: the step time (back to back) with an extra host sleep of 4 ms at the start of one
  phase, in blocks of 5 steps alternating with blocks without it (6 of each; medians), so that a
  drift of the GPU's clocks lands on both. If the step grows by the sleep, the host is on the
  critical path there and every ms of host time removed from that phase is a ms of step time.
"""
import statistics
import sys
import time

import torch

from fp8lm.bench import BenchConfig, resolve, step_setup
from fp8lm.optim import clip_grad_norm_

PHASES = ("forward", "backward", "optim")
SLEEP_MS = 4  # the host sleep of the slack tests
SLEEP_CYCLES = 400_000_000  # about 0.2 s at the H100's ~2 GHz: longer than any phase's enqueue


def _phases(model, optimizer, x, y, params, sleep_at=None, sleep_s=0.0):
    """The step as three closures (forward returns the loss the backward needs)."""
    box = {}

    def maybe_sleep(name):
        if sleep_at == name:
            time.sleep(sleep_s)

    def forward():
        maybe_sleep("forward")
        box["loss"] = model(x, y)[1]

    def backward():
        maybe_sleep("backward")
        box.pop("loss").backward()

    def optim():
        maybe_sleep("optim")
        clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"forward": forward, "backward": backward, "optim": optim}


def _stream(phases, steps=10):
    """Per phase and per step: ms between events, steps back to back (no synchronization)."""
    marks = []
    for _ in range(steps):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record()
        for i, name in enumerate(PHASES):
            phases[name]()
            ev[i + 1].record()
        marks.append(ev)
    torch.cuda.synchronize()
    out = {name: statistics.median(m[i].elapsed_time(m[i + 1]) for m in marks) for i, name in enumerate(PHASES)}
    out["step"] = statistics.median(m[0].elapsed_time(m[3]) for m in marks)
    return out


def _isolated(phases, steps=5):
    """Per phase: host enqueue ms and pure GPU ms (the phase queued behind a sleep kernel)."""
    host = {n: [] for n in PHASES}
    gpu = {n: [] for n in PHASES}
    for _ in range(steps):
        for name in PHASES:
            torch.cuda.synchronize()
            torch.cuda._sleep(SLEEP_CYCLES)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            phases[name]()
            host[name].append((time.perf_counter() - t0) * 1e3)
            end.record()
            torch.cuda.synchronize()
            gpu[name].append(start.elapsed_time(end))
    return ({n: statistics.median(v) for n, v in host.items()}, {n: statistics.median(v) for n, v in gpu.items()})


def main() -> int:
    levels = sys.argv[1:] or ["O0", "O1"]
    cfg = resolve(BenchConfig(device="cuda", recipe="delayed", compile="on", levels=("O0", "O1")))
    lines = []
    for level in levels:
        model, optimizer, x, y = step_setup(cfg, level, compiled=True)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        phases = _phases(model, optimizer, x, y, params)
        _stream(phases, steps=3)  # warm-up: compiles, optimizer state
        host, gpu = _isolated(phases)
        stream = _stream(phases)
        lines.append(f"{level}: phase     host ms   gpu ms   stream ms")
        for name in PHASES:
            lines.append(f"{level}: {name:<9}{host[name]:>8.1f}{gpu[name]:>9.1f}{stream[name]:>12.1f}")
        lines.append(f"{level}: step     {sum(host.values()):>8.1f}{sum(gpu.values()):>9.1f}{stream['step']:>12.1f}")
        for where in PHASES:  # interleaved blocks of 5 steps without and with the sleep, 6 of each
            sleepy = _phases(model, optimizer, x, y, params, where, SLEEP_MS / 1e3)
            base, slept = [], []
            for _ in range(6):
                base.append(_stream(phases, steps=5)["step"])
                slept.append(_stream(sleepy, steps=5)["step"])
            b, t = statistics.median(base), statistics.median(slept)
            lines.append(f"{level}: +{SLEEP_MS} ms host sleep before {where:<9}: step {t:.1f} ms against {b:.1f} "
                         f"({t - b:+.1f}; block medians without {min(base):.1f}-{max(base):.1f}, "
                         f"with {min(slept):.1f}-{max(slept):.1f})")
        print("\n".join(lines[-(len(PHASES) * 2 + 2):]), flush=True)
        del model, optimizer, phases
        torch.cuda.empty_cache()
    print("\n== summary\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
