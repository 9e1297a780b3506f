"""SwiGLU's backward pass and the FP8 cast of its result in one pass: Triton on GPUs, plain torch twin.

A SwiGLU MLP computes ``gu = x @ W_gu.T`` (the fused gate/up projection, (M, 2F) = [g | u]) and
``a = silu(g) * u``. Given ``da`` (M, F), the gradient of the projection's output is::

    dg = da * u * sig * (1 + g * (1 - sig))      sig = sigmoid(g); silu'(g) = sig * (1 + g * (1 - sig))
    du = da * g * sig
    dgu = [dg | du]                               (M, 2F)

and the FP8 linear that made ``gu`` needs ``dgu`` cast to the gradient format (E5M2 by default) with
its scale, the transposed copy its weight-gradient GEMM reads, and (delayed scaling) ``dgu``'s amax.
Computed apart, that is a BF16 ``dgu`` written and read back, and a kernel that reads ``g`` and
``da`` twice (an output column of either half needs both halves' inputs: Inductor's fused kernel on
the H100 ran at 526 us per llama-0.75b layer, ``benchmarks/RESULTS.md``) plus a byte transpose. Here
one program takes an (M, F) tile of ``g``, ``u`` and ``da`` once and writes both halves of ``dgu``
in FP8 and one partial amax: per element of ``dgu`` it reads 3 bytes (2 of ``gu``, 1 of ``da``) and
writes 1, and the transposed copy 1 more.

The transposed copy is written from bytes, not from the computed tile: after storing its row-major
tiles, the program waits at a barrier, loads those bytes back (from L2: it has just written them) and
stores them transposed, as the byte transpose ``fp8lm.ops.cast.transpose_fp8`` does. Transposing the
computed FP8 tiles in registers (``tl.trans``, strided stores, the FP32 tiles before the cast, pairs of
bytes as 16-bit words) gave wrong bytes on the H100 with Triton 3.6, in the transposed copy and
sometimes in the row-major one too, differently from run to run (``benchmarks/swiglu_debug.py``,
``benchmarks/trans_pack_debug.py``, ``benchmarks/RESULTS.md``); the read-back form gave right bytes at
every shape tried. Against the separate byte transpose it saves reading the FP8 gradient back from
memory and one launch: about 0.3 ms per llama-0.75b O1 step on the H100, in A/B runs of alternating
processes (``benchmarks/RESULTS.md``, ninth session of 2026-11-24).

Numerics (the twin, ``swiglu_backward_cast_reference``, is the oracle)::

    dgu   = float32 math above, from BF16/FP16/float32 inputs widened exactly to float32
    amax  = max |dgu|  (float32; NaN if dgu holds a NaN)
    out   = cast_rne(clamp(dgu * scale, -fmt.max, fmt.max) + (dgu - dgu))    as ``fused_cast``

``dgu`` is cast from float32, not first rounded to the projection's dtype (BF16) as the unfused path
does: one rounding instead of two. The kernel and the twin agree to one FP8 ulp: Triton's ``exp``
and torch's ``sigmoid`` may differ in the last float32 bit, which moves an FP8 rounding only when a
value sits at a rounding boundary (the GPU test counts such bytes).
"""
from __future__ import annotations

import torch

from fp8lm.formats import Format, amax, dequantize, get_format, quantize
from fp8lm.ops.cast import _grid, _launch, _operator, triton, triton_available

__all__ = ["swiglu_backward_cast", "swiglu_backward_cast_reference", "swiglu_grad_amax"]

_BLOCK_M, _BLOCK_N, _WARPS = 64, 64, 4  # the tile of g, u and da; each program writes two 64 x 64 FP8 tiles

