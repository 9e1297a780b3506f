"""Fused Triton step of ``fp8lm.optim.AdamW``: one parameter's whole update in two passes over memory.

The plain-torch step in ``adam.py`` is the reference (the "twin") and the CPU path; this module
recomputes exactly its per-element formulas (module docstring of ``adam.py``) inside one kernel
per pass instead of 15-40 small torch ops per parameter.

Passes, per parameter (flattened, contiguous):

* pass 1 (read-only; atomic max into ``scratch``, a float32[``SCRATCH_SLOTS``] device buffer): recompute
  this step's FP32 ``m``, ``v`` and, for the FP8 state, ``r = sqrt(v)`` and ``q = |m| / r`` (0 where
  r == 0), and, for an FP16 ``ScaledTensor`` master, the new FP32 weight
  ``w_new = w * (1 - lr * wd) - step_size * clamp(update)``. Reduce amax(r), amax(q), amax(|w_new|).
  Each amax is an integer max of the float32 bits of ``|x|``, which order as the values do with NaN
  above inf above every finite value, so a NaN makes the amax NaN, as ``torch.amax`` does (``tl.max``
  of floats is not specified on NaN). Each program's block maximum goes into one of ``_SPREAD`` slots
  (program id modulo ``_SPREAD``) with one atomic; readers take the max over the slots. On one slot
  the atomics of a large tensor's programs queue behind each other: spread over 8, with the bits
  replacing a second atomic for a NaN flag, the O2 step took 11.8-12.1 ms against 13.9-17.0 (llama-0.75b,
  H100, ``benchmarks/RESULTS.md``). Program 0 also copies the old scales into ``scratch`` so pass 2
  can overwrite the state's scales without a race.
* pass 2: recompute the same values bit for bit (same code), compute the new scales on the
  device from ``scratch`` (no host sync), encode and store: FP16 ``r`` (``exp_avg_sq``), E4M3
  ``q = m / r_stored`` (``exp_avg``, ``r_stored`` the FP16 value just stored, decoded), the new
  weight (FP16 master ``_data`` or the FP32 parameter in place), and the new scales.
  State "fp32" (level O1): m and v are FP32 tensors updated in place; a plain FP32 parameter
  takes pass 2 alone. A master's new scale comes from a bound on its new amax (``adam.py``,
  "Master weights"), so instead of pass 1 a small kernel reduces the *old* master's amax (reading
  its 2-byte ``_data``) and pass 2 computes the scale from it; only betas without a bound take
  pass 1. Pass 2 also reduces the amax of the FP16 bytes it stores (one atomic per block) into
  its scratch, with the new scale: the next step reads both from there instead of running the
  small kernel (48 launches, 0.8 ms per llama-0.75b step on the H100), whenever the master still
  holds those bytes (``AdamW`` compares the tensors' version counters; any other write, e.g. a
  checkpoint load, runs the kernel again). Either way the amax is the same number.

Bytes per element (level O2, FP16 master, FP8 gradient): pass 1 reads 6, pass 2 reads 6 and
writes 5, so 17 in all (the plain path moves about ten FP32 temporaries per element per op).
Level O1 (FP16 master, FP8 gradient, FP32 m and v): pass 2 reads 11 and writes 10, so 21 (23 when
the amax kernel runs, 32 with a pass 1).

Numerics, against the plain path:

* Every op of the plain path is mirrored in order: divisions are IEEE (``tl.div_rn``; by a
  power-of-two scale as a multiplication by its exact reciprocal, which rounds identically),
  square roots correctly rounded (``tl.sqrt_rn``), FMA contraction is off
  (``enable_fp_fusion=False``) and ``tl.fma`` is used exactly where torch's kernels contract
  (lerp, ``add(alpha=)``, ``addcmul``, CUDA's ``addcdiv``); dividing by a Python number multiplies
  by its FP32 reciprocal on CUDA, as torch's CUDA ``div`` does (a true division under the
  interpreter, as torch's CPU; ``CPU_ORDER`` likewise picks the CPU's ``addcdiv`` order). What
  is left: torch's CPU ``sqrt`` is not correctly rounded on every CPU (about one result in five
  differs by one FP32 ulp on an AVX-512 machine), so against the CPU twin an FP32 value can
  differ in its last bit and, rarely, a stored FP8/FP16 value by one ulp of its format. On CUDA
  the order follows torch's CUDA kernels as read from their source (not measured here: no GPU).
* E4M3 bytes are decoded in the kernel with 0x7F/0xFF as NaN (``_load_e4m3``): Triton's
  interpreter reads them as 480, which would turn a NaN gradient into a finite one.
* Rounding is done in FP32 arithmetic, not by the hardware cast: ``lo = floor(x / ulp) * ulp``
  with ``ulp`` from the exponent bits (clamped at the format's smallest normal exponent, so
  subnormals use the subnormal spacing), ``frac = x / ulp - floor(x / ulp)`` (both exact), then
  up if ``u < frac`` (stochastic, ``u = tl.rand``) or round-half-even (nearest). The result is
  representable, so the final cast is exact on every backend (the interpreter's own FP8 cast
  rounds differently from hardware). This is ``tensor.round_stochastic`` and torch's RNE cast,
  including saturation (FP8 always, FP16 state under "nearest" as ``formats.quantize`` does) and
  non-finite values (FP8: NaN; FP16 state: NaN under "nearest", kept under "stochastic";
  master: kept). Stochastic results are one of the two neighbours of the exact value, like the
  twin's, but drawn from Philox (``tl.rand(seed, offset)``) instead of torch's generator: one
  seed per parameter per step comes from the optimizer's CPU generator (saved in
  ``state_dict()``), so fused runs are reproducible and resume exactly.
* Scales: ``formats.scale_from_amax(pow2=True)`` and ``tensor._pow2_scale`` with the twin's
  arithmetic (``fmt.max / amax`` is ``reciprocal(amax) * fmt.max`` in torch), except that
  ``floor(log2(s))`` is read from the exponent bits (exact) where torch's ``log2`` may round a
  value just below a power of two up to it: the scales can differ only when ``fmt.max / amax``
  lies within about one FP32 ulp below a power of two.
"""
from __future__ import annotations

