"""A/B inside whole O1 steps: ``fp8lm.optim.clip_grad_norm_`` against ``torch.nn.utils.clip_grad_norm_``.

Usage: python benchmarks/clip_ab.py   (a GPU). llama-0.75b, 8 x 2048 tokens, O1, recipe delayed,
per-block torch.compile; one model, the two clips alternated 4 times, 5 steps each, after 3
warm-up steps. Phases by CUDA events (profile_step.phases); medians over the rounds. In a step
the host runs ahead of the GPU as in training, so a host-bound clip shows as GPU idle time.
"""
import statistics

import torch

import profile_step
from fp8lm.bench import BenchConfig, _build
from fp8lm.optim import clip_grad_norm_


def main() -> None:
    cfg = BenchConfig(device="cuda", preset="llama-0.75b", batch_size=8, seq_len=2048, recipe="delayed")
    model, optimizer = _build(cfg, "O1")
    for block in model.layers:
        block.compile()
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (8, 2048), device="cuda")  # (B, T)
    y = torch.randint(0, vocab, (8, 2048), device="cuda")  # (B, T)
    profile_step.phases(model, optimizer, x, y, steps=3)  # warm-up (compiles)
    variants = {"fp8lm.optim": clip_grad_norm_, "torch.nn.utils": torch.nn.utils.clip_grad_norm_}
    results = {name: {"clip": [], "total": []} for name in variants}
    for _ in range(4):
        for name, fn in variants.items():
            profile_step.clip_grad_norm_ = fn
            ph = profile_step.phases(model, optimizer, x, y, steps=5)
            results[name]["clip"].append(ph["clip"])
            results[name]["total"].append(sum(ph.values()))
    print("O1 step, clip_grad_norm_ (median of 4 rounds x median of 5 steps):")
    for name, r in results.items():
        print(f"  {name:<16} clip {statistics.median(r['clip']):6.2f} ms   step {statistics.median(r['total']):7.2f} ms")


if __name__ == "__main__":
    main()
