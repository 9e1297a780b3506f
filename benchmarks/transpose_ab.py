"""A/B of where compiled FP8 linears make their transposed FP8 copies (a GPU measurement aid).

Usage: python benchmarks/transpose_ab.py [RECIPE]   (default delayed). Compiled llama-0.75b O1 steps
(8 x 2048 tokens) in one process, alternating: transposed copies written by the cast's kernel
(``compiled_transpose`` on, the default) and made from the FP8 tensor by ``fp8_mm`` in backward (off).
Prints the median phase times (CUDA events) of each.
"""
import sys

import torch

from fp8lm.bench import BenchConfig, _build
from fp8lm.nn import linear

sys.path.insert(0, "benchmarks")
from profile_step import phases  # noqa: E402


def main() -> None:
    recipe = sys.argv[1] if len(sys.argv) > 1 else "delayed"
    vocab, results = 32000, []
    x = torch.randint(0, vocab, (8, 2048), device="cuda")  # (B, T)
    y = torch.randint(0, vocab, (8, 2048), device="cuda")  # (B, T)
    for flag in (True, False):
        torch._dynamo.reset()
        linear._FUSED["compiled_transpose"] = flag
        cfg = BenchConfig(device="cuda", preset="llama-0.75b", batch_size=8, seq_len=2048, recipe=recipe)
        model, optimizer = _build(cfg, "O1")
        for block in model.layers:
            block.compile()
        phases(model, optimizer, x, y, steps=3)  # warm-up (compiles)
        ph = phases(model, optimizer, x, y, steps=7)
        print(f"compiled_transpose={flag}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ph.items()), flush=True)
        del model, optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
