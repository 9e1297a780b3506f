"""Optimizer step time: torch's fused AdamW against fp8lm AdamW, plain-torch and fused Triton steps.

    python benchmarks/optim_bench.py                    (a CUDA GPU with Triton: llama-0.75b shapes)
    python benchmarks/optim_bench.py --preset gpt-125m  (another preset's shapes)
    python benchmarks/optim_bench.py                    (a CPU: a tiny smoke run of the plain paths;
                                                         TRITON_INTERPRET=1 adds the fused ones)

Parameters have the shapes of a preset's model (``fp8lm.models.build_model`` on the meta device):
at O1/O2 its 2-D weights but the token embedding are FP16 ``ScaledTensor`` masters with E4M3
``ScaledTensor`` gradients (what ``fp8lm.amp`` makes of Float8Linear weights), the rest FP32
parameters with FP32 gradients. Rows, each built, timed and freed in turn in one process:

* ``torch fused``: ``torch.optim.AdamW(fused=True)``, every parameter FP32 with FP32 gradients;
* ``O1 plain`` / ``O1 fused``: fp8lm AdamW, state="fp32" + FP16 masters, ``fused=False`` / ``True``;
* ``O2 plain`` / ``O2 fused``: fp8lm AdamW, state="fp8" + FP16 masters, ``fused=False`` / ``True``.

Time: median ms per ``step()`` over CUDA-event repeats after warm-up (``fp8lm.bench.time_ms``);
the gradients stay in place between steps. The table is printed last, with the ratio to torch.
"""
import argparse
import gc
import statistics
import sys

import torch

from fp8lm.bench import time_ms
from fp8lm.ops.cast import triton_available
from fp8lm.optim import AdamW
from fp8lm.tensor import ScaledTensor

TINY_SHAPES = [((96, 64), True), ((64,), False), ((200, 64), False), ((64, 130), True)]


def preset_shapes(preset: str) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, is an FP16 master at O1/O2) of every parameter of ``preset``'s model."""
    from fp8lm.models import build_model
    with torch.device("meta"):
        model = build_model(preset)
    return [(tuple(p.shape), p.dim() == 2 and "emb" not in name) for name, p in model.named_parameters()]


def make_params(shapes, device: str, masters: bool) -> list[torch.nn.Parameter]:
    """Parameters with gradients: FP16 masters + E4M3 gradients where ``masters`` and marked, else FP32."""
    params = []
    for shape, is_master in shapes:
        w = torch.randn(shape, device=device) * 0.02
        g = torch.randn(shape, device=device) * 1e-3
        if masters and is_master:
            p = torch.nn.Parameter(ScaledTensor.from_hp(w, torch.float16))
            p.grad = ScaledTensor.from_hp(g, torch.float8_e4m3fn)
        else:
            p = torch.nn.Parameter(w)
            p.grad = g
        params.append(p)
    return params


def build(row: str, shapes, device: str):
    """The optimizer of one row (its parameters hang off it)."""
    if row == "torch fused":
        return torch.optim.AdamW(make_params(shapes, device, False), lr=1e-4, fused=device.startswith("cuda"))
    level, kind = row.split()
    return AdamW(make_params(shapes, device, True), lr=1e-4, state="fp32" if level == "O1" else "fp8",
                 fused=kind == "fused")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-0.75b")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rows", default=None, help="comma-separated rows to run (default: all); 'torch fused' "
                        "always runs, as the ratio's base")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    fused_ok = triton_available(device)
    if cuda:
        shapes = preset_shapes(args.preset)
    else:
        shapes, args.warmup, args.repeats = TINY_SHAPES, 1, 2
        print("optim_bench: no CUDA GPU, a tiny smoke run on the CPU")
    rows = ["torch fused", "O1 plain", "O1 fused", "O2 plain", "O2 fused"]
    if args.rows:
        wanted = {r.strip() for r in args.rows.split(",")}
        unknown = wanted - set(rows)
        if unknown:
            raise SystemExit(f"optim_bench: unknown rows {sorted(unknown)}; allowed: {', '.join(rows)}")
        rows = [r for r in rows if r == "torch fused" or r in wanted]
    if not fused_ok:
        rows = [r for r in rows if not r.endswith(" fused") or r == "torch fused"]
        print("optim_bench: Triton unavailable here: fused fp8lm rows skipped")
    numel = sum(torch.Size(s).numel() for s, _ in shapes)
    results = {}
    for row in rows:
        opt = build(row, shapes, device)
        ms = statistics.median(time_ms(opt.step, args.warmup, args.repeats, device))
        results[row] = ms
        print(f"{row:<12} {ms:9.3f} ms", flush=True)
        del opt
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    base = results["torch fused"]
    name = args.preset if cuda else "tiny"
    print(f"\n{name}: {len(shapes)} parameters, {numel / 1e6:.1f}M elements, {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}")
    print(f"{'optimizer':<14}{'ms/step':>10}{'x torch fused':>15}")
    for row, ms in results.items():
        print(f"{row:<14}{ms:10.3f}{ms / base:15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
