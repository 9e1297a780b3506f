"""Step time of O0 and O1 under other ``torch.compile`` settings (a GPU experiment of issue 5).

    python benchmarks/compile_modes.py [SETTING ...]      (default: all settings below)

The O1 step leaves the H100 idle about 5 ms per step (``profile_step.py``: busy 96.3 of 101.8 ms; O0
1.8 of 124.4): the host falls behind where many tiny kernels (amax histories, scales) run in a row.
Settings, each applied to the per-block ``block.compile()`` of ``fp8lm bench``'s step (``bench_step_one``,
same model, optimizer, data and timing) for O0 and O1 alike:

* ``default``: what ``fp8lm bench`` does;
* ``combo``: Inductor's ``combo_kernels`` (independent small kernels of a graph launched as one);
* ``cudagraphs``: ``mode="reduce-overhead"`` (CUDA graphs: one launch per compiled graph);
* ``combo+cudagraphs``: both;
* ``cudagraphs+mark``: CUDA graphs with ``torch.compiler.cudagraph_mark_step_begin()`` before each step
  (without it the graphs' fast path is refused: "pending, uninvoked backwards");
* ``whole``: the model's whole forward compiled as one graph (``torch.compile(model.forward)``: the
  autocast hooks of ``fp8lm.initialize`` stay outside) instead of per block;
* ``whole+cudagraphs``: the whole model as one CUDA graph (``mode="reduce-overhead"``, step marked): its
  only input is the token ids, so no activation is copied into a graph's static inputs, as it is per block;
* ``coord``: Inductor's ``coordinate_descent_tuning`` (each generated kernel's block sizes and warps tuned
  by measurement at compile time), passed as ``options`` to every block's compile;
* ``multikernel``: Inductor's ``triton.multi_kernel`` (a reduction compiled both persistent and looped, the
  faster one picked by measurement at run time), passed the same way;
* ``nomix``: Inductor's ``triton.mix_order_reduction`` off (torch 2.11 fuses a row reduction with a column
  reduction over the same input, e.g. RMSNorm's input gradient with its weight gradient, into one kernel);
* ``splitsize``: ``triton.mix_order_reduction_autotune_split_size`` (that kernel's split tuned by measurement);
* ``pdl``: ``triton.enable_pdl`` (Hopper's programmatic dependent launch: a kernel may start its prologue
  while the one before it finishes).

Prints one line per row and a table last (ms/step, ratio to O0 under the same setting, peak GiB).
"""
import sys

import torch
import torch.nn as nn

import fp8lm.bench as bench
from fp8lm.bench import BenchConfig, bench_step_one, resolve

SETTINGS = ("default", "combo", "cudagraphs", "combo+cudagraphs", "cudagraphs+mark", "whole", "whole+cudagraphs",
            "coord", "multikernel", "nomix", "splitsize", "pdl")
OPTIONS = {"coord": {"coordinate_descent_tuning": True}, "multikernel": {"triton.multi_kernel": 1},
           "nomix": {"triton.mix_order_reduction": False},
           "splitsize": {"triton.mix_order_reduction_autotune_split_size": True}, "pdl": {"triton.enable_pdl": True}}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # a CPU: a tiny smoke run of the patching


def run(setting: str, level: str) -> dict:
    """One `bench_step_one` row with the compile setting patched in."""
    import torch._inductor.config as inductor_config
    original = nn.Module.compile
    mode = "reduce-overhead" if "cudagraphs" in setting else None
    old_combo = inductor_config.combo_kernels
    inductor_config.combo_kernels = "combo" in setting
    whole = setting.startswith("whole")
    if whole:  # blocks stay as they are; the model is compiled in the step function below
        nn.Module.compile = lambda self, *a, **k: None
    else:
        extra = ({"mode": mode} if mode else {}) | ({"options": OPTIONS[setting]} if setting in OPTIONS else {})
        nn.Module.compile = lambda self, *a, **k: original(self, *a, **{**k, **extra})
    step_fn = bench._step_fn
    mark = "mark" in setting or (whole and mode is not None)

    def patched_step_fn(model, *args, **kwargs):
        if whole:  # the forward only: fp8lm.initialize's autocast hooks stay outside the graph
            model.forward = torch.compile(model.forward, **({"mode": mode} if mode else {}))
        step = step_fn(model, *args, **kwargs)
        if not mark:
            return step

        def marked():
            torch.compiler.cudagraph_mark_step_begin()
            return step()
        return marked
    bench._step_fn = patched_step_fn
    try:
        cfg = resolve(BenchConfig(device=DEVICE, recipe="delayed", compile="on", levels=("O0", "O1")))
        return bench_step_one(cfg, level, True)
    finally:
        nn.Module.compile = original
        inductor_config.combo_kernels = old_combo
        bench._step_fn = step_fn


def main() -> int:
    settings = [a for a in sys.argv[1:]] or list(SETTINGS)
    results = {}
    for setting in settings:
        for level in ("O0", "O1"):
            try:
                row = run(setting, level)
                results[(setting, level)] = (row["ms_per_step"], row["peak_mem_gib"] or float("nan"))
                print(f"{setting:<18} {level}: {row['ms_per_step']:.1f} ms/step, peak {row['peak_mem_gib'] or 0:.2f} GiB",
                      flush=True)
            except Exception as err:  # record and go on
                results[(setting, level)] = (float("nan"), float("nan"))
                print(f"{setting:<18} {level}: {type(err).__name__}: {' '.join(str(err).split())[:300]}", flush=True)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (tiny preset)"
    print(f"\nthe bench's step preset, delayed, per-block compile, {name}, torch {torch.__version__}")
    print(f"{'setting':<18}{'O0 ms':>9}{'O1 ms':>9}{'O1 vs O0':>10}{'O0 GiB':>9}{'O1 GiB':>9}")
    for setting in settings:
        (o0, m0), (o1, m1) = results[(setting, "O0")], results[(setting, "O1")]
        print(f"{setting:<18}{o0:9.1f}{o1:9.1f}{o0 / o1:9.2f}x{m0:9.2f}{m1:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
