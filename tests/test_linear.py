"""Float8Linear forward and backward against float64, what it saves, and its non-finite rule."""
import copy

import pytest
import torch
from torch import nn

from conftest import randn_heavy
from fp8lm.formats import sqnr_db
from fp8lm.nn import Float8Linear
from fp8lm.scaling import Recipe
from fp8lm.tensor import ScaledTensor, is_scaled, storage_bytes

SHAPES = [  # (leading dims of x, in_features, out_features)
    ((64,), 128, 96),
    ((37,), 100, 48),
    ((3, 29), 80, 33),
    ((2, 5, 7), 64, 130),
]
RECIPES = {
    "current": Recipe(),
    "delayed": Recipe(scaling="delayed"),
    "current-e4m3": Recipe(grad_format="e4m3"),
    "current-pow2": Recipe(pow2_scales=True),
}


def _pair(in_f, out_f, bias, recipe):
    hp = nn.Linear(in_f, out_f, bias=bias).double()
    with torch.no_grad():  # weights with a few outliers, like trained ones
        hp.weight.copy_(randn_heavy(out_f, in_f, dist="student_t", dtype=torch.float64) / in_f**0.5)
    fp8 = Float8Linear.from_linear(copy.deepcopy(hp).float(), recipe)
    return hp, fp8


def _step(hp, fp8, lead, dist, xg=None):
    x, g = xg or (randn_heavy(*lead, hp.in_features, dist=dist), randn_heavy(*lead, hp.out_features, dist=dist))
    x_hp = x.double().requires_grad_()
    out_hp = hp(x_hp)
    out_hp.backward(g.double())
    x_8 = x.clone().requires_grad_()
    out_8 = fp8(x_8)
    out_8.backward(g)
    return x_hp, out_hp, x_8, out_8


@pytest.mark.parametrize("lead,in_f,out_f", SHAPES)
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dist", ["gauss", "student_t"])
def test_forward_backward_sqnr(seed, lead, in_f, out_f, recipe, bias, dist):
    r = RECIPES[recipe]
    hp, fp8 = _pair(in_f, out_f, bias, r)
    # Delayed scaling is measured in steady state (the same batch again, so the history covers it);
    # how it reacts to a batch with a new, larger outlier is test_scaling's jump test.
    xg = (randn_heavy(*lead, in_f, dist=dist), randn_heavy(*lead, out_f, dist=dist))
    for _ in range(3 if r.scaling == "delayed" else 1):
        hp.zero_grad(), fp8.zero_grad()
        x_hp, out_hp, x_8, out_8 = _step(hp, fp8, lead, dist, xg)
    assert out_8.shape == out_hp.shape and out_8.dtype == torch.float32
    # pow2 scales put a lone outlier anywhere in (max/2, max], on the coarse top of the grid:
    # measured minimum over 40 draws 23.4 dB (output) / 21.8 dB (grads), hence 4 dB lower bars.
    slack = 4.0 if r.pow2_scales else 0.0
    grad_bar = (27.0 if r.grad_format == "e4m3" else 23.0) - slack
    assert sqnr_db(out_hp, out_8) >= 27.0 - slack
    assert sqnr_db(x_hp.grad, x_8.grad) >= grad_bar
    assert sqnr_db(hp.weight.grad, fp8.weight.grad) >= grad_bar
    if bias:
        assert sqnr_db(hp.bias.grad, fp8.bias.grad) >= 60.0  # bias grad is not quantized


