"""The training loop: determinism, metrics, validation isolation, config errors, skipped steps."""
import json
import math

import pytest
import torch

import fp8lm
from fp8lm.train import TrainConfig, lr_at, resolve_config, step_unless, train, train_step, train_step_async

REQUIRED = ("final_train_loss", "val_loss", "val_history", "tokens_per_s", "steps", "level", "recipe",
            "preset", "device", "peak_mem_bytes", "loss_history", "data_fingerprint", "num_params",
            "seed", "torch_version", "wall_s", "skipped_steps")


def write_text(path, lines=800):
    """A small Python-like text file (about 30 KB) to train on."""
    path.write_text("".join(f"def f{i}(x):\n    return x * {i % 7} + {i}  # line {i}\n" for i in range(lines)))
    return str(path)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A module-wide text file to train on."""
    return write_text(tmp_path_factory.mktemp("data") / "corpus.txt")


def small(text_file, **kw):
    """A quick CPU config: tiny preset, 2 x 32 tokens per step."""
    base = dict(preset="tiny", steps=8, batch_size=2, seq_len=32, eval_batches=2, eval_every=100,
                device="cpu", data=text_file, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run_a(text_file):
    """The reference short run that other tests compare against."""
    return train(small(text_file))


def test_identical_runs_are_bit_identical(text_file, run_a):
    run_b = train(small(text_file))
    assert run_a["loss_history"] == run_b["loss_history"]
    assert run_a["val_history"] == run_b["val_history"]


@pytest.mark.parametrize("recipe", list(fp8lm.RECIPES))
def test_validation_does_not_change_training(text_file, run_a, recipe):
    frequent = train(small(text_file, recipe=recipe, eval_every=2))
    rare = run_a if recipe == "current" else train(small(text_file, recipe=recipe))
    assert frequent["loss_history"] == rare["loss_history"]
    assert [s for s, _ in frequent["val_history"]] == [0, 2, 4, 6, 8]
    assert [s for s, _ in rare["val_history"]] == [0, 8]
    assert frequent["val_loss"] == rare["val_loss"]


def test_metrics_json(text_file, tmp_path):
    out = tmp_path / "sub" / "run.json"
    train(small(text_file, steps=3, metrics_out=str(out)))
    m = json.loads(out.read_text())
    for key in REQUIRED:
        assert key in m, key
    for key in ("final_train_loss", "val_loss", "tokens_per_s", "wall_s", "num_params"):
        assert isinstance(m[key], (int, float)) and math.isfinite(m[key]) and m[key] > 0, key
    assert len(m["loss_history"]) == m["steps"] == 3
    assert all(isinstance(v, float) for v in m["loss_history"])
    assert m["peak_mem_bytes"] is None and m["device"] == "cpu"
    assert m["data_fingerprint"]["source"] == text_file
    assert (m["level"], m["recipe"], m["preset"], m["seed"]) == ("O1", "current", "tiny", 1337)
    assert m["torch_version"] == torch.__version__ and m["skipped_steps"] == 0


def test_text_file_run_learns(text_file):
    m = train(small(text_file, steps=40, batch_size=4))
    assert m["loss_history"][0] > 5.0
    assert m["final_train_loss"] < 3.5 and m["val_loss"] < 3.5


@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=-3), "steps must be a positive integer"),
    (dict(preset="huge"), "unknown preset"),
    (dict(level="O9"), "unknown level"),
    (dict(recipe="sometimes"), "unknown recipe"),
    (dict(device="tpu"), "unknown device"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(data="/no/such/path"), "does not exist"),
    (dict(compile=True, inspect_every=2), "compile runs in one process without inspect_every"),
    (dict(compile=True, level="O0", dp="ddp"), "compile runs in one process"),
])
def test_bad_config(change, message):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(progress=False, **change))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_absent():
    with pytest.raises(ValueError, match="CUDA is not available"):
        train(TrainConfig(device="cuda", progress=False))


def test_defaults_resolved():
    cfg = resolve_config(TrainConfig(device="cpu"))
    assert (cfg.batch_size, cfg.seq_len, cfg.lr, cfg.warmup) == (16, 128, 3e-3, 30)
    assert resolve_config(TrainConfig(device="auto")).device in ("cpu", "cuda")
    assert resolve_config(TrainConfig(steps=20)).warmup == 2


def test_lr_schedule():
    cfg = resolve_config(TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1, device="cpu"))
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


class NaNModel(torch.nn.Module):
    """Returns a non-finite loss that still has gradients."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x, y):
        return None, (self.w * float("nan")).sum()


