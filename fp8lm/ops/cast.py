"""Fused amax + FP8 cast (+ transposed copy) of a 2-D high-precision tensor: Triton on GPUs, plain torch twin.

Numerics (bit for bit those of ``fp8lm.formats.amax`` and ``fp8lm.formats.quantize``)::

    amax     = max |x|                       float32; NaN if x holds a NaN (inf if it holds an inf)
    x_fp8    = cast_rne(clamp(f32(x) * scale, -fmt.max, fmt.max) + (x - x))
    x_fp8_t  = x_fp8.T, contiguous            the same bytes in the other layout

``+ (x - x)`` adds 0 where x is finite and NaN where it is inf or NaN, so a non-finite input is NaN in
FP8, never a saturated finite value (``formats.py``). The cast rounds to nearest even; the clamp
comes first, so no value overflows. The transposed copy exists because ``torch._scaled_mm`` wants
its first operand row-major and its second column-major: the weight-gradient GEMM reads
``x`` and ``grad_out`` transposed, and writing both layouts while the tile is in registers saves a
separate pass (read 1 byte, write 1 byte per element) in backward.

Bytes per element of a BF16 input (the floor is memory bandwidth; no arithmetic to speak of):

* plain torch, eager (the twin): ``x.abs()`` + ``amax`` (6 bytes), then ``float()``, ``* scale``,
  ``clamp_``, ``x - x``, ``+=``, ``to(fp8)`` (about 45 bytes with the float32 temporaries), then a
  transposed ``contiguous()`` (2 bytes): about 50 bytes.
* here: with a known scale (delayed/static scaling) one pass reads x (2 bytes), writes x_fp8 and
  x_fp8_t (2 bytes) and one partial amax per tile: 4 bytes. Current scaling needs the amax before
  the cast: one extra read-only pass (2 bytes), 6 in all; the partial amaxes (one float32 per
  tile) are reduced by ``torch.amax`` (which propagates NaN like ``formats.amax``).

An FP8 weight gradient (``encode_pow2``) is stored with a power-of-two scale from its own amax, which
plain code finds in two passes (amax, then cast: read 2 + 2 bytes, write 1). Here the cast runs first
with a guessed scale (the layer's scale of the step before) and measures the amax in the same pass; the
scale that amax gives is then compared with the guess on the device, and a second kernel casts again
only where they differ (its programs do nothing otherwise). The result is always the plain code's;
the second read happens only on the steps where the scale moves to another power of two.

``backend="auto"`` takes Triton for CUDA tensors when Triton imports, the twin otherwise (CPUs: the
twin is the CPU path and the GPU test's oracle, ``tests/test_cast.py``). ``backend="triton"`` on a
CPU tensor runs the kernels in Triton's interpreter when ``TRITON_INTERPRET=1`` (a debugging aid).
"""
from __future__ import annotations

import os

import torch

from fp8lm.formats import Format, amax, get_format, quantize, scale_from_amax

