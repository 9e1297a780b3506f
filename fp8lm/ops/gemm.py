"""The FP8 GEMM: every ``torch._scaled_mm`` call of fp8lm goes through ``fp8_mm`` here.

``torch._scaled_mm(a, b, scale_a, scale_b, out_dtype)`` computes ``(a * scale_a) @ (b * scale_b)``
with FP8 operands, a float32 accumulator and *dequantization* factors as scales (``1 / s`` for a
tensor quantized as ``cast(x * s)``). On CUDA (cuBLASLt) it accepts only:

* ``a`` row-major (``a.stride(1) == 1``) and ``b`` column-major (``b.stride(0) == 1``);
* ``a.shape[1]`` (K) and both dims of ``b`` (K, N) multiples of 16;
* dtype pairs E4M3 x E4M3, E4M3 x E5M2, E5M2 x E4M3 (never E5M2 x E5M2);
* float32 scales with one element each (per-tensor scaling).

The CPU kernel accepts more than that, so CI on a CPU could pass while the GPU refuses. Hence
``check_scaled_mm_args`` enforces CUDA's contract on every device, and ``fp8_mm`` makes any
shape legal first: K or N that are not multiples of 16 are zero-padded (zeros add nothing to
the dot products) and the output is sliced back. M (rows of ``a``) is free.

On CPUs the kernel is fast only from torch 2.13 on: torch 2.11's CPU ``_scaled_mm`` is a reference
loop (measured on the lent H100 machine's CPU: 3.4 s for a 2048x128x768 product that float32 does in
4.6 ms; torch 2.13 here: 15 ms), so older versions take the emulated path on CPUs.

Where no usable FP8 GEMM exists (GPUs of compute capability < 8.9, a CPU with torch < 2.13),
``fp8_mm`` emulates: the FP8 operands are widened exactly to bfloat16, multiplied with float32
accumulation, and scaled — the same quantization error, the high-precision GEMM's speed.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

__all__ = ["fp8_mm", "check_scaled_mm_args", "fp8_gemm_supported", "ScaledMMContractError"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class ScaledMMContractError(RuntimeError):
    """A ``torch._scaled_mm`` call that CUDA would refuse (an fp8lm bug, not a user error)."""


def check_scaled_mm_args(a, b, scale_a, scale_b, out_dtype) -> None:
    """Raise ``ScaledMMContractError`` unless the call is legal for CUDA's ``_scaled_mm``."""
    def fail(msg):
        raise ScaledMMContractError(f"_scaled_mm contract: {msg} (a {tuple(a.shape)} {a.dtype} "
                                    f"stride {a.stride()}, b {tuple(b.shape)} {b.dtype} stride {b.stride()})")

    if a.dim() != 2 or b.dim() != 2:
        fail("operands must be 2-D")
    if a.dtype not in _FP8 or b.dtype not in _FP8:
        fail("operands must be float8_e4m3fn or float8_e5m2")
    if a.dtype == torch.float8_e5m2 and b.dtype == torch.float8_e5m2:
        fail("E5M2 x E5M2 is not supported")
    if a.shape[1] != b.shape[0]:
        fail("inner dimensions differ")
    if a.shape[1] % 16 or b.shape[0] % 16 or b.shape[1] % 16:
        fail("K and N must be multiples of 16")
    if a.stride(1) != 1 or a.stride(0) < max(1, a.shape[1]):
        fail("a must be row-major")
    if b.stride(0) != 1 or b.stride(1) < max(1, b.shape[0]):
        fail("b must be column-major")
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        if s.dtype != torch.float32 or s.numel() != 1:
            fail(f"{name} must be a float32 tensor with one element")
    if out_dtype not in _OUT_DTYPES:
        fail(f"out_dtype must be one of {_OUT_DTYPES}")


_CPU_PROBE: dict[str, bool] = {}  # the answer of _cpu_scaled_mm_works, computed once


@torch.compiler.assume_constant_result  # compiled code reads the probe's answer, never traces it
def _cpu_scaled_mm_works() -> bool:
    if "ok" not in _CPU_PROBE:
        _CPU_PROBE["ok"] = _probe_cpu_scaled_mm()
    return _CPU_PROBE["ok"]


