"""Transposed FP8 stores written as 16-bit pairs: do they give right bytes where 8-bit ones did not? (a GPU debugging aid)

    python benchmarks/trans_pack_debug.py        (a CUDA GPU with Triton; or TRITON_INTERPRET=1 on a CPU)

Triton 3.6 on the H100 wrote wrong bytes (benchmarks/RESULTS.md; ``swiglu_debug.py``, ``cast_debug.py``) whenever the
SwiGLU backward kernel, or the cast kernel on float32 tiles, stored an FP8 tile in a second, transposed layout. The
guess tested here: the fault is in moving 8-bit elements between register layouts. Each form below builds the
transposed copy without an 8-bit layout change: the FP8 bytes of rows 2i and 2i + 1 are joined into one 16-bit word
(``lo | hi << 8``, little-endian: byte 2i first), the (BM/2, BN) word tile is transposed, and stored as uint16 into the
(N, M) copy viewed as (N, M/2) words (M even). Forms:

* ``cast32``: ``fp8lm.ops.cast``'s cast on a float32 input, its transposed copy stored as word pairs;
* ``swiglu``: ``fp8lm.ops.swiglu``'s backward kernel with a transposed copy stored as word pairs;
* ``swiglu8``: the same with the plain 8-bit transposed store (``tl.trans`` of the FP8 tile), the known-bad form;
* ``swiglu reload``: the row-major bytes the program just stored, loaded back after a barrier and transposed as
  loaded uint8 tiles (as ``fp8lm.ops.cast._transpose_kernel`` does, which is right);

each without and with ``tl.debug_barrier()`` before every transposed store (a second guess: a race between two
layout changes that share the kernel's shared memory).

Each prints, per shape and format: FP8 bytes of the row-major output that differ from the twin's by more than one
step (``swiglu``: Triton's ``exp`` and torch's ``sigmoid`` may differ in the last bit), and whether the transposed
copy equals the row-major output transposed (exactly). Under Triton's interpreter the row-major bytes differ from
the twin's (its numpy FP8 conversion rounds unlike hardware, ``tests/conftest.py``): there only the copies count.
"""
import os

import torch
import triton
import triton.language as tl

