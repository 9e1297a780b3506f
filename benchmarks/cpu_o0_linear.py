"""O0 step time on a CPU: plain BF16-autocast nn.Linear vs fp8lm's HighPrecisionLinear, same process.

    python benchmarks/cpu_o0_linear.py   # tiny preset, batch 16 x 128, median of 5 steps after 2 warm-up
"""
import statistics
import time

import torch

import fp8lm
from fp8lm.models import GPT, get_config
from fp8lm.nn import HighPrecisionLinear


def step_times(model, idx, n=7):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main():
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (16, 129))
    fast, _ = fp8lm.initialize(GPT(get_config("tiny")), level="O0", verbose=False)
    plain, _ = fp8lm.initialize(GPT(get_config("tiny")), level="O0", verbose=False)
    for m in plain.modules():  # undo the CPU fast path: plain nn.Linear under BF16 autocast
        if isinstance(m, HighPrecisionLinear):
            m.__class__ = torch.nn.Linear
    t_plain, t_fast = step_times(plain, idx), step_times(fast, idx)
    print(f"threads {torch.get_num_threads()}  O0 step: plain BF16 nn.Linear {t_plain:.3f} s, "
          f"HighPrecisionLinear {t_fast:.3f} s, ratio {t_plain / t_fast:.2f}x")


if __name__ == "__main__":
    main()
