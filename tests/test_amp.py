"""fp8lm.initialize on models written here (not fp8lm's own): conversion, checkpoints, errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fp8lm
from fp8lm.formats import sqnr_db
from fp8lm.nn import Float8Linear
from fp8lm.optim import AdamW as Fp8AdamW
from fp8lm.tensor import is_scaled, storage_bytes
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
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    out_model, out_opt = fp8lm.initialize(model, opt, level="O1", verbose=False)
    assert out_model is model and isinstance(out_opt, Fp8AdamW)
    opt = out_opt
    assert isinstance(model.up, Float8Linear) and isinstance(model.down, Float8Linear)
    assert not isinstance(model.tiny, Float8Linear)  # too small
    assert list(model.state_dict()) == keys
    # FP8 layers' weights are new Parameters (FP16 masters); every other Parameter is the same object
    for name, p in model.named_parameters():
        assert (p is params[name]) == (name not in ("up.weight", "down.weight")), name
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[0]["state"] == "fp32"
    report = fp8lm.conversion_report(model)
    assert report.fp8_layers == ["up", "down"]
    assert "too small" in report.high_precision_layers["tiny"]
    x = torch.randn(5, 48)
    y = model(x)  # no user autocast: BF16 autocast comes with the model
    assert y.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    y.float().sum().backward()
    opt.step()


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_bf16_state_dict_loads_into_converted_model(level):
    torch.manual_seed(0)
    plain = MLP()
    sd_bf16 = {k: v.bfloat16() for k, v in plain.state_dict().items()}
    model, _ = fp8lm.initialize(MLP(), level=level, verbose=False)
    model.load_state_dict(sd_bf16, strict=True)
    assert is_scaled(model.up.weight) and model.up.weight._data.dtype == torch.float16
    assert torch.equal(model.up.weight, sd_bf16["up.weight"].float())  # BF16 values fit FP16 exactly


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
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
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
    assert model.lm_head.weight is model.emb.weight and not is_scaled(model.lm_head.weight)  # FP32 kept
    report = fp8lm.conversion_report(model)
    assert [d.master for d in report.layers if d.fp8] == ["fp16", "fp16", "fp32"]
    assert "FP32 weight kept: lm_head" in report.summary()
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
    ({"level": "O9"}, "allowed: O0, O1, O2"),
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


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_o1_o2_masters_fp8_grads_and_optimizer(seed, level):
    model = MLP()
    decay = [model.up.weight, model.down.weight, model.tiny.weight]
    rest = [model.up.bias, model.down.bias, model.tiny.bias]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=2e-3, betas=(0.9, 0.95), eps=1e-7)
    model, opt = fp8lm.initialize(model, opt, level=level, verbose=False)
    for w in (model.up.weight, model.down.weight):
        assert isinstance(w, nn.Parameter) and is_scaled(w) and w._data.dtype == torch.float16
        assert storage_bytes(w) == 2 * w.numel() + 4
    assert not any(is_scaled(p) for p in (model.tiny.weight, *rest))
    assert isinstance(opt, Fp8AdamW) and [len(g["params"]) for g in opt.param_groups] == [3, 3]
    assert opt.param_groups[0]["params"][0] is model.up.weight
    g0 = opt.param_groups[0]
    assert (g0["lr"], g0["betas"], g0["eps"], g0["weight_decay"]) == (2e-3, (0.9, 0.95), 1e-7, 0.1)
    assert g0["state"] == {"O1": "fp32", "O2": "fp8"}[level]
    assert level in fp8lm.conversion_report(model).summary()
    x = randn_heavy(9, 48, dist="student_t")
    before = model.up.weight.dequantize()
    model(x).float().pow(2).mean().backward()
    assert is_scaled(model.up.weight.grad) and model.up.weight.grad._data.dtype == torch.float8_e4m3fn
    w_obj, data_obj = model.up.weight, model.up.weight._data
    opt.step()
    assert model.up.weight is w_obj and model.up.weight._data is data_obj and w_obj._data.dtype == torch.float16
    assert not torch.equal(model.up.weight.dequantize(), before)
    state = opt.state[model.up.weight]
    m_dtype = {"O1": torch.float32, "O2": torch.float8_e4m3fn}[level]
    assert state["exp_avg"].dtype == m_dtype


def test_initialize_without_optimizer_at_o2():
    model, opt = fp8lm.initialize(MLP(), level="O2", verbose=False)
    assert opt is None and is_scaled(model.up.weight)
    model(torch.randn(3, 48)).float().sum().backward()
    assert is_scaled(model.down.weight.grad)


def test_o0_keeps_parameters_and_optimizer():
    model = MLP()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)  # any optimizer at O0
    model, out = fp8lm.initialize(model, opt, level="O0", verbose=False)
    assert out is opt and list(model.parameters()) == params and not any(is_scaled(p) for p in params)


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_optimizer_must_be_a_fresh_adam(level):
    model = MLP()
    with pytest.raises(ValueError, match="allowed: Adam, AdamW"):
        fp8lm.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), level=level)
    assert type(model.up) is nn.Linear  # nothing converted on error
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 48)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="not taken a step"):
        fp8lm.initialize(model, opt, level=level)
    assert type(model.up) is nn.Linear


class _LossModel(nn.Module):
    """(x, y) -> (None, loss) like fp8lm's GPT; `poison` makes the gradient (not the loss) non-finite."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP()
        self.poison = False

    def forward(self, x, y):
        h = self.mlp.up(x)
        if self.poison and h.requires_grad:
            h.register_hook(lambda g: g * float("nan"))
        out = self.mlp.tiny(self.mlp.down(F.gelu(h)))
        return None, (out.float() - y).pow(2).mean()