import struct

import torch

from fp8lm.ops.cast import triton, triton_available
from fp8lm.tensor import FP16_AMAX_TARGET, is_scaled

if triton is not None:
    import triton.language as tl

__all__ = ["unsupported_reason", "fused_step", "set_fused_step", "fused_step_enabled", "SCRATCH_SLOTS"]

# Whether AdamW(fused=None) takes this path on CUDA: on since the kernels ran on the H100 against their
# twin and measured 9.3x (O1) and 21x (O2) faster than it (benchmarks/RESULTS.md; fused=True forces it).
_AUTO = {"on": True}


def set_fused_step(enabled: bool) -> bool:
    """Let ``AdamW(fused=None)`` take the fused Triton step on CUDA (on by default); returns the old setting."""
    old, _AUTO["on"] = _AUTO["on"], bool(enabled)
    return old


def fused_step_enabled() -> bool:
    """Whether ``AdamW(fused=None)`` takes the fused step on CUDA (``set_fused_step``)."""
    return _AUTO["on"]

_SPREAD = 8  # slots each amax is spread over: program i writes slot i % _SPREAD (module docstring)
SCRATCH_SLOTS = 8 + 4 * _SPREAD  # float32 slots of device scratch per parameter (module docstring)
_BLOCK = 2048
_BLOCK_INTERPRET = 512
_AMAX_ITERS = 16  # at most this many blocks per program of the master amax kernel


def _amax_iters(n: int, block: int) -> int:
    """Blocks per program of the master amax kernel: a power of two up to ``_AMAX_ITERS`` that still
    leaves about 512 programs (four per SM of an H100), so small masters keep the GPU busy."""
    iters = 1
    while iters < _AMAX_ITERS and n >= block * iters * 2 * 512:
        iters *= 2
    return iters

