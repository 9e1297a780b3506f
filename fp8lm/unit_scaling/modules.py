"""Unit-scaled ``nn.Module`` layers: the ops of :mod:`fp8lm.unit_scaling.ops` with parameters.

Every layer keeps its weights N(0, 1) and puts its scale factors *outside* the weights, so that at
initialization, with unit-variance inputs, outputs and the gradients sent back are ~unit variance.

Where the scales sit, and why (FP8 with the static recipe, scale 1)
--------------------------------------------------------------------
``fp8lm.initialize`` turns every plain ``nn.Linear`` into an FP8 ``Float8Linear`` whose three
GEMMs cast the input ``x`` and weight ``w`` (E4M3) and the output gradient ``grad_out`` (E5M2).
Those three tensors, not the layer's outputs, are what must be ~unit for a scale of 1. So the
matmul of ``UnitLinear`` / ``UnitReadout`` is a plain ``nn.Linear`` child (``.linear``) and::

    out = scale_fwd(linear(scale_bwd(x, beta_x)), alpha)      # alpha = K^-1/2 (readout: K^-1)

* forward: ``x`` enters the child unscaled (unit) and ``w`` is N(0, 1): both FP8 operands are
  unit. The child's raw output (std sqrt(K)) is a GEMM result, never cast, and ``alpha`` is
  applied after it. Scaling ``x`` by ``alpha`` *before* the child would cast a K^-1/2 tensor.
* backward: ``scale_fwd`` is the identity in backward, so the child's ``grad_out`` is the unit
  gradient arriving at ``out``: the E5M2 operand is unit. The raw grad_input (std sqrt(N)) and
  grad_weight (std sqrt(B)) are GEMM results; ``beta_x`` scales grad_input after the child, and
  grad_weight is scaled by B^-1/2 by a gradient hook on the weight (the weight is a leaf: a cut
  edge, any scale is allowed; Adam is invariant to it anyway). Scaling the gradient *before*
  the child (``scale_bwd`` on ``out``) would cast a non-unit ``grad_out``.

The weight-gradient hook: the factor B^-1/2 (B = rows of the last forward) is set by each
forward and applied to each gradient contribution before accumulation, so gradient
accumulation and activation checkpointing stay correct. A layer called twice per step with
different batch sizes scales both contributions by the last call's factor. The hook is
(re-)registered on whatever ``Parameter`` the layer holds at its next forward, so
``copy.deepcopy``, ``torch.load`` of a pickled model and replaced weights keep the rule.

Constraints (``constraint=``, see ``ops.linear``): inside a residual branch the backward scale of
``x`` must equal the forward scale (``"to_output_scale"``, the default): then the gradient at the
branch input is the true gradient of the scaled forward and branch and skip gradients keep the
ratio of their forward weights. Its std is sqrt(N / K) (e.g. 0.58 for ``down`` 384->128 and
1.73 for ``qkv`` 128->384). ``constraint=None`` makes it unit for any N, K but is only correct on a
cut edge (all gradient to the parameters below passes through it).

Layers and their rules (K fan_in, N fan_out, B rows, V vocabulary, T sequence length):

* ``UnitLinear``: out x W^T K^-1/2; grad_x K^-1/2 (or N^-1/2); grad_W B^-1/2; bias unscaled.
* ``UnitReadout``: out x W^T K^-1 (muP readout: logits std K^-1/2 at init, by design);
  grad_x N^-1/2 (a cut edge: all gradient flows through the head); grad_W B^-1/2.
* ``UnitEmbedding``: out W[idx]; grad_W (tokens / V)^-1/2.
* ``UnitRMSNorm``: x / rms(x) * gain in float32 (unit by construction); grad_gain B^-1/2.
* ``UnitSiLU`` / ``UnitGELU`` / ``UnitSwiGLU``: the activation divided by its std (rms for the
  GLU) under N(0, 1) input; input gradients divided by the rms of the derivative.
* ``UnitMLP``: ``down(swiglu(gate_up(x)))``, linears with ``"to_output_scale"``.
* ``UnitCausalAttention``: softmax scale 1/d; out and grad_v * sqrt(T / H_T) (values assumed
  uncorrelated across positions; ``value_corr`` rho: (rho + (1 - rho) H_T / T)^-1/2); grad_q,
  grad_k per ``constraint`` (``ops.causal_attention``; default here "to_output_scale": true
  gradients, std ~0.15 at init, since a residual branch needs them).
* ``UnitSelfAttention``: fused ``qkv`` UnitLinear, optional RoPE (a rotation: scale-free),
  ``UnitCausalAttention``, ``proj`` UnitLinear.
* ``UnitResidualBlock``: pre-norm block ``x -> add(attn(norm(split(x)))) -> add(mlp(...))``
  with the tau rule (``ops.residual_split`` / ``ops.residual_add``).
* ``UnitCrossEntropy``: mean loss; grad_logits * M sqrt(V).

All layers carry ``unit_scaled = True``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from fp8lm.unit_scaling import ops
from fp8lm.unit_scaling.ops import LINEAR_CONSTRAINTS, scale_bwd, scale_fwd

__all__ = [
    "UnitLinear",
    "UnitReadout",
    "UnitEmbedding",
    "UnitRMSNorm",
    "UnitSiLU",
    "UnitGELU",
    "UnitSwiGLU",
    "UnitMLP",
    "UnitCausalAttention",
    "UnitSelfAttention",
    "UnitResidualBlock",
    "UnitCrossEntropy",
    "residual_taus",
    "apply_rotary",
    "set_weight_grad_scale",
]

# --------------------------------------------------------------------------- weight-gradient scale

# weight Parameter -> one-element list holding the factor its hook applies (set by each forward)
_WEIGHT_GRAD_SCALES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _times_box(box: list, grad: Tensor) -> Tensor:
    if type(grad) is Tensor:
        return grad * box[0]
    # A tensor subclass (fp8lm's FP8 ScaledTensor weight gradient at O1/O2) keeps its type: its
    # in-place multiply by a scalar only changes its scale; an out-of-place one would widen it.
    scaled = grad.clone()
    scaled.mul_(box[0])
    return scaled


def set_weight_grad_scale(weight: Tensor, scale: float) -> None:
    """Scale ``weight``'s next gradient contributions by ``scale`` (a tensor hook, registered once).

    The hook holds only a one-element list, never the module or the weight, so it creates no
    reference cycle; a new ``Parameter`` (deep copy, reload) gets its own hook on first use.
    """
    if not (weight.requires_grad and torch.is_grad_enabled()):
        return
    box = _WEIGHT_GRAD_SCALES.get(weight)
    if box is None:
        box = [scale]
        weight.register_hook(functools.partial(_times_box, box))
        _WEIGHT_GRAD_SCALES[weight] = box
    box[0] = float(scale)


def _check_constraint(constraint: Optional[str]) -> Optional[str]:
    if constraint not in LINEAR_CONSTRAINTS:
        raise ValueError(f"constraint must be one of {LINEAR_CONSTRAINTS!r}, got {constraint!r}")
    return constraint


def _rows(x: Tensor, width: int) -> int:
    return max(x.numel() // width, 1)


# --------------------------------------------------------------------------- matmuls


class UnitLinear(nn.Module):
    """Unit-scaled linear layer: ``out = (x W^T) K^-1/2 (+ bias)``, W ~ N(0, 1) in ``self.linear``.

    Rule: forward K^-1/2 after the GEMM; grad_x K^-1/2 (``constraint="to_output_scale"``, the
    true gradient, std sqrt(N / K)) or N^-1/2 (``constraint=None``, unit); grad_W B^-1/2; the bias
    (zeros at init) is added unscaled. The GEMM's FP8 operands x, W, grad_out are all unit.
    """

    unit_scaled = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 constraint: Optional[str] = "to_output_scale"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.constraint = _check_constraint(constraint)
        self.linear = nn.Linear(in_features, out_features, bias=False)  # the GEMM: initialize converts it
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight N(0, 1), bias 0."""
        nn.init.normal_(self.linear.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def weight(self) -> nn.Parameter:
        """The (N, K) weight, held by the ``nn.Linear`` child."""
        return self.linear.weight

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, constraint={self.constraint}"

    def forward(self, x: Tensor) -> Tensor:
        """x (..., K) -> (..., N)."""
        k, n = self.in_features, self.out_features
        set_weight_grad_scale(self.linear.weight, _rows(x, k) ** -0.5)
        beta_x = k**-0.5 if self.constraint == "to_output_scale" else n**-0.5
        out = scale_fwd(self.linear(scale_bwd(x, beta_x)), k**-0.5)  # (..., N)
        return out if self.bias is None else out + self.bias


class UnitReadout(nn.Module):
    """Output head (u-muP readout): ``logits = (x W^T) / K``, W ~ N(0, 1) in ``self.linear``.

    Rule: forward K^-1 after the GEMM (logits std K^-1/2 at init: small on purpose, as in muP);
    grad_x N^-1/2 (unit; the head is a cut edge); grad_W B^-1/2.
    """

    unit_scaled = True

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight N(0, 1)."""
        nn.init.normal_(self.linear.weight)

    @property
    def weight(self) -> nn.Parameter:
        """The (V, K) weight, held by the ``nn.Linear`` child."""
        return self.linear.weight

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}"

    def forward(self, x: Tensor) -> Tensor:
        """x (..., K) -> logits (..., V)."""
        k, n = self.in_features, self.out_features
        set_weight_grad_scale(self.linear.weight, _rows(x, k) ** -0.5)
        return scale_fwd(self.linear(scale_bwd(x, n**-0.5)), 1.0 / k)


class UnitEmbedding(nn.Module):
    """Token embedding with an N(0, 1) table. Rule: out W[idx]; grad_W (tokens / V)^-1/2."""

    unit_scaled = True

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Table N(0, 1)."""
        nn.init.normal_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def forward(self, idx: Tensor) -> Tensor:
        """idx (...) -> (..., D)."""
        return ops.embedding(idx, self.weight)


# --------------------------------------------------------------------------- norm, activations


class UnitRMSNorm(nn.Module):
    """RMS norm with a learned gain (ones at init), in float32, returned in the input's dtype.

    Rule: x / rms(x) is unit by construction and its input gradient ~unit (std sqrt(1 - 1/d) for
    unit gradients at unit input), so neither is rescaled; grad_gain is scaled by B^-1/2.
    """

    unit_scaled = True

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D)."""
        return ops.rms_norm(x.float(), self.weight.float(), self.eps).type_as(x)


class UnitSiLU(nn.Module):
    """Rule: silu(x) / 0.5595 (its std at N(0, 1) input); grad_x / 0.6160 (rms of silu')."""

    unit_scaled = True

    def forward(self, x: Tensor) -> Tensor:
        """Elementwise."""
        return ops.silu(x)


class UnitGELU(nn.Module):
    """Rule: gelu(x) / 0.5879 (its std at N(0, 1) input); grad_x / 0.6752 (rms of gelu')."""

    unit_scaled = True

    def forward(self, x: Tensor) -> Tensor:
        """Elementwise."""
        return ops.gelu(x)


class UnitSwiGLU(nn.Module):
    """SwiGLU ``silu(gate) * up``. Rule: out / rms(silu) = / 0.5965; grad_up / 0.5965;
    grad_gate / rms(silu') = / 0.6160 (each unit for independent N(0, 1) gate and up)."""

    unit_scaled = True

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        """gate, up (..., F) -> (..., F)."""
        return ops.silu_glu(gate, up)


class UnitMLP(nn.Module):
    """SwiGLU feed-forward ``down(swiglu(gate_up(x)))`` with a fused gate/up ``UnitLinear``.

    Rule: each part unit-scaled as above, the linears with ``"to_output_scale"`` (true
    gradients inside a residual branch): at init grad_x of ``down`` has std sqrt(dim / ffn)
    and that of ``gate_up`` sqrt(2) (both gate and up send gradient back).
    """

    unit_scaled = True

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_up = UnitLinear(dim, 2 * ffn_dim)
        self.act = UnitSwiGLU()
        self.down = UnitLinear(ffn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., C) -> (..., C)."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (..., F) each
        return self.down(self.act(gate, up))  # (..., C)


# --------------------------------------------------------------------------- attention


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of each head of x (B, nh, T, hd) by RoPE angles.

    A rotation preserves every vector's norm, so it needs no scale in either direction.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class UnitCausalAttention(nn.Module):
    """Unit-scaled causal attention on (..., T, d) q, k, v (``ops.causal_attention``).

    Rule: softmax scale 1/d; out and grad_v * s with s = sqrt(T / H_T) for values uncorrelated
    across positions, (rho + (1 - rho) H_T / T)^-1/2 for ``value_corr`` rho; grad_q, grad_k * s
    (``constraint="to_output_scale"``, true gradients) or * sqrt(T d / (H_T - H2_T))
    (``constraint=None``, unit). On a CPU, 16-bit inputs are computed in float32 (the CPU's BF16
    kernel is several times slower and also accumulates in float32) and the output rounded back.
    """

    unit_scaled = True

    def __init__(self, constraint: Optional[str] = "to_output_scale", value_corr: float = 0.0):
        super().__init__()
        self.constraint = _check_constraint(constraint)
        if not 0.0 <= value_corr <= 1.0:
            raise ValueError(f"value_corr must be in [0, 1], got {value_corr}")
        self.value_corr = float(value_corr)

    def extra_repr(self) -> str:
        return f"constraint={self.constraint}, value_corr={self.value_corr}"

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v (..., T, d) -> (..., T, d)."""
        if q.device.type != "cpu" or q.dtype == torch.float32:
            return ops.causal_attention(q, k, v, self.constraint, self.value_corr)
        with torch.autocast("cpu", enabled=False):
            out = ops.causal_attention(q.float(), k.float(), v.float(), self.constraint, self.value_corr)
        return out.to(q.dtype)


class UnitSelfAttention(nn.Module):
    """Multi-head causal self-attention: fused ``qkv`` UnitLinear, RoPE, UnitCausalAttention, ``proj``.

    Rule: every piece unit-scaled as above; RoPE is a rotation (no scale); the linears use
    ``"to_output_scale"`` (inside a residual branch), so at init grad_x of ``qkv`` has std
    ~sqrt(3) times that of its output gradient, and with the true-gradient attention the branch
    sends back a ~unit gradient.
    """

    unit_scaled = True

    def __init__(self, dim: int, n_heads: int, attn_constraint: Optional[str] = "to_output_scale",
                 value_corr: float = 0.0):
        super().__init__()
        if dim % n_heads or (dim // n_heads) % 2:
            raise ValueError(f"dim {dim} must split into {n_heads} heads of even width")
        self.n_heads = n_heads
        self.qkv = UnitLinear(dim, 3 * dim)
        self.attn = UnitCausalAttention(attn_constraint, value_corr)
        self.proj = UnitLinear(dim, dim)

    def forward(self, x: Tensor, cos: Optional[Tensor] = None, sin: Optional[Tensor] = None) -> Tensor:
        """x (B, T, C) -> (B, T, C); ``cos``/``sin`` (T, hd/2) rotary tables, or None for no RoPE."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = self.attn(q, k, v)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


# --------------------------------------------------------------------------- residual blocks


def residual_taus(n_branches: int, mult: float = 1.0) -> list[float]:
    """tau of each residual add so the stream is the normalized sum of all branch outputs.

    With branch weight ``mult`` relative to the embedding, after ``l`` adds the (unit-variance)
    stream is (emb + mult * sum of l branch outputs) / sqrt(1 + l mult^2), which needs
    tau_l = mult^2 / (1 + l mult^2) at add l = 1..n: the unit-scaled form of the plain
    ``x = x + f(x)`` stream of a standard transformer (mult 1: every branch and the embedding
    weigh the same; the final norm removes the overall scale).
    """
    if n_branches < 1 or not mult > 0:
        raise ValueError(f"need n_branches >= 1 and mult > 0, got {n_branches} and {mult}")
    return [mult * mult / (1.0 + l * mult * mult) for l in range(1, n_branches + 1)]


class UnitResidualBlock(nn.Module):
    """Pre-norm transformer block with unit-scaled residuals (the tau rule).

        a, skip = split(x, tau_attn);  x = add(attn(attn_norm(a)), skip, tau_attn)
        m, skip = split(x, tau_mlp);   x = add(mlp(mlp_norm(m)), skip, tau_mlp)

    Rule: ``add`` is sqrt(tau) branch + sqrt(1 - tau) skip (unit for independent unit inputs);
    ``split`` gives the branch gradient sqrt(tau) and the skip gradient sqrt(1 - tau) in backward,
    so with true-gradient branches the stream gradient is the true gradient of the forward.
    """

    unit_scaled = True

    def __init__(self, attn: nn.Module, mlp: nn.Module, dim: int, tau_attn: float, tau_mlp: float,
                 eps: float = 1e-5):
        super().__init__()
        for tau in (tau_attn, tau_mlp):
            if not 0.0 < tau < 1.0:
                raise ValueError(f"tau must be in the open interval (0, 1), got {tau}")
        self.tau_attn, self.tau_mlp = float(tau_attn), float(tau_mlp)
        self.attn_norm = UnitRMSNorm(dim, eps)
        self.attn = attn
        self.mlp_norm = UnitRMSNorm(dim, eps)
        self.mlp = mlp

    def extra_repr(self) -> str:
        return f"tau_attn={self.tau_attn:.4f}, tau_mlp={self.tau_mlp:.4f}"

    def forward(self, x: Tensor, *attn_args) -> Tensor:
        """x (B, T, C) -> (B, T, C); ``attn_args`` are passed on to ``attn`` (e.g. RoPE tables)."""
        a, skip = ops.residual_split(x, self.tau_attn)
        x = ops.residual_add(self.attn(self.attn_norm(a), *attn_args), skip, self.tau_attn)  # (B, T, C)
        m, skip = ops.residual_split(x, self.tau_mlp)
        return ops.residual_add(self.mlp(self.mlp_norm(m)), skip, self.tau_mlp)  # (B, T, C)


# --------------------------------------------------------------------------- loss


class UnitCrossEntropy(nn.Module):
    """Mean cross-entropy; rule: loss unchanged, grad_logits * M sqrt(V) (unit at init)."""

    unit_scaled = True

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """logits (..., V), targets (...) -> scalar."""
        return ops.cross_entropy(logits, targets)