class OneBatch:
    """A sampler that always returns the same (1, 2) batch."""

    def next(self):
        return torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)


def test_non_finite_loss_skips_the_step():
    model = NaNModel()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    loss, applied = train_step(model, opt, OneBatch(), lr=0.1, grad_clip=1.0)
    assert math.isnan(loss) and not applied
    assert torch.equal(model.w.detach(), torch.ones(3)) and model.w.grad is None


def test_async_step_skips_non_finite_on_the_device():
    """``train_step_async`` reads nothing on the host: a NaN loss comes back as a tensor with found_inf 1,
    the weights untouched and the gradients cleared."""
    model = NaNModel()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    loss, found_inf = train_step_async(model, opt, OneBatch(), lr=0.1, grad_clip=1.0)
    assert isinstance(loss, torch.Tensor) and loss.isnan() and found_inf.tolist() == [1.0]
    assert torch.equal(model.w.detach(), torch.ones(3)) and model.w.grad is None


OPTIMIZERS = {
    "torch fused AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),  # found_inf on the device
    "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.1),  # read on the host
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "fp8lm AdamW": lambda ps: fp8lm.optim.AdamW(ps, lr=0.1, state="fp8"),  # its plain path on the CPU
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_unless(name, seed):
    """A flagged step changes nothing (weights, step counts); the next unflagged step equals the first step
    of an optimizer that never saw the flag."""
    w0, g = torch.randn(5, 7), torch.randn(5, 7)
    pa, pb = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    oa, ob = OPTIMIZERS[name]([pa]), OPTIMIZERS[name]([pb])
    pa.grad = g.clone()
    step_unless(oa, torch.ones(1))
    assert torch.equal(pa.detach(), w0)
    for p, o in ((pa, oa), (pb, ob)):
        p.grad = g.clone()
        step_unless(o, torch.zeros(1))
    assert torch.equal(pa.detach(), pb.detach()) and not torch.equal(pa.detach(), w0)
    if "step" in ob.state[pb]:
        assert float(oa.state[pa]["step"]) == float(ob.state[pb]["step"]) == 1.0


@pytest.mark.usefixtures("one_thread")  # conftest.py
@pytest.mark.parametrize("level", ["O0", "O2"])
def test_compiled_blocks_train_like_eager(text_file, level, capsys):
    """``compile=True``: the gradient check runs first (verdict printed and stored), every block is compiled
    (Dynamo captured graphs) and the losses follow eager's (Inductor's CPU code rounds differently in places)."""
    from torch._dynamo.utils import counters
    eager = train(small(text_file, level=level, steps=4))
    counters.clear()
    comp = train(small(text_file, level=level, steps=4, compile=True, progress=True))
    assert counters["stats"]["unique_graphs"] >= 1
    assert comp["compile_check"]["verdict"] in ("same", "close") and comp["compile_check"]["level"] == level
    assert f"gradient check at {level} {comp['compile_check']['verdict']}" in capsys.readouterr().out
    assert comp["config"]["compile"] is True and "compile_check" not in eager
    for a, b in zip(eager["loss_history"], comp["loss_history"]):
        assert abs(a - b) <= 0.02 * abs(a), (eager["loss_history"], comp["loss_history"])
