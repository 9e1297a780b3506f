"""FP8 cast of a BF16 activation: plain torch (eager, compiled) against the Triton fused kernels.

    python benchmarks/cast_bench.py            (a CUDA GPU with Triton)

What each row does to a (M, K) BF16 tensor, and the fewest bytes it must move per element:

* ``current``: amax, scale, cast, transposed copy (what Float8Linear does per input in forward):
  read 2 (amax) + read 2, write 1 + 1 (cast and transpose) = 6 bytes;
* ``known scale``: cast + transposed copy + amax of the same pass (delayed scaling): 4 bytes.

Columns: ``torch eager`` (``formats.amax`` + ``formats.quantize`` + ``.t().contiguous()``: the plain
path), ``torch compiled`` (the same function under ``torch.compile``), ``triton``
(``fp8lm.ops.cast``, tile transpose), ``triton strided`` (strided transpose stores). Time: median
of CUDA-event repeats after warm-up; GB/s counts the minimum bytes above. Printed table last.
"""
import statistics
import sys

import torch

from fp8lm.bench import time_ms
from fp8lm.formats import E4M3, amax, quantize, scale_from_amax
from fp8lm.ops.cast import fused_amax, fused_cast, triton_available

SHAPES = ((16384, 2048), (16384, 5632), (16384, 6144))


def plain_current(x):
    scale = scale_from_amax(amax(x), E4M3)
    x_fp8 = quantize(x, E4M3, scale)
    return x_fp8, x_fp8.t().contiguous(), scale


def plain_known(x, scale):
    x_fp8 = quantize(x, E4M3, scale)
    return x_fp8, x_fp8.t().contiguous(), amax(x)


def triton_current(x, trans_tile=True):
    scale = scale_from_amax(fused_amax(x), E4M3)
    x_fp8, x_fp8_t, _ = fused_cast(x, E4M3, scale, transpose=True, trans_tile=trans_tile)
    return x_fp8, x_fp8_t, scale


def triton_known(x, scale, trans_tile=True):
    return fused_cast(x, E4M3, scale, transpose=True, with_amax=True, trans_tile=trans_tile)


def main() -> int:
    if not (torch.cuda.is_available() and triton_available("cuda")):
        print("cast_bench: needs a CUDA GPU and Triton")
        return 1
    compiled_current = torch.compile(plain_current, dynamic=False)
    compiled_known = torch.compile(plain_known, dynamic=False)
    lines = [f"{'shape':<14}{'job':<13}{'torch eager':>14}{'torch compiled':>16}{'triton':>14}{'triton strided':>16}"
             "   (us; GB/s at the minimum bytes)"]
    for m, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
        scale = scale_from_amax(amax(x), E4M3)
        ref = plain_current(x)
        for got in (compiled_current(x), triton_current(x), triton_current(x, False)):
            assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(ref[:2], got[:2]))
        jobs = {
            "current": (6, [lambda: plain_current(x), lambda: compiled_current(x), lambda: triton_current(x),
                            lambda: triton_current(x, False)]),
            "known scale": (4, [lambda: plain_known(x, scale), lambda: compiled_known(x, scale),
                                lambda: triton_known(x, scale), lambda: triton_known(x, scale, False)]),
        }
        for job, (bytes_per, fns) in jobs.items():
            cells = []
            for fn in fns:
                us = statistics.median(time_ms(fn, 5, 50, "cuda")) * 1e3
                cells.append(f"{us:.0f} ({bytes_per * m * k / us / 1e3:.0f})")
            lines.append(f"{m}x{k:<8}{job:<13}{cells[0]:>14}{cells[1]:>16}{cells[2]:>14}{cells[3]:>16}")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
