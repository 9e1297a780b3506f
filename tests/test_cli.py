"""The command line: a real train run, compare outputs, and one-line errors for bad arguments."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fp8lm.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "2",
        "--device", "cpu", "--no-progress"]


def fp8lm_cli(*args, cwd=None):
    """Run `python -m fp8lm ARGS`; return the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FP8LM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "fp8lm", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small text file to train on."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i % 7} + {i}\n" for i in range(800)))
    return str(path)


def test_train_writes_metrics(text_file, tmp_path):
    out = tmp_path / "run.json"
    proc = fp8lm_cli("train", "--level", "O1", "--steps", "3", "--data", text_file,
                     "--metrics-out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(out.read_text())
    assert m["steps"] == 3 and len(m["loss_history"]) == 3 and m["level"] == "O1"
    assert m["config"]["batch_size"] == 2 and m["config"]["seq_len"] == 32
    assert "train loss" in proc.stdout and "Traceback" not in proc.stderr


def test_compare_writes_json_and_png(text_file, tmp_path):
    out = tmp_path / "cmp"
    proc = fp8lm_cli("compare", "--levels", "O0,O1", "--steps", "3", "--data", text_file,
                     "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "compare.json").read_text())
    assert result["levels"] == ["O0", "O1"] and result["baseline"] == "O0"
    assert set(result["runs"]) == {"O0", "O1"} and result["gaps_pct"]["O0"] == {"train": 0.0, "val": 0.0}
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "val gap vs O0" in proc.stdout and "(emulated)" in proc.stdout


def test_compile_flag_reaches_the_config():
    from fp8lm.cli import build_parser, config_from_args
    for flag, value in (([], False), (["--compile", "off"], False), (["--compile", "on"], True)):
        for command in ("train", "compare"):
            assert config_from_args(build_parser().parse_args([command, *flag])).compile is value


def bad_cases(tmp_path):
    """(arguments, a word the error line must contain) for every bad command line."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["train", "--preset", "huge"], "preset"),
        (["train", "--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["train", "--data", str(empty)], "empty"),
        (["train", "--corpus", ""], "corpus"),
        (["train", "--steps", "0"], "steps"),
        (["compare", "--steps", "-1"], "steps"),
        (["train", "--level", "O9"], "level"),
        (["compare", "--levels", "O0,O9"], "level"),
        (["train", "--recipe", "sometimes"], "recipe"),
        (["train", "--device", "tpu"], "device"),
        (["train", "--compile", "yes"], "compile"),
        (["train", "--compile", "on", "--inspect-every", "5", "--device", "cpu"], "compile"),
        ([], "required"),
    ]
    if not torch.cuda.is_available():
        cases.append((["train", "--device", "cuda"], "CUDA"))
    return cases


def check_one_line_error(args, word, returncode, stderr):
    """Exit code 2 and exactly one `fp8lm: error:` line naming `word`, no traceback, no usage."""
    lines = stderr.splitlines()
    assert returncode == 2, (args, stderr)
    assert len(lines) == 1, (args, stderr)
    assert lines[0].startswith("fp8lm: error: ") and word in lines[0], (args, lines)
    assert "Traceback" not in stderr and "usage" not in stderr, args


def test_bad_arguments_one_line(tmp_path, capsys, monkeypatch):
    """Every case through ``main`` in this process (the exit code and stderr a process would have)."""
    monkeypatch.delenv("FP8LM_DEBUG", raising=False)
    for args, word in bad_cases(tmp_path):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        check_one_line_error(args, word, exit_info.value.code, capsys.readouterr().err)


def test_bad_arguments_one_line_subprocess(tmp_path):
    """Two cases as real processes: a parser error and a run-time ``ValueError`` (each process pays
    the torch import, so the other cases run in-process above)."""
    cases = [c for c in bad_cases(tmp_path) if c[1] in ("preset", "does not exist")]
    assert len(cases) == 2
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda case: fp8lm_cli(*case[0]), cases))
    for (args, word), proc in zip(cases, procs):
        check_one_line_error(args, word, proc.returncode, proc.stderr)


def test_debug_env_reraises(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8LM_DEBUG", "1")
    with pytest.raises(ValueError, match="does not exist"):
        main(["train", "--data", str(tmp_path / "missing.txt")])
