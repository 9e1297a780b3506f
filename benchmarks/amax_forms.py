"""How the amax a delayed-scaling cast feeds its history is written, and what Inductor makes of it (a GPU measuring aid, issue 5).

    python benchmarks/amax_forms.py        (a CUDA GPU)

One compiled function per form, each ``(quantize(t, E5M2, scale), amax of |t|)`` of a BF16 (M, N) tensor that is
the graph's input (as an output gradient is in a per-block compiled backward), so Inductor writes one kernel
that reads ``t`` once, stores the FP8 bytes and reduces the amax (plus small kernels that finish the reduction):

* ``rows``: ``t.abs().amax(dim=1).amax()`` (``Float8Linear._amax_by_rows``, the library's form);
* ``chunks``: ``t.view(M, N // 128, 128).abs().amax(-1).amax()`` (maxima of 128-element pieces of rows);
* ``cols``: ``t.abs().amax(dim=0).amax()`` (column maxima);
* ``flat``: ``t.abs().amax()``;

and the Triton kernel ``fp8lm.ops.cast.fused_cast`` without and with its transposed copy (``triton``,
``triton+T``). Every form's FP8 bytes and amax are checked against ``formats.quantize`` / ``formats.amax``.
GB/s counts 3 bytes per element (read 2, write 1; ``triton+T`` 4). Times: CUDA events, median of 30 calls
after warm-up, the forms interleaved round by round (``fp8lm.bench.time_interleaved``). Table last.
"""
import statistics

import torch

from fp8lm.bench import time_interleaved
from fp8lm.formats import E5M2, amax, quantize
from fp8lm.ops.cast import fused_cast

SHAPES = [(16384, 11264), (16384, 6144), (16384, 5632), (16384, 2048)]
FORMS = {
    "rows": lambda t: t.abs().amax(dim=1).amax().float(),
    "chunks": lambda t: t.view(t.shape[0], t.shape[1] // 128, 128).abs().amax(-1).amax().float(),
    "cols": lambda t: t.abs().amax(dim=0).amax().float(),
    "flat": lambda t: t.abs().amax().float(),
}


def compiled(form):
    def fn(t, scale):
        return quantize(t, E5M2, scale), form(t)
    return torch.compile(fn)


def main():
    lines = []
    for m, n in SHAPES:
        torch._dynamo.reset()
        t = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 1e-3
        scale = torch.tensor(2.0**14, device="cuda")
        want_fp8, want_amax = quantize(t, E5M2, scale), amax(t)
        fns = {}
        for name, form in FORMS.items():
            fn = compiled(form)
            got_fp8, got_amax = fn(t, scale)
            assert torch.equal(got_fp8.view(torch.uint8), want_fp8.view(torch.uint8)) and torch.equal(got_amax, want_amax)
            fns[name] = (lambda fn: lambda: fn(t, scale))(fn)
        for name, transpose in (("triton", False), ("triton+T", True)):
            got_fp8, _, got_amax = fused_cast(t, E5M2, scale, transpose=transpose, with_amax=True)
            assert torch.equal(got_fp8.view(torch.uint8), want_fp8.view(torch.uint8)) and torch.equal(got_amax, want_amax)
            fns[name] = (lambda tr: lambda: fused_cast(t, E5M2, scale, transpose=tr, with_amax=True))(transpose)
        for fn in fns.values():
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        times = time_interleaved(fns, 10, 3, "cuda")
        row = []
        for name, ts in times.items():
            ms = statistics.median(ts)
            gbs = m * n * (4 if name == "triton+T" else 3) / ms / 1e6
            row.append(f"{name} {ms * 1e3:6.1f} us {gbs:5.0f} GB/s")
        lines.append(f"{m} x {n}: " + ", ".join(row))
        print(lines[-1], flush=True)
    print("\n== amax forms: median us per cast (read BF16, write FP8, amax), GB/s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