from fp8lm.formats import E4M3, E5M2, amax, scale_from_amax
from fp8lm.ops import swiglu as sw
from fp8lm.ops.cast import _saturating_cast, cast_reference

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@triton.jit
def _store_t_pairs(out_t_ptr, y8, pid_m, rn, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store the (BLOCK_M, BLOCK_N) FP8 tile ``y8`` (rows pid_m * BLOCK_M ..) transposed into the (N, M) row-major
    copy at ``out_t_ptr`` (uint16 words, (N, M // 2)), two bytes per word."""
    bits = y8.to(tl.uint8, bitcast=True).to(tl.uint16)
    pairs = tl.permute(tl.reshape(bits, (BLOCK_M // 2, 2, BLOCK_N)), (0, 2, 1))  # (BM/2, BN, 2)
    lo, hi = tl.split(pairs)  # rows 2i and 2i + 1: (BM/2, BN) each
    words = tl.trans(lo | (hi << 8))  # (BN, BM/2)
    rw = pid_m * (BLOCK_M // 2) + tl.arange(0, BLOCK_M // 2)
    mask_t = (rn[:, None] < N) & (rw[None, :] < M // 2)
    tl.store(out_t_ptr + rn[:, None] * (M // 2) + rw[None, :], words, mask=mask_t)


@triton.jit
def cast32_kernel(x_ptr, scale_ptr, out_ptr, out_t_ptr, M, N, FMT_MAX: tl.constexpr, E4M3: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BARRIER: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    x = tl.load(x_ptr + rm[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    y8 = _saturating_cast(x, tl.load(scale_ptr), FMT_MAX, E4M3)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], y8, mask=mask)
    if BARRIER:
        tl.debug_barrier()
    _store_t_pairs(out_t_ptr, y8, pid_m, rn, M, N, BLOCK_M, BLOCK_N)


@triton.jit
def swiglu_kernel(gu_ptr, da_ptr, scale_ptr, out_ptr, out_t_ptr, out_t2_ptr, M, F, FMT_MAX: tl.constexpr, E4M3: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAIRS: tl.constexpr, BARRIER: tl.constexpr,
                  HALVES: tl.constexpr = 3, SECOND: tl.constexpr = 0):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < F)
    row_gu = gu_ptr + rm[:, None] * (2 * F) + rn[None, :]
    g = tl.load(row_gu, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(row_gu + F, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + rm[:, None] * F + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    dg8 = _saturating_cast(da * u * sig * (1.0 + g * (1.0 - sig)), tl.load(scale_ptr), FMT_MAX, E4M3)
    du8 = _saturating_cast(da * g * sig, tl.load(scale_ptr), FMT_MAX, E4M3)
    out_row = out_ptr + rm[:, None] * (2 * F) + rn[None, :]
    tl.store(out_row, dg8, mask=mask)
    tl.store(out_row + F, du8, mask=mask)
    if BARRIER:
        tl.debug_barrier()
    if PAIRS == 2:  # reload the row-major bytes this program just stored, transpose them as the byte transpose does
        tl.debug_barrier()  # the stores above are visible to every thread of the program after this
        mask_t = (rn[:, None] < F) & (rm[None, :] < M)
        row8 = out_ptr.to(tl.pointer_type(tl.uint8)) + rm[:, None] * (2 * F) + rn[None, :]
        out_t8 = out_t2_ptr.to(tl.pointer_type(tl.uint8)) + rn[:, None] * M + rm[None, :]
        tl.store(out_t8, tl.trans(tl.load(row8, mask=mask, other=0)), mask=mask_t)
        tl.store(out_t8 + F * M, tl.trans(tl.load(row8 + F, mask=mask, other=0)), mask=mask_t)
    elif PAIRS:
        if HALVES & 1:
            _store_t_pairs(out_t_ptr, dg8, pid_m, rn, M, F, BLOCK_M, BLOCK_N)
        if BARRIER:
            tl.debug_barrier()
        if HALVES & 2:
            if SECOND == 0:  # the second half at an offset computed in the kernel
                _store_t_pairs(out_t_ptr + F * (M // 2), du8, pid_m, rn, M, F, BLOCK_M, BLOCK_N)
            elif SECOND == 1:  # the second half from a pointer argument of its own
                _store_t_pairs(out_t2_ptr, du8, pid_m, rn, M, F, BLOCK_M, BLOCK_N)
            else:  # dg's values again, into the second half (does the value or the place matter?)
                _store_t_pairs(out_t_ptr + F * (M // 2), dg8, pid_m, rn, M, F, BLOCK_M, BLOCK_N)
    else:
        mask_t = (rn[:, None] < F) & (rm[None, :] < M)
        out_t = out_t_ptr + rn[:, None] * M + rm[None, :]
        tl.store(out_t, tl.trans(dg8), mask=mask_t)
        if BARRIER:
            tl.debug_barrier()
        tl.store(out_t + F * M, tl.trans(du8), mask=mask_t)


def _bad(out, ref, step=1):
    return int(((out.view(torch.uint8).int() - ref.view(torch.uint8).int()).abs() > step).sum())


def run_cast32(m, n, fmt, barrier=False):
    x = torch.randn(m, n, device=DEVICE) * 3.0
    scale = scale_from_amax(amax(x), fmt)
    ref, _, _ = cast_reference(x, fmt, scale)
    out = torch.empty(m, n, dtype=fmt.dtype, device=DEVICE)
    out_t = torch.zeros(n, m, dtype=fmt.dtype, device=DEVICE)
    grid = (triton.cdiv(m, 64), triton.cdiv(n, 128))
    cast32_kernel[grid](x, scale.reshape(1), out, out_t.view(torch.uint8).view(torch.uint16), m, n, FMT_MAX=fmt.max,
                        E4M3=fmt is E4M3, BLOCK_M=64, BLOCK_N=128, BARRIER=barrier, **({} if DEVICE == "cpu" else {"num_warps": 4}))
    return _bad(out, ref, 0), torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8))


def run_swiglu(m, f, fmt, pairs, barrier=False, halves=3, detail=False, second=0):
    """``pairs``: 0 the 8-bit transposed store, 1 word pairs, 2 the read-back form; ``halves``: which halves' copies
    to store (bits 1: dg, 2: du); ``second``: how the du half is addressed (kernel docstring)."""
    gu = (torch.randn(m, 2 * f, device=DEVICE) * 2).to(torch.bfloat16)
    da = (torch.randn(m, f, device=DEVICE) * 1e-3).to(torch.bfloat16)
    scale = scale_from_amax(amax(sw._grad_hp(gu, da)), fmt)
    ref, _, _ = sw.swiglu_backward_cast_reference(gu, da, fmt, scale)
    out = torch.empty(m, 2 * f, dtype=fmt.dtype, device=DEVICE)
    out_t = torch.zeros(2 * f, m, dtype=fmt.dtype, device=DEVICE)
    t_arg = out_t.view(torch.uint8).view(torch.uint16) if pairs == 1 else out_t
    grid = (triton.cdiv(m, 64), triton.cdiv(f, 64))
    t2_arg = out_t if pairs == 2 else (out_t[f:].view(torch.uint8).view(torch.uint16) if pairs else out_t[f:])
    swiglu_kernel[grid](gu, da, scale.reshape(1), out, t_arg, t2_arg, m, f, FMT_MAX=fmt.max, E4M3=fmt is E4M3, BLOCK_M=64,
                        BLOCK_N=64, PAIRS=pairs, BARRIER=barrier, HALVES=halves, SECOND=second,
                        **({} if DEVICE == "cpu" else {"num_warps": 4}))
    if detail:  # wrong bytes of the transposed copy: per half, and the first few (row, col, got, want)
        want = out.t().contiguous().view(torch.uint8)
        if second == 2:  # dg's bytes in both halves
            want = torch.cat([want[:f], want[:f]])
        got = out_t.view(torch.uint8)
        wrong = (got != want).nonzero().tolist()
        halves_wrong = [sum(1 for r, _ in wrong if r < f), sum(1 for r, _ in wrong if r >= f)]
        sample = [(r, c, int(got[r, c]), int(want[r, c])) for r, c in wrong[:6]]
        return halves_wrong, sample
    return _bad(out, ref), torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8))


def main():
    shapes = [(38, 19), (1000, 515), (4096, 2816)] if DEVICE == "cuda" else [(38, 19), (130, 70)]
    for barrier in (False, True):  # 1. the word-pair forms and the plain 8-bit store, without and with barriers
        for fmt in (E4M3, E5M2):
            print(f"cast32  {fmt.name} barrier {barrier:d} (bad bytes, transposed copy exact): "
                  f"{[run_cast32(m, n, fmt, barrier) for m, n in shapes]}", flush=True)
            for name, pairs in (("swiglu", 1), ("swiglu8", 0)):
                print(f"{name:7s} {fmt.name} barrier {barrier:d} (bad bytes, transposed copy exact): "
                      f"{[run_swiglu(m, f, fmt, pairs, barrier) for m, f in shapes]}", flush=True)
    for second in (0, 1, 2):  # 2. which half goes wrong, and whether the place or the values matter
        for m, f in shapes:
            print(f"swiglu pairs, second half form {second}, e4m3, {m} x {f}: wrong bytes of the copy per half, "
                  f"first ones (row, col, got, want): {run_swiglu(m, f, E4M3, 1, detail=True, second=second)}",
                  flush=True)
    for fmt in (E4M3, E5M2):  # 3. the form the library uses: read the stored bytes back, transpose them
        for m, f in shapes + ([(16384, 5632)] if DEVICE == "cuda" else []):
            print(f"swiglu reload, {fmt.name}, {m} x {f}: bad row-major bytes, wrong bytes of the copy per half, "
                  f"first ones (row, col, got, want): {run_swiglu(m, f, fmt, 2)[0]}, "
                  f"{run_swiglu(m, f, fmt, 2, detail=True)}", flush=True)


if __name__ == "__main__":
    main()
