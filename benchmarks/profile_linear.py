"""Where one linear's forward + backward spends its GPU time (a GPU debugging aid for issue 5).

Usage: python benchmarks/profile_linear.py [M,K,N ...]   (default 16384,2048,2048 and 8192,8192,8192)

For each shape and variant (BF16 ``nn.Linear``; fp8lm's Float8Linear compiled, as O1 builds it with
an FP16 master and FP8 weight gradient, and with a plain FP32 weight; torchao's tensorwise layer
compiled, if importable) prints the median fwd+bwd time (CUDA events, 20 repeats after warm-up) and
the CUDA kernels of 5 profiled calls: calls and microseconds per fwd+bwd, largest first.
"""
import statistics
import sys
from collections import defaultdict

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fp8lm.bench import _fp8_layer, _fwd_bwd, _torchao_layer, torchao_version
from fp8lm.nn import Float8Linear
from fp8lm.scaling import get_recipe


def _median_ms(fn, repeats=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _kernels(fn, calls=5):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time / calls
            count[e.name] += 1
    return sorted(((t, count[n] / calls, n) for n, t in total.items()), reverse=True)


def _variants(k, n):
    recipe = get_recipe("current")
    out = {
        "bf16": lambda: nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16),
        "fp8 compiled (O1 layer)": lambda: torch.compile(_fp8_layer(k, n, "cuda", recipe)),
        "fp8 compiled (fp32 weight)": lambda: torch.compile(
            Float8Linear.from_linear(nn.Linear(k, n, bias=False, device="cuda"), recipe)),
    }
    if torchao_version():
        out["torchao compiled"] = lambda: torch.compile(_torchao_layer(k, n, "cuda"))
    return out


def main() -> None:
    shapes = [tuple(int(v) for v in s.split(",")) for s in sys.argv[1:]] or [(16384, 2048, 2048), (8192, 8192, 8192)]
    for m, k, n in shapes:
        x_hp = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g_hp = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        for name, make in _variants(k, n).items():
            torch._dynamo.reset()
            fn = _fwd_bwd(make(), x_hp, g_hp)
            ms = _median_ms(fn)
            print(f"== {m}x{k}->{n} {name}: {ms:.3f} ms, {6 * m * k * n / ms / 1e9:.0f} TFLOP/s", flush=True)
            for t, c, kname in _kernels(fn)[:14]:
                print(f"   {t:8.1f} us  {c:4.1f}x  {kname[:110]}")


if __name__ == "__main__":
    main()
