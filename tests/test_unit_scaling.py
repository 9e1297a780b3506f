"""fp8lm.unit_scaling: unit-variance outputs and gradients at init, exact primitives, errors."""
import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from fp8lm import unit_scaling as us
from fp8lm.unit_scaling import ops

TOL = 0.1
ROWS = 4096


def _gen(seed=None):
    """A generator with a fresh seed each run (printed, so a failure can be replayed)."""
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g, requires_grad=True):
    return torch.randn(*shape, generator=g).requires_grad_(requires_grad)


def _backward(out, g):
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    return grad


def _close_to_1(t, tol=TOL):
    s = t.detach().double().std().item()
    assert abs(s - 1.0) < tol, s


# --------------------------------------------------------------------------- primitives


def test_scale_fwd_bwd_exact():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    g = torch.tensor([0.5, 1.0, -4.0])
    y = us.scale_fwd(x, 3.0)
    assert torch.equal(y, x.detach() * 3.0)
    y.backward(g)
    assert torch.equal(x.grad, g)  # identity in backward

    x.grad = None
    y = us.scale_bwd(x, 0.25)
    assert torch.equal(y, x.detach())  # identity in forward
    y.backward(g)
    assert torch.equal(x.grad, g * 0.25)

    x.grad = None
    y = us.scaled(x, 2.0, 5.0)
    assert torch.equal(y, x.detach() * 2.0)
    y.backward(g)
    assert torch.equal(x.grad, g * 5.0)


# --------------------------------------------------------------------------- linear


@pytest.mark.parametrize("k,n", [(64, 1024), (256, 256), (1024, 64)])
def test_linear_unconstrained_unit(k, n):
    g = _gen()
    x, w = _randn(ROWS, k, g=g), _randn(n, k, g=g)
    out = us.linear(x, w, constraint=None)
    _close_to_1(out)
    _backward(out, g)
    _close_to_1(x.grad)
    _close_to_1(w.grad)


@pytest.mark.parametrize("width", [64, 256, 1024])
@pytest.mark.parametrize("batch", [(ROWS,), (8, 512)])
def test_linear_to_output_scale_unit_when_square(width, batch):
    # With the default constraint grad_x has std sqrt(N / K): unit only for square weights.
    g = _gen()
    x, w = _randn(*batch, width, g=g), _randn(width, width, g=g)
    out = us.linear(x, w)
    _close_to_1(out)
    _backward(out, g)
    _close_to_1(x.grad)
    _close_to_1(w.grad)


def test_linear_to_output_scale_is_true_gradient():
    g = _gen()
    k, n = 96, 320
    x, w = _randn(64, k, g=g).double().detach().requires_grad_(), _randn(n, k, g=g).double().detach().requires_grad_()
    b = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    out = us.linear(x, w, b)
    ref = (x.detach() @ w.detach().T) * k**-0.5 + b.detach()
    torch.testing.assert_close(out, ref)
    grad = _backward(out, g).double()
    torch.testing.assert_close(x.grad, k**-0.5 * (grad @ w.detach()))
    torch.testing.assert_close(b.grad, grad.sum(0))  # bias unscaled
    # weight grad is a cut edge: scaled by batch^-1/2, not K^-1/2
    torch.testing.assert_close(w.grad, 64**-0.5 * (grad.T @ x.detach()))


def test_linear_bad_constraint():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with pytest.raises(ValueError, match="to_output_scale") as e:
        us.linear(x, w, constraint="gmean")
    assert "None" in str(e.value)


# --------------------------------------------------------------------------- readout, embedding


@pytest.mark.parametrize("k,v", [(64, 1024), (256, 256), (1024, 64)])
def test_readout(k, v):
    g = _gen()
    x, w = _randn(ROWS, k, g=g), _randn(v, k, g=g)
    out = us.readout(x, w)
    # Forward is fan_in^-1 by design (muP readout): logits std K^-1/2, not 1.
    s = out.detach().std().item() * math.sqrt(k)
    assert abs(s - 1.0) < TOL, s
    _backward(out, g)
    _close_to_1(x.grad)
    _close_to_1(w.grad)


