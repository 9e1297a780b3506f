"""``clip_grad_norm_`` for FP8 gradients: torch's semantics without one Python dispatch per tensor.

``torch.nn.utils.clip_grad_norm_`` takes its per-tensor path for tensor subclasses (its
``_has_foreach_support`` is False for them). Over an O1/O2 model, whose FP8 linear weights have
``ScaledTensor`` gradients, it therefore calls ``vector_norm`` and ``mul_`` once per gradient, each
through ``ScaledTensor.__torch_dispatch__`` in Python: 4.2 ms per ``llama-0.75b`` step on the H100
while the GPU waits (``benchmarks/RESULTS.md``). Here::

    norms   FP8 ScaledTensor gradients: fp8lm.ops.norm.fp8_l2_norms (one read of the FP8 bytes,
            one launch per tensor on CUDA; its plain-torch twin elsewhere);
            plain gradients: torch._foreach_norm
    total   vector_norm(stack(norms in float32)); coef = max_norm / (total + 1e-6), clamped to 1
    clip    plain gradients: torch._foreach_mul_(grads, coef);
            FP8 gradients: torch._foreach_div_(scales, coef): the FP8 bytes stay, the scale takes the
            factor, exactly as ``ScaledTensor.mul_`` does it (``fp8lm/tensor.py``)

The numbers are torch's up to float32 summation order (a few ulps in the FP8 gradients' norms). No
host synchronization unless ``error_if_nonfinite``. Anything else (another ``norm_type``, DTensor
gradients under FSDP2, ScaledTensors holding non-FP8 data, gradients on several devices) goes to
torch's function unchanged.
"""
from __future__ import annotations

from typing import Iterable

import torch

from fp8lm.ops.norm import fp8_l2_norms
from fp8lm.tensor import ScaledTensor

__all__ = ["clip_grad_norm_"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _split(grads: list) -> tuple[list, list] | None:
    """(plain gradients, FP8 ScaledTensor gradients), or None when another kind is present."""
    plain, fp8 = [], []
    for g in grads:
        if type(g) is torch.Tensor:
            plain.append(g)
        elif type(g) is ScaledTensor and g._data.dtype in _FP8 and g._data.is_contiguous():
            fp8.append(g)
        else:
            return None
    return plain, fp8


def clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """Clip the gradients of ``parameters`` to a total norm of ``max_norm``; return the total norm.

    The arguments and result are ``torch.nn.utils.clip_grad_norm_``'s; FP8 ``ScaledTensor`` gradients
    take the path in the module docstring, everything else torch's function.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    split = _split(grads) if float(norm_type) == 2.0 else None
    if not grads or split is None or not split[1] or len({g.device for g in grads}) != 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    plain, fp8 = split
    norms = fp8_l2_norms([g._data for g in fp8], [g._scale for g in fp8])
    if plain:
        norms += [n.float() for n in torch._foreach_norm(plain, 2.0)]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(f"The total norm of order 2.0 for gradients from `parameters` is non-finite, so it "
                           "cannot be clipped. To disable this error and scale the gradients by the non-finite "
                           "norm anyway, set `error_if_nonfinite=False`")
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if plain:
        torch._foreach_mul_(plain, coef)
    torch._foreach_div_([g._scale for g in fp8], coef)
    return total
