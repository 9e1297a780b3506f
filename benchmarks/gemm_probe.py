"""Where one FP8 linear's forward + backward loses to its ceiling (a GPU measuring aid, issue 5).

    python benchmarks/gemm_probe.py [gemms] [host] [profile]     (a CUDA GPU; all three by default)

1. ``gemms``: each of the layer's three GEMMs alone (``torch._scaled_mm`` on ready operands) at
   16384 x 2048->11264 and 8192^3, with and without Hopper's fast accumulation, and computed as
   the transposed product (``C.T = B.T @ A.T``: the other operand order cuBLAS may tile better),
   next to the BF16 ``mm`` of the same shape.
2. ``host``: fp8lm's compiled layer (``fp8lm bench``'s ``fp8 compiled`` column, recipe ``delayed``)
   and torchao's at every GEMM-level shape: GPU time per forward + backward (CUDA events, median),
   host time per call (the wall time of issuing 20 calls without synchronizing, divided by 20), and
   the same layers compiled with ``mode="reduce-overhead"`` (CUDA graphs), and fp8lm's layer with its
   byte transpose called as an opaque ``custom_op`` (``fp8 custom_op``: how it was called before the
   ``triton_op`` registration of the fifth session of 2026-11-23).
3. ``profile``: the CUDA kernels of fp8lm's compiled layer at 2048->11264, per call, largest first.

Times: CUDA events, median of repeats after warm-up (``fp8lm.bench.time_ms``). Tables last.
"""
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fp8lm.bench import GEMM_SHAPES, _fp8_layer, _fwd_bwd, _torchao_layer, time_ms, torchao_version
from fp8lm.nn import Float8Linear
from fp8lm.formats import E4M3, E5M2, quantize_dynamic
from fp8lm.scaling import get_recipe

BF16 = torch.bfloat16


def med(fn, warmup=5, repeats=30):
    return statistics.median(time_ms(fn, warmup, repeats, "cuda"))


def _mm(a, b, sa, sb, fast, out=BF16):
    return lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out, use_fast_accum=fast)


def gemm_rows(m, k, n):
    """ms of each GEMM of the layer in each form: {(role, form): ms}."""
    x = torch.randn(m, k, device="cuda", dtype=BF16)
    w = torch.randn(n, k, device="cuda", dtype=BF16) * 0.02
    g = torch.randn(m, n, device="cuda", dtype=BF16) * 1e-3
    (x8, sx), (w8, sw), (g8, sg) = quantize_dynamic(x, E4M3), quantize_dynamic(w, E4M3), quantize_dynamic(g, E5M2)
    xt8, wt8, gt8 = x8.t().contiguous(), w8.t().contiguous(), g8.t().contiguous()
    ix, iw, ig = sx.reciprocal(), sw.reciprocal(), sg.reciprocal()
    # (a, b) as _scaled_mm takes them: a row-major, b column-major; "T" computes the transposed product.
    forms = {
        "fwd": {"": (x8, w8.t(), ix, iw), "T": (w8, x8.t(), iw, ix)},                # out (M,N) / out.T (N,M)
        "dgrad": {"": (g8, wt8.t(), ig, iw), "T": (wt8, g8.t(), iw, ig)},            # dx (M,K) / dx.T (K,M)
        "wgrad": {"": (gt8, xt8.t(), ig, ix), "T": (xt8, gt8.t(), ix, ig)},           # dw (N,K) / dw.T (K,N)
    }
    bf = {"fwd": lambda: x @ w.t(), "dgrad": lambda: g @ w, "wgrad": lambda: g.t() @ x}
    rows = {}
    for role, by_form in forms.items():
        rows[(role, "bf16")] = med(bf[role])
        for form, (a, b, sa, sb) in by_form.items():
            for fast in (False, True):
                rows[(role, f"fp8{form}{' fast' if fast else ''}")] = med(_mm(a, b, sa, sb, fast))
        if role == "wgrad":
            a, b, sa, sb = by_form[""]
            rows[(role, "fp8 f32out")] = med(_mm(a, b, sa, sb, False, torch.float32))
    return rows


_OPAQUE = {}


def _opaque_transpose():
    """``fp8lm::transpose_fp8`` as it was before the 2026-11-23 fifth session: an opaque ``custom_op``
    (registered here under another name) around the same kernel, for a same-process comparison."""
    if "op" not in _OPAQUE:
        from fp8lm.ops import cast as cast_mod

        @torch.library.custom_op("fp8lm_probe::transpose_fp8", mutates_args=())
        def opaque(x_fp8: torch.Tensor) -> torch.Tensor:
            return cast_mod.transpose_fp8(x_fp8)

        opaque.register_fake(lambda x_fp8: x_fp8.new_empty((x_fp8.shape[1], x_fp8.shape[0])))
        _OPAQUE["op"] = opaque
    return _OPAQUE["op"]


