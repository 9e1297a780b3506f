"""The high-precision linear layer of the O0 baseline and of the layers O1 keeps out of FP8.

Numerics: under BF16 autocast, ``F.linear`` rounds input and weight to bfloat16, multiplies with
float32 accumulation and rounds the output to bfloat16. On GPUs that is one BF16 tensor-core
GEMM and this layer simply calls ``F.linear``.

CPUs without BF16 matrix units (AVX2-only x86, most CI machines) run that BF16 GEMM in software,
5-15x slower than a float32 GEMM (measured here: 87% of an O0 step of the ``tiny`` preset). On
the CPU this layer therefore computes the same function another way: operands rounded to
bfloat16, widened back to float32 (exact), a float32 GEMM (the products of two bfloat16 values
are exact in float32, the sums are float32 as in the BF16 kernel), the result rounded to
bfloat16. Only the order of the float32 additions can differ. The backward pass follows the same
casts, so gradients are rounded to bfloat16 exactly where autocast rounds them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HighPrecisionLinear"]


class HighPrecisionLinear(nn.Linear):
    """``nn.Linear`` with a fast, numerically equivalent BF16-autocast GEMM on CPUs.

    Made in place from a plain ``nn.Linear`` with ``HighPrecisionLinear.from_linear(linear)``.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "HighPrecisionLinear":
        """Convert a plain ``nn.Linear`` in place (same object, parameters and state_dict keys)."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"HighPrecisionLinear.from_linear needs a plain nn.Linear, got {type(linear).__name__}")
        linear.__class__ = cls
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return F.linear(x, self.weight, self.bias)
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            x_lp = x.to(dtype).float()  # (..., K), values exactly representable in `dtype`
            w_lp = self.weight.to(dtype).float()  # (N, K)
            b_lp = None if self.bias is None else self.bias.to(dtype).float()
            return F.linear(x_lp, w_lp, b_lp).to(dtype)
