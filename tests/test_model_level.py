"""Model-level bar: the `tiny` GPT trained at O1 (FP8 GEMMs) ends within 2% of O0 (BF16).

Same seed, same data (the embedded standard-library corpus), same batches; the final validation
loss is compared, 200 steps of 16 x 128 tokens per run (runs shared with the other model-level
tests, see tests/model_runs.py). Runs are deterministic on a given CPU, but which level ends lower at
this length depends on the seed and on the CPU's BF16 arithmetic: on an AVX2 machine seed 1337 gave O1
-1.50% vs O0 and seed 7 +1.19%; on an AVX-512-BF16 machine (2026-11-24, same code) +0.83% and +3.02%,
with the seed-7 tail train loss +3.2%. One seed's gap is mostly trajectory noise, about 3% either way
across these CPUs, so the bar is on the mean over two seeds (2%), and each seed is held to 4%.
"""
import pytest

from model_runs import STEPS

SEEDS = (1337, 7)
PER_SEED = 0.04  # one seed's gap, either way (module docstring)


@pytest.fixture(scope="module")
def runs(model_runs):
    return {(level, seed): model_runs[f"tiny-{level}-s{seed}"] for seed in SEEDS for level in ("O0", "O1")}


def _gap(runs, seed, key="val_loss"):
    o0, o1 = runs[("O0", seed)][key], runs[("O1", seed)][key]
    return (o1 - o0) / o0


@pytest.mark.slow
def test_o1_val_loss_within_2_percent_of_o0(runs):
    gaps = [_gap(runs, s) for s in SEEDS]
    for s in SEEDS:
        o0 = runs[("O0", s)]["val_loss"]
        assert o0 < 2.5, f"O0 did not learn (seed {s}): val loss {o0:.3f}"  # ln(256) = 5.55 at init
        print(f"seed {s}: O0 val {o0:.4f}  O1 val {runs[('O1', s)]['val_loss']:.4f}  gap {_gap(runs, s):+.2%}")
    assert all(abs(g) <= PER_SEED for g in gaps), gaps
    assert abs(sum(gaps) / len(gaps)) <= 0.02, gaps


@pytest.mark.slow
def test_o1_loss_curve_tracks_o0(runs):
    tail = STEPS // 4  # mean train loss over the last quarter, where single-batch noise averages out
    for s in SEEDS:
        h0, h1 = runs[("O0", s)]["loss_history"], runs[("O1", s)]["loss_history"]
        assert len(h0) == len(h1) == STEPS and runs[("O1", s)]["skipped_steps"] == 0
        m0, m1 = sum(h0[-tail:]) / tail, sum(h1[-tail:]) / tail
        assert abs(m1 - m0) / m0 <= PER_SEED, (s, m0, m1)