class _OpaqueTranspose:
    """Context: ``Float8Linear`` calls the opaque transpose operator instead of the ``triton_op``."""

    def __enter__(self):
        import fp8lm.nn.linear as linear_mod
        self.old, linear_mod.transpose_fp8 = linear_mod.transpose_fp8, _opaque_transpose()

    def __exit__(self, *exc):
        import fp8lm.nn.linear as linear_mod
        linear_mod.transpose_fp8 = self.old


def _with(context, fn):
    def call():
        with context():
            return fn()
    return call


def host_rows(m, k, n):
    """GPU ms (events), host ms per call, and the CUDA-graph ms for fp8lm's and torchao's compiled layers."""
    x = torch.randn(m, k, device="cuda", dtype=BF16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=BF16)
    makers = {"bf16": lambda mode: nn.Linear(k, n, bias=False, device="cuda", dtype=BF16),
              "fp8": lambda mode: torch.compile(_fp8_layer(k, n, "cuda", get_recipe("delayed")), mode=mode),
              "fp8 fp32w": lambda mode: torch.compile(Float8Linear.from_linear(
                  nn.Linear(k, n, bias=False, device="cuda"), get_recipe("delayed")), mode=mode)}
    if torchao_version():
        makers["torchao"] = lambda mode: torch.compile(_torchao_layer(k, n, "cuda"), mode=mode)
    makers["fp8 custom_op"] = makers["fp8"]
    out = {}
    for name, make in makers.items():
        for mode in (None, "reduce-overhead"):
            if name in ("bf16", "fp8 fp32w", "fp8 custom_op") and mode:
                continue
            torch._dynamo.reset()
            try:
                fn = _fwd_bwd(make(mode), x, g)
                if name == "fp8 custom_op":
                    fn = _with(_OpaqueTranspose, fn)
                gpu = med(fn, warmup=6)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                host = (time.perf_counter() - t0) / 20 * 1e3
                torch.cuda.synchronize()
                out[(name, mode or "default")] = (gpu, host)
            except Exception as e:  # noqa: BLE001 (a probe: record and go on)
                out[(name, mode or "default")] = (float("nan"), float("nan"))
                print(f"{name} {mode}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return out


def kernels(m, k, n, calls=5):
    x = torch.randn(m, k, device="cuda", dtype=BF16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=BF16)
    torch._dynamo.reset()
    fn = _fwd_bwd(torch.compile(_fp8_layer(k, n, "cuda", get_recipe("delayed"))), x, g)
    for _ in range(6):
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
    return sorted(((t, count[nm] / calls, nm) for nm, t in total.items()), reverse=True)


def host_profile(m, k, n, calls=50):
    """cProfile of `calls` forward + backward calls of fp8lm's compiled layer (host time: where it goes)."""
    import cProfile
    import io
    import pstats
    x = torch.randn(m, k, device="cuda", dtype=BF16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=BF16)
    torch._dynamo.reset()
    fn = _fwd_bwd(torch.compile(_fp8_layer(k, n, "cuda", get_recipe("delayed"))), x, g)
    for _ in range(6):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    return buf.getvalue()


def main():
    stages = sys.argv[1:] or ["gemms", "host", "profile"]
    lines = []
    if "cprofile" in stages:
        lines += ["", f"cProfile of 50 calls, 16384 x 2048->2048", host_profile(16384, 2048, 2048)]
    if "profile" in stages:
        ks = kernels(16384, 2048, 11264)
        lines += ["", "fp8lm compiled layer, delayed, 16384 x 2048->11264: CUDA kernels per fwd+bwd",
                  f"  total {sum(t for t, _, _ in ks):8.1f} us"]
        lines += [f"  {t:8.1f} us {c:4.1f}x {nm[:100]}" for t, c, nm in ks[:24]]
    if "gemms" in stages:
        for m, k, n in ((16384, 2048, 11264), (8192, 8192, 8192)):
            rows = gemm_rows(m, k, n)
            lines += ["", f"GEMMs alone, {m} x {k}->{n}, ms (T: the transposed product; fast: use_fast_accum)"]
            forms = sorted({f for _, f in rows}, key=lambda f: (f != "bf16", f))
            lines.append(f"{'role':8s}" + "".join(f"{f:>14s}" for f in forms))
            for role in ("fwd", "dgrad", "wgrad"):
                lines.append(f"{role:8s}" + "".join(
                    f"{rows[(role, f)]:14.3f}" if (role, f) in rows else f"{'':14s}" for f in forms))
            print("\n".join(lines[-5:]), flush=True)
    if "host" in stages or "host2" in stages:
        lines += ["", "compiled layers, fwd+bwd: GPU ms (events) / host ms per call (issue time of 20 calls)"]
        for m, k, n in ([(16384, 2048, 2048), (16384, 2048, 11264)] if "host2" in stages else GEMM_SHAPES):
            res = host_rows(m, k, n)
            lines.append(f"{m} x {k}->{n}: " + ", ".join(
                f"{nm} {mode}: {gpu:.3f} / {host:.3f}" for (nm, mode), (gpu, host) in res.items()))
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
