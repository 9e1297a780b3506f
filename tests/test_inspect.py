"""``fp8lm.inspect``: figures against float64 references, state left untouched, outputs, CLI, training log.

References are computed here from tensors captured independently (a manual forward of the same
ops, or hooks of the test's own), with float64 reductions and the FP8 bounds written as literals:
saturation above 464 (E4M3) / 61440 (E5M2) after scaling, flush at or below half the smallest
subnormal, 2**-10 (E4M3) / 2**-17 (E5M2). The bounds themselves are checked against torch's casts.
"""
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fp8lm
from conftest import randn_heavy
from fp8lm.cli import main
from fp8lm.formats import E4M3, E5M2, quantize
from fp8lm.inspection import TENSORS, inspect
from fp8lm.models import GPT, build_model, get_config
from fp8lm.train import TrainConfig, train

FMT = {"e4m3": dict(max=448.0, sat=464.0, flush=2.0**-10), "e5m2": dict(max=57344.0, sat=61440.0, flush=2.0**-17)}
PNG = b"\x89PNG\r\n\x1a\n"


def ref_figures(t: torch.Tensor, scale: dict[str, float]) -> dict:
    """rms, amax and per-format saturated/flushed fractions of ``t`` in float64."""
    t64 = t.detach().double()
    mag, n = t64.abs(), t64.numel()
    out = {"rms": t64.square().mean().sqrt().item(), "amax": mag.max().item()}
    for name, bounds in FMT.items():
        scaled = mag * scale[name]
        out[f"{name}_saturated"] = ((scaled > bounds["sat"]).sum() / n).item()
        out[f"{name}_flushed"] = (((scaled <= bounds["flush"]) & (mag > 0)).sum() / n).item()
    return out


def ref_scale(t: torch.Tensor, scaling: str) -> dict[str, float]:
    """The float64 scale per format: fmt.max / amax (current) or 1 (static / unscaled)."""
    if scaling == "current":
        amax = t.detach().double().abs().max().item()
        return {name: bounds["max"] / amax for name, bounds in FMT.items()}
    assert scaling in ("static", "unscaled"), scaling
    return {name: 1.0 for name in FMT}


def assert_matches(stats, t: torch.Tensor, scaling: str, where: str) -> None:
    """The report's figures for ``t`` equal the float64 reference (fractions within one element)."""
    got, ref = stats.to_dict(), ref_figures(t, ref_scale(t, scaling))
    assert got["shape"] == list(t.shape), where
    assert got["rms"] == pytest.approx(ref["rms"], rel=1e-5), where
    assert got["amax"] == pytest.approx(ref["amax"], rel=1e-6), where
    for key in ("e4m3_saturated", "e4m3_flushed", "e5m2_saturated", "e5m2_flushed"):
        assert abs(got[key] - ref[key]) <= 1.0 / t.numel() + 1e-12, (where, key, got[key], ref[key])


def wide_heavy(*shape, lo=-22.0, hi=18.0) -> torch.Tensor:
    """Student-t values times 2**U(lo, hi); the default range saturates and flushes in both formats."""
    return randn_heavy(*shape, dist="student_t") * torch.exp2(torch.empty(shape).uniform_(lo, hi))


