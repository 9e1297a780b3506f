"""Unit Scaling / u-muP ops: scaled so activations and gradients are ~unit variance at init.

See :mod:`fp8lm.unit_scaling.ops` for the rule each op applies.
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

from fp8lm.unit_scaling.ops import __all__  # noqa: F401  (the one list lives in ops.py)
