"""Unit-scaled functional ops (Unit Scaling, arXiv 2303.11257; u-muP, arXiv 2407.17465).

Every op is scaled so that, at initialization, with unit-variance inputs and N(0, 1) weights,
its output AND the gradients it sends back have unit variance. Forward and backward get
separate scale factors, so FP8 casts can use a static scale of 1. Primitives:

* ``scale_fwd(x, a)``: forward ``a * x``, backward identity. ``scale_bwd(x, b)``: forward
  identity, backward ``b * grad``. A scaled op is ``scale_fwd(op(scale_bwd(x)), a)``: because
  ``scale_fwd`` is the identity in backward, the backward factor of an input is exactly the
  ``scale_bwd`` factor put on it, times the raw gradient of the unscaled op.

Rules (``K`` = fan_in, ``N`` = fan_out, ``B`` = batch rows = ``x.numel() // K``):

* ``linear``: out = x W^T * K^-1/2. grad_x * K^-1/2 (``constraint="to_output_scale"``, a true
  gradient of the scaled forward; unit only when N == K) or * N^-1/2 (``constraint=None``,
  always unit but not a true gradient). grad_W * B^-1/2 (weights are leaves: a cut edge).
* ``readout``: out = x W^T * K^-1 (muP readout: logits have std K^-1/2 at init);
  grad_x * N^-1/2, grad_W * B^-1/2.
* ``embedding``: out = W[idx] (unit already); grad_W * (tokens / vocab)^-1/2, since a row
  receives on average tokens / vocab unit-variance contributions.
* ``rms_norm``: unit forward by construction; grad_x is ~unit already; grad_weight * B^-1/2.
* ``silu`` / ``gelu``: out / std(f(z)), grad * 1 / rms(f'(z)), z ~ N(0, 1).
* ``silu_glu(gate, up)``: silu(gate) * up / rms(silu(z)); grad_up * 1 / rms(silu(z)),
  grad_gate * 1 / rms(silu'(z)).
* ``residual_split`` / ``residual_add``: add ``sqrt(tau) * branch + sqrt(1 - tau) * skip``
  (forward scales, identity backward); split gives both copies the same scales in backward
  (values unchanged), so the summed gradient at the split has unit variance.
* ``causal_attention``: softmax scale 1/d (u-muP). Then attention is ~uniform over the causal
  prefix, so position t has output variance 1/(t+1) and the mean is H_T / T (harmonic number):
  out * sqrt(T / H_T); grad_v * sqrt(T / H_T); grad_q, grad_k * sqrt(T d / (H_T - H2_T)) (or, with
  ``constraint="to_output_scale"``, the output's scale: true gradients). ``value_corr`` rho
  assumes values correlated across positions: out and grad_v * (rho + (1 - rho) H_T / T)^-1/2.
* ``cross_entropy``: mean loss unchanged; grad_logits * M sqrt(V) (M = rows, V = vocab), since
  d(mean CE)/dlogits = (softmax - onehot) / M has per-element std ~ V^-1/2 / M.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "scale_fwd",
    "scale_bwd",
    "scaled",
    "linear",
    "readout",
    "embedding",
    "rms_norm",
    "silu",
    "gelu",
    "silu_glu",
    "residual_split",
    "residual_add",
    "causal_attention",
    "cross_entropy",
    "LINEAR_CONSTRAINTS",
]

LINEAR_CONSTRAINTS = ("to_output_scale", None)


class _ScaledGrad(torch.autograd.Function):
    """Forward ``x * fwd``, backward ``grad * bwd``."""

    @staticmethod
    def forward(ctx, x: Tensor, fwd: float, bwd: float) -> Tensor:  # type: ignore[override]
        ctx.bwd = bwd
        return x * fwd if fwd != 1.0 else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return (grad * ctx.bwd if ctx.bwd != 1.0 else grad), None, None


def scaled(x: Tensor, fwd: float = 1.0, bwd: float = 1.0) -> Tensor:
    """Multiply by ``fwd`` in the forward pass and the gradient by ``bwd`` in the backward pass."""
    return _ScaledGrad.apply(x, float(fwd), float(bwd))


def scale_fwd(x: Tensor, alpha: float) -> Tensor:
    """Forward ``alpha * x``; backward passes the gradient through unchanged."""
    return scaled(x, alpha, 1.0)


def scale_bwd(x: Tensor, beta: float) -> Tensor:
    """Forward identity; backward multiplies the gradient by ``beta``."""
    return scaled(x, 1.0, beta)


# --------------------------------------------------------------------------- matmuls


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, constraint: Optional[str] = "to_output_scale") -> Tensor:
    """Unit-scaled linear layer; ``weight`` is (N, K) with N(0, 1) entries.

    Rule: out = x W^T * K^-1/2 (+ bias, unscaled); grad_W scaled by B^-1/2 with
    B = x.numel() // K (weight is a leaf, so its scale is free: a cut edge); grad_x scaled by

    * ``constraint="to_output_scale"`` (default): K^-1/2, the same as the output, so grad_x is the
      true gradient of the scaled forward (needed on a non-cut edge, e.g. inside a residual
      branch, for the chain rule to hold). Its std is sqrt(N / K): unit only for N == K.
    * ``constraint=None``: N^-1/2, so grad_x is unit-variance for any N, but it is the true
      gradient times sqrt(K / N): only safe where that global factor is harmless (Adam-like
      optimizers are invariant to it when every path back is scaled the same way).

    Algebra: raw grad_x of the unscaled matmul is g W (std sqrt(N)), and ``scale_fwd`` is the
    identity in backward, so the extra ``scale_bwd`` on x is exactly the grad_x scale above.
    """
    if constraint not in LINEAR_CONSTRAINTS:
        raise ValueError(f"constraint must be one of {LINEAR_CONSTRAINTS!r}, got {constraint!r}")
    n, k = weight.shape
    batch = max(x.numel() // k, 1)
    fwd = k**-0.5
    bwd_x = fwd if constraint == "to_output_scale" else n**-0.5
    out = F.linear(scale_bwd(x, bwd_x), scale_bwd(weight, batch**-0.5))
    out = scale_fwd(out, fwd)
    if bias is not None:
        out = out + bias
    return out


def readout(x: Tensor, weight: Tensor) -> Tensor:
    """Output head (u-muP readout); ``weight`` is (V, K) with N(0, 1) entries.

    Rule: out = x W^T * K^-1 (logits start with std K^-1/2, by design, as in muP);
    grad_x scaled by N^-1/2 (unit variance); grad_W scaled by B^-1/2.
    """
    n, k = weight.shape
    batch = max(x.numel() // k, 1)
    out = F.linear(scale_bwd(x, n**-0.5), scale_bwd(weight, batch**-0.5))
    return scale_fwd(out, 1.0 / k)


def embedding(idx: Tensor, weight: Tensor) -> Tensor:
    """Unit-scaled embedding lookup; ``weight`` is (V, D) with N(0, 1) entries.

    Rule: forward W[idx] (already unit); grad_W scaled by (tokens / V)^-1/2: a row gets on average
    tokens / V unit-variance contributions, so the unscaled grad_W has variance tokens / V.
    """
    vocab = weight.shape[0]
    tokens = max(idx.numel(), 1)
    return F.embedding(idx, scale_bwd(weight, (tokens / vocab) ** -0.5))


# --------------------------------------------------------------------------- norms, activations


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """RMS norm over the last dim: x / rms(x) * weight.

    Rule: the forward is unit-RMS by construction and grad_x is already ~unit (std
    sqrt(1 - 1/d) for unit grads), so neither is rescaled; grad_weight (a sum over B = rows)
    is scaled by B^-1/2.
    """
    d = x.shape[-1]
    if weight is not None:
        batch = max(x.numel() // d, 1)
        weight = scale_bwd(weight, batch**-0.5)
    return F.rms_norm(x, (d,), weight, eps)


def _normal_moments(fn) -> Tuple[float, float, float]:
    """(std of fn(z), rms of fn(z), rms of fn'(z)) for z ~ N(0, 1), by trapezoid quadrature in float64."""
    z = torch.linspace(-14.0, 14.0, 56001, dtype=torch.float64, requires_grad=True)
    y = fn(z)
    (dy,) = torch.autograd.grad(y.sum(), z)
    z, y = z.detach(), y.detach()
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    m1 = torch.trapezoid(pdf * y, z).item()
    m2 = torch.trapezoid(pdf * y * y, z).item()
    d2 = torch.trapezoid(pdf * dy * dy, z).item()
    return math.sqrt(m2 - m1 * m1), math.sqrt(m2), math.sqrt(d2)


# Computed once at import (quadrature, float64). Values:
#   silu: std 0.559538, rms 0.596469, rms of derivative 0.616021
#   gelu (erf): std 0.587915, rms 0.652090, rms of derivative 0.675167
_SILU_STD, _SILU_RMS, _SILU_DRMS = _normal_moments(F.silu)
_GELU_STD, _GELU_RMS, _GELU_DRMS = _normal_moments(F.gelu)


def silu(x: Tensor) -> Tensor:
    """Rule: silu(x) / 0.5595 (its std for x ~ N(0,1)); grad_x * 1 / 0.6160 (rms of silu')."""
    return scaled(F.silu(scale_bwd(x, 1.0 / _SILU_DRMS)), 1.0 / _SILU_STD)


def gelu(x: Tensor) -> Tensor:
    """Rule: gelu(x) / 0.5879 (its std for x ~ N(0,1)); grad_x * 1 / 0.6752 (rms of gelu')."""
    return scaled(F.gelu(scale_bwd(x, 1.0 / _GELU_DRMS)), 1.0 / _GELU_STD)


def silu_glu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU ``silu(gate) * up``.

    Rule: out / 0.5965 (rms of silu; the product with zero-mean ``up`` has std = rms(silu));
    grad_up (= g silu(gate), std 0.5965) * 1 / 0.5965; grad_gate (= g up silu'(gate),
    std 0.6160) * 1 / 0.6160.
    """
    out = F.silu(scale_bwd(gate, 1.0 / _SILU_DRMS)) * scale_bwd(up, 1.0 / _SILU_RMS)
    return scale_fwd(out, 1.0 / _SILU_RMS)


# --------------------------------------------------------------------------- residuals


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in the open interval (0, 1), got {tau}")
    return tau


def residual_split(x: Tensor, tau: float) -> Tuple[Tensor, Tensor]:
    """Split the residual stream into (x_for_branch, x_skip) before a residual branch.

    Rule: forward values are both exactly ``x``; in backward the branch copy's gradient is scaled
    by sqrt(tau) and the skip copy's by sqrt(1 - tau), so two independent unit-variance gradients
    sum to a unit-variance gradient at ``x``. These are the same factors ``residual_add`` applies
    in forward (there, identity in backward), so the pair is the u-muP residual with the scales
    moved: each edge carries its coefficient once in each direction.
    """
    tau = _check_tau(tau)
    return scale_bwd(x, math.sqrt(tau)), scale_bwd(x, math.sqrt(1.0 - tau))


def residual_add(residual: Tensor, skip: Tensor, tau: float) -> Tensor:
    """Merge a residual branch output into the skip stream.

    Rule: forward ``sqrt(tau) * residual + sqrt(1 - tau) * skip`` (unit variance for independent
    unit inputs, since the squared coefficients sum to 1); backward passes the gradient
    unchanged to both (the backward factors live in ``residual_split``).
    """
    tau = _check_tau(tau)
    return scale_fwd(residual, math.sqrt(tau)) + scale_fwd(skip, math.sqrt(1.0 - tau))


# --------------------------------------------------------------------------- attention, loss


@lru_cache(maxsize=256)
def _harmonic(t: int) -> Tuple[float, float]:
    """(H_T, H2_T) = (sum 1/n, sum 1/n^2) for n = 1..T."""
    n = torch.arange(1, t + 1, dtype=torch.float64)
    return (1.0 / n).sum().item(), (1.0 / (n * n)).sum().item()


def causal_attention(q: Tensor, k: Tensor, v: Tensor, constraint: Optional[str] = None,
                     value_corr: float = 0.0) -> Tensor:
    """Causal self-attention on (..., T, d) tensors with unit-scaled output and gradients.

    Rule: softmax scale 1/d (u-muP), so for unit q, k the logits have std d^-1/2 and attention is
    ~uniform over the causal prefix: position t averages t+1 values. If values at different
    positions have correlation ``value_corr`` (rho), that average has variance
    rho + (1 - rho) / (t+1), mean over positions rho + (1 - rho) H_T / T (H_T harmonic number). So
    out * s with s = (rho + (1 - rho) H_T / T)^-1/2: sqrt(T / H_T) for independent values
    (rho = 0, the default: Unit Scaling's assumption; early positions larger, late smaller), 1 for
    identical ones. grad_v gets the same factor (it is then the true gradient). For grad_q and
    grad_k the uniform-attention, independent-values approximation gives variance
    (H_T - H2_T) / (T d) before scaling, and ``constraint`` chooses their scale:

    * ``None`` (default): sqrt(T d / (H_T - H2_T)), unit variance (position 0 gets zero grad_q:
      nothing to attend to but itself). A cut-edge scale, not a true gradient: the q and k paths
      are amplified by sqrt(d H_T / (H_T - H2_T)) (6.8 at T=128, d=32, rho=0) relative to the v path.
    * ``"to_output_scale"``: s, the forward scale, so all three gradients are true gradients of
      the scaled forward; grad_q and grad_k then have std sqrt((H_T - H2_T) / (d H_T)) (rho=0;
      0.15 at T=128, d=32; 0.11 at T=1024, d=64): small, as the loss barely depends on q and k
      while attention is uniform. Needed inside a residual branch for the branch and skip
      gradients to keep their forward ratio.

    Real token streams are correlated across positions (frequent tokens share an embedding, and
    after the first layer every position carries the prefix average): on the byte-level default
    corpus rho is about 0.2 at the first layer and 0.8 deeper, at init (``fp8lm.models.unit_gpt``).
    """
    if constraint not in LINEAR_CONSTRAINTS:
        raise ValueError(f"constraint must be one of {LINEAR_CONSTRAINTS!r}, got {constraint!r}")
    if not 0.0 <= value_corr <= 1.0:
        raise ValueError(f"value_corr must be in [0, 1], got {value_corr}")
    t, d = q.shape[-2], q.shape[-1]
    if k.shape[-2] != t or v.shape[-2] != t:
        raise ValueError("causal_attention expects self-attention: q, k, v with the same length T")
    h1, h2 = _harmonic(t)
    out_scale = (value_corr + (1.0 - value_corr) * h1 / t) ** -0.5
    if constraint == "to_output_scale":
        qk_scale = out_scale
    else:
        qk_scale = math.sqrt(t * d / (h1 - h2)) if t > 1 else 1.0
    out = F.scaled_dot_product_attention(
        scale_bwd(q, qk_scale), scale_bwd(k, qk_scale), scale_bwd(v, out_scale), is_causal=True, scale=1.0 / d
    )
    return scale_fwd(out, out_scale)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over logits (..., V) and integer targets (...).

    Rule: the loss value is unchanged; grad_logits is scaled by M * sqrt(V) (M = rows =
    logits.numel() // V). The raw gradient (softmax - onehot) / M has zero row mean and
    per-row squared norm 1 - 2 p_target + sum p^2 ~ 1 (V large), i.e. per-element std ~ V^-1/2 / M.
    """
    vocab = logits.shape[-1]
    rows = max(logits.numel() // vocab, 1)
    flat = scale_bwd(logits.reshape(-1, vocab), rows * math.sqrt(vocab))
    return F.cross_entropy(flat, targets.reshape(-1))