# ---------------------------------------------------------------- a small standard model
class Branchy(nn.Module):
    """Two linears read the same hidden tensor, so each one's grad_input is its own share."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(37, 53)
        self.left = nn.Linear(53, 29, bias=False)
        self.right = nn.Linear(53, 29)

    def forward(self, x, y):
        h = F.gelu(self.inp(x))  # (B, T, 53)
        out = self.left(h) * self.right(h)  # (B, T, 29)
        return out, (out * y).mean()  # linear in out: wide values stay finite in float32


def branchy_reference(model: Branchy, x, y) -> dict:
    """Every layer's six tensors from a manual forward of the same ops and autograd of the test's own."""
    x = x.detach().requires_grad_(True)
    a = F.linear(x, model.inp.weight, model.inp.bias)
    h = F.gelu(a)
    left, right = F.linear(h, model.left.weight), F.linear(h, model.right.weight, model.right.bias)
    out = left * right
    loss = (out * y).mean()
    params = [model.inp.weight, model.left.weight, model.right.weight]
    g_a, g_left, g_right, g_x, *g_w = torch.autograd.grad(loss, [a, left, right, x, *params], retain_graph=True)
    g_h_left = torch.autograd.grad(left, h, g_left, retain_graph=True)[0]  # left's share of dL/dh
    g_h_right = torch.autograd.grad(right, h, g_right)[0]
    return {
        "inp": dict(input=x, weight=params[0], output=a, grad_out=g_a, grad_input=g_x, grad_weight=g_w[0]),
        "left": dict(input=h, weight=params[1], output=left, grad_out=g_left, grad_input=g_h_left,
                     grad_weight=g_w[1]),
        "right": dict(input=h, weight=params[2], output=right, grad_out=g_right, grad_input=g_h_right,
                      grad_weight=g_w[2]),
    }


@pytest.mark.parametrize("recipe", [None, "current", "static"])
def test_standard_model_figures_match_float64(seed, recipe):
    model = Branchy()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(wide_heavy(*p.shape, lo=-10, hi=0))
    x = wide_heavy(3, 7, 37).requires_grad_(True)
    y = wide_heavy(3, 7, 29)
    report = inspect(model, (x, y), recipe=recipe)
    ref = branchy_reference(model, x, y)
    assert report.layer_names() == ["inp", "left", "right"]
    scaling = recipe or "unscaled"
    for name, tensors in ref.items():
        entry = report.layer(name)
        assert entry.scaling == scaling and entry.type == "Linear"
        assert set(entry.tensors) == set(TENSORS), name
        for tensor, t in tensors.items():
            assert_matches(entry.tensors[tensor], t, scaling, f"{name}.{tensor}")
    # the wide inputs make every figure non-trivial at scale 1
    x_figs = report.layer("inp").tensors["input"].formats
    if scaling != "current":
        assert all(x_figs[f].saturated > 0 and x_figs[f].flushed > 0 for f in ("e4m3", "e5m2"))
    else:
        assert x_figs["e4m3"].saturated == 0 and x_figs["e4m3"].flushed > 0


def test_bounds_are_torchs_casts(seed):
    """Flushed = what the saturating cast turns into 0; E5M2 saturated = what a plain cast makes inf."""
    t = wide_heavy(4099)
    report = inspect(nn.Linear(4099, 17), t[None], loss_fn=lambda m, b: m(b).sum())
    report_x = report.layer("<model>").tensors["input"].formats
    for fmt in (E4M3, E5M2):
        zeros = (quantize(t, fmt, torch.tensor(1.0)).float() == 0) & (t != 0)
        assert report_x[fmt.name].flushed == pytest.approx(zeros.float().mean().item(), abs=1e-9)
    overflow = torch.isinf(t.to(torch.float8_e5m2).float())
    assert report_x["e5m2"].saturated == pytest.approx(overflow.float().mean().item(), abs=1e-9)
    assert overflow.any() and report_x["e4m3"].saturated > report_x["e5m2"].saturated


def test_shared_layer_gets_one_entry_per_call_and_loss_fn(seed):
    layer = nn.Linear(19, 19)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    x = randn_heavy(5, 19, dist="student_t")
    report = inspect(model, x, loss_fn=lambda m, b: m(b).square().sum())
    assert report.layer_names() == ["0", "0#2"]
    first, second = report.layers
    assert "grad_input" not in first.tensors  # x does not require grad: no dL/dx is computed
    assert "grad_weight" in first.tensors and "grad_weight" not in second.tensors  # the total, once
    h = torch.tanh(layer(x))
    assert_matches(second.tensors["input"], h, "unscaled", "second call input")
    assert report.loss == pytest.approx(layer(h).square().sum().item(), rel=1e-6)
    assert [m.name for m in report.modules] == ["1"]


def test_activation_checkpointing_recompute_is_not_a_new_call(seed):
    a, b = nn.Linear(21, 33), nn.Linear(33, 21)
    block = lambda x: b(F.gelu(a(x)))  # noqa: E731
    model = nn.ModuleList([a, b])
    x = randn_heavy(5, 21, dist="student_t").requires_grad_(True)
    ckpt = inspect(model, x, loss_fn=lambda m, x: checkpoint(block, x, use_reentrant=False).square().mean())
    plain = inspect(model, x, loss_fn=lambda m, x: block(x).square().mean())
    assert ckpt.layer_names() == plain.layer_names() == ["0", "1"]
    for e_ckpt, e_plain in zip(ckpt.layers, plain.layers):
        assert set(e_ckpt.tensors) == set(e_plain.tensors) == set(TENSORS)
        for t in TENSORS:
            assert e_ckpt.tensors[t].to_dict() == e_plain.tensors[t].to_dict(), (e_plain.name, t)


def test_user_errors():
    with pytest.raises(ValueError, match="no nn.Linear"):
        inspect(nn.Sequential(nn.Tanh()), torch.ones(3))
    with pytest.raises(ValueError, match="scalar loss"):
        inspect(nn.Linear(3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown recipe"):
        inspect(nn.Linear(3, 4), torch.ones(2, 3), recipe="sometimes", loss_fn=lambda m, b: m(b).sum())


# ---------------------------------------------------------------- the tiny GPT
def tiny_gpt(level: str, recipe: str = "current") -> GPT:
    """The `tiny` preset at `level`, fresh weights from the test's seed."""
    model, _ = fp8lm.initialize(GPT(get_config("tiny")), None, level=level, recipe=recipe, verbose=False)
    return model


