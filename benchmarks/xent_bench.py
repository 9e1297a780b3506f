"""Cross entropy forward + backward at the step's shape: the plain expression against fp8lm's kernels.

    python benchmarks/xent_bench.py [--rows 16384] [--vocab 32000]

Rows, one process, BF16 logits (rows x vocab) with random targets, each timed over forward + backward
(CUDA events, median of repeats after warm-up), with the peak memory the call adds above its inputs:

* ``plain``: ``F.cross_entropy(logits.float(), t)``, what ``GPT.forward`` computed before;
* ``plain compiled``: the same under ``torch.compile``;
* ``kernel B/W``: ``fp8lm.ops.cross_entropy`` with BLOCK=B, num_warps=W (the default is marked ``*``).

The kernel rows also print their largest deviation from ``plain`` (loss, gradient). Table last.
On a CPU: a tiny smoke run of the plain rows and (under ``TRITON_INTERPRET=1``) the default kernel.
"""
import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from fp8lm.bench import time_ms
from fp8lm.ops import cross_entropy as xent
from fp8lm.ops.cast import triton_available


def plain(z, t):
    return F.cross_entropy(z.float(), t)


def fwd_bwd(fn, z, t):
    def call():
        z.grad = None
        loss = fn(z, t)
        loss.backward()
        return loss
    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        args.rows, args.vocab, args.repeats = 64, 1000, 3
        print("xent_bench: no CUDA GPU, a tiny smoke run on the CPU")
    z = (torch.randn(args.rows, args.vocab, device=device) * 2).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, args.vocab, (args.rows,), device=device)
    rows = {"plain": plain}
    if cuda:
        rows["plain compiled"] = torch.compile(plain)
    default = (xent._BLOCK, xent._WARPS)
    configs = [(b, w) for b in (2048, 4096, 8192) for w in (4, 8, 16)] if cuda else [default]
    if triton_available(device):
        for b, w in configs:
            rows[f"kernel {b}/{w}{' *' if (b, w) == default else ''}"] = (b, w)
    z.grad = None
    ref_loss = plain(z, t)
    ref_loss.backward()
    ref_grad = z.grad.clone()
    results = {}
    for name, fn in rows.items():
        if isinstance(fn, tuple):
            xent._BLOCK, xent._WARPS = fn
            fn = xent.cross_entropy
        call = fwd_bwd(fn, z, t)
        loss = call()
        dev = (abs(float(loss) - float(ref_loss)), float((z.grad.float() - ref_grad.float()).abs().max()))
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ms = statistics.median(time_ms(call, 3, args.repeats, device))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
        results[name] = (ms, peak, dev)
        print(f"{name:<18} {ms:8.3f} ms  +{peak:.2f} GiB  dev loss {dev[0]:.2e} grad {dev[1]:.2e}", flush=True)
    xent._BLOCK, xent._WARPS = default
    base_ms = results["plain"][0]
    print(f"\ncross entropy fwd+bwd, {args.rows} x {args.vocab} BF16 logits, {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, torch {torch.__version__}")
    print(f"{'row':<18}{'ms':>9}{'x plain':>9}{'+GiB':>7}{'|dloss|':>10}{'|dgrad|max':>12}")
    for name, (ms, peak, dev) in results.items():
        print(f"{name:<18}{ms:9.3f}{base_ms / ms:9.2f}{peak:7.2f}{dev[0]:10.1e}{dev[1]:12.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
