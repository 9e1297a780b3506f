"""Do compiled blocks compute eager's gradients? The check ``fp8lm bench`` runs before it times compiled steps.

Why: a compiler fault can make a compiled training step *faster* by computing less. Under torch 2.11,
Dynamo mis-traced ``fp8lm``'s RMSNorm (an ``autograd.Function`` whose ``x.float()`` aliased its float32
input, pytorch/pytorch#180642): both norms' backward got zeros and two input-gradient GEMMs per layer
were dropped as dead code, at every level, so the bench timed a shorter step for nine sessions
(``benchmarks/RESULTS.md``, tenth session). A timing cannot see that; a comparison of gradients can.

What: one block of the ``tiny`` preset (dim 128, 2 x 32 tokens) at the given level and recipe, forward
and backward under BF16 autocast, eager and compiled, from the same weights and input. The default
backend is ``aot_eager``: Dynamo's capture and AOTAutograd's joint forward/backward graph (where the
fault above lived) without Inductor's code generation, whose fused float32 intermediates would move FP8
values by whole steps and blur the comparison (``benchmarks/grad_check.py`` also runs Inductor). For the
input and every parameter::

    max_diff = max|g_compiled - g_eager| / max|g_eager|
    rel_l2   = ||g_compiled - g_eager|| / ||g_eager||

Verdicts: ``same`` (every ``max_diff`` <= 1e-2: BF16 rounding), ``close`` (every ``rel_l2`` <= 5e-2, no
gradient that is zero only when compiled, no NaN: an upstream last-bit difference moves some FP8 values
by one step, 6-25% of those values, a few % in L2), ``different`` otherwise. A missing (None) gradient
counts as zeros. Measured on the H100 under torch 2.11 (tenth session): before the fix both norm gains'
gradients were zero only when compiled (``different``); after it O0 and O1 ``same`` under ``aot_eager``.
"""
from __future__ import annotations

import torch

__all__ = ["compiled_gradient_check", "VERDICTS"]

VERDICTS = ("same", "close", "different")
_SAME_MAX_DIFF = 1e-2
_CLOSE_REL_L2 = 5e-2


def _block(level: str, recipe, device: str):
    import fp8lm
    from fp8lm.models import build_model
    torch.manual_seed(0)
    model = build_model("tiny", 256, n_layers=1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, _ = fp8lm.initialize(model, optimizer, level=level, recipe=recipe, verbose=False)
    return model


def _gradients(run, block, x, cos, sin, device: str) -> dict:
    """Input and parameter gradients (float32, FP8 ones decoded; None as zeros) of ``sum(run(x)^2)``."""
    x = x.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = run(x, cos, sin)  # (B, T, C)
    y.float().square().sum().backward()
    grads = {"input": x.grad if x.grad is not None else torch.zeros_like(x)}
    for name, p in block.named_parameters():
        g = p.grad
        g = torch.zeros_like(p, dtype=torch.float32) if g is None else g.dequantize() if hasattr(g, "dequantize") else g
        grads[name] = g.float()
        p.grad = None
    return grads


def compiled_gradient_check(level: str, recipe, device: str, backend: str | None = None, compile_fn=None) -> dict:
    """Compare one ``tiny`` block's gradients, compiled against eager (module docstring).

    ``recipe``: an ``fp8lm.Recipe`` or a recipe name. ``backend``: ``torch.compile``'s backend (default
    ``"aot_eager"``); ``compile_fn(block)`` replaces ``torch.compile`` altogether when given. Returns ``{"level", "backend", "verdict", "worst_max_diff", "worst_rel_l2",
    "zero_only_compiled", "per_tensor"}``; ``per_tensor`` maps each gradient to ``(max_diff, rel_l2)``.
    """
    import torch._dynamo as dynamo
    backend = backend or "aot_eager"
    runs = []
    for compiled in (False, True):
        dynamo.reset()
        model = _block(level, recipe, device)
        block = model.layers[0]
        run = block
        if compiled:
            run = compile_fn(block) if compile_fn is not None else torch.compile(block, backend=backend)
        x = torch.randn(2, 32, model.config.dim, generator=torch.Generator().manual_seed(1)).to(device)  # (B, T, C)
        cos, sin = model.rope_cos[:32].to(device), model.rope_sin[:32].to(device)
        runs.append(_gradients(run, block, x, cos, sin, device))
    dynamo.reset()
    eager, comp = runs
    per_tensor, zero_only_compiled = {}, []
    for name, ge in eager.items():
        gc = comp[name]
        diff = gc - ge
        max_diff = float(diff.abs().max() / ge.abs().max().clamp_min(1e-30))
        rel_l2 = float(diff.norm() / ge.norm().clamp_min(1e-30))
        per_tensor[name] = (max_diff, rel_l2)
        if ge.any() and not gc.any():
            zero_only_compiled.append(name)
    worst_max = max(v[0] for v in per_tensor.values())
    worst_l2 = max(v[1] for v in per_tensor.values())
    nonfinite = any(v != v for pair in per_tensor.values() for v in pair)  # NaN never passes
    if nonfinite or zero_only_compiled or worst_l2 > _CLOSE_REL_L2:
        verdict = "different"
    else:
        verdict = "same" if worst_max <= _SAME_MAX_DIFF else "close"
    return {"level": level, "backend": "custom" if compile_fn is not None else backend, "verdict": verdict,
            "worst_max_diff": worst_max, "worst_rel_l2": worst_l2, "zero_only_compiled": zero_only_compiled,
            "per_tensor": per_tensor}
