"""fp8lm.initialize on models written here (not fp8lm's own): conversion, checkpoints, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fp8lm
from fp8lm.formats import sqnr_db
from fp8lm.nn import Float8Linear
from conftest import randn_heavy


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(48, 160)
        self.down = nn.Linear(160, 48)
        self.tiny = nn.Linear(48, 8)

    def forward(self, x):
        return self.tiny(self.down(F.gelu(self.up(x))))


class TiedLM(nn.Module):
    """A small transformer LM with the embedding tied to the head, and an nn.MultiheadAttention."""

    def __init__(self, vocab=97, dim=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 4 * dim)
        self.ff2 = nn.Linear(4 * dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, idx):
        x = self.emb(idx)
        T = idx.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        x = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        x = x + self.ff2(F.gelu(self.ff1(self.norm(x))))
        return self.lm_head(x)


def test_mlp_converted_in_place():
    torch.manual_seed(0)
    model = MLP()
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    out_model, out_opt = fp8lm.initialize(model, opt, level="O1", verbose=False)
    assert out_model is model and out_opt is opt
    assert isinstance(model.up, Float8Linear) and isinstance(model.down, Float8Linear)
    assert not isinstance(model.tiny, Float8Linear)  # too small
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    assert opt.param_groups[0]["weight_decay"] == 0.05
    report = fp8lm.conversion_report(model)
    assert report.fp8_layers == ["up", "down"]
    assert "too small" in report.high_precision_layers["tiny"]
    x = torch.randn(5, 48)
    y = model(x)  # no user autocast: BF16 autocast comes with the model
    assert y.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    y.float().sum().backward()
    opt.step()


def test_bf16_state_dict_loads_into_converted_model():
    torch.manual_seed(0)
    plain = MLP()
    sd_bf16 = {k: v.bfloat16() for k, v in plain.state_dict().items()}
    model, _ = fp8lm.initialize(MLP(), level="O1", verbose=False)
    model.load_state_dict(sd_bf16, strict=True)
    assert torch.equal(model.up.weight, sd_bf16["up.weight"].float())


def test_o1_close_to_o0(seed):
    m0 = MLP()
    m1 = copy.deepcopy(m0)
    fp8lm.initialize(m0, level="O0", verbose=False)
    fp8lm.initialize(m1, level="O1", verbose=False)
    assert not any(isinstance(m, Float8Linear) for m in m0.modules())
    x = torch.randn(64, 48)
    ref = MLP().double()
    ref.load_state_dict(m0.state_dict())
    y_ref = ref(x.double())
    assert sqnr_db(y_ref, m0(x)) > 30  # BF16
    assert sqnr_db(y_ref, m1(x)) > 20  # FP8 GEMMs, BF16 elsewhere


def test_tied_head_and_multihead_attention():
    torch.manual_seed(0)
    model = TiedLM()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = fp8lm.initialize(model, opt, level="O1", verbose=False)
    report = fp8lm.conversion_report(model)
    assert report.high_precision_layers["lm_head"] == "output head"
    assert "not a plain nn.Linear" in report.high_precision_layers["attn.out_proj"]
    assert report.fp8_layers == ["ff1", "ff2"]
    assert model.lm_head.weight is model.emb.weight
    assert sum(p.numel() for p in model.parameters()) == n_params
    idx = torch.randint(0, 97, (2, 12))
    loss = F.cross_entropy(model(idx).float().flatten(0, 1), idx.flatten())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_tied_head_in_fp8_shares_the_weight():
    torch.manual_seed(0)
    model, _ = fp8lm.initialize(TiedLM(), level="O1", fp8_head=True, verbose=False)
    assert isinstance(model.lm_head, Float8Linear)
    assert model.lm_head.weight is model.emb.weight
    idx = torch.randint(0, 97, (2, 12))
    model(idx).float().sum().backward()
    assert model.emb.weight.grad is not None and torch.isfinite(model.emb.weight.grad).all()


def test_shared_module_converted_once():
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    fp8lm.initialize(model, level="O1", verbose=False)
    assert model[0] is model[2] and isinstance(model[0], Float8Linear)
    assert len(fp8lm.conversion_report(model).layers) == 1


def test_exclude_patterns_and_callable():
    m, _ = fp8lm.initialize(MLP(), level="O1", exclude=["do*"], verbose=False)
    assert not isinstance(m.down, Float8Linear) and isinstance(m.up, Float8Linear)
    assert fp8lm.conversion_report(m).high_precision_layers["down"] == "excluded"
    m, _ = fp8lm.initialize(MLP(), level="O1", exclude=lambda name, mod: name == "up", verbose=False)
    assert not isinstance(m.up, Float8Linear) and isinstance(m.down, Float8Linear)


def test_two_models_two_levels_one_process():
    a, _ = fp8lm.initialize(MLP(), level="O0", verbose=False)
    b, _ = fp8lm.initialize(MLP(), level="O1", verbose=False)
    x = torch.randn(4, 48)
    assert a(x).dtype == b(x).dtype == torch.bfloat16
    assert not any(isinstance(m, Float8Linear) for m in a.modules())
    assert any(isinstance(m, Float8Linear) for m in b.modules())
    assert type(MLP().up) is nn.Linear  # the class itself is untouched


def test_autocast_ends_even_if_forward_raises():
    model, _ = fp8lm.initialize(MLP(), level="O1", verbose=False)
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 47))
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("kwargs,match", [
    ({"level": "O9"}, "allowed: O0, O1"),
    ({"recipe": "sometimes"}, "allowed: current, delayed"),
    ({"exclude": ["nothing.like.this"]}, "matches no linear layer"),
    ({"exclude": [3]}, "exclude must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fp8lm.initialize(MLP(), **kwargs)


def test_double_initialize_and_bad_optimizer():
    model, _ = fp8lm.initialize(MLP(), verbose=False)
    with pytest.raises(ValueError, match="already initialized"):
        fp8lm.initialize(model)
    with pytest.raises(ValueError, match="optimizer"):
        fp8lm.initialize(MLP(), optimizer="adam")


def test_summary_is_logged_once(caplog):
    with caplog.at_level("INFO", logger="fp8lm"):
        fp8lm.initialize(MLP(), level="O1")
    assert sum("linear layers run in FP8" in r.message for r in caplog.records) == 1


def test_high_precision_linear_matches_bf16_autocast(seed):
    """The CPU's fast path computes what BF16 autocast's (slow, software) GEMM computes."""
    from fp8lm.nn import HighPrecisionLinear
    ref = nn.Linear(96, 80)
    fast = HighPrecisionLinear.from_linear(copy.deepcopy(ref))
    x = torch.randn(3, 37, 96)
    g = torch.randn(3, 37, 80).bfloat16()
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_r, out_f = ref(xr), fast(xf)
    assert out_f.dtype == out_r.dtype == torch.bfloat16
    out_r.backward(g)
    out_f.backward(g)
    # same roundings; only the order of float32 additions may differ (one bf16 ulp at most)
    for a, b in ((out_r, out_f), (xr.grad, xf.grad), (ref.weight.grad, fast.weight.grad), (ref.bias.grad, fast.bias.grad)):
        assert sqnr_db(a.float(), b.float()) > 45
    ulp = (out_r.float() - out_f.float()).abs() / out_r.float().abs().clamp_min(1e-3)
    assert (ulp <= 2**-7).all()
    assert torch.equal(fast(x), F.linear(x, fast.weight, fast.bias))  # outside autocast: plain F.linear


def test_o0_keeps_every_linear_high_precision():
    from fp8lm.nn import HighPrecisionLinear
    model, _ = fp8lm.initialize(MLP(), level="O0", verbose=False)
    assert all(isinstance(m, HighPrecisionLinear) for m in (model.up, model.down, model.tiny))
    assert set(fp8lm.conversion_report(model).high_precision_layers.values()) == {"level O0", "too small (a dimension < 16)"}


def test_cpu_bf16_attention_matches_bf16_kernel_and_float64(seed):
    """The CPU fast path of causal attention is as close to float64 as the BF16 kernel, grads too."""
    from fp8lm.nn.bf16 import causal_attention
    q, k, v = (randn_heavy(3, 5, 37, 24, dist="student_t").bfloat16().requires_grad_() for _ in range(3))
    g = torch.randn(3, 5, 37, 24).bfloat16()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    y_ref = F.scaled_dot_product_attention(*ref, is_causal=True)
    y_ref.backward(g.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast = causal_attention(q, k, v)
    assert y_fast.dtype == torch.bfloat16
    y_fast.backward(g)
    y_bf16 = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
    assert sqnr_db(y_ref, y_fast.double()) >= sqnr_db(y_ref, y_bf16.double()) - 1.0
    assert sqnr_db(y_ref, y_fast.double()) > 40
    for t, r in zip((q, k, v), ref):
        assert sqnr_db(r.grad, t.grad.double()) > 30
