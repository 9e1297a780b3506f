"""Memory-lean RMSNorm, SwiGLU and causal attention: what they save for backward, and in what precision.

Activation memory, not weights, dominates a training step at LLM shapes: on ``llama-0.75b``
(16384 tokens per step) the saved activations are about 70% of the BF16 baseline's peak. These
functions compute exactly what the plain PyTorch expressions compute in the forward pass and
differ only in what they keep for the backward pass.

Exact (every level):

* ``rms_norm`` saves its input and the per-row ``rstd`` (4 bytes a row) and recomputes
  ``x * rstd`` in backward. The autograd graph of the plain expression keeps the float32 input
  *and* the float32 normalized copy (8 bytes per element); this keeps 4.
* ``swiglu`` takes the fused gate/up projection ``gu = [g, u]`` and returns ``silu(g) * u``,
  computed in float32 and rounded once to ``gu``'s dtype. It saves ``gu`` only; the plain
  expression also keeps ``silu(g)`` (a third more). ``linear_swiglu(linear, x)`` lets an FP8 linear
  compute it inside its own operation, whose backward casts the gradient to FP8 in SwiGLU's backward
  kernel (``fp8lm.nn.linear``); same forward values, same saved tensor.
* ``causal_attention`` copies ``v`` to a contiguous tensor before attention. A ``v`` that is a view
  of the fused QKV output would keep the whole QKV output (3 tensors) alive for backward.

Lossy, opt-in (``save_fp8=True``, set by ``fp8lm.initialize`` at level O2; the COAT recipe,
arXiv 2410.19313, of storing non-linear layers' inputs in FP8):

* ``swiglu`` stores ``gu`` as E4M3 with one power-of-two scale per row (per token: the rows of an
  activation differ in magnitude by orders, its columns much less). Backward dequantizes it, so
  ``dg = dh * u * silu'(g)`` and ``du = dh * silu(g)`` see ``g`` and ``u`` with a relative error up
  to 2^-4 (E4M3 has 3 mantissa bits; below 2^-6 of the row's scale it is absolute, 2^-10 of the
  row amax). The forward output is exact. ``linear_swiglu`` through an FP8 linear stores the same
  bytes and scales inside the linear's operation, whose fused backward kernel reads them.
* ``rms_norm`` stores its input in BF16 (relative error 2^-9): its backward then runs at the
  precision of the BF16 activations around it. The norm output feeds an FP8 GEMM anyway.
* ``causal_attention`` stores q, k, v as E4M3 with a power-of-two scale per (batch, head, token)
  row and no output: backward dequantizes them and recomputes the attention forward (one more
  attention forward per step, about a third of attention's cost) before its backward. The
  gradients then see the FP8-rounded q, k, v; the forward output is exact. The recomputation is a
  ``torch.func.vjp`` of the attention, which ``torch.compile`` traces into the block's graph.

The plain-PyTorch twins (``rms_norm_reference``, ``swiglu_reference``) are the test oracles.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fp8lm.formats import E4M3, dequantize, quantize, scale_from_amax
from fp8lm.nn.bf16 import causal_attention as _sdpa  # fast BF16 attention on CPUs

__all__ = ["rms_norm", "swiglu", "linear_swiglu", "causal_attention", "rms_norm_reference", "swiglu_reference",
           "quantize_rows", "dequantize_rows"]


# ------------------------------------------------------------------ FP8 rows
def quantize_rows(x_hp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_hp`` as E4M3 with one power-of-two scale per row (last dim): ``(x_fp8, scale)``.

    ``scale`` has shape ``x.shape[:-1] + (1,)`` (float32); a row's amax maps into (224, 448].
    All-zero or non-finite rows get scale 1 (non-finite values stay non-finite: NaN).
    """
    amax_rows = x_hp.abs().amax(dim=-1, keepdim=True).float()  # (..., 1)
    scale = scale_from_amax(amax_rows, E4M3, pow2=True)  # elementwise: one scale per row
    return quantize(x_hp, E4M3, scale), scale  # saturating; inf/NaN elements become NaN


def dequantize_rows(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_rows``: ``x_fp8 / scale`` in ``dtype`` (exact for a power-of-two scale)."""
    return dequantize(x_fp8, scale, dtype)


# ------------------------------------------------------------------ RMSNorm
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain PyTorch RMSNorm, float32 inside, output in ``x``'s dtype (the oracle)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).type_as(x)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32: ``t`` itself when it is float32 already, never ``t.float()``'s alias of it (used in
    this module's ``autograd.Function``s).

    With ``x.float()`` of the float32 residual stream (which returns ``x`` itself) in ``_RMSNorm.forward``,
    torch 2.11's Dynamo traced the function wrongly: compiled blocks got zero gradients through both
    RMSNorms and lost two input-gradient GEMMs per layer (``fp8lm.compile_check``, tenth session of
    ``benchmarks/RESULTS.md``); without the alias they match eager. pytorch/pytorch#180642 reports the same
    family under 2.11 (a traced function's intermediate aliasing a tensor it returns gets that output's
    gradient slot wrong)."""
    return t if t.dtype == torch.float32 else t.float()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, save_dtype):
        x32 = _f32(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        y32 = x32 * rstd * _f32(weight)
        y = y32 if x.dtype == torch.float32 else y32.to(x.dtype)
        x_saved = x if save_dtype is None or save_dtype == x.dtype else x.to(save_dtype)
        ctx.save_for_backward(x_saved, rstd, weight)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_saved, rstd, weight = ctx.saved_tensors
        x_hat = _f32(x_saved) * rstd  # (..., C)
        g = _f32(grad_y)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * x_hat).reshape(-1, x_hat.shape[-1]).sum(0).to(weight.dtype)
        gw = g * _f32(weight)  # d loss / d x_hat
        # d/dx of x * rstd(x): rstd * (gw - x_hat * mean(gw * x_hat))
        grad_x = rstd * (gw - x_hat * (gw * x_hat).mean(-1, keepdim=True))
        return grad_x.to(ctx.x_dtype), grad_w, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, save_dtype: torch.dtype | None = None):
    """``x / rms(x) * weight`` computed in float32, returned in ``x``'s dtype (module docstring).

    Saves ``x`` (in ``save_dtype`` if given, e.g. ``torch.bfloat16``) and the per-row ``rstd``.
    """
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match the last dim of "
                         f"x {tuple(x.shape)}")
    return _RMSNorm.apply(x, weight, eps, save_dtype)