def test_output_dtype_follows_autocast():
    layer = Float8Linear.from_linear(nn.Linear(32, 32), Recipe())
    x = torch.randn(4, 32)
    assert layer(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_saves_fp8_input_not_high_precision():
    layer = Float8Linear.from_linear(nn.Linear(64, 48), Recipe())
    x = torch.randn(40, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    big = [t for t in saved if t.numel() > 1]
    assert {t.dtype for t in big} == {torch.float8_e4m3fn}, [(t.dtype, t.shape) for t in big]
    assert sorted(t.shape for t in big) == sorted([torch.Size([40, 64]), torch.Size([48, 64])])


def test_no_grad_saves_nothing_and_updates_nothing():
    layer = Float8Linear.from_linear(nn.Linear(64, 48), Recipe(scaling="delayed"))
    x = torch.randn(8, 64)
    state = (layer.fp8_amax_history.clone(), layer.fp8_last_scale.clone())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            layer(x)
        with torch.inference_mode():
            layer(x)
    assert saved == []
    layer.eval()  # eval with grad enabled: saves for backward but updates no history
    layer(x.requires_grad_()).sum().backward()
    assert torch.equal(layer.fp8_amax_history, state[0]) and torch.equal(layer.fp8_last_scale, state[1])


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_input_gives_nan_output(bad):
    layer = Float8Linear.from_linear(nn.Linear(32, 16, bias=False), Recipe())
    x = torch.randn(4, 32)
    x[1, 3] = bad
    out = layer(x)
    assert torch.isnan(out[1]).all()  # never a finite saturated value from an inf input
    assert torch.isfinite(out[[0, 2, 3]]).all()


def test_non_finite_grad_propagates_as_nan():
    layer = Float8Linear.from_linear(nn.Linear(32, 16), Recipe())
    x = torch.randn(4, 32, requires_grad=True)
    g = torch.randn(4, 16)
    g[0, 0] = float("inf")
    layer(x).backward(g)
    assert torch.isnan(layer.weight.grad).any() and torch.isnan(x.grad[0]).all()


def test_emulated_path_matches_real_kernel(seed):
    hp = nn.Linear(96, 80)
    real = Float8Linear.from_linear(copy.deepcopy(hp), Recipe())
    emu = Float8Linear.from_linear(copy.deepcopy(hp), Recipe(emulate=True))
    x = torch.randn(33, 96)
    g = torch.randn(33, 80)
    xr, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    real(xr).backward(g)
    emu(xe).backward(g)
    assert sqnr_db(real.weight.grad, emu.weight.grad) > 60 and sqnr_db(xr.grad, xe.grad) > 60


def test_frozen_weight_skips_weight_grad():
    layer = Float8Linear.from_linear(nn.Linear(32, 32), Recipe())
    layer.weight.requires_grad_(False)
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None


def test_from_linear_rejects_subclasses():
    class MyLinear(nn.Linear):
        pass
    with pytest.raises(TypeError):
        Float8Linear.from_linear(MyLinear(16, 16), Recipe())


# ---- FP16 master weights and FP8 weight gradients (levels O1/O2) ----------------------------------

def _fp16_pair(in_f, out_f, bias=True, recipe=Recipe(), **kw):
    """A float64 reference and an FP16-master Float8Linear with the same (FP16-representable) weights."""
    hp = nn.Linear(in_f, out_f, bias=bias).double()
    with torch.no_grad():
        w = randn_heavy(out_f, in_f, dist="student_t", dtype=torch.float64) / in_f**0.5
        hp.weight.copy_(ScaledTensor.from_hp(w.float(), torch.float16).dequantize())
    fp8 = Float8Linear.from_linear(copy.deepcopy(hp).float(), recipe, master="fp16", **kw)
    return hp, fp8


@pytest.mark.parametrize("lead,in_f,out_f", SHAPES[1:])
@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_fp16_master_fp8_grad_sqnr(seed, lead, in_f, out_f, recipe):
    hp, fp8 = _fp16_pair(in_f, out_f, recipe=RECIPES[recipe])
    assert is_scaled(fp8.weight) and isinstance(fp8.weight, nn.Parameter) and fp8.weight._data.dtype == torch.float16
    ref = Float8Linear.from_linear(copy.deepcopy(hp).float(), RECIPES[recipe])  # FP32 weight, FP32 grad
    assert torch.equal(ref.weight, fp8.weight.dequantize())
    x, g = randn_heavy(*lead, in_f, dist="student_t"), randn_heavy(*lead, out_f, dist="student_t")
    x_hp, out_hp, x_8, out_8 = _step(hp, fp8, lead, "student_t", (x, g))
    x_r = x.clone().requires_grad_()
    out_r = ref(x_r)
    out_r.backward(g)
    # same FP8 GEMMs bit for bit: the FP16 master's cast equals the FP32 weight's
    assert torch.equal(out_8, out_r) and torch.equal(x_8.grad, x_r.grad)
    grad = fp8.weight.grad
    assert is_scaled(grad) and grad._data.dtype == torch.float8_e4m3fn
    assert storage_bytes(grad) == in_f * out_f + 4  # 1 byte per parameter + the scale
    assert sqnr_db(ref.weight.grad, grad.dequantize()) >= 28.0  # E4M3 storage of the GEMM output
    assert sqnr_db(hp.weight.grad, grad.dequantize()) >= 22.0  # vs float64: E5M2 grad_out + E4M3 storage
    assert sqnr_db(out_hp, out_8) >= 27.0 and sqnr_db(hp.bias.grad, fp8.bias.grad) >= 60.0


def test_wgrad_format_e5m2_and_bad_arguments():
    _, fp8 = _fp16_pair(48, 32, wgrad_format="e5m2")
    fp8(torch.randn(5, 48)).sum().backward()
    assert fp8.weight.grad._data.dtype == torch.float8_e5m2 and "wgrad=e5m2" in repr(fp8)
    with pytest.raises(ValueError, match="allowed: fp32, fp16"):
        Float8Linear.from_linear(nn.Linear(16, 16), Recipe(), master="bf16")
    with pytest.raises(ValueError, match="allowed: e4m3, e5m2"):
        Float8Linear.from_linear(nn.Linear(16, 16), Recipe(), master="fp16", wgrad_format="fp16")


@pytest.mark.parametrize("small_at", [0, 5])
def test_micro_batch_accumulation_keeps_small_contributions(seed, small_at):
    """8 micro-batches accumulated into one .grad match one big batch (float64 reference), and a
    micro-batch whose gradient is 1e-4 of the others is still in the sum."""
    in_f, out_f, rows = 70, 45, 23
    hp, _ = _fp16_pair(in_f, out_f, bias=False)
    layers = [Float8Linear.from_linear(copy.deepcopy(hp).float(), Recipe(), master="fp16") for _ in range(3)]
    acc, without, big = layers
    xs = [randn_heavy(rows, in_f, dist="student_t") for _ in range(8)]
    gs = [randn_heavy(rows, out_f, dist="student_t") for _ in range(8)]
    gs[small_at] = gs[small_at] * 1e-4
    for i, (x, g) in enumerate(zip(xs, gs)):
        acc(x).backward(g)
        if i != small_at:
            without(x).backward(g)
    big(torch.cat(xs)).backward(torch.cat(gs))
    ref = sum(g.double().t() @ x.double() for x, g in zip(xs, gs))  # (out, in) float64
    grad = acc.weight.grad
    assert is_scaled(grad) and grad._data.dtype == torch.float32  # the widened accumulation buffer
    assert storage_bytes(grad) == 4 * in_f * out_f + 4
    assert big.weight.grad._data.dtype == torch.float8_e4m3fn
    s_acc, s_big = sqnr_db(ref, grad.dequantize()), sqnr_db(ref, big.weight.grad.dequantize())
    assert s_acc >= 22.0 and s_acc >= s_big - 1.5, (s_acc, s_big)
    small_ref = gs[small_at].double().t() @ xs[small_at].double()
    small_got = grad.dequantize().double() - without.weight.grad.dequantize().double()
    assert sqnr_db(small_ref, small_got) >= 20.0  # an FP8 sum would have rounded it away entirely
    acc.zero_grad(set_to_none=False)  # zero_grad without set_to_none: back to 1 byte per parameter
    assert acc.weight.grad._data.dtype == torch.float8_e4m3fn and (acc.weight.grad.dequantize() == 0).all()


def test_fp16_master_non_finite_grad_and_frozen_weight():
    _, fp8 = _fp16_pair(32, 16)
    x = torch.randn(4, 32, requires_grad=True)
    g = torch.randn(4, 16)
    g[0, 0] = float("inf")
    fp8(x).backward(g)
    assert torch.isnan(fp8.weight.grad.dequantize()).any()
    _, frozen = _fp16_pair(32, 32)
    frozen.weight.requires_grad_(False)
    frozen(x).sum().backward()
    assert frozen.weight.grad is None and is_scaled(frozen.weight)