if triton is not None:
    import triton.language as tl

    from fp8lm.ops.cast import _saturating_cast, _tile_amax

    @triton.jit
    def _swiglu_bwd_kernel(gu_ptr, gu_scale_ptr, da_ptr, scale_ptr, out_ptr, out_t_ptr, partial_ptr, M, F, stride_gu,
                           stride_da, FMT_MAX: tl.constexpr, E4M3: tl.constexpr, CAST: tl.constexpr,
                           AMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TRANS: tl.constexpr,
                           GU_FP8: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rm[:, None] < M) & (rn[None, :] < F)
        row_gu = gu_ptr + rm[:, None] * stride_gu + rn[None, :]
        if GU_FP8:  # E4M3 bytes (passed as uint8) and one scale per row: g = bytes / scale, as `dequantize`
            s_row = tl.load(gu_scale_ptr + rm, mask=rm < M, other=1.0)[:, None]  # (BLOCK_M, 1)
            g = tl.load(row_gu, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32) / s_row
            u = tl.load(row_gu + F, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32) / s_row
        else:
            g = tl.load(row_gu, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(row_gu + F, mask=mask, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + rm[:, None] * stride_da + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        dg = da * u * sig * (1.0 + g * (1.0 - sig))
        du = da * g * sig
        if CAST:
            scale = tl.load(scale_ptr)
            out_row = out_ptr + rm[:, None] * (2 * F) + rn[None, :]  # (M, 2F) row-major
            tl.store(out_row, _saturating_cast(dg, scale, FMT_MAX, E4M3), mask=mask)
            tl.store(out_row + F, _saturating_cast(du, scale, FMT_MAX, E4M3), mask=mask)
            if TRANS:  # (2F, M): the bytes just stored, read back and transposed as loaded tiles (module docstring)
                tl.debug_barrier()  # every thread's stores above are visible to the whole program after this
                mask_t = (rn[:, None] < F) & (rm[None, :] < M)
                row8 = out_ptr.to(tl.pointer_type(tl.uint8)) + rm[:, None] * (2 * F) + rn[None, :]
                out_t8 = out_t_ptr.to(tl.pointer_type(tl.uint8)) + rn[:, None] * M + rm[None, :]
                tl.store(out_t8, tl.trans(tl.load(row8, mask=mask, other=0)), mask=mask_t)
                tl.store(out_t8 + F * M, tl.trans(tl.load(row8 + F, mask=mask, other=0)), mask=mask_t)
        if AMAX:
            a_g, a_u = _tile_amax(dg), _tile_amax(du)
            a = tl.where((a_g != a_g) | (a_u != a_u), float("nan"), tl.maximum(a_g, a_u))
            tl.store(partial_ptr + pid_m * tl.num_programs(1) + pid_n, a)


def _check(gu: torch.Tensor, da: torch.Tensor, gu_scale: torch.Tensor | None = None):
    """``(gu, da, gu_scale)`` checked, with unit-stride rows (copies only where a row is strided)."""
    if gu.dim() != 2 or da.dim() != 2 or gu.shape[1] != 2 * da.shape[1] or gu.shape[0] != da.shape[0]:
        raise ValueError(f"swiglu backward: gu must be (M, 2F) and da (M, F), got {tuple(gu.shape)} and "
                         f"{tuple(da.shape)}")
    if not da.is_floating_point() or da.element_size() < 2:
        raise ValueError(f"swiglu backward: da must be float16, bfloat16 or float32, got {da.dtype}")
    if gu_scale is None:
        if not gu.is_floating_point() or gu.element_size() < 2:
            raise ValueError(f"swiglu backward: gu must be float16, bfloat16 or float32 (or float8_e4m3fn with "
                             f"gu_scale), got {gu.dtype}")
    else:
        if gu.dtype != torch.float8_e4m3fn:
            raise ValueError(f"swiglu backward: gu_scale is for an E4M3 gu (fp8lm.nn.activations.quantize_rows), "
                             f"got gu of {gu.dtype}")
        if gu_scale.shape != (gu.shape[0], 1) or gu_scale.dtype != torch.float32:
            raise ValueError(f"swiglu backward: gu_scale must be float32 of shape ({gu.shape[0]}, 1), one scale per "
                             f"row of gu, got {gu_scale.dtype} {tuple(gu_scale.shape)}")
        gu_scale = gu_scale.contiguous()
    return (gu if gu.stride(1) == 1 else gu.contiguous()), (da if da.stride(1) == 1 else da.contiguous()), gu_scale


def _grad_hp(gu: torch.Tensor, da: torch.Tensor, gu_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[dg | du]`` in float32 (the module docstring's formulas); an E4M3 ``gu`` is divided by its row scales."""
    gu32 = gu.float() if gu_scale is None else dequantize(gu, gu_scale, torch.float32)
    g, u = gu32.chunk(2, dim=-1)  # (M, F) each
    da = da.float()
    sig = torch.sigmoid(g)
    return torch.cat([da * u * sig * (1 + g * (1 - sig)), da * g * sig], dim=-1)  # (M, 2F)


def swiglu_backward_cast_reference(gu: torch.Tensor, da: torch.Tensor, fmt: Format | str, scale: torch.Tensor,
                                   with_amax: bool = False, gu_scale: torch.Tensor | None = None):
    """The plain-torch twin of ``swiglu_backward_cast``: ``(dgu_fp8, dgu_fp8_t, amax | None)``."""
    gu, da, gu_scale = _check(gu, da, gu_scale)
    dgu = _grad_hp(gu, da, gu_scale)  # (M, 2F) float32
    dgu_fp8 = quantize(dgu, get_format(fmt), scale)
    return dgu_fp8, dgu_fp8.t().contiguous(), (amax(dgu) if with_amax else None)


def _use_kernel(gu: torch.Tensor) -> bool:
    return gu.is_cuda and triton_available(gu.device) and gu.numel() > 0


def _kernel_inputs(gu: torch.Tensor, gu_scale: torch.Tensor | None) -> dict:
    """The kernel's ``gu`` arguments: E4M3 bytes as uint8 with their row scales, or the 16/32-bit tensor."""
    if gu_scale is None:
        return dict(gu_ptr=gu, gu_scale_ptr=gu, GU_FP8=False)
    return dict(gu_ptr=gu.view(torch.uint8), gu_scale_ptr=gu_scale, GU_FP8=True)


def _fake_swiglu_grad_amax(gu, da, gu_scale=None):
    return gu.new_empty((), dtype=torch.float32)


def swiglu_grad_amax(gu: torch.Tensor, da: torch.Tensor, gu_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``max |dgu|`` (float32 scalar; NaN if any element is NaN) without writing ``dgu``: the first of
    two passes when the cast's scale needs the amax first (current scaling, a delayed history's first step).
    ``gu_scale`` as in ``swiglu_backward_cast``. Triton on CUDA, the twin elsewhere; compiled code calls it
    as the operator ``fp8lm::swiglu_grad_amax``."""
    return (_swiglu_grad_amax_op if torch.compiler.is_compiling() else _swiglu_grad_amax)(gu, da, gu_scale)


def _swiglu_grad_amax(gu: torch.Tensor, da: torch.Tensor, gu_scale: torch.Tensor | None = None) -> torch.Tensor:
    gu, da, gu_scale = _check(gu, da, gu_scale)
    if not _use_kernel(gu):
        return amax(_grad_hp(gu, da, gu_scale))
    m, f = da.shape
    grid = _grid(m, f, _BLOCK_M, _BLOCK_N)
    partial = torch.empty(grid, dtype=torch.float32, device=gu.device)
    _launch(_swiglu_bwd_kernel)[grid](**_kernel_inputs(gu, gu_scale), da_ptr=da, scale_ptr=partial, out_ptr=partial,
                                      out_t_ptr=partial, partial_ptr=partial, M=m, F=f, stride_gu=gu.stride(0),
                                      stride_da=da.stride(0), FMT_MAX=448.0, E4M3=True, CAST=False, AMAX=True,
                                      BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, TRANS=False, num_warps=_WARPS)
    return partial.amax()


_swiglu_grad_amax_op = _operator("fp8lm::swiglu_grad_amax", _fake_swiglu_grad_amax)(_swiglu_grad_amax)


def _fake_swiglu_backward_cast(gu, da, scale, fmt, with_amax, gu_scale=None):
    m, f = da.shape
    dtype = get_format(fmt).dtype
    return (gu.new_empty((m, 2 * f), dtype=dtype), gu.new_empty((2 * f, m), dtype=dtype),
            gu.new_empty((), dtype=torch.float32))


def _swiglu_backward_cast(gu: torch.Tensor, da: torch.Tensor, scale: torch.Tensor, fmt: str, with_amax: bool,
                          gu_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gu, da, gu_scale = _check(gu, da, gu_scale)
    fmt_ = get_format(fmt)
    if not _use_kernel(gu):
        dgu_fp8, dgu_fp8_t, a = swiglu_backward_cast_reference(gu, da, fmt_, scale, with_amax, gu_scale)
        return dgu_fp8, dgu_fp8_t, (a if with_amax else gu.new_zeros((), dtype=torch.float32))
    m, f = da.shape
    grid = _grid(m, f, _BLOCK_M, _BLOCK_N)
    out = torch.empty(m, 2 * f, dtype=fmt_.dtype, device=gu.device)
    out_t = torch.empty(2 * f, m, dtype=fmt_.dtype, device=gu.device)
    partial = torch.empty(grid, dtype=torch.float32, device=gu.device)
    _launch(_swiglu_bwd_kernel)[grid](**_kernel_inputs(gu, gu_scale), da_ptr=da, scale_ptr=scale.reshape(1).float(),
                                      out_ptr=out, out_t_ptr=out_t, partial_ptr=partial, M=m, F=f,
                                      stride_gu=gu.stride(0), stride_da=da.stride(0), FMT_MAX=fmt_.max,
                                      E4M3=fmt_.name == "e4m3", CAST=True, AMAX=with_amax, BLOCK_M=_BLOCK_M,
                                      BLOCK_N=_BLOCK_N, TRANS=True, num_warps=_WARPS)
    return out, out_t, (partial.amax() if with_amax else partial.new_zeros(()))


_swiglu_backward_cast_op = _operator("fp8lm::swiglu_backward_cast", _fake_swiglu_backward_cast)(_swiglu_backward_cast)


def swiglu_backward_cast(gu: torch.Tensor, da: torch.Tensor, fmt: Format | str, scale: torch.Tensor,
                         with_amax: bool = False, gu_scale: torch.Tensor | None = None):
    """SwiGLU's input gradient cast to FP8 in one pass: ``(dgu_fp8, dgu_fp8_t, amax | None)``.

    ``gu`` (M, 2F) is the saved ``[g | u]``, ``da`` (M, F) the gradient of ``silu(g) * u``; ``dgu_fp8``
    (M, 2F) and its transposed copy ``dgu_fp8_t`` (2F, M) are ``dgu`` cast with ``scale`` (a one-element
    float32 tensor) to ``fmt``; ``amax`` is ``max |dgu|`` when ``with_amax``. ``gu`` may be saved in FP8
    (level O2's FP8-saved activations): E4M3 with ``gu_scale``, float32 (M, 1), one power-of-two scale per
    row (``fp8lm.nn.activations.quantize_rows``); it is read as ``gu / gu_scale``. Triton on CUDA, the
    twin elsewhere (module docstring).

    Compiled code calls it as the operator ``fp8lm::swiglu_backward_cast`` (a ``triton_op``: Inductor
    launches the kernel); eager code launches the kernel directly, without the operator's dispatch.
    """
    fmt = get_format(fmt)
    if scale.numel() != 1:
        raise ValueError(f"scale must have one element, got shape {tuple(scale.shape)}")
    call = _swiglu_backward_cast_op if torch.compiler.is_compiling() else _swiglu_backward_cast
    dgu_fp8, dgu_fp8_t, a = call(gu, da, scale, fmt.name, bool(with_amax), gu_scale)
    return dgu_fp8, dgu_fp8_t, (a if with_amax else None)