# ------------------------------------------------------------------ SwiGLU
def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch ``silu(g) * u`` of the two halves of the last dim, float32 inside (the oracle)."""
    g, u = gate_up.float().chunk(2, dim=-1)
    return (F.silu(g) * u).to(gate_up.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, save_fp8):
        g, u = _f32(gate_up).chunk(2, dim=-1)  # (..., F) each
        h = (F.silu(g) * u).to(gate_up.dtype)
        if save_fp8:
            ctx.save_for_backward(*quantize_rows(gate_up))
        else:
            ctx.save_for_backward(gate_up)
        ctx.save_fp8, ctx.dtype = save_fp8, gate_up.dtype
        return h

    @staticmethod
    def backward(ctx, grad_h):
        if ctx.save_fp8:
            gu_fp8, scale = ctx.saved_tensors
            gu = dequantize_rows(gu_fp8, scale, torch.float32)
        else:
            (gu,) = ctx.saved_tensors
            gu = _f32(gu)
        g, u = gu.chunk(2, dim=-1)  # (..., F) each
        sig = torch.sigmoid(g)
        dh = _f32(grad_h)
        grad_g = dh * u * sig * (1 + g * (1 - sig))  # silu'(g) = sig * (1 + g * (1 - sig))
        grad_u = dh * g * sig
        return torch.cat([grad_g, grad_u], dim=-1).to(ctx.dtype), None


def swiglu(gate_up: torch.Tensor, save_fp8: bool = False) -> torch.Tensor:
    """``silu(g) * u`` for ``gate_up = [g, u]`` along the last dim (module docstring).

    Saves ``gate_up`` for backward, as E4M3 with per-row scales if ``save_fp8``.
    """
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim of gate_up must be even ([gate, up]), got {gate_up.shape[-1]}")
    return _SwiGLU.apply(gate_up, bool(save_fp8))


def linear_swiglu(linear: torch.nn.Module, x: torch.Tensor, save_fp8: bool = False) -> torch.Tensor:
    """``swiglu(linear(x), save_fp8)``; a linear that lists ``"swiglu"`` in ``fused_activations`` (an FP8
    ``Float8Linear``) computes it as ``linear(x, activation="swiglu", save_fp8=...)`` instead, one operation
    whose backward casts its output gradient to FP8 inside SwiGLU's backward kernel (``fp8lm.ops.swiglu``),
    which also reads an FP8-saved ``gate_up`` (O2). The forward values and what is saved are the same either
    way. Called through the module, so hooks (FSDP2's all-gather) run as for ``linear(x)``."""
    if "swiglu" in getattr(linear, "fused_activations", ()):
        return linear(x, activation="swiglu", save_fp8=True) if save_fp8 else linear(x, activation="swiglu")
    return swiglu(linear(x), save_fp8=save_fp8)


# ------------------------------------------------------------------ attention
class _FP8SavedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        y = _sdpa(q, k, v)  # (autograd records nothing inside a Function's forward)
        saved = [t for x in (q, k, v) for t in quantize_rows(x)]
        ctx.save_for_backward(*saved)
        ctx.dtype = q.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        q_fp8, q_s, k_fp8, k_s, v_fp8, v_s = ctx.saved_tensors
        qkv = [dequantize_rows(x, s, ctx.dtype) for x, s in ((q_fp8, q_s), (k_fp8, k_s), (v_fp8, v_s))]
        # The forward recomputed and differentiated as a function (torch.func.vjp), not through autograd's
        # graph (requires_grad_ + autograd.grad): Dynamo traces this form, so compiled blocks keep the
        # attention in their graph (with the other form it ran eagerly behind a graph break: on the H100,
        # an O2 step 2x slower in its attention and residual-gradient adds, benchmarks/RESULTS.md).
        _, vjp = torch.func.vjp(_sdpa, *qkv)
        return vjp(grad_y)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, save_fp8: bool = False) -> torch.Tensor:
    """Causal multi-head attention of (B, nh, T, hd) tensors (module docstring).

    ``save_fp8=False``: ``F.scaled_dot_product_attention`` with a contiguous ``v``. ``save_fp8=True``:
    the same forward; q, k, v saved as E4M3 rows and the forward recomputed in backward.
    """
    if not (q.shape == k.shape == v.shape) or q.dim() != 4:
        raise ValueError(f"causal_attention: q, k, v must share one (B, nh, T, hd) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if save_fp8 and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FP8SavedAttention.apply(q, k, v)
    if v.device.type != "cpu":  # (the CPU path widens v to a new float32 tensor anyway)
        v = v.contiguous()
    return _sdpa(q, k, v)
