"""Optimizers for levels O1 and O2: ``fp8lm.optim.AdamW`` (Adam and AdamW, FP32 or FP8/FP16 state).

See ``fp8lm/optim/adam.py`` for the numerics of the FP8 state.
"""
from fp8lm.optim.adam import AdamW
from fp8lm.optim.fused import fused_step_enabled, set_fused_step

__all__ = ["AdamW", "set_fused_step", "fused_step_enabled"]
