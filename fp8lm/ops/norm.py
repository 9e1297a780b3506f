"""L2 norms of many FP8 tensors read as FP8 bytes: what ``clip_grad_norm_`` needs from FP8 gradients.

Numerics::

    norm_i = sqrt(sum_j f32(x_ij)^2) / |scale_i|          one float32 per tensor

Every FP8 value is exact in float32, and so is its square (at most 2 x 4 significant bits), so the
only rounding is in the float32 sums: each Triton program sums the squares of one block of
``_BLOCK`` elements (a tree inside the block), and the per-block partials of all tensors, one row
of a zeroed (tensors x blocks) float32 buffer per tensor, are summed by one ``torch.sum`` over the
rows. The order is fixed, so results are deterministic; against a float64 reference the relative
error is a few float32 ulps (``tests/test_norm.py``). A NaN (E4M3 bytes 0x7F/0xFF, E5M2 NaN) or an
E5M2 inf makes that tensor's norm NaN or inf, as ``torch.linalg.vector_norm`` does.

Why: the plain path (the twin here) widens each FP8 tensor to bfloat16 (read 1 byte, write 2)
before ``vector_norm`` reads it again (2 bytes), in several launches per tensor. Here each tensor is
read once (1 byte per element) in one launch, and the reduction of all tensors' partials, the
square roots and the divisions by their scales take four launches in all
(``fp8lm.optim.clip_grad_norm_``).
"""
from __future__ import annotations

import torch

from fp8lm.ops.cast import triton, triton_available

if triton is not None:
    import triton.language as tl

__all__ = ["fp8_l2_norms", "fp8_l2_norms_reference", "fused_norms_supported"]

_BLOCK = 8192
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)

if triton is not None:
    @triton.jit
    def _sumsq_kernel(x_ptr, partial_ptr, n, E4M3: tl.constexpr, BLOCK: tl.constexpr):
        """partial[pid] = sum of squares of one block of FP8 bytes (passed as uint8)."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        bits = tl.load(x_ptr + offs, mask=mask, other=0)
        if E4M3:
            x = bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            x = tl.where((bits & 0x7F) == 0x7F, float("nan"), x)  # NaN bytes (the interpreter reads 480)
        else:  # inf and NaN bytes decoded by hand as well (the interpreter reads them as finite)
            x = bits.to(tl.float8e5, bitcast=True).to(tl.float32)
            special = (bits & 0x7C) == 0x7C
            x = tl.where(special, tl.where((bits & 0x03) == 0, float("inf"), float("nan")), x)
        tl.store(partial_ptr + pid, tl.sum(x * x, axis=0))


def fused_norms_supported(data: torch.Tensor) -> bool:
    """Whether ``fp8_l2_norms`` takes the Triton kernel for ``data``: contiguous FP8 on a Triton device."""
    return (data.dtype in _FP8 and data.is_contiguous() and triton_available(data.device)
            and not torch.compiler.is_compiling())


def fp8_l2_norms_reference(datas: list[torch.Tensor], scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """The plain-torch twin: ``vector_norm(data widened to bfloat16, dtype=float32) / |scale|`` per tensor."""
    return [torch.linalg.vector_norm(d.to(torch.bfloat16), 2, dtype=torch.float32) / s.abs().reshape(())
            for d, s in zip(datas, scales)]


def fp8_l2_norms(datas: list[torch.Tensor], scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each ``data / scale`` (FP8 ``data``, one float32 ``scale`` each), as 0-d float32
    tensors; the Triton kernel where ``fused_norms_supported`` holds for every tensor, else the twin."""
    if len(datas) != len(scales):
        raise ValueError(f"fp8_l2_norms: {len(datas)} tensors but {len(scales)} scales")
    if not datas or not all(fused_norms_supported(d) for d in datas) or len({d.device for d in datas}) != 1:
        return fp8_l2_norms_reference(datas, scales)
    device = datas[0].device
    blocks = [triton.cdiv(d.numel(), _BLOCK) for d in datas]
    partial = torch.zeros(len(datas), max(max(blocks), 1), dtype=torch.float32, device=device)  # (tensors, blocks)
    for i, (d, nb) in enumerate(zip(datas, blocks)):
        if nb:
            _sumsq_kernel[(nb,)](d.view(torch.uint8), partial[i], d.numel(),
                                 E4M3=d.dtype == torch.float8_e4m3fn, BLOCK=_BLOCK)
    scale_abs = torch.stack([s.reshape(()).float() for s in scales]).abs()  # (tensors,)
    norms = partial.sum(dim=1).sqrt_().div_(scale_abs)  # (tensors,)
    return list(norms.unbind())
