"""FP8 linear layer: the three GEMMs of ``nn.Linear`` in FP8, forward and backward.

Numerics (``x`` is the input reshaped to (M, K), ``w`` the (N, K) weight, see ``scaling.py``)::

    out         = x_fp8 @ w_fp8.T            E4M3 x E4M3, output in the autocast dtype (else x.dtype)
    grad_input  = grad_out_fp8 @ w_fp8       E5M2 x E4M3 (E4M3 x E4M3 with grad_format="e4m3")
    grad_weight = grad_out_fp8.T @ x_fp8     E5M2 x E4M3, output in the weight's dtype
    grad_bias   = grad_out.sum(0)            high precision

Each cast has its own per-tensor scale from the recipe (current, delayed, or static = 1). The forward saves
``x_fp8`` and ``w_fp8`` (1 byte per element) for backward, never the high-precision input.

When is scaling state updated? Exactly once per training forward + backward:

* training forward with grad enabled: the x and w histories (delayed) and the last-used scales;
* its backward: the grad_out history;
* ``torch.no_grad()`` / ``inference_mode`` / ``module.eval()``: nothing is updated and, with grad
  disabled, nothing is saved (the GEMM runs outside autograd);
* the forward that activation checkpointing recomputes inside backward: nothing is updated and,
  under delayed scaling, the scales of the original forward are reused so the recomputed
  activations are bit-identical.

A module called several times per step (weight sharing) pushes one history entry per call.

Scaling state lives in non-persistent buffers (``fp8_amax_history``, ``fp8_last_scale``): it moves
with ``.to()`` but stays out of ``state_dict`` so converted and plain models share checkpoint keys.
"""
from __future__ import annotations

import torch
from torch import nn

from fp8lm.formats import Format, amax, quantize
from fp8lm.ops.gemm import fp8_mm
from fp8lm.scaling import Recipe, compute_scale, static_scale, update_history

__all__ = ["Float8Linear"]

_X, _W, _G = 0, 1, 2  # rows of the scaling-state buffers


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` whose GEMMs run in FP8 (see the module docstring for the numerics).

    Made from an existing ``nn.Linear`` with ``Float8Linear.from_linear(linear, recipe)``, which
    converts the module in place: same object, same parameters, same ``state_dict`` keys.
    """

    recipe: Recipe

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe) -> "Float8Linear":
        """Convert a plain ``nn.Linear`` in place (its class becomes ``Float8Linear``) and return it."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"Float8Linear.from_linear needs a plain nn.Linear, got {type(linear).__name__}")
        linear.__class__ = cls
        linear._init_fp8(recipe)
        return linear

    def _init_fp8(self, recipe: Recipe) -> None:
        self.recipe = recipe
        dev = self.weight.device
        self.register_buffer("fp8_amax_history", torch.zeros(3, recipe.history_len, device=dev), persistent=False)
        self.register_buffer("fp8_last_scale", torch.ones(3, device=dev), persistent=False)

    def extra_repr(self) -> str:
        r = self.recipe
        return f"{super().extra_repr()}, fp8={r.scaling}:{r.fwd_format}/{r.grad_format}"

    def fp8_scale(self, row: int, t: torch.Tensor, fmt: Format, update: bool, recompute: bool) -> torch.Tensor:
        """The scale for casting ``t`` (state row ``row``), updating the state when ``update``."""
        if self.recipe.scaling == "static":
            return static_scale(t.device)  # no amax: the model is unit-scaled by construction
        delayed = self.recipe.scaling == "delayed"
        if recompute and delayed:
            return self.fp8_last_scale[row].clone()
        amax_now = amax(t)
        history = self.fp8_amax_history[row] if delayed else None
        scale = compute_scale(amax_now, history, fmt, self.recipe)
        if update:
            if delayed:
                update_history(history, amax_now)
            self.fp8_last_scale[row].copy_(scale)
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"Float8Linear: input has {x.shape[-1]} features in its last dimension, "
                               f"the layer expects {self.in_features} (input shape {tuple(x.shape)})")
        out_dtype = _out_dtype(x)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad))
        # Dtypes are explicit below; autocast must not re-cast the scaling math or the GEMM
        # (on CPUs it would turn _scaled_mm's internal matmul into a slow BF16 one).
        with torch.autocast(x.device.type, enabled=False):
            if not needs_grad:
                out, *_ = _fp8_forward(self, x.reshape(-1, x.shape[-1]), self.weight, False, False, out_dtype)
                out = out if self.bias is None else out + self.bias.to(out_dtype)
                return out.reshape(*x.shape[:-1], self.out_features)
            recompute = _in_backward()
            update = self.training and not recompute
            return _Float8LinearFn.apply(x, self.weight, self.bias, self, out_dtype, update, recompute)


def _fp8_forward(layer: Float8Linear, x2d, w_hp, update: bool, recompute: bool, out_dtype):
    """Quantize input and weight, run ``x @ w.T`` in FP8; return the output and what backward needs."""
    fmt = layer.recipe.fwd
    x_scale = layer.fp8_scale(_X, x2d, fmt, update, recompute)
    w_scale = layer.fp8_scale(_W, w_hp, fmt, update, recompute)
    x_fp8 = quantize(x2d, fmt, x_scale)  # (M, K)
    w_fp8 = quantize(w_hp, fmt, w_scale)  # (N, K)
    out = fp8_mm(x_fp8, x_scale.reciprocal(), w_fp8.t(), w_scale.reciprocal(), out_dtype,
                 emulate=layer.recipe.emulate)  # (M, N)
    return out, x_fp8, x_scale, w_fp8, w_scale


class _Float8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hp, w_hp, bias, layer, out_dtype, update, recompute):
        x2d = x_hp.reshape(-1, x_hp.shape[-1])  # (M, K)
        out, x_fp8, x_scale, w_fp8, w_scale = _fp8_forward(layer, x2d, w_hp, update, recompute, out_dtype)
        if bias is not None:
            out = out + bias.to(out_dtype)
        ctx.save_for_backward(x_fp8, x_scale, w_fp8, w_scale)
        ctx.layer, ctx.update = layer, update
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x_hp.shape, x_hp.dtype, w_hp.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.reshape(*x_hp.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, x_scale, w_fp8, w_scale = ctx.saved_tensors
        layer = ctx.layer
        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # (M, N)
        fmt = layer.recipe.grad
        g_scale = layer.fp8_scale(_G, g2d, fmt, ctx.update, False)
        g_fp8 = quantize(g2d, fmt, g_scale)
        g_inv, emulate = g_scale.reciprocal(), layer.recipe.emulate
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_mm(g_fp8, g_inv, w_fp8, w_scale.reciprocal(), ctx.x_dtype, emulate)  # (M, K)
            grad_x = grad_x.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = fp8_mm(g_fp8.t(), g_inv, x_fp8, x_scale.reciprocal(), ctx.w_dtype, emulate)  # (N, K)
        if ctx.needs_input_grad[2]:
            grad_b = g2d.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None
