"""Why an optimizer row moved (a GPU debugging aid): O1 fused AdamW on llama-0.75b shapes, the O1 master
scale from the bound (default: an amax pass + pass 2) against from the new amax (pass 1 + pass 2,
``adam.master_bound_args`` patched to None), alternated. Per variant: CUDA-event ms per step()
(median of 20), host ms per step() (launch time, no sync), and the top kernels of 3 profiled steps.
"""
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fp8lm.optim.adam as adam_mod
from fp8lm.bench import time_ms
from optim_bench import build, preset_shapes


def main() -> None:
    shapes = preset_shapes("llama-0.75b")
    opt = build("O1 fused", shapes, "cuda")
    real = adam_mod.master_bound_args
    variants = {"bound (amax pass + pass 2)": real, "new amax (pass 1 + pass 2)": lambda *a: None}
    rows = {k: {"gpu": [], "host": []} for k in variants}
    for _ in range(2):
        for name, fn in variants.items():
            adam_mod.master_bound_args = fn
            rows[name]["gpu"].append(statistics.median(time_ms(opt.step, 5, 20, "cuda")))
            torch.cuda.synchronize()
            host = []
            for _ in range(10):
                t0 = time.perf_counter()
                opt.step()
                host.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
            rows[name]["host"].append(statistics.median(host))
    for name, fn in variants.items():
        adam_mod.master_bound_args = fn
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                opt.step()
            torch.cuda.synchronize()
        print(f"== {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
    adam_mod.master_bound_args = real
    for name, r in rows.items():
        print(f"{name:<30} gpu {statistics.median(r['gpu']):7.3f} ms   host {statistics.median(r['host']):7.3f} ms")


if __name__ == "__main__":
    main()
