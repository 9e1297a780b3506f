"""Scaling recipes: how each FP8 cast chooses its per-tensor scale.

An FP8 linear layer casts three tensors per training step: the input ``x`` and the weight ``w``
(forward, E4M3) and the output gradient ``grad_out`` (backward, E5M2 by default). A recipe says
how each gets its scale (see ``formats.py`` for the cast itself):

* ``current``: ``scale = fmt.max / amax(tensor)`` from the tensor being cast (one extra read).
* ``delayed`` (FP8-LM, Transformer Engine): ``scale = fmt.max / max(amax history)`` over the last
  ``history_len`` steps (16 by default, as in FP8-LM); this step's amax is appended after the cast,
  so a cast never waits for its own amax. Fallback rule: while the history is empty (before the
  layer's first training forward) the current amax is used; from then on only the history (in
  ``Float8Linear``: a Python flag, ``fp8_history_ready``, so that compiled code has no data-
  dependent choice and Inductor can fuse the cast into the kernel producing the tensor). A
  non-finite amax is not pushed: the history keeps its finite entries. A tensor that suddenly grows
  saturates (clamps to ``fmt.max``, never inf) for one step; one that shrinks keeps a too-small
  scale for at most ``history_len`` steps.
* ``static`` (unit scaling, arXiv 2303.11257): ``scale = 1`` always; no amax is computed anywhere.
  Correct only for a model whose tensors have unit scale by construction (``fp8lm.unit_scaling``):
  E4M3 then covers about [2**-9, 448] and E5M2 [2**-16, 57344] around 1. On an ordinary model small
  gradients flush to zero (E5M2's smallest subnormal is 2**-16, about 1.5e-5).

History bookkeeping is plain tensor ops on the tensor's device (no ``.item()``, no host sync).

The three GEMMs of one FP8 linear (``x`` is (M, K), ``w`` is (N, K))::

    out         = x_fp8 @ w_fp8.T            E4M3 x E4M3  -> (M, N), in the autocast dtype
    grad_input  = grad_out_fp8 @ w_fp8       E5M2 x E4M3  -> (M, K)
    grad_weight = grad_out_fp8.T @ x_fp8     E5M2 x E4M3  -> (N, K), float32

``grad_format="e4m3"`` runs the backward casts in E4M3 too (more precision, less range).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8lm.formats import FORMATS, Format, get_format, scale_from_amax

__all__ = ["Recipe", "RECIPES", "SCALINGS", "get_recipe", "compute_scale", "static_scale", "update_history"]

SCALINGS = ("current", "delayed", "static")


@dataclass(frozen=True)
class Recipe:
    """How an FP8 linear scales its casts.

    scaling: "current", "delayed" or "static" (scale 1, no amax).
    history_len: amax history window for delayed scaling (FP8-LM uses 16).
    fwd_format / grad_format: FP8 formats of the forward operands and of the output gradient.
    pow2_scales: round every scale down to a power of two (exact rescaling).
    margin: back every scale off by ``2**margin``.
    emulate: run the GEMMs as dequantize + high-precision matmul instead of ``torch._scaled_mm``
        (the fallback on GPUs without FP8; also useful to isolate kernel effects).
    fast_accum: the forward GEMM (``out = x @ w.T``) uses Hopper's fast FP8 accumulation (no
        periodic promotion to float32), as torchao's float8 recipes do for that GEMM; the two
        gradient GEMMs always accumulate in full float32. Off by default (``benchmarks/RESULTS.md``
        has its speed and error on the H100).
    """

    scaling: str = "current"
    history_len: int = 16
    fwd_format: str = "e4m3"
    grad_format: str = "e5m2"
    pow2_scales: bool = False
    margin: int = 0
    emulate: bool = False
    fast_accum: bool = False

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; allowed: {', '.join(SCALINGS)}")
        if not isinstance(self.history_len, int) or self.history_len < 1:
            raise ValueError(f"history_len must be an integer >= 1, got {self.history_len!r}")
        for field in ("fwd_format", "grad_format"):
            if getattr(self, field) not in FORMATS:
                raise ValueError(f"unknown {field} {getattr(self, field)!r}; allowed: {', '.join(FORMATS)}")
        if self.fwd_format == "e5m2":
            raise ValueError("fwd_format 'e5m2' is not allowed: an E5M2 x E5M2 GEMM has no kernel; use 'e4m3'")

    @property
    def fwd(self) -> Format:
        return get_format(self.fwd_format)

    @property
    def grad(self) -> Format:
        return get_format(self.grad_format)


RECIPES = {
    "current": Recipe(scaling="current"),
    "delayed": Recipe(scaling="delayed"),
    "static": Recipe(scaling="static"),
}


def get_recipe(recipe: "str | Recipe") -> Recipe:
    """Return a named recipe (``fp8lm.RECIPES``) or pass a ``Recipe`` through."""
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; allowed: {', '.join(RECIPES)} or an fp8lm.Recipe")
    return RECIPES[recipe]


def compute_scale(amax_now: torch.Tensor, history: torch.Tensor | None, fmt: Format, recipe: Recipe) -> torch.Tensor:
    """Scale for this cast: from ``amax_now`` (current) or from ``history`` (delayed, with fallback).

    Static recipes never reach here with an amax: ``Float8Linear`` uses ``static_scale`` instead.
    """
    scale_now = scale_from_amax(amax_now, fmt, recipe.margin, recipe.pow2_scales)
    if recipe.scaling == "current" or history is None:
        return scale_now
    amax_hist = history.amax()
    scale_hist = scale_from_amax(amax_hist, fmt, recipe.margin, recipe.pow2_scales)
    return torch.where(amax_hist > 0, scale_hist, scale_now)


def static_scale(device: torch.device) -> torch.Tensor:
    """The scale of every cast under the static recipe: 1, a float32 scalar on ``device``."""
    return torch.ones((), dtype=torch.float32, device=device)


def update_history(history: torch.Tensor, amax_now: torch.Tensor) -> None:
    """Push ``amax_now`` into the rolling ``history`` in place; a non-finite amax is not pushed
    (the history keeps its finite entries, so a delayed scale stays finite)."""
    rolled = torch.roll(history, 1)
    rolled[0] = amax_now
    finite = torch.isfinite(amax_now)
    history.copy_(torch.where(finite, rolled, history))
