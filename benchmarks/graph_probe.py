"""The GEMM-level layer with its forward + backward captured in a CUDA graph, and the weights' cast
(a GPU measuring aid, issue 5, twelfth session).

    python benchmarks/graph_probe.py [cast] [layer] [M,K,N ...]     (default: both stages, 16384,2048,11264 and 8192^3)

Stage ``cast``: ``fp8lm.ops.cast.fused_cast`` of an FP16 master's data with ``in_scale`` (the weights' cast of
O1/O2) with each kernel configuration below (GPU time: calls replayed from a CUDA graph), against the
previous kernel (``tl.div_rn`` per element; loaded from ``runs/ab_old/fp8lm/ops/cast.py`` when that tree was
carried); every configuration's bytes and amax are
compared with the twin. Stage ``layer``: ``fp8lm bench``'s GEMM-level variants plus each one with its whole
call (forward, ``autograd.grad``) captured once in a ``torch.cuda.CUDAGraph`` and replayed (``graphed``: no host
work per call but the replay; the BF16 layer gets the same treatment), timed in interleaved shuffled rounds
(``fp8lm.bench.time_interleaved``), medians; then the kernels of ``fp8 triton compiled`` over 5 calls.
"""
import importlib.util
import os
import statistics
import sys

import torch
from torch import nn

from fp8lm.bench import _fp8_layer, _fwd_bwd, _torchao_layer, _with_fused_cast, time_interleaved, time_ms, \
    torchao_version
from fp8lm.formats import E4M3, amax, scale_from_amax
from fp8lm.ops import cast as cast_mod
from fp8lm.scaling import get_recipe
from fp8lm.tensor import ScaledTensor

sys.path.insert(0, os.path.dirname(__file__))
from layer_probe import kernels  # noqa: E402  (the layer's CUDA kernels over 5 profiled calls)

CONFIGS = [(64, 128, 8, True), (64, 256, 8, False), (64, 128, 8, False), (128, 128, 8, False), (64, 256, 4, False),
           (32, 256, 4, False), (128, 256, 8, False)]


def old_cast_module():
    path = os.path.join("runs", "ab_old", "fp8lm", "ops", "cast.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("old_cast", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kernel_ms(fn, calls=10):
    """GPU milliseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph, the replay timed with
    CUDA events (median of 15 replays), so host work (Triton's Python launcher) is not counted."""
    replay = graphed(lambda: [fn() for _ in range(calls)])
    return statistics.median(time_ms(replay, 3, 15, "cuda")) / calls


def stage_cast():
    old = old_cast_module()
    rows = []
    for m, n in ((11264, 2048), (8192, 8192), (2048, 5632), (6144, 2048)):
        w_hp = torch.randn(m, n, device="cuda") * 0.02
        w_hp[torch.rand_like(w_hp) < 1e-4] *= 50  # heavy tail
        w = ScaledTensor.from_hp(w_hp, torch.float16)
        w_true = w._data.float() / w._scale
        scale = scale_from_amax(amax(w_true), E4M3)
        ref = cast_mod.cast_reference(w._data, E4M3, scale, transpose=True, with_amax=True, in_scale=w._scale)
        gb = m * n * 4 / 1e9  # read 2 bytes, write 2 x 1 byte per element
        if old is not None:
            f = lambda: old.fused_cast(w._data, E4M3, scale, transpose=True, with_amax=True, in_scale=w._scale)  # noqa
            ms = kernel_ms(f)
            rows.append((f"{m}x{n}", "previous kernel (div_rn)", ms, gb / ms, "-"))
        shipped = cast_mod._CAST_CONFIG["in_scale"]
        for cfg in CONFIGS:
            cast_mod._CAST_CONFIG["in_scale"] = cfg
            try:
                f = lambda: cast_mod.fused_cast(w._data, E4M3, scale, transpose=True, with_amax=True,  # noqa
                                                in_scale=w._scale)
                got = f()
                same = all(torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                                       b.view(torch.uint8) if b.element_size() == 1 else b) for a, b in zip(got, ref))
                ms = kernel_ms(f)
                rows.append((f"{m}x{n}", f"{cfg}", ms, gb / ms, "same" if same else "DIFFERENT"))
            finally:
                cast_mod._CAST_CONFIG["in_scale"] = shipped
        copy = torch.empty_like(w._data)
        ms = kernel_ms(lambda: copy.copy_(w._data))
        rows.append((f"{m}x{n}", "FP16 copy of the data", ms, m * n * 4 / 1e9 / ms, "-"))
    print("\n== the weights' cast (FP16 data, in_scale, E4M3 + transposed copy + amax), us, TB/s by bytes moved")
    for shape, label, ms, tbs, same in rows:
        print(f"{shape:>11} {label:<28} {ms * 1e3:8.1f} us {tbs:6.2f} TB/s  {same}")