@pytest.mark.parametrize("vocab", [64, 256, 1024])
@pytest.mark.parametrize("tokens", [(ROWS,), (4, 256)])
def test_embedding(vocab, tokens):
    g = _gen()
    w = _randn(vocab, 128, g=g)
    idx = torch.randint(0, vocab, tokens, generator=g)
    out = us.embedding(idx, w)
    _close_to_1(out)
    _backward(out, g)
    _close_to_1(w.grad)  # over all rows, including those no token hit


# --------------------------------------------------------------------------- norms, activations


@pytest.mark.parametrize("width", [64, 256, 1024])
def test_rms_norm(width):
    g = _gen()
    x = (3.0 * torch.randn(ROWS // 4, width, generator=g)).requires_grad_()  # any input scale
    w = torch.ones(width, requires_grad=True)
    out = us.rms_norm(x, w)
    _close_to_1(out)
    _backward(out, g)
    # grad_x = (g - xhat mean(g xhat)) / rms(x): scale it by rms(x) = 3 to compare with unit input
    _close_to_1(x.grad * 3.0)
    # w.grad has only `width` entries: a std estimate from n samples has sd ~ 1/sqrt(2n), so the
    # tolerance is 4 of those (0.35 at width 64); 0.1 failed about 1 run in 2 at width 64.
    _close_to_1(w.grad, tol=max(TOL, 4 / math.sqrt(2 * width)))
    x2 = torch.randn(ROWS // 4, width, generator=g, requires_grad=True)
    out2 = us.rms_norm(x2)
    _backward(out2, g)
    _close_to_1(x2.grad)


@pytest.mark.parametrize("op,ref", [(us.silu, F.silu), (us.gelu, F.gelu)])
@pytest.mark.parametrize("width", [64, 256, 1024])
def test_activations(op, ref, width):
    g = _gen()
    x = _randn(ROWS, width, g=g)
    out = op(x)
    _close_to_1(out)
    raw = ref(x.detach())
    std = ops._SILU_STD if ref is F.silu else ops._GELU_STD
    torch.testing.assert_close(out.detach(), raw / std)  # forward is a constant rescale
    _backward(out, g)
    _close_to_1(x.grad)


@pytest.mark.parametrize("width", [64, 256, 1024])
def test_silu_glu(width):
    g = _gen()
    gate, up = _randn(ROWS, width, g=g), _randn(ROWS, width, g=g)
    out = us.silu_glu(gate, up)
    _close_to_1(out)
    _backward(out, g)
    _close_to_1(gate.grad)
    _close_to_1(up.grad)


def test_activation_constants():
    assert ops._SILU_STD == pytest.approx(0.559538, abs=1e-5)
    assert ops._SILU_DRMS == pytest.approx(0.616021, abs=1e-5)
    assert ops._GELU_STD == pytest.approx(0.587915, abs=1e-5)
    assert ops._GELU_DRMS == pytest.approx(0.675167, abs=1e-5)


# --------------------------------------------------------------------------- residuals


@pytest.mark.parametrize("tau", [0.2, 0.5, 0.8])
def test_residual_add_and_split(tau):
    g = _gen()
    res, skip = _randn(ROWS, 256, g=g), _randn(ROWS, 256, g=g)
    out = us.residual_add(res, skip, tau)
    _close_to_1(out)
    torch.testing.assert_close(out, math.sqrt(tau) * res.detach() + math.sqrt(1 - tau) * skip.detach())
    grad = _backward(out, g)
    assert torch.equal(res.grad, grad) and torch.equal(skip.grad, grad)  # identity in backward

    x = _randn(ROWS, 256, g=g)
    branch, skip2 = us.residual_split(x, tau)
    assert torch.equal(branch, x.detach()) and torch.equal(skip2, x.detach())
    # independent unit gradients coming back along the two copies sum to a unit gradient
    (branch * torch.randn(x.shape, generator=g) + skip2 * torch.randn(x.shape, generator=g)).sum().backward()
    _close_to_1(x.grad)


@pytest.mark.parametrize("tau", [0.0, 1.0, -0.1, 1.5])
def test_residual_bad_tau(tau):
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="tau"):
        us.residual_add(x, x, tau)
    with pytest.raises(ValueError, match="tau"):
        us.residual_split(x, tau)


# --------------------------------------------------------------------------- attention, loss


@pytest.mark.parametrize("t", [16, 128, 512])
@pytest.mark.parametrize("d", [64, 128])
def test_causal_attention(t, d):
    # Tolerance 0.15: the rule is a closed-form (uniform-attention) approximation, and the
    # output's per-position variance is not uniform (1/(t+1) before rescaling).
    g = _gen()
    b = max(1, 4096 // t)
    q, k, v = (_randn(b, 2, t, d, g=g) for _ in range(3))
    out = us.causal_attention(q, k, v)
    _close_to_1(out, 0.15)
    _backward(out, g)
    for grad in (q.grad, k.grad, v.grad):
        _close_to_1(grad, 0.15)


def test_causal_attention_is_scaled_sdpa():
    g = _gen()
    q, k, v = (torch.randn(2, 3, 10, 16, generator=g) for _ in range(3))
    h = sum(1.0 / n for n in range(1, 11))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / 16) * math.sqrt(10 / h)
    torch.testing.assert_close(us.causal_attention(q, k, v), ref)


@pytest.mark.parametrize("vocab", [64, 256, 1024])
def test_cross_entropy(vocab):
    g = _gen()
    logits = _randn(8, 256, vocab, g=g)
    targets = torch.randint(0, vocab, (8, 256), generator=g)
    loss = us.cross_entropy(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach().reshape(-1, vocab), targets.reshape(-1)))
    loss.backward()
    _close_to_1(logits.grad)


def test_causal_attention_true_gradient_constraint():
    # "to_output_scale": q, k, v gradients are the true gradients of the scaled forward (float64)
    g = _gen()
    t, d = 24, 16
    q, k, v = (torch.randn(2, 3, t, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    h = sum(1.0 / n for n in range(1, t + 1))
    for corr in (0.0, 0.4, 1.0):
        s = (corr + (1 - corr) * h / t) ** -0.5
        out = us.causal_attention(q, k, v, "to_output_scale", value_corr=corr)
        grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(out, (q, k, v), grad)
        ref_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / d) * s
        torch.testing.assert_close(out, ref_out)
        for a, b in zip(got, torch.autograd.grad(ref_out, (q, k, v), grad)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("t,d", [(128, 32), (300, 64)])
def test_causal_attention_true_gradient_qk_scale(t, d):
    # Tolerance 15% relative: the predicted grad_q/k std sqrt((H - H2) / (d H)) is the
    # uniform-attention approximation (0.15 at T=128, d=32).
    g = _gen()
    q, k, v = (_randn(max(1, 2048 // t), 2, t, d, g=g) for _ in range(3))
    out = us.causal_attention(q, k, v, "to_output_scale")
    _close_to_1(out, 0.15)
    _backward(out, g)
    h1, h2 = ops._harmonic(t)
    expect = math.sqrt((h1 - h2) / (d * h1))
    for grad in (q.grad, k.grad):
        assert abs(grad.std().item() / expect - 1.0) < 0.15, (grad.std().item(), expect)
    _close_to_1(v.grad, 0.15)


@pytest.mark.parametrize("corr", [0.4, 1.0])
def test_causal_attention_value_corr(corr):
    # values correlated across positions with correlation `corr`: the output is unit again
    g = _gen()
    b, t, d = 16, 128, 32
    common = torch.randn(b, 2, 1, d, generator=g)
    v = math.sqrt(corr) * common + math.sqrt(1 - corr) * torch.randn(b, 2, t, d, generator=g)
    q, k = (torch.randn(b, 2, t, d, generator=g) for _ in range(2))
    _close_to_1(us.causal_attention(q, k, v, value_corr=corr), 0.15)


def test_causal_attention_bad_args():
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="value_corr must be in \\[0, 1\\]"):
        us.causal_attention(x, x, x, value_corr=1.5)
    with pytest.raises(ValueError, match="constraint must be one of"):
        us.causal_attention(x, x, x, constraint="gmean")


# --------------------------------------------------------------------------- modules
# The layers of fp8lm.unit_scaling.modules: the same rules with parameters, checked the same way
# (std within TOL of 1 unless a tolerance is stated), at several widths and batch shapes.

# (K, N, batch shape): widths not multiples of 16 (but 48), flat and (batch, seq) inputs
SHAPES = [(48, 200, (ROWS,)), (200, 200, (6, 350)), (1000, 72, (ROWS // 2,))]


def _module_grads(module, *inputs, g):
    out = module(*inputs)
    _backward(out, g)
    return out


@pytest.mark.parametrize("k,n,batch", SHAPES)
@pytest.mark.parametrize("constraint", ["to_output_scale", None])
def test_unit_linear_module(k, n, batch, constraint):
    g = _gen()
    layer = us.UnitLinear(k, n, constraint=constraint)
    assert type(layer.linear) is torch.nn.Linear  # a plain child: fp8lm.initialize converts it
    _close_to_1(layer.weight)
    x = _randn(*batch, k, g=g)
    out = _module_grads(layer, x, g=g)
    _close_to_1(out)
    expect = math.sqrt(n / k) if constraint == "to_output_scale" else 1.0  # grad_x rule
    assert abs(x.grad.std().item() / expect - 1.0) < TOL
    _close_to_1(layer.weight.grad)


def test_unit_linear_module_matches_functional():
    g = _gen()
    layer = us.UnitLinear(37, 53, bias=True).double()
    with torch.no_grad():
        layer.bias.normal_(generator=g)
    x = torch.randn(5, 11, 37, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    out, ref = layer(x), us.linear(x2, w2, b2)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad)
    ref.backward(grad)
    for a, b in ((x.grad, x2.grad), (layer.weight.grad, w2.grad), (layer.bias.grad, b2.grad)):
        torch.testing.assert_close(a, b)


def test_unit_linear_weight_grad_hook_accumulates_and_copies():
    g = _gen()
    layer = us.UnitLinear(40, 24)
    x1, x2 = torch.randn(30, 40, generator=g), torch.randn(7, 40, generator=g)
    g1, g2 = torch.randn(30, 24, generator=g), torch.randn(7, 24, generator=g)
    layer(x1).backward(g1)
    layer(x2).backward(g2)  # two backward passes: each contribution gets its own B^-1/2
    k = 40**-0.5
    expect = 30**-0.5 * (g1.T @ x1) + 7**-0.5 * (g2.T @ x2)
    torch.testing.assert_close(layer.weight.grad, expect)
    clone = copy.deepcopy(layer)
    clone.zero_grad(set_to_none=True)
    clone(x1).backward(g1)
    torch.testing.assert_close(clone.weight.grad, 30**-0.5 * (g1.T @ x1))
    with torch.no_grad():  # no hook work without grad, output unchanged
        torch.testing.assert_close(layer(x1), (x1 @ layer.weight.T) * k)


@pytest.mark.parametrize("k,n,batch", SHAPES)
def test_unit_readout_module(k, n, batch):
    g = _gen()
    head = us.UnitReadout(k, n)
    assert type(head.linear) is torch.nn.Linear
    x = _randn(*batch, k, g=g)
    out = _module_grads(head, x, g=g)
    s = out.detach().std().item() * math.sqrt(k)  # logits std K^-1/2 by design
    assert abs(s - 1.0) < TOL, s
    _close_to_1(x.grad)
    _close_to_1(head.weight.grad)


@pytest.mark.parametrize("vocab,tokens", [(61, (ROWS,)), (300, (5, 333)), (1000, (ROWS,))])
def test_unit_embedding_module(vocab, tokens):
    g = _gen()
    emb = us.UnitEmbedding(vocab, 96)
    idx = torch.randint(0, vocab, tokens, generator=g)
    out = _module_grads(emb, idx, g=g)
    _close_to_1(out)
    _close_to_1(emb.weight.grad)


@pytest.mark.parametrize("width,dtype", [(48, torch.float32), (200, torch.bfloat16), (1000, torch.float32)])
def test_unit_rms_norm_module(width, dtype):
    g = _gen()
    norm = us.UnitRMSNorm(width)
    x = (2.0 * torch.randn(ROWS // 4, width, generator=g)).to(dtype).requires_grad_()
    out = _module_grads(norm, x, g=g)
    assert out.dtype == dtype
    _close_to_1(out)
    _close_to_1(x.grad.float() * 2.0)  # grad_x scales as 1 / rms(x)
    _close_to_1(norm.weight.grad, tol=max(TOL, 4 / math.sqrt(2 * width)))  # `width` samples, see test_rms_norm


@pytest.mark.parametrize("module", [us.UnitSiLU, us.UnitGELU])
@pytest.mark.parametrize("width", [48, 1000])
def test_unit_activation_modules(module, width):
    g = _gen()
    x = _randn(ROWS, width, g=g)
    out = _module_grads(module(), x, g=g)
    _close_to_1(out)
    _close_to_1(x.grad)


@pytest.mark.parametrize("width", [48, 1000])
def test_unit_swiglu_module(width):
    g = _gen()
    gate, up = _randn(ROWS, width, g=g), _randn(ROWS, width, g=g)
    out = us.UnitSwiGLU()(gate, up)
    _close_to_1(out)
    _backward(out, g)
    _close_to_1(gate.grad)
    _close_to_1(up.grad)


@pytest.mark.parametrize("dim,ffn,batch", [(48, 144, (ROWS,)), (200, 520, (6, 350))])
def test_unit_mlp_module(dim, ffn, batch):
    # grad_x std is sqrt(2) (true gradients: down sends sqrt(dim/ffn), gate_up sqrt(2 ffn/dim)),
    # tolerance 0.1 * sqrt(2).
    g = _gen()
    mlp = us.UnitMLP(dim, ffn)
    x = _randn(*batch, dim, g=g)
    out = _module_grads(mlp, x, g=g)
    _close_to_1(out)
    assert abs(x.grad.std().item() / math.sqrt(2) - 1.0) < TOL, x.grad.std().item()


@pytest.mark.parametrize("t", [40, 200])
@pytest.mark.parametrize("constraint", ["to_output_scale", None])
def test_unit_causal_attention_module(t, constraint):
    # Tolerance 0.15 as for the functional op (uniform-attention approximation).
    g = _gen()
    attn = us.UnitCausalAttention(constraint)
    q, k, v = (_randn(max(1, 2048 // t), 2, t, 32, g=g) for _ in range(3))
    out = attn(q, k, v)
    _close_to_1(out, 0.15)
    _backward(out, g)
    _close_to_1(v.grad, 0.15)
    if constraint is None:
        _close_to_1(q.grad, 0.15)
        _close_to_1(k.grad, 0.15)
    # the CPU route for 16-bit inputs (float32 inside) computes the same function
    q16, k16, v16 = (t_.detach().bfloat16() for t_ in (q, k, v))
    ref = us.causal_attention(q16.float(), k16.float(), v16.float(), constraint).bfloat16()
    torch.testing.assert_close(attn(q16, k16, v16), ref)


@pytest.mark.parametrize("t", [40, 128])
def test_unit_self_attention_module(t):
    # Output unit (0.15, as attention); grad_x std sqrt(1 + 2 s_qk^2) with s_qk the true q/k
    # gradient std (about 1.02 here), tolerance 0.15.
    g = _gen()
    dim, heads = 128, 4
    layer = us.UnitSelfAttention(dim, heads)
    x = _randn(max(1, 2048 // t), t, dim, g=g)
    cos, sin = torch.ones(t, dim // heads // 2), torch.zeros(t, dim // heads // 2)  # RoPE angle 0
    out = layer(x, cos, sin)
    _close_to_1(out, 0.15)
    _backward(out, g)
    _close_to_1(x.grad, 0.15)
    torch.testing.assert_close(out, layer(x))  # angle-0 RoPE is the identity
    with pytest.raises(ValueError, match="heads of even width"):
        us.UnitSelfAttention(100, 3)


def test_residual_taus_normalize_the_sum():
    g = _gen()
    for mult in (1.0, 0.25):
        taus = us.residual_taus(6, mult)
        emb = torch.randn(1000, generator=g)
        fs = [torch.randn(1000, generator=g) for _ in taus]
        x = emb
        for tau, f in zip(taus, fs):
            x = ops.residual_add(f, x, tau)
        torch.testing.assert_close(x, (emb + mult * sum(fs)) / math.sqrt(1 + 6 * mult * mult))
    with pytest.raises(ValueError, match="n_branches"):
        us.residual_taus(0)


@pytest.mark.parametrize("tau", [0.2, 0.5])
def test_unit_residual_block_module(tau):
    # Square UnitLinear branches (unit, true gradients) and pre-norms: out and grad_x unit.
    g = _gen()
    dim = 200
    block = us.UnitResidualBlock(us.UnitLinear(dim, dim), us.UnitLinear(dim, dim), dim, tau, tau)
    x = _randn(ROWS // 2, dim, g=g)
    out = _module_grads(block, x, g=g)
    _close_to_1(out)
    _close_to_1(x.grad)
    with pytest.raises(ValueError, match="tau"):
        us.UnitResidualBlock(block.attn, block.mlp, dim, 1.0, tau)


@pytest.mark.parametrize("vocab", [61, 1000])
def test_unit_cross_entropy_module(vocab):
    g = _gen()
    logits = _randn(8, 256, vocab, g=g)
    targets = torch.randint(0, vocab, (8, 256), generator=g)
    loss = us.UnitCrossEntropy()(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach().reshape(-1, vocab), targets.reshape(-1)))
    loss.backward()
    _close_to_1(logits.grad)


@pytest.mark.parametrize("layer_cls", [us.UnitLinear, us.UnitReadout])
def test_fp8_operands_of_converted_unit_layers_are_unit(layer_cls):
    """fp8lm.initialize converts the plain child; with the static recipe its three FP8 operands
    (input, weight, grad_out) are unit, while the layer's own output carries the scale."""
    import fp8lm
    from fp8lm.nn import Float8Linear

    g = _gen()
    k, n = 200, 136
    net = torch.nn.Sequential(layer_cls(k, n))
    net.unit_scaled = True
    fp8lm.initialize(net, level="O1", recipe="static", fp8_head=True, verbose=False)
    child = net[0].linear
    assert isinstance(child, Float8Linear)
    seen = {}
    child.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    child.register_full_backward_hook(lambda m, gi, go: seen.__setitem__("g", go[0].detach()))
    x = _randn(ROWS // 2, k, g=g)
    out = net(x)
    _backward(out.float(), g)
    w = child.weight.dequantize() if hasattr(child.weight, "dequantize") else child.weight
    for t in (seen["x"], w.detach(), seen["g"]):
        _close_to_1(t.float())
    # the layer output: unit for UnitLinear; std K^-1/2 for the readout (muP logits)
    _close_to_1(out.float() * (1.0 if layer_cls is us.UnitLinear else math.sqrt(k)))
