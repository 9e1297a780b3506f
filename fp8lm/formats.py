"""FP8 formats, per-tensor scales, quantize and dequantize: the reference math.

Numerics
--------
Two 8-bit float formats (OCP FP8, PyTorch's ``float8_e4m3fn`` / ``float8_e5m2``):

    format  exponent/mantissa  largest   smallest normal  smallest subnormal  use
    E4M3    4 / 3              448       2**-6            2**-9               weights, activations
    E5M2    5 / 2              57344     2**-14           2**-16              gradients (wider range)

An FP8 tensor always travels with a float32 *scale* ``s``: ``x_fp8 = cast(x_hp * s)`` and
``x_hp ~= x_fp8 / s``. With per-tensor "current" scaling ``s = fmt.max / amax(x)``, so the
largest magnitude lands on the format's largest value and the rest keep as much relative
precision as the 3 (2) mantissa bits give: about 32 dB SQNR for E4M3 and 26 dB for E5M2 on
Gaussian data. ``margin`` backs the scale off by ``2**margin``; ``pow2=True`` rounds the scale
down to a power of two, which makes ``1/s`` exact and rescaling lossless.

Casting rules, the same on every device:

* Saturation: ``x_hp * s`` is clamped to ``[-fmt.max, fmt.max]`` before the cast, so a finite
  input never becomes inf or NaN (E5M2 has inf; a plain cast of 1e6 would produce it).
* Non-finite input: a plain cast to E4M3 on the CPU turns inf into 448, which would hide an
  overflow. Here every non-finite input element (inf or NaN) becomes NaN in FP8. NaN then
  propagates through the GEMM into the output and the loss, where the training loop sees it
  and skips the step. A non-finite amax gives scale 1 (the scale itself stays finite).
* Degenerate scales: amax == 0 gives scale 1; the scale is capped at 2**100 so a tiny amax
  never makes ``1/s`` underflow or ``x * s`` overflow float32.

All functions here are plain torch and run on any device without host-device synchronization.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Format", "E4M3", "E5M2", "FORMATS", "get_format",
    "amax", "scale_from_amax", "quantize", "dequantize", "quantize_dynamic", "sqnr_db",
]

_MAX_SCALE = 2.0**100


@dataclass(frozen=True)
class Format:
    """An FP8 format: its torch dtype and the numbers that bound it."""

    name: str
    dtype: torch.dtype
    max: float
    min_normal: float
    min_subnormal: float
    mantissa_bits: int


E4M3 = Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0**-6, 2.0**-9, 3)
E5M2 = Format("e5m2", torch.float8_e5m2, 57344.0, 2.0**-14, 2.0**-16, 2)
FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


def get_format(name: str | Format) -> Format:
    """Return the ``Format`` named ``name`` ("e4m3" or "e5m2"); a ``Format`` passes through."""
    if isinstance(name, Format):
        return name
    if name not in FORMATS:
        raise ValueError(f"unknown FP8 format {name!r}; allowed: {', '.join(FORMATS)}")
    return FORMATS[name]


def amax(x: torch.Tensor) -> torch.Tensor:
    """Largest magnitude of ``x`` as a float32 0-d tensor (NaN if ``x`` holds a NaN)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.abs().amax().float()


def scale_from_amax(amax_: torch.Tensor, fmt: Format, margin: int = 0, pow2: bool = False) -> torch.Tensor:
    """Scale that maps ``amax_`` onto ``fmt.max / 2**margin``; 1 for a zero or non-finite amax."""
    amax_ = amax_.float()
    scale = (fmt.max / 2.0**margin) / amax_
    ok = torch.isfinite(amax_) & (amax_ > 0)
    scale = torch.where(ok, scale, torch.ones_like(scale)).clamp(max=_MAX_SCALE)
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return scale


def quantize(x_hp: torch.Tensor, fmt: Format, scale: torch.Tensor) -> torch.Tensor:
    """Cast ``x_hp * scale`` to ``fmt`` with saturation; non-finite elements become NaN."""
    x_f32 = x_hp.float()
    x_scaled = (x_f32 * scale).clamp_(-fmt.max, fmt.max)
    x_scaled += x_f32 - x_f32  # + 0 where x is finite, + NaN where it is inf or NaN
    return x_scaled.to(fmt.dtype)


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Back to high precision: ``x_fp8 / scale`` in ``dtype``."""
    return (x_fp8.float() / scale).to(dtype)


def quantize_dynamic(x_hp: torch.Tensor, fmt: Format | str, margin: int = 0, pow2: bool = False):
    """Current (per-tensor dynamic) scaling in one call: returns ``(x_fp8, scale)``."""
    fmt = get_format(fmt)
    scale = scale_from_amax(amax(x_hp), fmt, margin, pow2)
    return quantize(x_hp, fmt, scale), scale


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``20 log10(|ref| / |ref - out|)`` in dB, computed in float64."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    noise = torch.linalg.vector_norm(ref64 - out64)
    if not torch.isfinite(noise):
        return float("nan")
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(torch.linalg.vector_norm(ref64) / noise))