def _probe_cpu_scaled_mm() -> bool:
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 13):
        return False  # a slow reference kernel before 2.13 (see the module docstring)
    try:
        a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
        one = torch.ones((), dtype=torch.float32)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def fp8_gemm_supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` runs usably on ``device`` (CUDA capability >= 8.9; CPU with torch >= 2.13)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    if device.type == "cpu":
        return _cpu_scaled_mm_works()
    return False


@functools.lru_cache(maxsize=None)
def _warn_emulation(device_desc: str) -> None:
    warnings.warn(f"fp8lm: no FP8 GEMM on {device_desc}; FP8 layers run emulated "
                  "(FP8 quantization error, high-precision GEMM speed)", RuntimeWarning, stacklevel=3)


def _pad_cols(x: torch.Tensor, cols: int) -> torch.Tensor:
    """Zero-pad the last dim of a row-major FP8 matrix to ``cols`` (through a uint8 view)."""
    pad = cols - x.shape[1]
    if pad == 0:
        return x
    return F.pad(x.contiguous().view(torch.uint8), (0, pad)).view(x.dtype)


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def fp8_mm(a_fp8, a_inv_scale, b_fp8, b_inv_scale, out_dtype, emulate: bool = False,
           fast_accum: bool = False) -> torch.Tensor:
    """``(a_fp8 * a_inv_scale) @ (b_fp8 * b_inv_scale)`` in ``out_dtype``.

    ``a_fp8`` is (M, K), ``b_fp8`` is (K, N); either layout is accepted and made legal for
    ``torch._scaled_mm`` (row-major ``a``, column-major ``b``, K and N padded to multiples of 16).
    ``emulate=True`` (or a device without FP8 GEMMs) takes the bfloat16 emulation path.
    ``fast_accum=True`` lets Hopper's FP8 tensor cores accumulate without the periodic promotion to
    float32 (``use_fast_accum``: faster, fewer accumulator bits over long K); other devices ignore it.
    """
    m, k = a_fp8.shape
    n = b_fp8.shape[1]
    if b_fp8.shape[0] != k:
        raise ScaledMMContractError(f"fp8_mm: inner dimensions differ: a {tuple(a_fp8.shape)}, b {tuple(b_fp8.shape)}")
    if emulate or not fp8_gemm_supported(a_fp8.device):
        if not emulate and not torch.compiler.is_compiling():  # (a traced warning breaks the graph)
            _warn_emulation(str(a_fp8.device))
        # autocast would run this float32 product in BF16: compiled, a layer's backward is traced under the
        # autocast that was on around its forward (eager runs it after the autocast region, in float32)
        with torch.autocast(a_fp8.device.type, enabled=False):
            out = a_fp8.to(torch.bfloat16).float() @ b_fp8.to(torch.bfloat16).float()
            return (out * (a_inv_scale * b_inv_scale)).to(out_dtype)
    k16, n16 = _round16(k), _round16(n)
    a = _pad_cols(a_fp8 if a_fp8.stride(1) == 1 else a_fp8.contiguous(), k16)
    b_t = b_fp8.t()  # (N, K), made row-major so that b = b_t.t() is column-major
    b_t = b_t if b_t.stride(1) == 1 else b_t.contiguous()
    b_t = _pad_cols(b_t, k16)
    if n16 != n:
        b_t = F.pad(b_t.view(torch.uint8), (0, 0, 0, n16 - n)).view(b_fp8.dtype)
    b = b_t.t()
    a_inv_scale = a_inv_scale.reshape(()).float()
    b_inv_scale = b_inv_scale.reshape(()).float()
    check_scaled_mm_args(a, b, a_inv_scale, b_inv_scale, out_dtype)
    out = torch._scaled_mm(a, b, scale_a=a_inv_scale, scale_b=b_inv_scale, out_dtype=out_dtype,
                           use_fast_accum=fast_accum and a.is_cuda)
    return out[:, :n] if n16 != n else out
