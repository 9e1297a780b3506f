"""Optimizers for levels O1 and O2: ``fp8lm.optim.AdamW`` (Adam and AdamW, FP32 or FP8/FP16 state),
and ``fp8lm.optim.clip_grad_norm_`` (torch's, without a Python dispatch per FP8 gradient).

See ``fp8lm/optim/adam.py`` for the numerics of the FP8 state.
"""
from fp8lm.optim.adam import AdamW
from fp8lm.optim.clip import clip_grad_norm_
from fp8lm.optim.fused import fused_step_enabled, set_fused_step

__all__ = ["AdamW", "clip_grad_norm_", "set_fused_step", "fused_step_enabled"]