if triton is not None:
    # amaxes (by index): r, q, w_new, and the master's stored FP16 data after this step (read by the next step)
    _R, _Q, _W, _NEXT_W = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
    # scratch slots: 3-5 the old scales of r, q, w (_OLD + index), 6 the master's new scale (read by the next
    # step), from 8 on _SPREAD slots per amax index, holding the float32 bits of partial maxima (int32)
    _OLD, _NEXT_SCALE, _AMAX = tl.constexpr(3), tl.constexpr(6), tl.constexpr(8)
    _SPREAD_C = tl.constexpr(_SPREAD)
    _TARGET = tl.constexpr(FP16_AMAX_TARGET)

    # ---- element helpers ---------------------------------------------------------------------

    @triton.jit
    def _is_finite(x):
        return tl.abs(x) <= 3.4028234663852886e38  # False for inf and NaN

    @triton.jit
    def _clamp(x, bound):
        """``x.clamp(-bound, bound)`` keeping NaN (comparisons, not min/max)."""
        x = tl.where(x > bound, bound, x)
        return tl.where(x < -bound, -bound, x)

    @triton.jit
    def _round_to_grid(x, u, MANT: tl.constexpr, EMIN: tl.constexpr, FMAX: tl.constexpr,
                       SATURATE: tl.constexpr, STOCHASTIC: tl.constexpr):
        """Finite float32 ``x`` rounded to a format's grid, in FP32 (exactly representable result)."""
        if SATURATE:
            x = _clamp(x, FMAX)
        e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2|x|) for normal x
        e = tl.maximum(e, EMIN)  # subnormals of the format share the smallest normal's ulp
        ulp = ((e - MANT + 127) << 23).to(tl.float32, bitcast=True)
        inv_ulp = ((127 - e + MANT) << 23).to(tl.float32, bitcast=True)
        t = x * inv_ulp  # exact: a power-of-two rescale
        lo = tl.floor(t)
        frac = t - lo  # exact, in [0, 1)
        if STOCHASTIC:
            up = u < frac
        else:
            odd = (lo.to(tl.int32) & 1) != 0
            up = (frac > 0.5) | ((frac == 0.5) & odd)
        return (lo + up.to(tl.float32)) * ulp

    @triton.jit
    def _pow2_floor(s):
        """2**floor(log2 s) for a positive normal float32 ``s`` (its exponent bits)."""
        return (s.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _scale_from_amax(amax, FMAX: tl.constexpr):
        """``formats.scale_from_amax(amax, fmt, pow2=True)`` on a loaded scalar."""
        ok = (amax > 0) & _is_finite(amax)
        one = tl.full(amax.shape, 1.0, tl.float32)
        s = tl.where(ok, tl.div_rn(one, amax) * FMAX, one)
        s = tl.where(s > 2.0**100, 2.0**100, s)
        return _pow2_floor(s)

    @triton.jit
    def _master_scale(amax, TARGET: tl.constexpr):
        """``tensor._pow2_scale(amax, FP16_AMAX_TARGET)`` on a loaded scalar."""
        ok = (amax > 0) & _is_finite(amax)
        one = tl.full(amax.shape, 1.0, tl.float32)
        s = tl.where(ok, tl.div_rn(one, amax) * TARGET, one)
        s = tl.where(s > 2.0**100, 2.0**100, s)
        s = tl.where(s < 2.0**-100, 2.0**-100, s)
        return _pow2_floor(s)

    @triton.jit
    def _div_by_scale(x, s):
        """``x / s`` for a loaded scalar scale, bit for bit: by the reciprocal when ``s`` is a power of two
        (then ``1 / s`` is exact and both round the same exact quotient), else a true division."""
        if (s.to(tl.int32, bitcast=True) & 0x7FFFFF) == 0:
            y = x * tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        else:
            y = tl.div_rn(x, s)
        return y

    @triton.jit
    def _abs_bits(x, mask):
        """The bits of |x| as int32 (0 where masked): ordered as the values, NaN above inf above every finite."""
        return tl.where(mask, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)

    @triton.jit
    def _bits_into(scratch_ptr, INDEX: tl.constexpr, bits):
        """One atomic max of a block's largest ``_abs_bits`` into amax INDEX's slot for this program."""
        slot = _AMAX + INDEX * _SPREAD_C + tl.program_id(0) % _SPREAD_C
        tl.atomic_max(scratch_ptr.to(tl.pointer_type(tl.int32)) + slot, tl.max(bits, 0))

    @triton.jit
    def _amax_into(scratch_ptr, INDEX: tl.constexpr, x, mask):
        """Atomic max of |x| (masked) into amax INDEX; NaN wins, as in ``torch.amax``."""
        _bits_into(scratch_ptr, INDEX, _abs_bits(x, mask))

    @triton.jit
    def _amax_from(scratch_ptr, INDEX: tl.constexpr):
        """Amax INDEX reduced over its slots (NaN when a NaN was seen, as ``torch.amax``)."""
        slots = _AMAX + INDEX * _SPREAD_C + tl.arange(0, _SPREAD_C)
        bits = tl.load(scratch_ptr.to(tl.pointer_type(tl.int32)) + slots)
        return tl.max(bits, 0).to(tl.float32, bitcast=True)

    # ---- the step's arithmetic (the plain path's ops, in order) -------------------------------

    @triton.jit
    def _load_w(w_ptr, w_scale, offs, mask, MASTER: tl.constexpr):
        """FP32 weight: the master's ``_data / _scale`` or the FP32 parameter."""
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MASTER:
            w = _div_by_scale(w, w_scale)
        return w

    @triton.jit
    def _load_e4m3(ptr, offs, mask):
        """E4M3 bytes (passed as uint8) to FP32; 0x7F / 0xFF are NaN (Triton's interpreter reads 480)."""
        bits = tl.load(ptr + offs, mask=mask, other=0)
        x = bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        return tl.where((bits & 0x7F) == 0x7F, float("nan"), x)

    @triton.jit
    def _load_g(g_ptr, g_scale_ptr, offs, mask, GRAD_SCALED: tl.constexpr, GRAD_E4M3: tl.constexpr):
        """FP32 gradient: a ScaledTensor's ``_data / _scale`` or the plain tensor."""
        if GRAD_E4M3:
            g_hp = _load_e4m3(g_ptr, offs, mask)
        else:
            g_hp = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GRAD_SCALED:
            g_hp = _div_by_scale(g_hp, tl.load(g_scale_ptr))
        return g_hp

    @triton.jit
    def _decay_and_grad(w, g_hp, decay, l2, HAS_DECAY: tl.constexpr, HAS_L2: tl.constexpr):
        """(w * (1 - lr wd), g + wd * w): AdamW's decay or Adam's L2 term."""
        if HAS_DECAY:
            w = w * decay
        if HAS_L2:
            g_hp = tl.fma(l2, w, g_hp)  # torch's add(alpha=): a + alpha * b, contracted
        return w, g_hp

    @triton.jit
    def _lerp(m, g_hp, weight, LERP_SMALL: tl.constexpr):
        """``m.lerp_(g, weight)`` as torch computes it."""
        d = g_hp - m
        if LERP_SMALL:
            return tl.fma(weight, d, m)
        return tl.fma(-d, 1.0 - weight, g_hp)

    @triton.jit
    def _new_v(v_old, g_hp, beta2, one_minus_b2):
        """``v.mul_(b2).addcmul_(g, g, value=1 - b2)``: the last product and the sum contracted, as torch."""
        return tl.fma(one_minus_b2 * g_hp, g_hp, v_old * beta2)

    @triton.jit
    def _addcdiv(w, m, denom, alpha, CPU_ORDER: tl.constexpr):
        """``w.addcdiv_(m, denom, value=alpha)``: CUDA w + alpha * (m / d) contracted, CPU w + alpha * m / d."""
        if CPU_ORDER:
            return w + tl.div_rn(alpha * m, denom)
        return tl.fma(alpha, tl.div_rn(m, denom), w)

    @triton.jit
    def _denom(r, bc2, eps, BC2_RECIP: tl.constexpr):
        """``(sqrt(v) / bc2_sqrt) + eps``; ``bc2`` is already the FP32 reciprocal when BC2_RECIP."""
        if BC2_RECIP:
            d = r * bc2
        else:
            d = tl.div_rn(r, bc2)
        return d + eps

    @triton.jit
    def _encode_fp16_master(w_new, scale, u, STOCHASTIC: tl.constexpr):
        """``(w_new * scale)`` rounded into FP16 (no saturation; inf and NaN kept)."""
        x = w_new * scale
        y = _round_to_grid(x, u, 10, -14, 65504.0, False, STOCHASTIC)
        return tl.where(_is_finite(x), y, x).to(tl.float16)

    # ---- kernels --------------------------------------------------------------------------------

    @triton.jit
    def _fp8_state_values(w_ptr, g_ptr, g_scale_ptr, m_fp8_ptr, v_fp16_ptr, offs, mask, w_scale_old, m_scale_old,
                          v_scale_old, decay, l2, lerp_w, beta2, one_minus_b2, neg_step_size, bc2, eps, bound_update,
                          NEED_W: tl.constexpr, MASTER: tl.constexpr, GRAD_SCALED: tl.constexpr,
                          GRAD_E4M3: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_L2: tl.constexpr,
                          LERP_SMALL: tl.constexpr, BC2_RECIP: tl.constexpr, BLOCK: tl.constexpr):
        """This step's FP32 ``(m, r, w_new)`` of one block from the FP8 m / FP16 r state (both passes: same code,
        same bits). ``w_new`` is only meaningful with NEED_W (else the weight is not read)."""
        if NEED_W:
            w = _load_w(w_ptr, w_scale_old, offs, mask, MASTER)
        else:  # pass 1 of an FP32 parameter under AdamW: the weight is not needed
            w = tl.zeros([BLOCK], tl.float32)
        w, g_hp = _decay_and_grad(w, _load_g(g_ptr, g_scale_ptr, offs, mask, GRAD_SCALED, GRAD_E4M3), decay, l2,
                                  HAS_DECAY, HAS_L2)
        r_old = _div_by_scale(tl.load(v_fp16_ptr + offs, mask=mask, other=0.0).to(tl.float32), v_scale_old)
        m_old = _div_by_scale(_load_e4m3(m_fp8_ptr, offs, mask), m_scale_old) * r_old
        m = _lerp(m_old, g_hp, lerp_w, LERP_SMALL)
        r = tl.sqrt_rn(_new_v(r_old * r_old, g_hp, beta2, one_minus_b2))
        update = _clamp(tl.div_rn(m, _denom(r, bc2, eps, BC2_RECIP)), bound_update)
        w_new = tl.fma(neg_step_size, update, w)  # add_(update, alpha=-step_size)
        return m, r, w_new

    @triton.jit
    def _fp8_state_amax_kernel(w_ptr, w_scale_ptr, g_ptr, g_scale_ptr, m_fp8_ptr, m_scale_ptr, v_fp16_ptr,
                               v_scale_ptr, scratch_ptr, n, decay, l2, lerp_w, beta2, one_minus_b2, neg_step_size,
                               bc2, eps, bound_update, MASTER: tl.constexpr, GRAD_SCALED: tl.constexpr,
                               GRAD_E4M3: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_L2: tl.constexpr,
                               LERP_SMALL: tl.constexpr, BC2_RECIP: tl.constexpr, BLOCK: tl.constexpr):
        """Pass 1 of the FP8 state (read-only): amax of r, q = |m| / r and (MASTER) w_new, one block per program
        (several blocks per program, to issue fewer atomics, ran 3.9x slower on the H100: RESULTS.md)."""
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        v_scale_old = tl.load(v_scale_ptr)
        m_scale_old = tl.load(m_scale_ptr)
        w_scale_old = tl.load(w_scale_ptr)  # the scratch itself when not MASTER (unused)
        m, r, w_new = _fp8_state_values(w_ptr, g_ptr, g_scale_ptr, m_fp8_ptr, v_fp16_ptr, offs, mask, w_scale_old,
                                        m_scale_old, v_scale_old, decay, l2, lerp_w, beta2, one_minus_b2,
                                        neg_step_size, bc2, eps, bound_update, MASTER or HAS_L2, MASTER, GRAD_SCALED,
                                        GRAD_E4M3, HAS_DECAY, HAS_L2, LERP_SMALL, BC2_RECIP, BLOCK)
        _amax_into(scratch_ptr, _R, r, mask)
        _amax_into(scratch_ptr, _Q, tl.where(r > 0, tl.div_rn(tl.abs(m), r), 0.0), mask)
        if MASTER:
            _amax_into(scratch_ptr, _W, w_new, mask)
        if pid == 0:  # the old scales, for pass 2 (which overwrites the state's)
            tl.store(scratch_ptr + _OLD + _R, v_scale_old)
            tl.store(scratch_ptr + _OLD + _Q, m_scale_old)
            tl.store(scratch_ptr + _OLD + _W, w_scale_old)

    @triton.jit(do_not_specialize=["seed"])
    def _fp8_state_kernel(w_ptr, w_scale_ptr, g_ptr, g_scale_ptr, m_fp8_ptr, m_scale_ptr, v_fp16_ptr, v_scale_ptr,
                          scratch_ptr, skip_ptr, n, seed, decay, l2, lerp_w, beta2, one_minus_b2, neg_step_size, bc2,
                          eps, bound_q, bound_update, MASTER: tl.constexpr,
                          GRAD_SCALED: tl.constexpr, GRAD_E4M3: tl.constexpr, HAS_DECAY: tl.constexpr,
                          HAS_L2: tl.constexpr, LERP_SMALL: tl.constexpr, BC2_RECIP: tl.constexpr,
                          CPU_ORDER: tl.constexpr, STOCH_V: tl.constexpr,
                          STOCH_W: tl.constexpr, BLOCK: tl.constexpr):
        """Pass 2 of the FP8 m (q = m / r) + FP16 r = sqrt(v) state: the new scales from pass 1's amaxes, encode
        and store m, r and the weight."""
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        v_scale_old = tl.load(scratch_ptr + _OLD + _R)  # the old scales, saved by pass 1
        m_scale_old = tl.load(scratch_ptr + _OLD + _Q)
        w_scale_old = tl.load(scratch_ptr + _OLD + _W)
        m, r, w_new = _fp8_state_values(w_ptr, g_ptr, g_scale_ptr, m_fp8_ptr, v_fp16_ptr, offs, mask, w_scale_old,
                                        m_scale_old, v_scale_old, decay, l2, lerp_w, beta2, one_minus_b2,
                                        neg_step_size, bc2, eps, bound_update, True, MASTER, GRAD_SCALED, GRAD_E4M3,
                                        HAS_DECAY, HAS_L2, LERP_SMALL, BC2_RECIP, BLOCK)
        keep = tl.load(skip_ptr) == 0  # a found_inf flag (AdamW.step): nothing is stored when it is set
        mask = mask & (tl.load(skip_ptr + offs * 0) == 0)  # (as a vector: the interpreter's & needs one)
        u_v, u_m, u_w, _ = tl.rand4x(seed, offs)
        v_scale = _scale_from_amax(_amax_from(scratch_ptr, _R), 65504.0)
        amax_q = _amax_from(scratch_ptr, _Q)
        amax_q = tl.where(amax_q > bound_q, bound_q, amax_q) * (1.0 + 2.0**-8)
        m_scale = _scale_from_amax(amax_q, 448.0)
        # r: FP16, saturating + NaN under "nearest" (formats.quantize), inf kept under "stochastic"
        x = r * v_scale
        if STOCH_V:
            y = tl.where(_is_finite(x), _round_to_grid(x, u_v, 10, -14, 65504.0, False, True), x)
        else:
            y = tl.where(_is_finite(x), _round_to_grid(x, u_v, 10, -14, 65504.0, True, False), float("nan"))
        tl.store(v_fp16_ptr + offs, y.to(tl.float16), mask=mask)
        r_stored = _div_by_scale(y, v_scale)
        # q = m / r_stored: E4M3, saturating, non-finite -> NaN
        q = _clamp(tl.where(r_stored > 0, tl.div_rn(m, r_stored), 0.0), bound_q)
        x = q * m_scale
        y = _round_to_grid(x, u_m, 3, -6, 448.0, True, STOCH_V)
        y = tl.where(_is_finite(x), y, float("nan"))
        y8 = y.to(tl.float8e4nv, fp_downcast_rounding="rtne")  # exact: y is on the grid
        tl.store(m_fp8_ptr + offs, y8.to(tl.uint8, bitcast=True), mask=mask)
        if MASTER:
            w_scale = _master_scale(_amax_from(scratch_ptr, _W), _TARGET)
            tl.store(w_ptr + offs, _encode_fp16_master(w_new, w_scale, u_w, STOCH_W), mask=mask)
            if pid == 0:
                if keep:
                    tl.store(w_scale_ptr, w_scale)
        else:
            tl.store(w_ptr + offs, w_new, mask=mask)
        if pid == 0:
            if keep:
                tl.store(v_scale_ptr, v_scale)
                tl.store(m_scale_ptr, m_scale)

    @triton.jit
    def _master_amax_kernel(w_ptr, w_scale_ptr, scratch_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        """The old master's amax of ``_data`` into amax _W; program 0 keeps the old scale. Each program
        reduces ITERS blocks before its one atomic (one atomic per block serialized on the slot: 1.3 TB/s
        on the H100)."""
        pid = tl.program_id(0)
        bits = tl.zeros([BLOCK], tl.int32)
        for i in tl.static_range(ITERS):
            offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            bits = tl.maximum(bits, _abs_bits(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32), mask))
        _bits_into(scratch_ptr, _W, bits)
        if pid == 0:
            tl.store(scratch_ptr + _OLD + _W, tl.load(w_scale_ptr))

    @triton.jit(do_not_specialize=["seed"])
    def _fp32_state_kernel(w_ptr, w_scale_ptr, g_ptr, g_scale_ptr, m_ptr, v_ptr, scratch_ptr, prev_ptr, skip_ptr, n,
                           seed, decay, l2, lerp_w, beta2, one_minus_b2, neg_step_size, bc2, eps, decay_abs, lr_bound,
                           PASS2: tl.constexpr, BOUND: tl.constexpr, CACHED: tl.constexpr,
                           MASTER: tl.constexpr, GRAD_SCALED: tl.constexpr, GRAD_E4M3: tl.constexpr,
                           HAS_DECAY: tl.constexpr, HAS_L2: tl.constexpr, LERP_SMALL: tl.constexpr,
                           BC2_RECIP: tl.constexpr, CPU_ORDER: tl.constexpr,
                           STOCH_W: tl.constexpr, BLOCK: tl.constexpr):
        """FP32 m and v (torch's op sequence): pass 1 (master amax only) or pass 2 (store). With
        BOUND the master's new scale comes from the old amax and a bound; the old amax and scale come
        from ``_master_amax_kernel`` (in ``scratch``) or, CACHED, from the previous step's pass 2
        (``prev``: that step's scratch, where pass 2 reduces the amax of the data it stores)."""
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if CACHED:
            w_scale_old = tl.load(prev_ptr + _NEXT_SCALE)
        elif PASS2:
            w_scale_old = tl.load(scratch_ptr + _OLD + _W)
        else:
            w_scale_old = tl.load(w_scale_ptr)  # the scratch itself when not MASTER (unused)
        w = _load_w(w_ptr, w_scale_old, offs, mask, MASTER)
        w, g_hp = _decay_and_grad(w, _load_g(g_ptr, g_scale_ptr, offs, mask, GRAD_SCALED, GRAD_E4M3), decay, l2,
                                  HAS_DECAY, HAS_L2)
        m = _lerp(tl.load(m_ptr + offs, mask=mask, other=0.0), g_hp, lerp_w, LERP_SMALL)
        v = _new_v(tl.load(v_ptr + offs, mask=mask, other=0.0), g_hp, beta2, one_minus_b2)
        w_new = _addcdiv(w, m, _denom(tl.sqrt_rn(v), bc2, eps, BC2_RECIP), neg_step_size, CPU_ORDER)
        if not PASS2:
            _amax_into(scratch_ptr, _W, w_new, mask)
            if pid == 0:
                tl.store(scratch_ptr + _OLD + _W, w_scale_old)
        else:
            keep = tl.load(skip_ptr) == 0  # a found_inf flag (AdamW.step): nothing is stored when it is set
            mask = mask & (tl.load(skip_ptr + offs * 0) == 0)  # (as a vector: the interpreter's & needs one)
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
            if MASTER:
                if BOUND:  # adam._master_scale_from_bound: amax(old) * |decay| + lr * bound
                    if CACHED:
                        amax_data = _amax_from(prev_ptr, _NEXT_W)
                    else:
                        amax_data = _amax_from(scratch_ptr, _W)
                    amax_old = _div_by_scale(amax_data, w_scale_old)
                    w_scale = _master_scale(amax_old * decay_abs + lr_bound, _TARGET)
                else:
                    w_scale = _master_scale(_amax_from(scratch_ptr, _W), _TARGET)
                u_w = tl.rand(seed, offs)
                w_fp16 = _encode_fp16_master(w_new, w_scale, u_w, STOCH_W)
                tl.store(w_ptr + offs, w_fp16, mask=mask)
                if BOUND:  # the next step's old amax, from the bytes just stored
                    _amax_into(scratch_ptr, _NEXT_W, w_fp16.to(tl.float32), mask)
                if pid == 0:
                    if keep:
                        tl.store(w_scale_ptr, w_scale)
                        tl.store(scratch_ptr + _NEXT_SCALE, w_scale)
            else:
                tl.store(w_ptr + offs, w_new, mask=mask)


# --------------------------------------------------------------------------------------------
# host side


def _storage_ok(t: torch.Tensor, dtypes: tuple) -> bool:
    """A dense tensor of one of ``dtypes`` (not a subclass such as FSDP2's DTensor: no raw pointer)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype in dtypes and t.is_contiguous()


def unsupported_reason(p: torch.Tensor, group: dict, state: dict | None = None) -> str | None:
    """Why the fused step cannot run on ``p`` with ``group``'s options (None when it can)."""
    if triton is None:
        return "Triton is not installed"
    if not triton_available(p.device):
        return f"the parameter is on {p.device}; the fused step needs a CUDA tensor (or TRITON_INTERPRET=1)"
    if group["state"] == "fp8" and (group["m_scaling"], group["v_storage"]) != ("normalized", "sqrt"):
        return (f"m_scaling={group['m_scaling']!r}, v_storage={group['v_storage']!r}: the fused step supports only "
                "m_scaling='normalized', v_storage='sqrt'")
    if is_scaled(p):
        if not _storage_ok(p._data, (torch.float16,)):
            return f"a ScaledTensor parameter with {p._data.dtype} data; the fused step needs contiguous FP16 masters"
    elif not _storage_ok(p, (torch.float32,)):
        return f"a {p.dtype} parameter; the fused step needs contiguous float32 parameters or FP16 ScaledTensor masters"
    g = p.grad
    g_data = g._data if is_scaled(g) else g
    if (type(g_data) is not torch.Tensor or g_data.device != p.device or not g_data.is_floating_point()
            or not g_data.is_contiguous()):
        return "the gradient must be a dense contiguous floating-point tensor on the parameter's device"
    if p.numel() >= 2**31 - 2 * _BLOCK:
        return "the parameter has 2**31 elements or more"
    for key, value in (state or {}).items():
        if key != "step" and isinstance(value, torch.Tensor) and not value.is_contiguous():
            return f"state tensor {key!r} is not contiguous"
    return None


def _f32(x: float) -> float:
    """``x`` rounded to float32 (as torch converts a Python number for a float32 op)."""
    return struct.unpack("f", struct.pack("f", x))[0] if abs(x) < 3.4e38 else x


def _common_args(p, group: dict, lr: float, beta1: float, beta2: float, eps: float, wd: float, step: int):
    """The scalar arguments and flags shared by both kernels (the twin's constants)."""
    decoupled = group["decoupled"]
    bc2_sqrt = (1 - beta2**step) ** 0.5
    recip = p.is_cuda  # torch's CUDA div by a Python number multiplies by its FP32 reciprocal
    bc2 = _f32(1.0 / _f32(bc2_sqrt)) if recip else bc2_sqrt
    args = dict(decay=1 - lr * wd, l2=wd, lerp_w=1 - beta1, beta2=beta2, one_minus_b2=1 - beta2,
                neg_step_size=-(lr / (1 - beta1**step)), bc2=bc2, eps=eps)
    flags = dict(HAS_DECAY=wd != 0 and decoupled, HAS_L2=wd != 0 and not decoupled,
                 LERP_SMALL=abs(_f32(1 - beta1)) < 0.5, BC2_RECIP=recip, CPU_ORDER=not p.is_cuda)
    return args, flags


_NO_SKIP = {}  # device -> a zero flag, for steps without found_inf


def _skip_flag(skip: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``skip`` as a one-element float32 tensor on ``device``, or a cached zero."""
    if skip is None:
        if device not in _NO_SKIP:
            _NO_SKIP[device] = torch.zeros(1, dtype=torch.float32, device=device)
        return _NO_SKIP[device]
    return skip.reshape(1).to(device=device, dtype=torch.float32)


def _launch_options(p: torch.Tensor) -> tuple[int, dict]:
    if p.is_cuda:
        return _BLOCK, dict(num_warps=8, enable_fp_fusion=False)
    return _BLOCK_INTERPRET, {}


def fused_step(p: torch.Tensor, state: dict, group: dict, scalars: tuple, seed: int, scratch: torch.Tensor,
               bounds: tuple[float, float] | None = None, master_bound: tuple[float, float] | None = None,
               prev: torch.Tensor | None = None, skip: torch.Tensor | None = None) -> None:
    """One fused AdamW step of ``p`` (state already initialized; ``step`` already advanced).

    ``scalars`` is ``_begin``'s (lr, beta1, beta2, eps, wd, step); ``scratch`` a zeroed float32
    device tensor of ``SCRATCH_SLOTS`` elements used by this parameter only; ``bounds`` the FP8
    state's (bound_q, bound_update) from ``adam._update_bound``; ``master_bound`` the FP32 state's
    ``(|decay|, lr * bound)`` for an FP16 master (``adam.master_bound_args``; None: pass 1 instead).
    ``prev``: the scratch this master's previous bounded step used, when its data and scale are
    still the bytes that step stored (``AdamW`` checks): its amax and scale replace the amax kernel.
    ``skip``: a one-element float32 device tensor (``found_inf``); where it is nonzero the kernels store
    nothing (the parameter, its state and scales stay as they were) without the host reading it.
    """
    lr, beta1, beta2, eps, wd, step = scalars
    args, flags = _common_args(p, group, lr, beta1, beta2, eps, wd, step)
    master = is_scaled(p)
    g = p.grad
    w, w_scale = (p._data, p._scale) if master else (p.detach(), scratch)
    g_data, g_scale = (g._data, g._scale.reshape(1)) if is_scaled(g) else (g.detach(), scratch)
    grad_e4m3 = g_data.dtype == torch.float8_e4m3fn
    if grad_e4m3:
        g_data = g_data.view(torch.uint8)  # decoded in the kernel (NaN bytes: ``_load_e4m3``)
    n = p.numel()
    if n == 0:
        return
    block, options = _launch_options(p)
    grid = (triton.cdiv(n, block),)
    flags.update(MASTER=master, GRAD_SCALED=is_scaled(g), GRAD_E4M3=grad_e4m3,
                 STOCH_W=group["master_rounding"] == "stochastic", BLOCK=block)
    if group["state"] == "fp32":
        bound = master_bound if master else None
        cached = bound is not None and prev is not None
        tensors = (w, w_scale, g_data, g_scale, state["exp_avg"], state["exp_avg_sq"], scratch,
                   prev if cached else scratch, _skip_flag(skip, p.device), n, seed)
        decay_abs, lr_bound = bound or (1.0, 0.0)
        if bound is not None and not cached:  # the old amax (2 bytes per element) instead of pass 1 (11)
            iters = _amax_iters(n, block) if p.is_cuda else 1
            _master_amax_kernel[(triton.cdiv(n, block * iters),)](w, w_scale, scratch, n, BLOCK=block, ITERS=iters,
                                                                  **options)
        for pass2 in ((False, True) if master and bound is None else (True,)):
            _fp32_state_kernel[grid](*tensors, **args, decay_abs=decay_abs, lr_bound=lr_bound, PASS2=pass2,
                                     BOUND=bound is not None, CACHED=cached, **flags, **options)
        return
    bound_q, bound_update = bounds
    tensors = (w, w_scale, g_data, g_scale, state["exp_avg"].view(torch.uint8), state["exp_avg_scale"],
               state["exp_avg_sq"], state["exp_avg_sq_scale"], scratch, n)
    pass1_flags = {k: v for k, v in flags.items() if k not in ("CPU_ORDER", "STOCH_W")}
    _fp8_state_amax_kernel[grid](*tensors, **args, bound_update=bound_update, **pass1_flags, **options)
    _fp8_state_kernel[grid](*tensors[:9], _skip_flag(skip, p.device), n, seed, **args, bound_q=bound_q,
                            bound_update=bound_update, STOCH_V=group["rounding"] == "stochastic", **flags, **options)
