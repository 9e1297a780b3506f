"""Model-level bar: the `tiny` GPT trained at O1 (FP8 GEMMs) ends within 2% of O0 (BF16).

Same seed, same data (the embedded standard-library corpus), same batches; the final validation
loss is compared. The run is shortened for CI (a CPU's BF16 matmul is slow): batch 8 x 128 tokens.
"""
import pytest

from fp8lm.train import TrainConfig, train

STEPS = 200


@pytest.fixture(scope="module")
def runs():
    base = dict(preset="tiny", steps=STEPS, batch_size=8, eval_every=STEPS, eval_batches=8, progress=False)
    return {level: train(TrainConfig(level=level, **base)) for level in ("O0", "O1")}


@pytest.mark.slow
def test_o1_val_loss_within_2_percent_of_o0(runs):
    o0, o1 = runs["O0"]["val_loss"], runs["O1"]["val_loss"]
    assert o0 < 3.0, f"O0 did not learn: val loss {o0:.3f}"  # ln(256) = 5.55 at init
    gap = (o1 - o0) / o0
    print(f"O0 val {o0:.4f}  O1 val {o1:.4f}  gap {gap:+.2%}")
    assert abs(gap) <= 0.02


@pytest.mark.slow
def test_o1_loss_curve_tracks_o0(runs):
    h0, h1 = runs["O0"]["loss_history"], runs["O1"]["loss_history"]
    assert len(h0) == len(h1) == STEPS and runs["O1"]["skipped_steps"] == 0
    # mean train loss over the last quarter, where noise from single batches averages out
    tail = STEPS // 4
    m0, m1 = sum(h0[-tail:]) / tail, sum(h1[-tail:]) / tail
    assert abs(m1 - m0) / m0 <= 0.03