__all__ = ["fused_amax", "fused_cast", "cast_transpose_amax", "cast_reference", "transpose_fp8", "triton_available",
           "encode_pow2", "encode_pow2_reference", "encode_pow2_op", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")
_BLOCK_M, _BLOCK_N = 64, 64  # the amax kernel's tile
# The cast kernel's tile, warps and transposed-copy form per input kind: (BLOCK_M, BLOCK_N, warps, RELOAD).
# Measured on the H100 (``benchmarks/cast_sweep.py``, tenth session; the bytes do not depend on any of it):
# a 16-bit input, tile transposed in registers: 64 x 256 with 8 warps 56.7 / 276 / 105 us at x 16384x2048 /
# grad 16384x11264 / x 8192x8192 against 72 / 281 / 106 for the earlier 64 x 128 with 4 warps (a BF16 copy of
# the same input: 48 / 247 / 93 us). A ScaledTensor's FP16 data (in_scale, the weights' casts): the copy
# made from the bytes just stored (RELOAD) 85 / 123 us at 11264x2048 / 8192x8192 against 102 / 227 us with
# the register transpose; with ``_unscale``'s multiply in place of a division per element (twelfth session,
# ``benchmarks/graph_probe.py cast``, kernel time from CUDA graph replays) 39 / 104 us against 44 / 116, and
# still ahead of every register-transpose tile tried (40-90 / 105-208 us). Float32 inputs always reload (the
# Triton fault described in ``fused_cast``).
_CAST_CONFIG = {"16bit": (64, 256, 8, False), "in_scale": (64, 128, 8, True), "float32": (64, 128, 4, True)}
_T_BLOCK = 128  # the byte transpose's square tile: 128-byte rows in and out


try:  # Triton is optional: without it (CPUs) every function here runs the plain-torch twin
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _tile_amax(x):
        """max |x| of a float32 tile; NaN if the tile holds a NaN (``tl.max`` alone would skip it)."""
        a = tl.max(tl.max(tl.abs(x), 1), 0)
        n_nan = tl.sum(tl.sum((x != x).to(tl.int32), 1), 0)
        return tl.where(n_nan > 0, float("nan"), a)

    @triton.jit
    def _saturating_cast(x, scale, FMT_MAX: tl.constexpr, E4M3: tl.constexpr):
        """``formats.quantize`` of a float32 tile: scale, clamp, non-finite to NaN, round to nearest even."""
        y = x * scale
        y = tl.where(y > FMT_MAX, FMT_MAX, y)  # comparisons, not min/max: NaN must stay NaN
        y = tl.where(y < -FMT_MAX, -FMT_MAX, y)
        y = y + (x - x)  # + 0 where finite (-0 becomes +0, as in the twin), NaN where x is inf or NaN
        if E4M3:  # one return, the format chosen at compile time (Triton 3.6 compiled both returns of an early one)
            y8 = y.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        else:
            y8 = y.to(tl.float8e5, fp_downcast_rounding="rtne")
        return y8

    @triton.jit
    def _unscale(x, s_in):
        """``x / s_in`` rounded to nearest (``tl.div_rn``), as a multiply where that is the same number: for a
        power-of-two ``s_in`` whose reciprocal is a normal float32 (every master weight's scale), ``1 / s_in``
        is exact and so is ``x * (1 / s_in)``. A float32 division is a long instruction sequence; it made the
        weights' casts compute-bound on the H100."""
        bits = s_in.to(tl.int32, bitcast=True)
        biased_exp = (bits >> 23) & 0xFF
        if ((bits & 0x7FFFFF) == 0) & (biased_exp > 1) & (biased_exp < 253):
            x = x * tl.div_rn(1.0, s_in)
        else:
            x = tl.div_rn(x, s_in)
        return x

    @triton.jit
    def _amax_kernel(x_ptr, partial_ptr, M, N, stride_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        x = tl.load(x_ptr + rm[:, None] * stride_m + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(partial_ptr + pid_m * tl.num_programs(1) + pid_n, _tile_amax(x))

    @triton.jit
    def _cast_kernel(x_ptr, scale_ptr, out_ptr, out_t_ptr, partial_ptr, M, N, stride_m,
                     FMT_MAX: tl.constexpr, E4M3: tl.constexpr, TRANSPOSE: tl.constexpr, TRANS_TILE: tl.constexpr,
                     AMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, in_scale_ptr=None,
                     IN_SCALE: tl.constexpr = False, RELOAD: tl.constexpr = False):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        x = tl.load(x_ptr + rm[:, None] * stride_m + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        if IN_SCALE:  # a ScaledTensor's _data: its true value first, as ``dequantize`` divides
            x = _unscale(x, tl.load(in_scale_ptr))
        y8 = _saturating_cast(x, tl.load(scale_ptr), FMT_MAX, E4M3)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], y8, mask=mask)
        if TRANSPOSE:
            if RELOAD:  # the bytes just stored, read back after a barrier and transposed as a loaded tile
                tl.debug_barrier()
                mask_t = (rn[:, None] < N) & (rm[None, :] < M)
                row8 = out_ptr.to(tl.pointer_type(tl.uint8)) + rm[:, None] * N + rn[None, :]
                out_t8 = out_t_ptr.to(tl.pointer_type(tl.uint8)) + rn[:, None] * M + rm[None, :]
                tl.store(out_t8, tl.trans(tl.load(row8, mask=mask, other=0)), mask=mask_t)
            elif TRANS_TILE:  # transpose the tile in registers/shared memory, then coalesced stores
                mask_t = (rn[:, None] < N) & (rm[None, :] < M)
                tl.store(out_t_ptr + rn[:, None] * M + rm[None, :], tl.trans(y8), mask=mask_t)
            else:  # strided stores straight from the tile's layout
                tl.store(out_t_ptr + rn[None, :] * M + rm[:, None], y8, mask=mask)
        if AMAX:
            tl.store(partial_ptr + pid_m * tl.num_programs(1) + pid_n, _tile_amax(x))


    @triton.jit
    def _recast_kernel(x_ptr, scale_ptr, used_ptr, out_ptr, M, N, stride_m, FMT_MAX: tl.constexpr,
                       E4M3: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """``out`` = the cast of ``x`` with ``scale``, written only if ``out`` was cast with another scale
        (``used``); otherwise every program ends after two scalar loads."""
        scale = tl.load(scale_ptr)
        if scale != tl.load(used_ptr):
            pid_m, pid_n = tl.program_id(0), tl.program_id(1)
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = (rm[:, None] < M) & (rn[None, :] < N)
            x = tl.load(x_ptr + rm[:, None] * stride_m + rn[None, :], mask=mask, other=0.0).to(tl.float32)
            y8 = _saturating_cast(x, scale, FMT_MAX, E4M3)
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], y8, mask=mask)

    @triton.jit
    def _transpose_kernel(x_ptr, out_ptr, M, N, BLOCK: tl.constexpr):
        """(M, N) row-major bytes to (N, M) row-major: one tile in, transposed on chip, one tile out."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK + tl.arange(0, BLOCK)
        rn = pid_n * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N))
        tl.store(out_ptr + rn[:, None] * M + rm[None, :], tl.trans(x), mask=(rn[:, None] < N) & (rm[None, :] < M))


def _launch(kernel):
    """``kernel`` as code traced by ``torch.compile`` may launch it (``torch.library.wrap_triton``; eager:
    the kernel itself)."""
    wrap = getattr(torch.library, "wrap_triton", None)
    return kernel if wrap is None else wrap(kernel)


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``: a CUDA device and an importable Triton, or
    any device under Triton's interpreter (``TRITON_INTERPRET=1``, which runs kernels on the CPU)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _use_triton(x_hp: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "triton" and not triton_available(x_hp.device):
        raise ValueError(f"backend 'triton' needs a CUDA tensor and an importable Triton; got a {x_hp.device} tensor")
    return backend == "triton" or (backend == "auto" and x_hp.is_cuda and triton_available(x_hp.device))


def _check_2d(x_hp: torch.Tensor) -> torch.Tensor:
    if x_hp.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x_hp.shape)}")
    if not x_hp.is_floating_point() or x_hp.element_size() < 2:
        raise ValueError(f"expected a float16, bfloat16 or float32 tensor, got {x_hp.dtype}")
    return x_hp if x_hp.stride(1) == 1 else x_hp.contiguous()


def _grid(m: int, n: int, block_m: int = _BLOCK_M, block_n: int = _BLOCK_N) -> tuple[int, int]:
    return (-(-m // block_m), -(-n // block_n))


def _cast_config(x_hp: torch.Tensor, in_scale: torch.Tensor | None) -> tuple[int, int, dict, bool]:
    """The cast kernel's (BLOCK_M, BLOCK_N, launch options, RELOAD) for this input (``_CAST_CONFIG``; the
    interpreter takes no launch options)."""
    kind = "float32" if x_hp.dtype == torch.float32 else "in_scale" if in_scale is not None else "16bit"
    block_m, block_n, warps, reload = _CAST_CONFIG[kind]
    return block_m, block_n, ({"num_warps": warps} if x_hp.is_cuda else {}), reload


def fused_amax(x_hp: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``formats.amax(x_hp)`` of a 2-D tensor: one read-only pass (Triton) and a tiny reduction."""
    x_hp = _check_2d(x_hp)
    if not _use_triton(x_hp, backend) or x_hp.numel() == 0:
        return amax(x_hp)
    m, n = x_hp.shape
    grid = _grid(m, n)
    partial = torch.empty(grid, dtype=torch.float32, device=x_hp.device)
    _launch(_amax_kernel)[grid](x_hp, partial, m, n, x_hp.stride(0), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N)
    return partial.amax()


