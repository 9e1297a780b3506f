"""One FP8 linear's forward + backward on the GPU, kernel by kernel, for each cast mode (a GPU measuring aid, issue 5).

    python benchmarks/layer_probe.py [M,K,N ...]        (default 16384,2048,11264)

For each shape: BF16 ``nn.Linear`` and fp8lm's compiled O1 layer (``fp8lm bench``'s ``fp8 compiled``,
recipe ``delayed``) with ``set_fused_cast`` False (default), "grad" and True (and torchao's compiled tensorwise
layer when importable), timed in interleaved,
shuffled rounds (``fp8lm.bench.time_interleaved``, the bench's method; medians), then each FP8 variant's
CUDA kernels over 5 profiled calls: microseconds and calls per forward + backward, largest first, and
their sum (the GPU's busy time) next to the median wall time per call (the difference: idle gaps).
"""
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fp8lm.bench import _fp8_layer, _fwd_bwd, _torchao_layer, _with_fused_cast, time_interleaved, torchao_version
from fp8lm.scaling import get_recipe

sys.path.insert(0, os.path.dirname(__file__))
from profile_step import idle_gaps  # noqa: E402


def kernels(fn, calls=5):
    """(kernel rows largest first, the idle-gap report of ``profile_step.idle_gaps``) over ``calls`` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time / calls
            count[e.name] += 1
    rows = sorted(((t, count[nm] / calls, nm) for nm, t in total.items()), reverse=True)
    return rows, idle_gaps(prof, calls, top=10, min_us=1.0)


def host_ms(fn, calls=10):
    """Host time to issue one call (``calls`` issued after a synchronization, no synchronization between)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return host


def syncs(fn):
    """Whether one call synchronizes the host with the GPU (``torch.cuda.set_sync_debug_mode``)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as err:
        return f"yes: {str(err).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


def variants(m, k, n):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    recipe = get_recipe("delayed")
    fns = {"bf16": _fwd_bwd(nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16), x, g)}
    for label, mode in (("fp8 default", False), ("fp8 grad", "grad"), ("fp8 triton", True)):
        fns[label] = _with_fused_cast(_fwd_bwd(torch.compile(_fp8_layer(k, n, "cuda", recipe)), x, g), mode)
    if torchao_version():
        fns["torchao"] = _fwd_bwd(torch.compile(_torchao_layer(k, n, "cuda")), x, g)
    return fns


def host_profile(fn, calls=50, top=35):
    """cProfile of ``calls`` calls of ``fn`` (where its host time goes), by own time and by cumulative time."""
    import cProfile
    import io
    import pstats
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def main():
    if "--cprofile" in sys.argv:  # host profile of the given variant at the first shape
        sys.argv.remove("--cprofile")
        name = sys.argv.pop(1)
        shape = tuple(int(v) for v in (sys.argv[1:] or ["16384,2048,11264"])[0].split(","))
        fn = variants(*shape)[name]
        for _ in range(5):
            fn()
        print(f"== cProfile of 50 calls of {name} at {shape}, host {host_ms(fn):.3f} ms per call")
        print(host_profile(fn))
        return
    shapes = [tuple(int(v) for v in a.split(",")) for a in sys.argv[1:]] or [(16384, 2048, 11264)]
    summary = []
    for m, k, n in shapes:
        torch._dynamo.reset()
        fns = variants(m, k, n)
        for fn in fns.values():
            for _ in range(4):
                fn()
        torch.cuda.synchronize()
        times = time_interleaved(fns, 12, 3, "cuda")
        med = {name: statistics.median(ts) for name, ts in times.items()}
        print(f"\n== {m} x {k}->{n} bf16: median {med['bf16']:.3f} ms per call, host {host_ms(fns['bf16']):.3f} ms "
              "per call", flush=True)
        for name, fn in fns.items():
            if name == "bf16":
                continue
            ks, gaps = kernels(fn)
            busy = sum(t for t, _, _ in ks) / 1e3
            print(f"\n== {m} x {k}->{n} {name}: median {med[name]:.3f} ms per call, kernels {busy:.3f} ms, "
                  f"{sum(c for _, c, _ in ks):.0f} launches, host {host_ms(fn):.3f} ms per call, "
                  f"synchronizes: {syncs(fn)}", flush=True)
            for t, c, nm in ks[:22]:
                print(f"  {t:8.1f} us {c:4.1f}x {nm[:110]}")
            print(gaps.replace("per step", "per call"))
        summary.append(f"{m} x {k}->{n}: " + ", ".join(f"{nm} {ms:.3f} ms ({med['bf16'] / ms:.2f}x)"
                                                      for nm, ms in med.items()))
    print("\n== summary (median ms per fwd+bwd, ratio to bf16)")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