def tokens(batch=2, seq=37):
    x = torch.randint(0, 256, (batch, seq + 1))
    return x[:, :-1], x[:, 1:]


def capture_step(model, batch) -> dict:
    """One plain forward + backward with the test's own hooks: every linear's six tensors."""
    seen, handles = {}, []

    def fwd(name):
        def hook(module, args, output):
            got = seen.setdefault(name, {})
            got.update(input=args[0].detach(), weight=module.weight.detach(), output=output.detach())
            args[0].register_hook(lambda g: got.__setitem__("grad_input", g))  # single-consumer inputs
            output.register_hook(lambda g: got.__setitem__("grad_out", g))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(fwd(name)))
    model.zero_grad(set_to_none=True)
    model(*batch)[1].backward()
    for h in handles:
        h.remove()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            seen[name]["grad_weight"] = m.weight.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return seen


@pytest.mark.parametrize("level", ["O0", "O1"])
def test_tiny_gpt_figures_match_float64(seed, level):
    model = tiny_gpt(level)
    batch = tokens()
    report = inspect(model, batch)
    ref = capture_step(model, batch)  # the same step again: deterministic, bit-identical tensors
    assert report.layer_names() == list(ref)
    for entry in report.layers:
        expected = "current" if entry.type == "Float8Linear" else "unscaled"
        assert entry.scaling == expected, entry.name
        assert entry.type == ("HighPrecisionLinear" if level == "O0" or entry.name == "head" else "Float8Linear")
        for tensor in TENSORS:
            assert_matches(entry.tensors[tensor], ref[entry.name][tensor], expected, f"{entry.name}.{tensor}")
    assert report.loss == pytest.approx(model(*batch)[1].item(), rel=1e-6)


def model_state(model) -> dict:
    """Everything inspect must leave as it was: parameters, grads, buffers, mode, hooks, the RNG."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_same_state(before: dict, after: dict) -> None:
    for key in ("params", "grads", "buffers"):
        assert len(before[key]) == len(after[key]), key
        for a, b in zip(before[key], after[key]):
            assert (a is None and b is None) or torch.equal(a, b), key
    for key in ("training", "hooks"):
        assert before[key] == after[key], key
    assert torch.equal(before["rng"], after["rng"])


def test_state_untouched_and_delayed_history_not_advanced(seed):
    model = tiny_gpt("O1", "delayed")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):  # two real steps
        opt.zero_grad()
        model(*tokens())[1].backward()
        opt.step()
    model(*tokens())[1].backward()  # leave gradients in .grad: inspect must not touch them
    batch = tokens()
    before = model_state(model)
    history = model.layers[1].attn.qkv.fp8_amax_history
    assert (history[:, :3] > 0).all() and (history[:, 3:] == 0).all()  # three training passes
    report = inspect(model, batch)
    assert_same_state(before, model_state(model))
    # The figures are those of the next real step: same scales as the layer then uses.
    layer = model.layers[1].attn.qkv
    model.zero_grad(set_to_none=True)
    model(*batch)[1].backward()
    stats = report.layer("layers.1.attn.qkv").tensors
    assert report.layer("layers.1.attn.qkv").scaling == "delayed"
    assert stats["input"].formats["e4m3"].scale == layer.fp8_last_scale[0].item()
    assert stats["weight"].formats["e4m3"].scale == layer.fp8_last_scale[1].item()
    assert stats["grad_out"].formats["e5m2"].scale == layer.fp8_last_scale[2].item()
    assert stats["input"].formats["e4m3"].scale != 448.0 / stats["input"].amax  # history, not current


def test_json_and_table(seed, tmp_path):
    report = inspect(tiny_gpt("O1"), tokens())
    report.to_json(tmp_path / "out" / "inspect.json")  # the PNG: test_cli_inspect_writes_json_and_png
    data = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert set(data) == {"loss", "recipe", "formats", "layers", "modules"}
    assert data["formats"]["e5m2"] == {"max": 57344.0, "saturation_bound": 61440.0, "flush_bound": 2.0**-17}
    assert [entry["name"] for entry in data["layers"]] == report.layer_names()
    qkv = data["layers"][0]
    assert qkv["type"] == "Float8Linear" and set(qkv["tensors"]) == set(TENSORS)
    assert set(qkv["tensors"]["grad_out"]) == {"shape", "dtype", "nonfinite", "rms", "amax", "e4m3_scale",
                                              "e5m2_scale", "e4m3_saturated", "e4m3_flushed",
                                              "e5m2_saturated", "e5m2_flushed"}
    assert qkv["tensors"]["input"]["rms"] == report.layers[0].tensors["input"].rms
    assert {"layers.0", "layers.3.mlp_norm", "tok_emb"} <= {m["name"] for m in data["modules"]}
    table = report.table().splitlines()
    assert len(table) == 3 + len(report.layers) * len(TENSORS)
    assert table[1].split()[:4] == ["layer", "tensor", "rms", "amax"] and "E5M2" in table[1]


CAST = {"input": "e4m3", "weight": "e4m3", "grad_out": "e5m2"}  # what each FP8 GEMM casts, and to what


def static_picture(preset: str) -> list:
    """inspect of `preset` at O1 with the static recipe (scale 1): the FP8 layers' entries."""
    if preset.startswith("unit-"):
        model, _ = fp8lm.initialize(build_model(preset, 256), None, level="O1", recipe="static", verbose=False)
    else:
        with pytest.warns(UserWarning, match="static"):  # initialize warns: not a unit-scaled model
            model, _ = fp8lm.initialize(build_model(preset, 256), None, level="O1", recipe="static", verbose=False)
    report = inspect(model, tokens(2, 48))
    return [e for e in report.layers if e.type == "Float8Linear"]


