"""FP8 modules, and the high-precision linear that keeps CPU baselines fast."""
from fp8lm.nn.bf16 import HighPrecisionLinear
from fp8lm.nn.linear import Float8Linear

__all__ = ["Float8Linear", "HighPrecisionLinear"]