def graphed(fn):
    """``fn``'s work captured once in a CUDA graph (after warm-up on a side stream); returns its replay.

    Every graph here is captured on PyTorch's default capture stream, as in the runs of ``77_`` and ``82_``.
    Graphs captured on one stream share that stream's cuBLAS workspace (pytorch/pytorch#193402: destroying
    one can leave another pointing at freed memory); ``fp8lm bench`` with such columns hit an illegal memory
    access in its 8192^3 row after the graphs of an earlier shape were freed (``86_``), which is why the bench
    has no CUDA-graph columns. This probe resets Dynamo and frees nothing between graphs of one shape."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def variants(m, k, n):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    recipe = get_recipe("delayed")
    fns = {"bf16": _fwd_bwd(nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16), x, g),
           "fp8 compiled": _fwd_bwd(torch.compile(_fp8_layer(k, n, "cuda", recipe)), x, g),
           "fp8 triton compiled": _with_fused_cast(_fwd_bwd(torch.compile(_fp8_layer(k, n, "cuda", recipe)), x, g))}
    if torchao_version():
        fns["torchao compiled"] = _fwd_bwd(torch.compile(_torchao_layer(k, n, "cuda")), x, g)
    for name in list(fns):
        try:
            fns[f"{name} graphed"] = graphed(fns[name])
        except Exception as err:  # report, keep the others
            print(f"{name} graphed: {type(err).__name__}: {' '.join(str(err).split())[:300]}", flush=True)
    return fns


def stage_layer(shapes):
    summary = []
    for m, k, n in shapes:
        torch._dynamo.reset()
        fns = variants(m, k, n)
        for fn in fns.values():
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        times = time_interleaved(fns, 12, 3, "cuda")
        med = {name: statistics.median(ts) for name, ts in times.items()}
        ks, _ = kernels(fns["fp8 triton compiled"])
        print(f"\n== {m} x {k}->{n} fp8 triton compiled: kernels {sum(t for t, _, _ in ks) / 1e3:.3f} ms per call, "
              f"median {med['fp8 triton compiled']:.3f}, graphed {med.get('fp8 triton compiled graphed', 0):.3f}")
        for t, c, nm in ks[:16]:
            print(f"  {t:8.1f} us {c:4.1f}x {nm[:110]}")
        flops = 6 * m * k * n
        summary.append(f"\n== {m} x {k}->{n}: median ms per fwd+bwd, TFLOP/s, ratio to bf16 (ratio to bf16 graphed)")
        for name, ms in med.items():
            graph_ref = med.get("bf16 graphed", float("nan"))
            summary.append(f"  {name:<30} {ms:7.3f} ms {flops / ms / 1e9:6.0f}  {med['bf16'] / ms:5.2f}x "
                           f"({graph_ref / ms:5.2f}x)")
    print("\n".join(summary))


def main():
    args = sys.argv[1:]
    stages = [a for a in args if a in ("cast", "layer")] or ["cast", "layer"]
    shapes = [tuple(int(v) for v in a.split(",")) for a in args if "," in a] or [(16384, 2048, 11264), (8192,) * 3]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, torchao {torchao_version()}")
    if "cast" in stages:
        stage_cast()
    if "layer" in stages:
        stage_layer(shapes)


if __name__ == "__main__":
    main()