def test_unit_scaled_gpt_is_near_unit_and_standard_gpt_is_not(seed):
    """The picture inspect exists to show: static scale 1 fits unit-tiny's casts and not tiny's."""
    unit, standard = static_picture("unit-tiny"), static_picture("tiny")
    assert len(unit) >= 12 and len(standard) >= 12  # (initialize may keep a few in BF16)
    for tensor, fmt in CAST.items():
        unit_rms = [e.tensors[tensor].rms for e in unit]
        assert 0.5 <= statistics.median(unit_rms) <= 2, (tensor, unit_rms)
        assert all(1 / 8 <= r <= 8 for r in unit_rms), (tensor, unit_rms)  # tiny's grad_out: ~2**-13
        assert all(e.tensors[tensor].formats[fmt].flushed < 0.01 for e in unit), tensor
        assert all(e.tensors[tensor].formats[fmt].saturated == 0 for e in unit), tensor
    assert all(e.tensors["grad_out"].rms < 0.1 and e.tensors["weight"].rms < 0.1 for e in standard)
    assert max(e.tensors["grad_out"].formats["e5m2"].flushed for e in standard) > 0.1
    assert all(e.tensors["weight"].formats["e4m3"].flushed > 0.01 for e in standard)


# ---------------------------------------------------------------- command line and training log
def test_cli_inspect_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "i.json"
    code = main(["inspect", "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "33",
                 "--level", "O1", "--recipe", "delayed", "--json-out", str(out), "--png-out", str(tmp_path / "i.png")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fp8lm inspect tiny O1 (delayed) on cpu" in printed and "layers.3.mlp.down [delayed]" in printed
    data = json.loads(out.read_text())
    assert len(data["layers"]) == 17 and data["layers"][0]["tensors"]["input"]["shape"] == [2, 33, 128]
    assert (tmp_path / "i.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("args, word", [
    (["inspect", "--preset", "huge"], "preset"),
    (["inspect", "--level", "O9"], "level"),
    (["inspect", "--recipe", "sometimes"], "recipe"),
    (["inspect", "--batch-size", "0"], "batch-size"),
    (["inspect", "--device", "tpu"], "device"),
    (["train", "--inspect-every", "0"], "inspect-every"),
])
def test_cli_inspect_bad_arguments(args, word, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert err[0].startswith("fp8lm: error: ") and word in err[0]


def test_inspect_every_logs_and_leaves_training_unchanged(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("".join(f"def f{i}(x):\n    return x * {i % 7} + {i}\n" for i in range(800)))
    base = dict(preset="tiny", steps=2, batch_size=2, seq_len=32, eval_batches=1, eval_every=100,
                device="cpu", data=str(data), progress=False, recipe="delayed")
    plain = train(TrainConfig(**base))
    out = tmp_path / "run.json"
    logged = train(TrainConfig(**base, inspect_every=1, metrics_out=str(out)))
    assert logged["loss_history"] == plain["loss_history"] and "inspect" not in plain
    entries = json.loads(out.read_text())["inspect"]
    assert [e["step"] for e in entries] == [0, 1, 2]
    for e in entries:
        assert set(e) == {"step", "loss", "layers"} and len(e["layers"]) == 17
        assert set(e["layers"]["layers.0.attn.qkv"]) == set(TENSORS)
        assert set(e["layers"]["head"]["grad_out"]) == {"rms", "amax", "e4m3_saturated", "e4m3_flushed",
                                                        "e5m2_saturated", "e5m2_flushed"}
    drift = [e["layers"]["layers.0.mlp.down"]["weight"]["rms"] for e in entries]
    assert drift[0] != drift[1] != drift[2]  # the model trains between entries
    assert math.isfinite(entries[0]["loss"])