def cast_reference(x_hp: torch.Tensor, fmt: Format | str, scale: torch.Tensor, transpose: bool = False,
                   with_amax: bool = False, in_scale: torch.Tensor | None = None):
    """The plain-torch twin of ``fused_cast`` (same arguments, same results, bit for bit)."""
    fmt = get_format(fmt)
    x_hp = _check_2d(x_hp)
    if in_scale is not None:
        x_hp = x_hp.float() / in_scale  # a ScaledTensor's dequantize()
    x_fp8 = quantize(x_hp, fmt, scale)  # (M, N)
    x_fp8_t = x_fp8.t().contiguous() if transpose else None  # (N, M)
    return x_fp8, x_fp8_t, (amax(x_hp) if with_amax else None)


def fused_cast(x_hp: torch.Tensor, fmt: Format | str, scale: torch.Tensor, transpose: bool = False,
               with_amax: bool = False, backend: str = "auto", trans_tile: bool = True,
               in_scale: torch.Tensor | None = None):
    """Cast a 2-D tensor to FP8 with ``scale`` in one pass; returns ``(x_fp8, x_fp8_t, amax)``.

    ``x_fp8`` is (M, N) row-major; ``x_fp8_t`` its (N, M) row-major transpose when ``transpose``
    (else None); ``amax`` = ``formats.amax(x_hp)`` from the same pass when ``with_amax`` (else
    None). ``scale`` is a float32 tensor with one element on ``x_hp``'s device. ``trans_tile``
    picks how the Triton kernel writes the transpose of a 16-bit input (tile transposed on chip, or
    strided stores); the transpose of a float32 input, or of one with ``in_scale``, is always made from
    the FP8 bytes just stored, read back.
    ``in_scale`` (a one-element float32 tensor, or None): ``x_hp`` is the ``_data`` of a
    ``ScaledTensor`` with this ``_scale``; the values cast (and the amax) are ``x_hp / in_scale``,
    as ``dequantize()`` gives them, without the float32 copy (an FP16 master is read at 2 bytes).
    """
    fmt = get_format(fmt)
    x_hp = _check_2d(x_hp)
    for name, s in (("scale", scale), ("in_scale", in_scale)):
        if s is not None and s.numel() != 1:
            raise ValueError(f"{name} must have one element, got shape {tuple(s.shape)}")
    if not _use_triton(x_hp, backend) or x_hp.numel() == 0:
        return cast_reference(x_hp, fmt, scale, transpose, with_amax, in_scale)
    m, n = x_hp.shape
    block_m, block_n, options, reload = _cast_config(x_hp, in_scale)
    grid = _grid(m, n, block_m, block_n)
    # Triton 3.6 on the H100 wrote wrong transposed bytes from FLOAT32 tiles whose sizes are multiples
    # of 16, with either store (``benchmarks/cast_debug.py``; the row-major bytes were right): a float32
    # input's transposed copy is made from the bytes the program has just stored, read back (RELOAD; the
    # form ``fp8lm.ops.swiglu`` uses, ``benchmarks/trans_pack_debug.py``). FP16 data with ``in_scale``
    # takes the same form because it is faster there (``_CAST_CONFIG``).
    x_fp8 = torch.empty(m, n, dtype=fmt.dtype, device=x_hp.device)
    x_fp8_t = torch.empty(n, m, dtype=fmt.dtype, device=x_hp.device) if transpose else None
    partial = torch.empty(grid, dtype=torch.float32, device=x_hp.device) if with_amax else None
    scale = scale.reshape(1).float()
    _launch(_cast_kernel)[grid](x_hp, scale, x_fp8, x_fp8_t if transpose else x_fp8,
                                partial if with_amax else x_fp8, m, n, x_hp.stride(0),
                                FMT_MAX=fmt.max, E4M3=fmt.name == "e4m3", TRANSPOSE=transpose,
                                TRANS_TILE=trans_tile, AMAX=with_amax, BLOCK_M=block_m, BLOCK_N=block_n,
                                in_scale_ptr=scale if in_scale is None else in_scale.reshape(1).float(),
                                IN_SCALE=in_scale is not None, RELOAD=reload, **options)
    return x_fp8, x_fp8_t, (partial.amax() if with_amax else None)


