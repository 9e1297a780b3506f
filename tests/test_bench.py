"""`fp8lm bench` on a CPU: the smoke version runs end to end and writes a well-formed JSON."""
import json
import math
import time

import pytest
import torch

from fp8lm.bench import BenchConfig, _gemm_ratios, format_tables, host_ms, resolve
from fp8lm.cli import main

SMOKE = ["bench", "--device", "cpu", "--batch-size", "1", "--seq-len", "16", "--steps", "1", "--warmup", "1",
         "--gemm-repeats", "2", "--no-progress"]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_cpu_smoke_writes_json(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    assert main([*SMOKE, "--fast-accum", "--out", str(out)]) == 0  # (fast accumulation: CUDA only, a no-op here)
    printed = capsys.readouterr().out
    assert "GEMM level" in printed and "Step level" in printed
    assert "forward GEMM fast accumulation on, fp8lm AdamW step unfused" in printed
    result = json.loads(out.read_text())
    assert set(result) == {"meta", "gemm", "step", "grad_check"}
    assert result["grad_check"] == {}  # only compiled step rows are preceded by a gradient check
    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["timer"] == "wall clock" and meta["peak_tflops"] is None
    assert meta["command"].startswith("fp8lm bench") and meta["config"]["preset"] == "tiny"
    assert meta["config"]["fast_accum"] is True and meta["config"]["fused_optimizer"] is False

    assert len(result["gemm"]) == 2
    for row in result["gemm"]:
        m, k, n = row["shape"]
        assert row["flops"] == 6 * m * k * n
        for name in ("bf16", "fp8"):
            v = row["variants"][name]
            assert "error" not in v, v
            assert all(_positive(v[key]) for key in ("ms", "tflops", "ratio")), v
            assert len(v["ms_all"]) == v["repeats"] == 2 and v["ms_q1"] <= v["ms"] <= v["ms_q3"], v
        assert row["variants"]["bf16"]["ratio"] == 1.0

    steps = {r["variant"]: r for r in result["step"]}
    assert set(steps) == {"O0", "O1", "O2"}
    for level, r in steps.items():
        assert "error" not in r, r
        assert r["compile"] is False
        for key in ("ms_per_step", "tokens_per_s", "tflops", "ratio_vs_O0", "loss"):
            assert _positive(r[key]), (level, key, r[key])
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # no peak and no allocator stats on a CPU
        assert r["steps"] == 1
    assert steps["O0"]["ratio_vs_O0"] == 1.0


def test_bench_table_reports_errors_and_skips():
    result = {"meta": {"device_name": "cpu", "device": "cpu", "torch": "x", "triton": None, "torchao": None,
                       "date_utc": "d", "timer": "wall clock", "peak_tflops": None, "peak_note": None,
                       "config": {"preset": "tiny", "batch_size": 1, "seq_len": 16, "steps": 1, "warmup": 1}},
              "gemm": [{"label": "8 x 16->16", "variants": {"bf16": {"tflops": 1.0, "ratio": 1.0},
                                                           "fp8": {"error": "RuntimeError: boom"}}}],
              "step": [{"variant": "O1", "compile": True, "error": "BackendCompilerFailed: no"},
                       {"variant": "O2", "compile": True, "skipped": "time budget spent"}]}
    table = format_tables(result)
    assert "error" in table and "BackendCompilerFailed" in table and "time budget spent" in table


def test_bench_table_host_times_only_when_measured():
    """CUDA runs record each GEMM-level variant's host time per call: a second table pairs it with the GPU
    time; a CPU run (synchronous calls: no host time apart) prints no such table."""
    meta = {"device_name": "gpu", "device": "cuda", "torch": "x", "triton": None, "torchao": None, "date_utc": "d",
            "timer": "CUDA events", "peak_tflops": None, "peak_note": None}
    variants = {"bf16": {"tflops": 700.0, "ratio": 1.0, "ms": 3.1, "host_ms": 0.41},
                "fp8 compiled": {"tflops": 900.0, "ratio": 1.3, "ms": 2.38, "host_ms": 2.24},
                "fp8": {"error": "RuntimeError: boom"}}
    table = format_tables({"meta": meta, "gemm": [{"label": "16384 x 2048->11264", "variants": variants}], "step": []})
    host_lines = table.split("host ms to issue")[1].splitlines()
    row = next(line for line in host_lines if line.startswith("16384 x 2048->11264"))
    assert row.split()[3:] == ["0.41", "/", "3.10", "-", "2.24", "/", "2.38"]  # bf16, fp8 (error), fp8 compiled
    for v in variants.values():
        v.pop("host_ms", None)
    assert "host ms" not in format_tables({"meta": meta, "gemm": [{"label": "8 x 16->16", "variants": variants}],
                                           "step": []})


def test_gemm_ratios_pick_each_columns_baseline():
    """Ratios: to bf16, scaled_mm only to the bare BF16 GEMMs; a column whose baseline was not timed gets none."""
    variants = {"bf16": {"ms": 3.0}, "fp8 triton compiled": {"ms": 2.0}, "bf16 mm only": {"ms": 2.8},
                "scaled_mm only": {"ms": 1.4}, "fp8": {"error": "boom"}}
    _gemm_ratios(variants)
    assert {n: v.get("ratio") for n, v in variants.items()} == pytest.approx({
        "bf16": 1.0, "fp8 triton compiled": 1.5, "bf16 mm only": 3.0 / 2.8, "scaled_mm only": 2.0, "fp8": None})
    alone = {"scaled_mm only": {"ms": 1.6}, "bf16": {"ms": 3.0}}
    _gemm_ratios(alone)
    assert "ratio" not in alone["scaled_mm only"]


def test_host_ms_times_the_issuing_of_calls():
    calls = []
    assert host_ms(lambda: (calls.append(1), time.sleep(0.002)), "cpu", calls=4) >= 2.0 and len(calls) == 4


@pytest.mark.parametrize("bad", [dict(levels=("O9",)), dict(levels=("O0", "O3")), dict(compile="sometimes"),
                                 dict(steps=0), dict(preset="huge"), dict(device="tpu")])
def test_bench_config_errors_are_value_errors(bad):
    with pytest.raises(ValueError):
        resolve(BenchConfig(device=bad.pop("device", "cpu"), **bad))


def test_bench_cli_gemm_shapes(tmp_path, capsys, one_thread):
    """--gemm-shapes picks the GEMM-level shapes (MxKxN); a malformed one is a one-line usage error."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--skip-step", "--gemm-repeats", "1", "--no-progress", "--no-torchao",
                 "--gemm-shapes", "64x32x48, 40X24x16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["gemm"]
    assert [r["shape"] for r in rows] == [[64, 32, 48], [40, 24, 16]]
    assert all(r["variants"]["fp8"]["ms"] > 0 for r in rows)
    capsys.readouterr()
    for bad in ("64x32", "64x0x8", "axbxc"):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--gemm-shapes", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "MxKxN" in err and err.count("\n") == 1, err


def test_bench_cli_bad_argument_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--compile", "sometimes"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8lm: error:") and err.count("\n") == 1


def test_gemm_timing_is_interleaved_in_shuffled_rounds():
    """Each round calls every variant once in turn (1 untimed + per_round timed calls), in an order that
    changes between rounds and repeats in a rerun."""
    from fp8lm.bench import time_interleaved

    def run():
        calls = []
        fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c", "d")}
        times = time_interleaved(fns, rounds=8, per_round=2, device="cpu")
        assert {name: len(ts) for name, ts in times.items()} == {name: 16 for name in "abcd"}
        assert all(t >= 0 for ts in times.values() for t in ts)
        return calls

    calls = run()
    rounds = [calls[i:i + 12] for i in range(0, len(calls), 12)]
    orders = [tuple(r[::3]) for r in rounds]
    assert all(sorted(o) == list("abcd") for o in orders)
    assert all(r == [x for x in o for _ in range(3)] for r, o in zip(rounds, orders))
    assert len(set(orders)) > 1  # shuffled, not one fixed order
    assert run() == calls  # seeded: a rerun repeats the order


def test_gemm_timing_drops_a_variant_that_raises():
    """A variant that fails in the timed rounds loses its times and reports its error; the others go on."""
    from fp8lm.bench import time_interleaved
    calls = {"ok": 0, "bad": 0}

    def ok():
        calls["ok"] += 1

    def bad():
        calls["bad"] += 1
        if calls["bad"] > 3:
            raise RuntimeError("boom\nsecond line")

    errors = {}
    times = time_interleaved({"ok": ok, "bad": bad}, rounds=5, per_round=2, device="cpu", errors=errors)
    assert set(times) == {"ok"} and len(times["ok"]) == 10
    assert errors == {"bad": "RuntimeError: boom second line"} and calls["bad"] == 4