class _Batches:
    def __init__(self):
        self.gen = torch.Generator().manual_seed(0)

    def next(self):
        return torch.randn(6, 48, generator=self.gen), torch.randn(6, 8, generator=self.gen)


def _snapshot(model, opt):
    sd = {k: (v._data.clone(), v._scale.clone()) if is_scaled(v) else v.clone() for k, v in model.state_dict().items()}
    st = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}
    return sd, st


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b.view(torch.uint8) if b.dtype.itemsize == 1 else b)


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_non_finite_fp8_gradient_skips_the_step_and_corrupts_nothing(level):
    from fp8lm.train import train_step
    torch.manual_seed(0)
    model = _LossModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = fp8lm.initialize(model, opt, level=level, verbose=False)
    batches = _Batches()
    assert train_step(model, opt, batches, 1e-2, 1.0)[1]  # a good step: optimizer state exists
    before = _snapshot(model, opt)
    model.poison = True
    loss, applied = train_step(model, opt, batches, 1e-2, 1.0)
    assert math.isfinite(loss) and not applied  # the loss was fine; the FP8 gradients were not
    assert all(p.grad is None for p in model.parameters())
    assert _same(_snapshot(model, opt), before)
    model.poison = False
    assert train_step(model, opt, batches, 1e-2, 1.0)[1]
    assert all(torch.isfinite(p.dequantize() if is_scaled(p) else p).all() for p in model.parameters())


def test_o2_model_deepcopy_and_checkpoint_round_trip(seed, tmp_path):
    model, _ = fp8lm.initialize(MLP(), level="O2", verbose=False)
    x = torch.randn(5, 48)
    twin = copy.deepcopy(model)
    assert is_scaled(twin.up.weight) and twin.up.weight._data is not model.up.weight._data
    assert torch.equal(twin(x), model(x))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh, _ = fp8lm.initialize(MLP(), level="O2", verbose=False)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))  # weights_only (torch's default)
    for a, b in ((fresh.up.weight, model.up.weight), (fresh.down.weight, model.down.weight)):
        assert torch.equal(a._data.view(torch.int16), b._data.view(torch.int16)) and a._scale == b._scale
    assert torch.equal(fresh(x), model(x))


def test_level_o2_plumbing():
    """O2 reaches every entry point: TrainConfig, `fp8lm train --level`, `fp8lm compare --levels`."""
    from fp8lm.cli import build_parser, config_from_args
    from fp8lm.compare import check_levels
    from fp8lm.train import TrainConfig, resolve_config
    assert resolve_config(TrainConfig(level="O2", device="cpu")).level == "O2"
    assert config_from_args(build_parser().parse_args(["train", "--level", "O2"])).level == "O2"
    assert build_parser().parse_args(["compare", "--levels", "O0,O1,O2"]).levels == ["O0", "O1", "O2"]
    check_levels(["O0", "O1", "O2"])
