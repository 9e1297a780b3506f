"""fp8lm.nn.activations: same forward as plain PyTorch, gradients against float64, bytes saved for backward."""
import pytest
import torch
import torch.nn.functional as F

import fp8lm
from fp8lm.formats import sqnr_db
from fp8lm.models import build_model
from fp8lm.nn.activations import (causal_attention, dequantize_rows, quantize_rows, rms_norm, rms_norm_reference,
                                  swiglu, swiglu_reference)
from conftest import randn_heavy


def saved_bytes(fn):
    """Run ``fn()`` and return (its output, the bytes of distinct storages autograd saved for backward)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def grads64(fn, *inputs):
    """Gradients of ``sum(fn(*inputs) * w)`` for a fixed random ``w``, inputs as float64 leaves."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return torch.autograd.grad((out * w).sum(), leaves), w


def grads(fn, w, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, w.to(out.dtype))


# ------------------------------------------------------------------ rows
def test_quantize_rows_round_trip(seed):
    x = randn_heavy(7, 33, dist="student_t") * torch.logspace(-6, 3, 7).unsqueeze(1)  # rows 9 decades apart
    x_fp8, scale = quantize_rows(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and scale.shape == (7, 1)
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two
    amax_scaled = (x.abs().amax(-1, keepdim=True) * scale)
    assert bool(((amax_scaled > 224) & (amax_scaled <= 448)).all())
    back = dequantize_rows(x_fp8, scale, torch.float32)
    for row, row_back in zip(x, back):
        assert sqnr_db(row, row_back) > 25  # each row at E4M3 precision, whatever its magnitude
    x[2, 3] = float("inf")
    assert torch.isnan(dequantize_rows(*quantize_rows(x), torch.float32)[2]).any()  # never hidden


# ------------------------------------------------------------------ RMSNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_forward_equals_plain_and_grads_match_float64(seed, dtype):
    x = randn_heavy(3, 5, 37, dist="student_t").to(dtype) * 3
    w = 1 + 0.3 * torch.randn(37)
    assert torch.equal(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
    (gx64, gw64), gy = grads64(lambda a, b: rms_norm_reference(a, b, 1e-5), x, w)
    gx, gw = grads(lambda a, b: rms_norm(a, b, 1e-5), gy, x, w)
    bound = 100 if dtype == torch.float32 else 40  # the BF16 output grad and BF16 grad_x bound it
    assert sqnr_db(gx64, gx) > bound and sqnr_db(gw64, gw) > bound
    gx_bf, gw_bf = grads(lambda a, b: rms_norm(a, b, 1e-5, torch.bfloat16), gy, x, w)
    assert sqnr_db(gx64, gx_bf) > 40 and sqnr_db(gw64, gw_bf) > 40  # input saved in BF16


def test_rms_norm_saves_half_the_plain_bytes():
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.ones(256, requires_grad=True)
    _, plain = saved_bytes(lambda: rms_norm_reference(x, w, 1e-5))
    _, lean = saved_bytes(lambda: rms_norm(x, w, 1e-5))
    _, lean_bf16 = saved_bytes(lambda: rms_norm(x, w, 1e-5, torch.bfloat16))
    assert lean <= 0.5 * plain + 64 * 4 + 256 * 4  # x + rstd + weight, not x + x_hat
    assert lean_bf16 <= 0.5 * lean + 64 * 4 + 256 * 4


def test_rms_norm_refuses_wrong_weight():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.randn(2, 8), torch.ones(7))


# ------------------------------------------------------------------ SwiGLU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_forward_equals_plain_and_grads_match_float64(seed, dtype):
    gu = (randn_heavy(2, 9, 2 * 43, dist="student_t") * 2).to(dtype)
    assert torch.equal(swiglu(gu), swiglu_reference(gu))
    assert torch.equal(swiglu(gu, save_fp8=True), swiglu_reference(gu))  # FP8 storage is for backward only
    (g64,), gh = grads64(swiglu_reference, gu)
    (g,) = grads(swiglu, gh, gu)
    (g_fp8,) = grads(lambda a: swiglu(a, save_fp8=True), gh, gu)
    assert sqnr_db(g64, g) > (100 if dtype == torch.float32 else 40)
    assert sqnr_db(g64, g_fp8) > 25  # gate and up at E4M3 precision (3 mantissa bits) in backward


def test_swiglu_fp8_saves_a_third_of_plain_bytes():
    gu = torch.randn(128, 2 * 96, dtype=torch.bfloat16, requires_grad=True)

    def plain():
        g, u = gu.chunk(2, dim=-1)
        return F.silu(g) * u

    _, plain_bytes = saved_bytes(plain)
    _, lean = saved_bytes(lambda: swiglu(gu))
    _, lean_fp8 = saved_bytes(lambda: swiglu(gu, save_fp8=True))
    assert lean <= 0.67 * plain_bytes  # [g, u], not also silu(g)
    assert lean_fp8 <= 0.5 * lean + 128 * 4  # 1 byte an element + a float32 scale a row


def test_swiglu_refuses_odd_width():
    with pytest.raises(ValueError, match="even"):
        swiglu(torch.randn(3, 7))


# ------------------------------------------------------------------ attention
def test_attention_fp8_saved_forward_exact_grads_close(seed):
    q, k, v = (randn_heavy(2, 3, 19, 16, dist="student_t").to(torch.bfloat16) for _ in range(3))
    plain = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.equal(causal_attention(*leaves, save_fp8=True), plain)
    ref = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    g64, gy = grads64(ref, q, k, v)
    g_bf16 = grads(causal_attention, gy, q, k, v)
    g_fp8 = grads(lambda a, b, c: causal_attention(a, b, c, save_fp8=True), gy, q, k, v)
    for ref_g, g, g8 in zip(g64, g_bf16, g_fp8):
        assert sqnr_db(ref_g, g) > 35
        assert sqnr_db(ref_g, g8) > 17  # q, k, v at E4M3 precision in backward (min 20.9 dB over 60 seeds)


def test_attention_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one \\(B, nh, T, hd\\) shape"):
        causal_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8))


# ------------------------------------------------------------------ model
def test_o2_model_saves_fp8_activations_and_fewer_bytes(seed):
    """initialize turns FP8 saved activations on at O2 only; the O2 GPT's forward keeps fewer bytes
    for backward than O1's, and the loss is the same function (the forward pass is unchanged)."""
    x = torch.randint(0, 64, (4, 32))
    out = {}
    for level in ("O1", "O2"):
        torch.manual_seed(0)
        model = build_model("tiny", vocab_size=64, seq_len=32)
        model, _ = fp8lm.initialize(model, None, level=level, recipe="current", verbose=False)
        flags = [m.fp8_saved_activations for m in model.modules() if hasattr(m, "fp8_saved_activations")]
        assert len(flags) == 4 * 4 + 1 and all(f == (level == "O2") for f in flags)
        (_, loss), nbytes = saved_bytes(lambda: model(x, x))
        out[level] = float(loss.detach()), nbytes
    assert out["O2"][0] == out["O1"][0]
    assert out["O2"][1] < 0.8 * out["O1"][1]
    with pytest.raises(ValueError, match="fp8_activations=True needs an FP8 level"):
        fp8lm.initialize(build_model("tiny", vocab_size=64), None, level="O0", fp8_activations=True)
