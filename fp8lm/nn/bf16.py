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

Attention has the same problem on those CPUs: BF16 ``scaled_dot_product_attention`` ran 2.8x
slower than float32 here (forward + backward, 16 x 4 heads x 128 x 32), 40% of an O0 ``tiny`` step.
``causal_attention`` widens BF16 q, k, v to float32 on the CPU (exact), runs the float32 kernel
and rounds the output back: the CPU BF16 kernel accumulates in float32 as well, and the result is
as close to a float64 reference (relative error 1.6e-3 vs 1.9e-3 for the BF16 kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HighPrecisionLinear", "causal_attention"]


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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal ``scaled_dot_product_attention`` of (B, nh, T, hd) tensors; fast BF16 on CPUs.

    On GPUs, or for float32 inputs, this is ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``.
    On a CPU with 16-bit inputs it computes in float32 and rounds the output to the input dtype.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cpu", enabled=False):  # autocast would cast the float32 operands back
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    return y.to(q.dtype)
