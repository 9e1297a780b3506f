"""Model-level bars of the unit-scaled GPT (unit-tiny, 200 steps of 16 x 128 tokens, seed 1337).

* FP8 with static scales (level O1, recipe "static": scale 1, no amax anywhere) ends within 2% of
  the same unit-scaled model in BF16 (O0), final validation loss.
* The unit-scaled model in BF16 is not worse than the standard `tiny` model at O0 by more than
  5%. The bar is one-sided: with its tuned u-muP learning rate unit-tiny ends about 10% *lower*
  than tiny (benchmarks/RESULTS.md: 1.67 vs 1.87-1.90 over three seeds), and being better is
  not a failure of unit scaling.

Runs are declared in tests/model_runs.py and trained once per session (fixture `model_runs`).
"""
import pytest


@pytest.fixture(scope="module")
def runs(model_runs):
    return {name: model_runs[name] for name in ("tiny-O0-s1337", "unit-tiny-O0-s1337", "unit-tiny-O1static-s1337")}


def _gap(a: float, b: float) -> float:
    return (a - b) / b


@pytest.mark.slow
def test_static_fp8_within_2_percent_of_unit_bf16(runs):
    o0, static = runs["unit-tiny-O0-s1337"], runs["unit-tiny-O1static-s1337"]
    gap = _gap(static["val_loss"], o0["val_loss"])
    print(f"unit-tiny val loss: O0 {o0['val_loss']:.4f}, O1 static {static['val_loss']:.4f}, gap {gap:+.2%}")
    assert static["recipe"] == "static" and static["skipped_steps"] == 0
    assert o0["val_loss"] < 2.5  # it learned: ln(256) = 5.55 at init
    assert abs(gap) <= 0.02, gap


@pytest.mark.slow
def test_unit_bf16_within_5_percent_of_standard_tiny(runs):
    std, unit = runs["tiny-O0-s1337"], runs["unit-tiny-O0-s1337"]
    gap = _gap(unit["val_loss"], std["val_loss"])
    print(f"val loss: tiny O0 {std['val_loss']:.4f}, unit-tiny O0 {unit['val_loss']:.4f}, gap {gap:+.2%}")
    assert unit["num_params"] == std["num_params"] and unit["flops_per_token"] == std["flops_per_token"]
    assert gap <= 0.05, gap
