"""Does a compiled block give eager's gradients? A check for the torch version at hand (issue 5, tenth session).

    python benchmarks/grad_check.py [--variants]      (--variants: also a copy-everything RMSNorm, for comparison)

The tenth session found, in the Inductor code of the O1 llama-0.75b step on the device image (torch 2.11),
a backward without the input-gradient GEMMs of the q/k/v and gate/up projections (the two that read an
RMSNorm output) and both norms' backward fed zeros. This script runs one ``tiny`` block, forward and
backward, eager and compiled (``aot_eager`` on the CPU; ``inductor`` as well on CUDA), at O0 and O1, and
prints per run the largest relative difference of the input gradient and of every parameter gradient
against eager, and which gradients are all zero. A compiled block whose gradients differ from eager's by
more than rounding is not measuring the same training step.
"""
import torch
import torch._dynamo as dynamo

import fp8lm
from fp8lm.nn import activations
from fp8lm.models import build_model
from fp8lm.tensor import is_scaled


def _model(level: str, device: str):
    torch.manual_seed(0)
    model = build_model("tiny", 256, n_layers=1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, _ = fp8lm.initialize(model, optimizer, level=level, recipe="current", verbose=False)
    return model


def _grads(run, block, x, cos, sin, device):
    xi = x.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = run(xi, cos, sin)
    y.float().square().sum().backward()
    out = {"x": xi.grad.float()}
    for name, p in block.named_parameters():
        g = p.grad
        out[name] = None if g is None else (g.dequantize() if is_scaled(g) else g).float()
        p.grad = None
    return out


def check(level: str, device: str, backend: str) -> str:
    rows = []
    results = []
    for compiled in (False, True):
        dynamo.reset()
        model = _model(level, device)
        block = model.layers[0]
        run = torch.compile(block, backend=backend) if compiled else block
        torch.manual_seed(1)
        x = torch.randn(2, 32, 128, device=device)  # (B, T, C)
        cos, sin = model.rope_cos[:32].to(device), model.rope_sin[:32].to(device)
        results.append(_grads(run, block, x, cos, sin, device))
    eager, comp = results
    worst, worst_l2, zeros = 0.0, 0.0, []
    for name, ge in eager.items():
        gc = comp[name]
        if ge is None or gc is None:
            rows.append(f"{name}: grad missing ({'eager' if ge is None else 'compiled'})")
            continue
        rel = ((gc - ge).abs().max() / ge.abs().max().clamp_min(1e-30)).item()
        l2 = ((gc - ge).norm() / ge.norm().clamp_min(1e-30)).item()
        worst, worst_l2 = max(worst, rel), max(worst_l2, l2)
        if not gc.any() and ge.any():
            zeros.append(name)
        if rel > 1e-2:
            rows.append(f"{name}: max diff {rel:.3g} of max |grad|, relative L2 error {l2:.3g}")
    # FP8 casts turn a last-bit difference upstream (Inductor keeps float32 where eager rounds) into a
    # one-step difference of an FP8 value (6-25%): such runs differ elementwise but not in L2 norm.
    verdict = "SAME" if worst <= 1e-2 and not zeros else "CLOSE" if worst_l2 <= 2e-2 and not zeros else "DIFFERENT"
    head = (f"{level} {device} {backend}: {verdict} (worst max diff {worst:.3g}, worst relative L2 error "
            f"{worst_l2:.3g}; all-zero compiled grads: {zeros or 'none'})")
    return "\n".join([head] + ["    " + r for r in rows])


class _NormCopies(torch.autograd.Function):
    """A variant of ``fp8lm.nn.activations._RMSNorm`` for ``--variants``: every float32 view made a copy."""
    @staticmethod
    def forward(ctx, x, weight, eps, save_dtype):
        x32 = x.to(torch.float32, copy=True)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = (x32 * rstd * weight.to(torch.float32, copy=True)).to(x.dtype, copy=True)
        ctx.save_for_backward(x, rstd, weight)
        ctx.x_dtype = x.dtype
        return y

    backward = staticmethod(activations._RMSNorm.backward)


def main():
    import sys
    print(f"torch {torch.__version__}")
    runs = [("O0", "cpu", "aot_eager"), ("O1", "cpu", "aot_eager")]
    if torch.cuda.is_available():
        runs += [("O0", "cuda", "inductor"), ("O1", "cuda", "aot_eager"), ("O1", "cuda", "inductor")]
    variants = {"shipped": activations._RMSNorm}
    if "--variants" in sys.argv:
        variants["copies"] = _NormCopies
    shipped = activations._RMSNorm
    for vname, fn in variants.items():
        activations._RMSNorm = fn
        try:
            for level, device, backend in runs:
                try:
                    print(f"[{vname}] " + check(level, device, backend), flush=True)
                except Exception as err:  # report, go on
                    print(f"[{vname}] {level} {device} {backend}: {type(err).__name__}: "
                          f"{' '.join(str(err).split())[:300]}", flush=True)
        finally:
            activations._RMSNorm = shipped


if __name__ == "__main__":
    main()
