"""Which form of the SwiGLU backward kernel's transposed stores gives right bytes on this GPU (a debugging aid).

    python benchmarks/swiglu_debug.py

Launches ``variant_kernel`` below (``fp8lm.ops.swiglu._swiglu_bwd_kernel`` as first written, with its
transposed stores) directly with each ``TRANS`` form (0: no transposed copy, 1: FP8 tiles transposed on
chip, 2: float32 tiles transposed then cast, 3: strided stores, 4: the FP8 tiles bitcast to uint8 and
transposed on chip, as ``fp8lm.ops.cast._transpose_kernel`` does, 5: both copies stored as uint8 bits), format, dtype and shape, and prints how
many FP8 bytes differ by more than one step from the twin's (``swiglu_backward_cast_reference`` on the
same GPU), how many still hold the fill value, and whether the transposed copy equals ``out.t()``.
On the H100 (Triton 3.6, 2026-11-23, ``benchmarks/results/bench_h100/17_swiglu_debug.txt``) only
``TRANS=0`` was right. The library kernel now writes its transposed copy from the bytes it has just stored,
read back (``benchmarks/trans_pack_debug.py``, ninth session of 2026-11-24).
"""
import torch
import triton
import triton.language as tl

from fp8lm.formats import E4M3, E5M2, amax, scale_from_amax
from fp8lm.ops import swiglu as mod
from fp8lm.ops.cast import _saturating_cast, _tile_amax


@triton.jit
def variant_kernel(gu_ptr, da_ptr, scale_ptr, out_ptr, out_t_ptr, partial_ptr, M, F, stride_gu, stride_da,
                       FMT_MAX: tl.constexpr, E4M3: tl.constexpr, CAST: tl.constexpr, AMAX: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TRANS: tl.constexpr = 1):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < F)
    row_gu = gu_ptr + rm[:, None] * stride_gu + rn[None, :]
    g = tl.load(row_gu, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(row_gu + F, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + rm[:, None] * stride_da + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    dg = da * u * sig * (1.0 + g * (1.0 - sig))
    du = da * g * sig
    if CAST:
        scale = tl.load(scale_ptr)
        dg8 = _saturating_cast(dg, scale, FMT_MAX, E4M3)
        du8 = _saturating_cast(du, scale, FMT_MAX, E4M3)
        if TRANS == 5:  # both copies stored as uint8 bits: row-major, and transposed on chip
            dg_bits, du_bits = dg8.to(tl.uint8, bitcast=True), du8.to(tl.uint8, bitcast=True)
            out_row8 = out_ptr.to(tl.pointer_type(tl.uint8)) + rm[:, None] * (2 * F) + rn[None, :]
            tl.store(out_row8, dg_bits, mask=mask)
            tl.store(out_row8 + F, du_bits, mask=mask)
            mask_t = (rn[:, None] < F) & (rm[None, :] < M)
            out_t8 = out_t_ptr.to(tl.pointer_type(tl.uint8)) + rn[:, None] * M + rm[None, :]
            tl.store(out_t8, tl.trans(dg_bits), mask=mask_t)
            tl.store(out_t8 + F * M, tl.trans(du_bits), mask=mask_t)
        else:
            out_row = out_ptr + rm[:, None] * (2 * F) + rn[None, :]  # (M, 2F) row-major
            tl.store(out_row, dg8, mask=mask)
            tl.store(out_row + F, du8, mask=mask)
        if TRANS == 1:  # FP8 tiles transposed on chip
            mask_t = (rn[:, None] < F) & (rm[None, :] < M)
            out_t = out_t_ptr + rn[:, None] * M + rm[None, :]  # (2F, M) row-major
            tl.store(out_t, tl.trans(dg8), mask=mask_t)
            tl.store(out_t + F * M, tl.trans(du8), mask=mask_t)
        elif TRANS == 2:  # float32 tiles transposed, then cast
            mask_t = (rn[:, None] < F) & (rm[None, :] < M)
            out_t = out_t_ptr + rn[:, None] * M + rm[None, :]
            tl.store(out_t, _saturating_cast(tl.trans(dg), scale, FMT_MAX, E4M3), mask=mask_t)
            tl.store(out_t + F * M, _saturating_cast(tl.trans(du), scale, FMT_MAX, E4M3), mask=mask_t)
        elif TRANS == 3:  # strided stores from the tile's own layout
            out_t = out_t_ptr + rn[None, :] * M + rm[:, None]
            tl.store(out_t, dg8, mask=mask)
            tl.store(out_t + F * M, du8, mask=mask)
        elif TRANS == 4:  # the FP8 tiles as uint8 bits, transposed on chip (as the working byte transpose)
            mask_t = (rn[:, None] < F) & (rm[None, :] < M)
            out_t = out_t_ptr.to(tl.pointer_type(tl.uint8)) + rn[:, None] * M + rm[None, :]
            tl.store(out_t, tl.trans(dg8.to(tl.uint8, bitcast=True)), mask=mask_t)
            tl.store(out_t + F * M, tl.trans(du8.to(tl.uint8, bitcast=True)), mask=mask_t)
    if AMAX:
        a_g, a_u = _tile_amax(dg), _tile_amax(du)
        a = tl.where((a_g != a_g) | (a_u != a_u), float("nan"), tl.maximum(a_g, a_u))
        tl.store(partial_ptr + pid_m * tl.num_programs(1) + pid_n, a)



def run(m, f, fmt, dtype, trans, warps):
    torch.manual_seed(0)
    gu = (torch.randn(m, 2 * f, device="cuda") * 2).to(dtype)
    da = (torch.randn(m, f, device="cuda") * 1e-3).to(dtype)
    scale = scale_from_amax(amax(mod._grad_hp(gu, da)), fmt)
    ref, _, _ = mod.swiglu_backward_cast_reference(gu, da, fmt, scale)
    grid = mod._grid(m, f, mod._BLOCK_M, mod._BLOCK_N)
    out = torch.full((m, 2 * f), 0.5, dtype=torch.float32, device="cuda").to(fmt.dtype)
    out_t = torch.full((2 * f, m), 0.5, dtype=torch.float32, device="cuda").to(fmt.dtype)
    partial = torch.empty(grid, device="cuda")
    variant_kernel[grid](gu, da, scale.reshape(1), out, out_t, partial, m, f, gu.stride(0), da.stride(0),
                                 FMT_MAX=fmt.max, E4M3=fmt is E4M3, CAST=True, AMAX=True, BLOCK_M=mod._BLOCK_M,
                                 BLOCK_N=mod._BLOCK_N, TRANS=trans, num_warps=warps)
    torch.cuda.synchronize()
    diff = (out.view(torch.uint8).int() - ref.view(torch.uint8).int()).abs()
    bad = int((diff > 1).sum())
    unwritten = int((out.view(torch.uint8) == torch.tensor(0.5, dtype=fmt.dtype).view(torch.uint8).cuda()).sum())
    t_ok = trans == 0 or torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8))
    return bad, unwritten, t_ok


TRANS_FORMS = (0, 1, 3, 4, 5)


def main():
    for warps in (4,):
        for trans in TRANS_FORMS:
            for fmt in (E4M3, E5M2):
                for dtype in (torch.bfloat16, torch.float32):
                    res = [run(m, f, fmt, dtype, trans, warps) for m, f in ((37, 19), (1000, 515), (4096, 2816))]
                    print(f"warps {warps} TRANS {trans} {fmt.name} {str(dtype):15s} (bad>1step, unwritten, t_ok): {res}",
                          flush=True)


if __name__ == "__main__":
    main()
