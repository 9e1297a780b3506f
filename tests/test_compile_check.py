"""fp8lm.compile_check: a compiled block's gradients against eager's, and how `fp8lm bench` reports them."""
import pytest
import torch

from fp8lm.bench import BenchConfig, bench_steps, format_tables, _Budget, resolve
from fp8lm.compile_check import compiled_gradient_check


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.parametrize("level", ["O0", "O1"])
def test_compiled_block_passes(level):
    """aot_eager traces what eager runs: O1 bit for bit (FP8 casts of the same values), O0 to BF16 rounding."""
    check = compiled_gradient_check(level, "current", "cpu")
    assert check["verdict"] == "same", check
    assert check["zero_only_compiled"] == [] and check["backend"] == "aot_eager"
    assert {"input", "attn_norm.weight", "mlp_norm.weight", "attn.qkv.weight"} <= set(check["per_tensor"])
    if level == "O1":
        assert check["worst_max_diff"] == 0.0


def test_missing_gradients_are_different():
    """A 'compiled' block that drops the input's gradient (as the torch 2.11 fault dropped the norms') fails."""
    check = compiled_gradient_check("O1", "current", "cpu",
                                    compile_fn=lambda block: (lambda x, cos, sin: block(x.detach(), cos, sin)))
    assert check["verdict"] == "different" and check["zero_only_compiled"] == ["input"]
    assert check["backend"] == "custom" and check["per_tensor"]["input"][1] == pytest.approx(1.0)


def test_bench_runs_the_check_once_per_level_and_warns(monkeypatch):
    """Compiled step rows: each level's check runs once, before its first row; a 'different' verdict prints a
    warning under the step table. (The rows themselves are stubbed: this tests the bookkeeping only.)"""
    import fp8lm.bench as bench
    calls = []

    def fake_check(level, recipe, device):
        calls.append(level)
        return {"level": level, "backend": "aot_eager", "verdict": "different" if level == "O1" else "same",
                "worst_max_diff": 1.0, "worst_rel_l2": 1.0, "zero_only_compiled": ["attn_norm.weight"],
                "per_tensor": {}}
    monkeypatch.setattr("fp8lm.compile_check.compiled_gradient_check", fake_check)
    monkeypatch.setattr(bench, "bench_step_one", lambda cfg, variant, compiled: {
        "variant": variant, "compile": compiled, "ms_per_step": 1.0, "fwd_bwd_ms": None, "optimizer_ms": None,
        "tokens_per_s": 1.0, "mfu": None, "peak_mem_gib": None, "warmup_s": 0.0})
    cfg = resolve(BenchConfig(device="cpu", compile="both", levels=("O0", "O1"), torchao=False, progress=False))
    checks = {}
    rows = bench_steps(cfg, _Budget(None), checks=checks)
    assert calls == ["O0", "O1"] and len(rows) == 4  # eager rows run no check
    table = format_tables({"meta": {"device_name": "cpu", "device": "cpu", "torch": "x", "triton": None,
                                    "torchao": None, "date_utc": "d", "timer": "wall clock", "peak_tflops": None,
                                    "peak_note": None, "config": {"preset": "tiny", "batch_size": 1, "seq_len": 8,
                                                                  "steps": 1, "warmup": 1}},
                           "gemm": [], "step": rows, "grad_check": checks})
    assert "(aot_eager): O0 same, O1 different" in table
    warnings = [line for line in table.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "O1" in warnings[0] and "attn_norm.weight" in warnings[0]
    cfg = resolve(BenchConfig(device="cpu", compile="on", levels=("O0",), torchao=False, progress=False,
                              grad_check=False))
    calls.clear()
    bench_steps(cfg, _Budget(None), checks={})
    assert calls == []


def test_cli_skip_grad_check_flag(monkeypatch):
    """`fp8lm bench --skip-grad-check` reaches the configuration."""
    import fp8lm.bench as bench
    from fp8lm.cli import main
    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda cfg: seen.setdefault("cfg", cfg))
    main(["bench", "--device", "cpu", "--skip-grad-check", "--no-progress"])
    assert seen.pop("cfg").grad_check is False
    main(["bench", "--device", "cpu", "--no-progress"])
    assert seen.pop("cfg").grad_check is True
