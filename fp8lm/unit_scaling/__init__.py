"""Unit Scaling / u-muP ops and layers: scaled so activations and gradients are ~unit variance at init.

See :mod:`fp8lm.unit_scaling.ops` for the rule each functional op applies and
:mod:`fp8lm.unit_scaling.modules` for the layers (where their scales sit relative to the FP8 GEMM).
"""
from fp8lm.unit_scaling.ops import (
    LINEAR_CONSTRAINTS,
    causal_attention,
    cross_entropy,
    embedding,
    gelu,
    linear,
    readout,
    residual_add,
    residual_split,
    rms_norm,
    scale_bwd,
    scale_fwd,
    scaled,
    silu,
    silu_glu,
)
from fp8lm.unit_scaling.modules import (
    UnitCausalAttention,
    UnitCrossEntropy,
    UnitEmbedding,
    UnitGELU,
    UnitLinear,
    UnitMLP,
    UnitReadout,
    UnitResidualBlock,
    UnitRMSNorm,
    UnitSelfAttention,
    UnitSiLU,
    UnitSwiGLU,
    apply_rotary,
    residual_taus,
    set_weight_grad_scale,
)
from fp8lm.unit_scaling import modules as _modules
from fp8lm.unit_scaling import ops as _ops

__all__ = [*_ops.__all__, *_modules.__all__]
