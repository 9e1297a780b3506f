"""Does a compiled block give eager's gradients? A check for the torch version at hand (issue 5, tenth session).

    python benchmarks/grad_check.py [--variants]      (--variants: also a copy-everything RMSNorm, for comparison)

The tenth session found, in the Inductor code of the O1 llama-0.75b step on the device image (torch 2.11),
a backward without the input-gradient GEMMs of the q/k/v and gate/up projections (the two that read an
RMSNorm output) and both norms' backward fed zeros. This script runs ``fp8lm.compile_check`` (one ``tiny``
block, forward and backward, eager against compiled) at O0 and O1 with ``aot_eager`` on the CPU and, on
CUDA, with ``inductor`` as well, and prints each verdict with every gradient that differs by more than
1% of its largest value. ``fp8lm bench`` runs the same check (``aot_eager``) before its compiled rows.
"""
import sys

import torch

from fp8lm.compile_check import compiled_gradient_check
from fp8lm.nn import activations


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


def report(level: str, device: str, backend: str) -> str:
    check = compiled_gradient_check(level, "current", device, backend=backend)
    zeros = ", ".join(check["zero_only_compiled"]) or "none"
    lines = [f"{level} {device} {backend}: {check['verdict']} (worst max diff {check['worst_max_diff']:.3g}, "
             f"worst relative L2 {check['worst_rel_l2']:.3g}; zero only when compiled: {zeros})"]
    for name, (max_diff, rel_l2) in check["per_tensor"].items():
        if max_diff > 1e-2:
            lines.append(f"    {name}: max diff {max_diff:.3g} of max |grad|, relative L2 {rel_l2:.3g}")
    return "\n".join(lines)


def main():
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
                    print(f"[{vname}] " + report(level, device, backend), flush=True)
                except Exception as err:  # report, go on
                    print(f"[{vname}] {level} {device} {backend}: {type(err).__name__}: "
                          f"{' '.join(str(err).split())[:300]}", flush=True)
        finally:
            activations._RMSNorm = shipped


if __name__ == "__main__":
    main()
