"""Memory report: bytes of weights, gradients and optimizer state, measured from the tensors that exist.

Every level is checked two ways: against an independent count (``fp8lm.tensor.storage_bytes`` of
each weight, gradient and optimizer-state tensor) and against the nominal bytes per parameter of
the level (O0 16, O1 11, O2 6 for linear weights; scales and scaling state on top).
"""
import json
from dataclasses import replace

import pytest
import torch

import fp8lm
from fp8lm.memory import memory_report
from fp8lm.models import GPT, GPTConfig, get_config
from fp8lm.nn import Float8Linear
from fp8lm.tensor import is_scaled, storage_bytes

# Odd widths (not multiples of 16) for the exact accounting; the tiny preset for the nominal bars.
ODD = GPTConfig(vocab_size=83, dim=40, n_layers=2, n_heads=2, ffn_dim=72, seq_len=24)
NOMINAL = {"O0": 16, "O1": 11, "O2": 6}  # linear weights: weight + grad + optimizer bytes per parameter


def make(cfg: GPTConfig, level: str):
    """A model at `level` with the AdamW the training loop would build (2 groups)."""
    model = GPT(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    return fp8lm.initialize(model, opt, level=level, verbose=False)


def backward(model, cfg: GPTConfig, micro_batches: int = 1) -> None:
    """Forward + backward on random tokens, `micro_batches` times without zeroing the gradients."""
    for _ in range(micro_batches):
        x = torch.randint(0, cfg.vocab_size, (2, 13))
        model(x, x)[1].backward()


def step_then_backward(cfg: GPTConfig, level: str, micro_batches: int = 1):
    """One full optimizer step (so the state exists), then backward again: the point the report is for."""
    model, opt = make(cfg, level)
    backward(model, cfg)
    opt.step()
    opt.zero_grad(set_to_none=True)
    backward(model, cfg, micro_batches)
    return model, opt


def independent_count(model, opt) -> dict[str, dict[str, int]]:
    """Per class and column, the sum of storage_bytes over weights, grads and optimizer state."""
    fp8_ids = {id(m.weight) for m in model.modules() if isinstance(m, Float8Linear)}
    fp8_ids |= {id(p) for p in model.parameters() if is_scaled(p)}
    out = {c: {"weights": 0, "grads": 0, "optimizer": 0, "params": 0} for c in ("fp8_linear", "other")}
    for p in model.parameters():
        cls = out["fp8_linear" if id(p) in fp8_ids else "other"]
        cls["params"] += p.numel()
        cls["weights"] += storage_bytes(p)
        cls["grads"] += storage_bytes(p.grad)
        cls["optimizer"] += sum(storage_bytes(v) for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    return out


@pytest.mark.parametrize("level", ["O0", "O1", "O2"])
def test_bytes_match_an_independent_count(seed, level):
    model, opt = step_then_backward(ODD, level)
    report = memory_report(model, opt)
    expected = independent_count(model, opt)
    for cls, cols in expected.items():
        got = report.classes[cls]
        assert (got.params, got.weights, got.grads, got.optimizer) == \
            (cols["params"], cols["weights"], cols["grads"], cols["optimizer"]), cls
    fp8_layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    state = sum(b.numel() * b.element_size() for m in fp8_layers for b in m.buffers(recurse=False))
    assert report.classes["fp8_linear"].fp8_state == state
    assert report.buffers == model.rope_cos.numel() * 4 * 2  # rotary tables, not per parameter
    assert report.grads_present and (level == "O0") == (not fp8_layers)


def test_o0_is_16_bytes_per_parameter_fp32(seed):
    model, opt = step_then_backward(ODD, "O0")
    report = memory_report(model, opt)
    other, n = report.classes["other"], sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    assert report.classes["fp8_linear"].params == 0 and other.params == n
    assert (other.weights, other.grads) == (4 * n, 4 * n)
    assert other.optimizer == 8 * n + 4 * n_tensors  # m and v in FP32, one 4-byte step per tensor
    assert other.dtypes["weights"] == {"float32": 4 * n} and other.dtypes["grads"] == {"float32": 4 * n}


@pytest.mark.parametrize("level", ["O0", "O1", "O2"])
def test_linear_weights_nominal_bytes_per_param_tiny(seed, level):
    """After backward and before the step, one micro-batch: O2 <= 6.25 B/param, scales included."""
    cfg = replace(get_config("tiny"), seq_len=32)
    model, opt = step_then_backward(cfg, level)
    report = memory_report(model, opt)
    cls = report.classes["fp8_linear" if level != "O0" else "other"]
    assert NOMINAL[level] <= cls.bytes_per_param <= NOMINAL[level] + 0.05, cls.to_dict()
    if level == "O2":
        assert cls.bytes_per_param <= 6.25
    if level != "O0":
        n, layers = cls.params, sum(isinstance(m, Float8Linear) for m in model.modules())
        assert cls.dtypes["weights"] == {"float16": 2 * n, "float32": 4 * layers}  # FP16 masters + scales
        assert cls.dtypes["grads"].get("float8_e4m3fn", 0) + cls.dtypes["grads"].get("float8_e5m2", 0) == n
    if level == "O2":
        assert cls.dtypes["optimizer"]["float8_e4m3fn"] == cls.params
        assert cls.dtypes["optimizer"]["float16"] == 2 * cls.params


def test_accumulation_buffer_is_counted(seed):
    """Two micro-batches before the step: the FP8 gradients widen to FP32 buffers, and the report says so."""
    model, opt = step_then_backward(ODD, "O1", micro_batches=2)
    cls = memory_report(model, opt).classes["fp8_linear"]
    assert cls.dtypes["grads"].get("float32", 0) >= 4 * cls.params
    assert "float8_e4m3fn" not in cls.dtypes["grads"] and "float8_e5m2" not in cls.dtypes["grads"]
    opt.zero_grad(set_to_none=True)
    backward(model, ODD)
    assert memory_report(model, opt).classes["fp8_linear"].grads < 1.1 * cls.params


def test_shared_storage_counted_once_and_module_caches_counted(seed):
    model, opt = make(ODD, "O1")
    model.head.weight = model.tok_emb.weight  # tied: one storage, one parameter
    before = memory_report(model)
    layer = model.layers[0].attn.qkv
    assert isinstance(layer, Float8Linear)
    layer._w_fp8_cache = torch.empty(layer.weight.shape, dtype=torch.float8_e4m3fn)  # a cached FP8 copy
    layer._history_view = layer.fp8_amax_history[0]  # a view of a buffer: no new bytes
    after = memory_report(model)
    assert after.classes["fp8_linear"].fp8_state - before.classes["fp8_linear"].fp8_state == layer.weight.numel()
    n_other = sum(p.numel() for p in model.parameters() if not is_scaled(p))
    assert before.classes["other"].weights == 4 * n_other
    assert not before.grads_present and before.classes["other"].optimizer == 0


def test_summary_and_dict(seed):
    model, opt = step_then_backward(ODD, "O2")
    report = memory_report(model, opt)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["classes"]["fp8_linear"]["total"] == report.classes["fp8_linear"].total
    assert d["total"] == report.total == sum(c["total"] for c in d["classes"].values()) + d["buffers"]
    table = report.summary()
    assert "FP8 linear weights" in table and "other parameters" in table and "B/param" in table
    assert f"{report.classes['fp8_linear'].bytes_per_param:.2f} B/param" in report.line()


def test_bad_arguments():
    with pytest.raises(ValueError, match="torch.nn.Module"):
        memory_report("model")
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        memory_report(torch.nn.Linear(3, 3), optimizer={})