def encode_pow2_reference(x_hp: torch.Tensor, fmt: Format | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch twin of ``encode_pow2``: ``(x_fp8, scale)`` with the power-of-two scale of ``x_hp``'s
    amax (``scale_from_amax(amax, fmt, pow2=True)``), as ``ScaledTensor.from_hp(x_hp, fmt.dtype)`` stores it."""
    fmt = get_format(fmt)
    scale = scale_from_amax(amax(x_hp), fmt, pow2=True)
    return quantize(x_hp, fmt, scale), scale


def encode_pow2(x_hp: torch.Tensor, fmt: Format | str, guess: torch.Tensor,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_pow2_reference(x_hp, fmt)`` (the same bits) in one pass over ``x_hp`` when ``guess`` (a
    one-element float32 tensor) is the scale it comes to, two otherwise (module docstring). The caller
    keeps the returned scale as the next call's guess. No host synchronization either way."""
    fmt = get_format(fmt)
    x_hp = _check_2d(x_hp)
    if guess.numel() != 1:
        raise ValueError(f"guess must have one element, got shape {tuple(guess.shape)}")
    if not _use_triton(x_hp, backend) or x_hp.numel() == 0:
        return encode_pow2_reference(x_hp, fmt)
    used = guess.reshape(1).float()
    x_fp8, _, a = fused_cast(x_hp, fmt, used, with_amax=True, backend=backend)
    scale = scale_from_amax(a, fmt, pow2=True)
    m, n = x_hp.shape
    block_m, block_n, options, _ = _cast_config(x_hp, None)
    _launch(_recast_kernel)[_grid(m, n, block_m, block_n)](
        x_hp, scale.reshape(1), used, x_fp8, m, n, x_hp.stride(0), FMT_MAX=fmt.max, E4M3=fmt.name == "e4m3",
        BLOCK_M=block_m, BLOCK_N=block_n, **options)
    return x_fp8, scale


def _operator(name: str, fake):
    """Register the decorated function as the torch operator ``name`` (schema from its annotations).

    With Triton importable it is a ``torch.library.triton_op``: ``torch.compile`` traces its body, so
    Inductor launches its Triton kernels from the compiled code like its own, without the Python
    dispatch of an opaque operator (a ``custom_op``'s call cost about 150-250 us of host time per call
    on the H100's host, ``benchmarks/gemm_probe.py``), and still never fuses them with other kernels.
    Without Triton (CPUs) it is a ``custom_op`` with ``fake`` as its shape function."""
    def register(fn):
        if triton is not None and hasattr(torch.library, "triton_op"):
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return register


def _fake_cast_transpose_amax(x_hp, scale, fmt, in_scale=None):
    m, n = x_hp.shape
    dtype = get_format(fmt).dtype
    return (x_hp.new_empty((m, n), dtype=dtype), x_hp.new_empty((n, m), dtype=dtype),
            x_hp.new_empty((), dtype=torch.float32))


@_operator("fp8lm::cast_transpose_amax", _fake_cast_transpose_amax)
def cast_transpose_amax(x_hp: torch.Tensor, scale: torch.Tensor, fmt: str,
                        in_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused_cast(x_hp, fmt, scale, transpose=True, with_amax=True, in_scale=in_scale)`` as one
    torch operator.

    ``torch.compile`` keeps its kernel whole (Triton on CUDA, the twin elsewhere) instead of letting
    Inductor re-fuse its parts, so a compiled FP8 linear can use the one-pass kernel; returns
    ``(x_fp8, x_fp8_t, amax)``.
    """
    return fused_cast(x_hp, fmt, scale, transpose=True, with_amax=True, in_scale=in_scale)


def _fake_encode_pow2(x_hp, guess, fmt):
    return x_hp.new_empty(x_hp.shape, dtype=get_format(fmt).dtype), x_hp.new_empty((), dtype=torch.float32)


@_operator("fp8lm::encode_pow2", _fake_encode_pow2)
def encode_pow2_op(x_hp: torch.Tensor, guess: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_pow2(x_hp, fmt, guess)`` as one torch operator (how compiled code calls it: the kernels are
    launched from Inductor's code, never re-fused)."""
    return encode_pow2(x_hp, fmt, guess)


def _fake_transpose_fp8(x_fp8):
    m, n = x_fp8.shape
    return x_fp8.new_empty((n, m))


@_operator("fp8lm::transpose_fp8", _fake_transpose_fp8)
def transpose_fp8(x_fp8: torch.Tensor) -> torch.Tensor:
    """``x_fp8.t().contiguous()`` of a 2-D FP8 (or any 1-byte) tensor, as one torch operator.

    On CUDA with Triton a tiled byte transpose (``_transpose_kernel``), else torch's copy; the bytes
    are the same either way. Compiled FP8 linears call it for the transposed operands of the
    weight-gradient GEMM: as a kernel of its own it keeps Inductor from writing the transposed
    copy from inside the kernel that makes ``x_fp8`` (byte stores a row apart, which ran that kernel
    at about half of memory bandwidth on the H100, ``benchmarks/RESULTS.md``).
    """
    if x_fp8.dim() != 2 or x_fp8.element_size() != 1:
        raise ValueError(f"transpose_fp8 needs a 2-D 1-byte tensor, got shape {tuple(x_fp8.shape)} {x_fp8.dtype}")
    m, n = x_fp8.shape
    out = torch.empty(n, m, dtype=x_fp8.dtype, device=x_fp8.device)  # never an alias of the input
    if not (x_fp8.is_cuda and triton_available(x_fp8.device)) or x_fp8.numel() == 0:
        return out.copy_(x_fp8.t())
    x_fp8 = x_fp8.contiguous()
    grid = _grid(m, n, _T_BLOCK, _T_BLOCK)
    _launch(_transpose_kernel)[grid](x_fp8.view(torch.uint8), out.view(torch.uint8), m, n, BLOCK=_T_BLOCK,
                                     num_warps=8)
    return out
