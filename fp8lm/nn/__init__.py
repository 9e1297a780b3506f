"""FP8 modules."""
from fp8lm.nn.linear import Float8Linear

__all__ = ["Float8Linear"]
