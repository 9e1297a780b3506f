"""Scaling recipes: validation, the delayed-scaling history, and when state may change."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fp8lm.formats import E4M3, E5M2, scale_from_amax, sqnr_db
from fp8lm.nn import Float8Linear
from fp8lm.scaling import RECIPES, Recipe, compute_scale, get_recipe, update_history


@pytest.mark.parametrize("kw,word", [({"scaling": "sometimes"}, "scaling"), ({"history_len": 0}, "history_len"),
                                     ({"grad_format": "e3m4"}, "grad_format"), ({"fwd_format": "e5m2"}, "e5m2")])
def test_recipe_validation(kw, word):
    with pytest.raises(ValueError, match=word):
        Recipe(**kw)


def test_get_recipe_names_allowed_values():
    assert get_recipe("delayed") is RECIPES["delayed"]
    with pytest.raises(ValueError, match="allowed: current, delayed"):
        get_recipe("dynamic")


def test_history_window_and_reset():
    h = torch.zeros(16)
    for i in range(1, 21):
        update_history(h, torch.tensor(float(i)))
    assert sorted(h.tolist()) == [float(i) for i in range(5, 21)]  # last 16 only, newest first
    assert h[0] == 20.0
    before = h.clone()
    for bad in (float("inf"), float("nan")):
        update_history(h, torch.tensor(bad))
        assert torch.equal(h, before)  # a non-finite amax is not pushed


def test_delayed_falls_back_to_current_when_history_empty():
    r = Recipe(scaling="delayed")
    s = compute_scale(torch.tensor(2.0), torch.zeros(16), E4M3, r)
    assert s.item() == pytest.approx(448 / 2)
    s = compute_scale(torch.tensor(2.0), torch.tensor([4.0] + [0.0] * 15), E4M3, r)
    assert s.item() == pytest.approx(448 / 4)


def test_delayed_tracks_a_1000x_jump_and_drop(seed):
    torch.manual_seed(seed)
    layer = Float8Linear.from_linear(nn.Linear(64, 32), Recipe(scaling="delayed", history_len=16))
    ref = nn.Linear(64, 32).double()
    ref.load_state_dict(layer.state_dict())
    quality = []
    for step in range(60):
        mag = 1000.0 if 10 <= step < 30 else 1.0
        x = torch.randn(48, 64) * mag
        out = layer(x.requires_grad_())
        out.sum().backward()
        assert torch.isfinite(out).all(), step
        assert (out != 0).any(), step
        quality.append(sqnr_db(ref(x.double()), out))
    # the jump step saturates (clamped, finite); the next steps know the new amax
    assert min(quality[11:30]) >= 25.0
    # after the drop the stale 1000x amax shrinks the scale for at most 16 steps, without flushing
    assert min(quality[30:46]) >= 10.0
    assert min(quality[47:]) >= 25.0


def test_delayed_scale_does_not_wait_for_current_amax(seed):
    """After the first training forward every delayed scale comes from the history alone (the cast
    need not wait for its own amax): a 1000x larger step-2 input and gradient are cast with step 1's
    scales (they saturate), and their amaxes are pushed into the history after the cast."""
    layer = Float8Linear.from_linear(nn.Linear(32, 16), Recipe(scaling="delayed"))
    assert not layer.fp8_history_ready
    x1, g1 = torch.randn(8, 32), torch.randn(8, 16)
    layer(x1.requires_grad_()).backward(g1)
    assert layer.fp8_history_ready
    assert torch.equal(layer.fp8_last_scale[0], scale_from_amax(x1.abs().max(), E4M3))  # step 1: current
    x2, g2 = torch.randn(8, 32) * 1000, torch.randn(8, 16) * 1000
    layer(x2.requires_grad_()).backward(g2)
    assert torch.equal(layer.fp8_last_scale[0], scale_from_amax(x1.abs().max(), E4M3))
    assert torch.equal(layer.fp8_last_scale[2], scale_from_amax(g1.abs().max(), E5M2))
    assert layer.fp8_amax_history[0, 0] == x2.abs().max() and layer.fp8_amax_history[2, 0] == g2.abs().max()


def test_history_respects_window_in_layer():
    layer = Float8Linear.from_linear(nn.Linear(32, 32), Recipe(scaling="delayed", history_len=4))
    for _ in range(10):
        layer(torch.randn(8, 32, requires_grad=True)).sum().backward()
    assert layer.fp8_amax_history.shape == (3, 4)
    assert (layer.fp8_amax_history > 0).all()


def _model(recipe):
    torch.manual_seed(0)
    return nn.Sequential(Float8Linear.from_linear(nn.Linear(32, 64), recipe), nn.GELU(),
                         Float8Linear.from_linear(nn.Linear(64, 32), recipe))


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_checkpoint_recompute_updates_history_once_and_matches(scaling):
    recipe = Recipe(scaling=scaling, history_len=8)
    plain, ckpt = _model(recipe), _model(recipe)
    for step in range(3):
        x = torch.randn(16, 32) * (1 + step)
        plain(x.requires_grad_()).square().sum().backward()
        checkpoint(ckpt, x, use_reentrant=False).square().sum().backward()
    for a, b in zip((plain[0], plain[2]), (ckpt[0], ckpt[2])):
        assert torch.equal(a.fp8_amax_history, b.fp8_amax_history)  # one push per step, not two
        assert torch.equal(a.weight.grad, b.weight.grad)  # recomputed activations are identical
    if scaling == "delayed":
        assert int((plain[0].fp8_amax_history[0] > 0).sum()) == 3
