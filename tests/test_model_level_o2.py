"""Model-level bar for level O2: the `tiny` GPT with FP8 GEMMs, FP16 master weights, FP8 weight
gradients and FP8 m / FP16 v AdamW state ends within 2% of O0 (BF16, FP32 AdamW).

Same seeds, data and batches as the O0 runs of tests/model_runs.py (200 steps of 16 x 128 tokens);
the final validation loss is compared. As for O1 (test_model_level.py), which level ends lower
at this length depends on the seed (and on the CPU's BF16 arithmetic), so the bar is on the mean gap
over two seeds, each seed held to 4% either way (a level that behaves differently, better or worse,
is suspect; on an AVX-512-BF16 machine, 2026-11-24, seed 1337 gave -0.45% and seed 7 +3.06%). The mean-gap bar is
one-sided: O2 ending lower than O0 is not a failure (at 300 steps, with FP8 saved activations, O2
ended 1.9% below O0 on the mean of these two seeds: `benchmarks/RESULTS.md`; at these 200 steps
seed 1337 gives +0.39% and seed 7 +1.44%).
"""
import pytest

from model_runs import STEPS

SEEDS = (1337, 7)


@pytest.fixture(scope="module")
def runs(model_runs):
    return {(level, seed): model_runs[f"tiny-{level}-s{seed}"] for seed in SEEDS for level in ("O0", "O2")}


def _gap(runs, seed):
    o0, o2 = runs[("O0", seed)]["val_loss"], runs[("O2", seed)]["val_loss"]
    return (o2 - o0) / o0


@pytest.mark.slow
def test_o2_val_loss_within_2_percent_of_o0(runs):
    gaps = [_gap(runs, s) for s in SEEDS]
    for s in SEEDS:
        o0, o2 = runs[("O0", s)], runs[("O2", s)]
        assert o0["val_loss"] < 2.5, f"O0 did not learn (seed {s}): val loss {o0['val_loss']:.3f}"
        assert len(o2["loss_history"]) == STEPS and o2["skipped_steps"] == 0
        print(f"seed {s}: O0 val {o0['val_loss']:.4f}  O2 val {o2['val_loss']:.4f}  gap {_gap(runs, s):+.2%}")
    assert all(abs(g) <= 0.04 for g in gaps), gaps
    assert sum(gaps) / len(gaps) <= 0.02, gaps
