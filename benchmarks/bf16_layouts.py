"""Why is BF16 ``nn.Linear`` forward + backward slower than its three GEMMs called bare? (GPU aid)

    python benchmarks/bf16_layouts.py

At 16384 x 2048->11264 and 8192^3, timed in the bench's interleaved, unsynchronized rounds
(``fp8lm.bench.time_interleaved``, 40 rounds of 3 calls): ``nn.Linear`` with ``torch.autograd.grad``;
the three GEMMs bare with the weight gradient as ``g.T @ x`` (the bench's ``bf16 mm only``); and bare with
it as ``(x.T @ g).T`` (what autograd's mm backward computes for ``x @ w.T``). Prints medians and the
per-round medians of each.
"""
import statistics

import torch
from torch import nn

from fp8lm.bench import time_interleaved


def main() -> None:
    for m, k, n in ((16384, 2048, 11264), (8192, 8192, 8192)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        layer = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        w = layer.weight.detach()
        xd = x.detach()

        def linear():
            return torch.autograd.grad(layer(x), (x, layer.weight), g)

        def mm_gtx():
            return xd @ w.t(), g @ w, g.t() @ xd

        def mm_xtg():
            return xd @ w.t(), g @ w, (xd.t() @ g).t()

        fns = {"nn.Linear": linear, "mm, g.T @ x": mm_gtx, "mm, (x.T @ g).T": mm_xtg}
        for fn in fns.values():
            fn()
        torch.cuda.synchronize()
        times = time_interleaved(fns, 40, 3, "cuda")
        for name, ts in times.items():
            rounds = [statistics.median(ts[i:i + 3]) for i in range(0, len(ts), 3)]
            print(f"bf16_layouts {m} x {k}->{n} {name:<16} median {statistics.median(ts):.3f} ms; "
                  f"per round {' '.join(f'{r:.2f}' for r in rounds)}")


if __name__ == "__main__":
    main()
