"""`fp8lm bench`: FP8 against BF16, side by side in one process, at the GEMM and at the step level.

Method
------
Everything runs in one process on one device, so clocks, thermals and library versions are the
same for every column, and ratios are taken inside the run.

* Timing: CUDA events around each repeat (no synchronization between repeats), warm-up calls
  first (run-time compilation, cuBLAS handles, ``torch.compile``, optimizer state creation), then
  the **median** of the repeats. On a CPU the timers are wall-clock around a synchronous call.
* GEMM level: one linear layer's forward + backward, ``out = x @ w.T``, ``grad_x = g @ w``,
  ``grad_w = g.T @ x``: 6·M·K·N FLOPs. ``x`` (M, K) and ``grad_out`` (M, N) are BF16, random
  normal (never zeros). All variants of a shape are built and warmed up (compiled) first, then
  timed in interleaved rounds: each round runs every variant in turn (one untimed call, then 3
  timed ones on CUDA), in an order shuffled for every round, with no synchronization
  inside a round, and each column is the median over all its rounds (``--gemm-repeats`` timed
  calls; the JSON keeps every call's time, in round order, and the quartiles). A synchronization
  before each variant's calls (tried first) made the first timed call after it slow for every
  variant, most for the FP8 layers, whose host work per call is largest (8192^3: 3.8 ms against
  2.96 for the next two calls; BF16 4.8 against 4.6), so rounds are not synchronized inside. A
  fixed cyclic order (tried next) gave each variant the same predecessor every round, and BF16
  GEMMs ran slower right after a power-hungry FP8 variant: ``nn.Linear`` (after torchao's compiled
  layer) 5.05 ms at 8192^3 against 4.16 for the same three GEMMs bare (after torchao's eager
  layer), while alone, interleaved with each other, the two ran alike; hence the shuffle.
  Timed one after the other instead, the same BF16 GEMMs ran 4.34 ms in the first column and
  4.74 ms in a later one of one process at 8192^3 (``benchmarks/RESULTS.md``): the H100's clocks
  drift with its load, and a sequential table hands the drift to whichever column ran last.
  Columns:

  - ``bf16``: ``nn.Linear`` with BF16 weights (no casts at all: the strongest BF16 layer);
  - ``fp8``: ``fp8lm.nn.Float8Linear`` as levels O1/O2 build it (FP16 master with a scale, FP8
    weight gradient, recipe ``current``), quantization, transposes and scale math included, with
    its default casts (plain torch, ``set_fused_cast(False)``);
  - ``fp8 triton``: the same with every cast the Triton fused amax/cast/transpose kernel
    (``fp8lm.ops.cast``, ``set_fused_cast(True)``; only on CUDA with Triton);
  - ``fp8 compiled``: the default layer under ``torch.compile`` (Inductor fuses the plain casts);
  - ``fp8 triton compiled``: compiled with every cast fused (the operator ``fp8lm::cast_transpose_amax``);
  - ``torchao`` / ``torchao compiled``: torchao's float8 ``tensorwise`` layer, only if ``torchao``
    is importable: optional columns, never a dependency;
  - ``scaled_mm only``: the three ``torch._scaled_mm`` calls on operands already quantized and laid
    out (E4M3 x E4M3, E5M2 x E4M3 twice) against the three BF16 ``mm`` calls: the ceiling that
    quantization overhead eats into.

  Gradients come from ``torch.autograd.grad`` (no accumulation into ``.grad`` between repeats).
  On CUDA a second table gives each variant's host time to issue one call (``host_ms``: 5 calls issued
  after a synchronization, wall clock) next to its GPU time: a compiled FP8 layer issues about 25
  kernels per call and needed about as much host time as GPU time at 2048->11264 on the lent H100
  (``benchmarks/RESULTS.md``, ninth session), so its timed calls wait for the host whenever the calls
  before them leave the GPU's queue short.
* Step level: a full training step of a preset (``llama-0.75b`` on GPUs: batch 8 x 2048 tokens)
  at each level: forward, backward, ``fp8lm.optim.clip_grad_norm_(1.0)`` (torch's own for plain
  gradients, as at O0 and torchao), optimizer step, ``zero_grad``.
  O1 and O2 take the default plain casts (``set_fused_cast(False)``: compiled, Inductor fuses them
  into the kernels that produce their operands) and the fused SwiGLU (``set_fused_swiglu(True)``:
  the MLP's gradient cast to FP8 inside SwiGLU's backward kernel); where Triton runs on CUDA more
  rows show the alternatives: ``O1 grad`` (the output gradients' casts in the Triton kernel,
  ``set_fused_cast("grad")``), ``O1 triton`` (every cast there, ``set_fused_cast(True)``),
  ``O1 swiglu apart`` (the gate/up projection and SwiGLU apart, ``set_fused_swiglu(False)``) and, for
  O0 and O1, ``plain loss`` (the loss as ``F.cross_entropy(logits.float())`` instead of the Triton
  kernels of ``fp8lm.ops.cross_entropy``, ``set_fused_cross_entropy(False)``); compiled, the kernels
  are the operators ``fp8lm::cast_transpose_amax`` and ``fp8lm::swiglu_backward_cast``.
  O0 is the strongest honest BF16 baseline: BF16 autocast, torch's fused AdamW, compiled exactly as
  the FP8 levels are (per transformer block, ``block.compile()``, the way the issue's reference
  numbers were taken); the output head stays BF16 at every level. O1/O2 use the optimizer
  ``fp8lm.initialize`` builds. The step has no host synchronization (no ``loss.item()``, no
  finiteness check: the training loop's skip logic is left out so the GPU queue never drains).
  Reported: median ms/step, its forward+backward and optimizer parts, tokens/s, MFU
  (``model.flops_per_token`` x tokens/s over the peak; H100 SXM dense BF16 peak: 989 TFLOP/s, used
  for every level, FP8 included, so MFU ratios equal speed ratios), peak memory
  (``torch.cuda.max_memory_allocated`` over warm-up and timed steps) and the ratio to O0 at the
  same compile setting. Input tokens are random ids (fixed per run).
* Gradient check (``--skip-grad-check`` turns it off): before each level's first compiled row, one tiny
  block of that level, compiled, must give eager's gradients (``fp8lm.compile_check``; ``same``,
  ``close`` or ``different``, printed under the step table, with a warning for ``different``). Under
  the lent GPUs' torch 2.11 the compiled steps of nine sessions lacked both RMSNorms' backward and two
  input-gradient GEMMs per layer, and ran faster for it, until the tenth session found and fixed it.

Failures (a configuration that raises, e.g. ``torch.compile`` refusing the FP8 path) are recorded
in the JSON and the table as errors; the other columns still run. ``time_budget_s`` skips what
would start after the budget is spent (recorded as skipped), so a table always comes out.
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fp8lm.optim import clip_grad_norm_

__all__ = ["BenchConfig", "run_bench", "format_tables", "GEMM_SHAPES", "H100_BF16_DENSE_PEAK_TFLOPS"]

H100_BF16_DENSE_PEAK_TFLOPS = 989.0  # H100 SXM, dense BF16 tensor-core peak (datasheet)
GEMM_SHAPES = ((16384, 2048, 6144), (16384, 2048, 2048), (16384, 2048, 11264), (16384, 5632, 2048),
               (8192, 8192, 8192))  # (M tokens, K in, N out): llama-0.75b's linears and 8192^3
SMOKE_GEMM_SHAPES = ((256, 128, 384), (256, 384, 128))
COMPILE_MODES = ("off", "on", "both")
BENCH_LEVELS = ("O0", "O1", "O2")  # the single-process levels (O3 needs torch.distributed)
GEMM_VARIANTS = ("bf16", "fp8", "fp8 triton", "fp8 compiled", "fp8 triton compiled", "torchao", "torchao compiled",
                 "bf16 mm only", "scaled_mm only")


@dataclass
class BenchConfig:
    """What `fp8lm bench` measures; None means "the device's default" (`resolve`)."""

    device: str = "auto"
    preset: str | None = None  # llama-0.75b on CUDA, tiny on CPU
    levels: tuple | None = None  # default: BENCH_LEVELS
    recipe: str = "current"
    fast_accum: bool = False  # the FP8 forward GEMM with Hopper's fast accumulation (Recipe.fast_accum)
    fused_optimizer: bool = False  # force fp8lm AdamW's fused Triton step at O1/O2 (the CUDA default anyway)
    batch_size: int | None = None
    seq_len: int | None = None
    steps: int | None = None  # timed steps per configuration
    warmup: int | None = None  # untimed steps first
    gemm_repeats: int | None = None
    gemm_shapes: tuple | None = None
    compile: str | None = None  # "off", "on" or "both"; default both on CUDA, off on CPU
    torchao: bool = True  # add torchao columns when it is importable
    gemm: bool = True
    step: bool = True
    grad_check: bool = True  # compare a compiled block's gradients with eager's first (fp8lm.compile_check)
    peak_tflops: float | None = None  # default H100_BF16_DENSE_PEAK_TFLOPS on CUDA, none on CPU
    time_budget_s: float | None = None
    out: str | None = None
    progress: bool = True
    command: str = ""


def _fused_step_by_default(device: str) -> bool:
    """Whether fp8lm's AdamW takes its fused Triton step on ``device`` without ``fused=True``."""
    from fp8lm.ops.cast import triton_available
    from fp8lm.optim import fused_step_enabled
    return device.startswith("cuda") and fused_step_enabled() and triton_available(device)


def resolve(cfg: BenchConfig) -> BenchConfig:
    """Check `cfg` and fill the device-dependent defaults (tiny, few steps, wall-clock on a CPU)."""
    from fp8lm.models import PRESETS
    from fp8lm.train import resolve_device

    device = resolve_device(cfg.device)
    cuda = device.startswith("cuda")
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; allowed: {', '.join(PRESETS)}")
    compile_mode = cfg.compile or ("both" if cuda else "off")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile_mode!r}; allowed: {', '.join(COMPILE_MODES)}")
    import fp8lm
    levels = tuple(cfg.levels or BENCH_LEVELS)
    for level in levels:
        if level not in BENCH_LEVELS:
            raise ValueError(f"level {level!r} cannot be benchmarked in one process; allowed: {', '.join(BENCH_LEVELS)}"
                             + (" (O3 shards with FSDP2 under torch.distributed)" if level == "O3" else ""))
    if cfg.recipe not in fp8lm.RECIPES:
        raise ValueError(f"unknown recipe {cfg.recipe!r}; allowed: {', '.join(fp8lm.RECIPES)}")
    for name in ("batch_size", "seq_len", "steps", "warmup", "gemm_repeats"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < (0 if name == "warmup" else 1)):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    preset = cfg.preset or ("llama-0.75b" if cuda else "tiny")
    return BenchConfig(
        device=device, preset=preset, levels=levels, recipe=cfg.recipe, fast_accum=bool(cfg.fast_accum),
        fused_optimizer=bool(cfg.fused_optimizer) or _fused_step_by_default(device),
        batch_size=cfg.batch_size or (8 if cuda else 4),
        seq_len=cfg.seq_len or (PRESETS[preset].seq_len if cuda else 64),
        steps=cfg.steps or (10 if cuda else 2), warmup=cfg.warmup if cfg.warmup is not None else (3 if cuda else 1),
        gemm_repeats=cfg.gemm_repeats or (60 if cuda else 3),
        gemm_shapes=tuple(cfg.gemm_shapes or (GEMM_SHAPES if cuda else SMOKE_GEMM_SHAPES)),
        compile=compile_mode, torchao=cfg.torchao, gemm=cfg.gemm, step=cfg.step, grad_check=cfg.grad_check,
        peak_tflops=cfg.peak_tflops or _default_peak(device),
        time_budget_s=cfg.time_budget_s, out=cfg.out, progress=cfg.progress, command=cfg.command,
    )


def _default_peak(device: str) -> float | None:
    """989 TFLOP/s on H100/H200 (the same dense BF16 tensor-core peak); None elsewhere (no MFU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return H100_BF16_DENSE_PEAK_TFLOPS if ("H100" in name or "H200" in name) else None


# ----------------------------------------------------------------------------------------------- timing

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_ms(fn, warmup: int, repeats: int, device: str) -> list[float]:
    """Milliseconds of each of `repeats` calls of `fn()` after `warmup` untimed calls.

    CUDA: one pair of events per call, read after a single synchronization at the end.
    CPU: wall-clock around each (synchronous) call.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    if not device.startswith("cuda"):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


class _Budget:
    """Wall-clock budget: `left()` is False once `seconds` have passed since creation (None: no limit)."""

    def __init__(self, seconds: float | None):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> bool:
        return self.seconds is None or time.perf_counter() - self.t0 < self.seconds


def _log(cfg: BenchConfig, message: str) -> None:
    if cfg.progress:
        sys.stderr.write(f"[fp8lm bench] {message}\n")
        sys.stderr.flush()


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def torchao_version() -> str | None:
    """torchao's version if it can be imported (with its float8 training API), else None."""
    try:
        import torchao
        from torchao.float8 import convert_to_float8_training  # noqa: F401
    except Exception:  # any import failure means: no torchao column
        return None
    return getattr(torchao, "__version__", "unknown")


# ----------------------------------------------------------------------------------------------- GEMM level

def _recipe(cfg: BenchConfig):
    """The ``fp8lm.Recipe`` of the configuration (its named recipe, plus ``fast_accum``)."""
    import dataclasses

    from fp8lm.scaling import get_recipe
    return dataclasses.replace(get_recipe(cfg.recipe), fast_accum=cfg.fast_accum)


def _fp8_layer(k: int, n: int, device: str, recipe) -> nn.Module:
    """A `Float8Linear` as O1/O2 build it: FP16 master weight with a scale, FP8 weight gradient."""
    from fp8lm.nn import Float8Linear
    return Float8Linear.from_linear(nn.Linear(k, n, bias=False, device=device), recipe, master="fp16")


def _torchao_layer(k: int, n: int, device: str) -> nn.Module:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    seq = nn.Sequential(nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16))
    convert_to_float8_training(seq, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    return seq[0]


def _fwd_bwd(layer: nn.Module, x_hp: torch.Tensor, grad_out_hp: torch.Tensor):
    """A closure running `layer` forward and backward (grads of input and weight, no accumulation)."""
    def call():
        out = layer(x_hp)
        return torch.autograd.grad(out, (x_hp, layer.weight), grad_out_hp)
    return call


def _scaled_mm_only(m: int, k: int, n: int, device: str):
    """Closures for the three FP8 GEMMs on ready operands and the three BF16 GEMMs (the ceiling)."""
    from fp8lm.formats import E4M3, E5M2, quantize_dynamic
    x_hp = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w_hp = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    g_hp = torch.randn(m, n, device=device, dtype=torch.bfloat16) * 1e-3
    x_fp8, sx = quantize_dynamic(x_hp, E4M3)
    w_fp8, sw = quantize_dynamic(w_hp, E4M3)
    g_fp8, sg = quantize_dynamic(g_hp, E5M2)
    x_t_fp8, w_t_fp8, g_t_fp8 = x_fp8.t().contiguous(), w_fp8.t().contiguous(), g_fp8.t().contiguous()
    ix, iw, ig = sx.reciprocal(), sw.reciprocal(), sg.reciprocal()
    bf16 = torch.bfloat16

    def fp8():
        torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=ix, scale_b=iw, out_dtype=bf16)  # (M, N)
        torch._scaled_mm(g_fp8, w_t_fp8.t(), scale_a=ig, scale_b=iw, out_dtype=bf16)  # (M, K)
        torch._scaled_mm(g_t_fp8, x_t_fp8.t(), scale_a=ig, scale_b=ix, out_dtype=bf16)  # (N, K)

    def hp():
        x_hp @ w_hp.t()
        g_hp @ w_hp
        g_hp.t() @ x_hp
    return hp, fp8


# step-row suffix -> (set_fused_cast mode, set_fused_swiglu, set_fused_cross_entropy): the rows next to the
# default ones; "plain loss" is the only one that also applies to O0
ALTERNATIVE_ROWS = {" plain loss": (False, True, False), " grad": ("grad", True, True),
                    " triton": (True, True, True), " swiglu apart": (False, False, True)}
O0_ROWS = (" plain loss",)


def _with_fused_cast(fn, mode: bool | str = True, swiglu: bool = True, loss: bool = True):
    """`fn` run with `Float8Linear`'s Triton fused casts set to `mode` (`set_fused_cast`; True: every cast),
    its fused SwiGLU on or off (`set_fused_swiglu`) and the loss's kernels on or off (`set_fused_cross_entropy`)."""
    from fp8lm.nn.linear import set_fused_cast, set_fused_swiglu
    from fp8lm.ops.cross_entropy import set_fused_cross_entropy

    def call():
        old, old_swiglu, old_loss = set_fused_cast(mode), set_fused_swiglu(swiglu), set_fused_cross_entropy(loss)
        try:
            return fn()
        finally:
            set_fused_cast(old)
            set_fused_swiglu(old_swiglu)
            set_fused_cross_entropy(old_loss)
    return call


def _gemm_closures(m: int, k: int, n: int, cfg: BenchConfig, phase: str, ao: bool) -> dict:
    """The GEMM-level variants of one shape and `phase` ("eager" or "compiled") as ``name -> factory``."""
    from fp8lm.ops.cast import triton_available
    device = cfg.device
    x_hp = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_out_hp = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    if phase == "compiled":
        makers = {"fp8 compiled": lambda: _fwd_bwd(torch.compile(_fp8_layer(k, n, device, _recipe(cfg))),
                                                   x_hp, grad_out_hp)}
        if triton_available(device) and device.startswith("cuda"):
            makers["fp8 triton compiled"] = lambda: _with_fused_cast(
                _fwd_bwd(torch.compile(_fp8_layer(k, n, device, _recipe(cfg))), x_hp, grad_out_hp))
        if ao:
            makers["torchao compiled"] = lambda: _fwd_bwd(torch.compile(_torchao_layer(k, n, device)),
                                                          x_hp, grad_out_hp)
        return makers
    makers = {
        "bf16": lambda: _fwd_bwd(nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16), x_hp, grad_out_hp),
        "fp8": lambda: _fwd_bwd(_fp8_layer(k, n, device, _recipe(cfg)), x_hp, grad_out_hp),
    }
    if triton_available(device) and device.startswith("cuda"):
        makers["fp8 triton"] = lambda: _with_fused_cast(
            _fwd_bwd(_fp8_layer(k, n, device, _recipe(cfg)), x_hp, grad_out_hp))
    if ao:
        makers["torchao"] = lambda: _fwd_bwd(_torchao_layer(k, n, device), x_hp, grad_out_hp)
    if device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 9):
        pair = []  # both ceiling closures share one set of operands, made on first use

        def ceiling(i):
            pair.extend(pair or _scaled_mm_only(m, k, n, device))
            return pair[i]
        makers["bf16 mm only"], makers["scaled_mm only"] = (lambda: ceiling(0)), (lambda: ceiling(1))
    return makers


def bench_gemm(cfg: BenchConfig, budget: _Budget) -> list[dict]:
    """GEMM-level rows: one per shape, TFLOP/s and ratio to `bf16` for each variant.

    Every variant of a shape (eager, and compiled when `cfg.compile` asks for it) is built and warmed
    up first, then timed in interleaved rounds (`time_interleaved`), so a drift of the GPU's clocks
    during the run lands on every column alike instead of on whichever ran last.
    """
    ao = cfg.torchao and torchao_version() is not None
    phases = ("eager", "compiled") if cfg.compile in ("on", "both") else ("eager",)
    rows = []
    for m, k, n in cfg.gemm_shapes:
        flops = 6 * m * k * n
        row = {"shape": [m, k, n], "label": f"{m} x {k}->{n}", "flops": flops, "variants": {}}
        rows.append(row)
        if not budget.left():
            row["variants"] = {"bf16": {"skipped": "time budget spent"}}
            continue
        fns = {}
        for phase in phases:
            for name, make in _gemm_closures(m, k, n, cfg, phase, ao).items():
                fns[name] = _build_variant(name, make, cfg, row["variants"])
        fns = {name: fn for name, fn in fns.items() if fn is not None}
        rounds = math.ceil(cfg.gemm_repeats / _calls_per_round(cfg.device))
        errors = {}
        times = time_interleaved(fns, rounds, _calls_per_round(cfg.device), cfg.device, errors)
        for name, message in errors.items():
            row["variants"][name] = {"error": message}
        for name, ts in times.items():
            ms = statistics.median(ts)
            row["variants"][name].update(ms=ms, tflops=flops / ms / 1e9, repeats=len(ts),
                                         ms_q1=_quantile(ts, 0.25), ms_q3=_quantile(ts, 0.75),
                                         ms_all=[round(t, 4) for t in ts])
            if cfg.device.startswith("cuda"):
                row["variants"][name]["host_ms"] = host_ms(fns[name], cfg.device)
        row["variants"] = {name: row["variants"][name] for name in GEMM_VARIANTS if name in row["variants"]}
        _gemm_ratios(row["variants"])
        _log(cfg, f"gemm {row['label']}: " + ", ".join(
            f"{name} {_tflops(v['tflops'])} TFLOP/s" if "tflops" in v else f"{name} {v.get('error', v.get('skipped'))}"
            for name, v in row["variants"].items()))
        del fns
        _free(cfg.device)
    return rows


def _gemm_ratios(variants: dict) -> None:
    """Each timed GEMM-level variant's `ratio`: its baseline's ms over its own. The baseline is `bf16`, for
    `scaled_mm only` the bare BF16 GEMMs (`bf16 mm only`)."""
    for name, v in variants.items():
        base = "bf16 mm only" if name == "scaled_mm only" else "bf16"
        ref = variants.get(base, {}).get("ms")
        if v.get("ms") and ref:
            v["ratio"] = ref / v["ms"]


def host_ms(fn, device: str, calls: int = 5) -> float:
    """Host milliseconds to issue one call of `fn`: `calls` calls issued after a synchronization, with none
    between them, timed by the wall clock (the GPU runs their kernels meanwhile). A call whose host time is
    above its GPU time cannot keep the GPU busy: the layer then runs at its host's pace."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    _sync(device)
    return elapsed / calls * 1e3


def _calls_per_round(device: str) -> int:
    """Timed calls of each variant per interleaved round: 3 on CUDA (after one untimed call), 1 on a CPU."""
    return 3 if device.startswith("cuda") else 1


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[round(q * 4) - 1] if len(values) > 1 else values[0]


def _build_variant(name: str, make, cfg: BenchConfig, variants: dict):
    """Build one GEMM-level variant and warm it up (compiles happen here); on failure record the error
    in `variants[name]` and return None."""
    try:
        fn = make()
        t0 = time.perf_counter()
        for _ in range(max(2, cfg.warmup)):
            fn()
        _sync(cfg.device)
    except Exception as err:  # report, keep benchmarking the other variants
        variants[name] = {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
        return None
    variants[name] = {"warmup_s": time.perf_counter() - t0}
    return fn


def time_interleaved(fns: dict, rounds: int, per_round: int, device: str,
                     errors: dict | None = None) -> dict[str, list[float]]:
    """Milliseconds of `rounds * per_round` calls of each function in `fns`, timed in interleaved rounds.

    Each round runs every function in turn, in an order shuffled anew for every round (seeded, so a
    rerun repeats it): one untimed call, then `per_round` timed calls. On CUDA nothing synchronizes
    inside a round (CUDA events around each timed call, read after the round), so the host stays
    ahead of the GPU across the switches from one variant to the next, as it does across the layers of
    a model. On a CPU: wall clock around each (synchronous) call. A function that raises is dropped
    from later rounds and keeps no times; its error goes to `errors` (name -> message) when given."""
    names = list(fns)
    times = {name: [] for name in names}
    cuda = device.startswith("cuda")
    order = random.Random(0)
    for _ in range(rounds):
        marks = []
        order.shuffle(names)
        for name in [n for n in names if n in times]:
            try:
                marks += _time_calls(fns[name], per_round, cuda, times[name])
            except Exception as err:  # report, keep timing the others
                if errors is not None:
                    errors[name] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                del times[name]  # (a raising call left no events in `marks`)
        if cuda:
            torch.cuda.synchronize(device)
            for start, end, out in marks:
                out.append(start.elapsed_time(end))
    return times


def _time_calls(fn, per_round: int, cuda: bool, out: list) -> list:
    """One untimed call of `fn`, then `per_round` timed ones: CPU times go to `out` now; CUDA calls
    return their (start, end, out) event pairs, read after the round's synchronization."""
    fn()
    marks = []
    for _ in range(per_round):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            marks.append((start, end, out))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return marks


# ----------------------------------------------------------------------------------------------- step level

def _build(cfg: BenchConfig, variant: str):
    """Model and optimizer of one step-level variant ("O0", "O1", "O2" or "torchao"), on the device."""
    import fp8lm
    from fp8lm import models

    torch.manual_seed(0)
    with torch.device(cfg.device):  # initialize on the device: a 0.75B-parameter CPU init takes seconds
        model = models.build_model(cfg.preset, seq_len=cfg.seq_len)
    if variant == "torchao":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                                   module_filter_fn=lambda mod, fqn: fqn != "head")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=cfg.device.startswith("cuda"))
    level = "O0" if variant == "torchao" else variant
    options = {"fused": True} if cfg.fused_optimizer and level in ("O1", "O2") else None
    return fp8lm.initialize(model, optimizer, level=level, recipe=_recipe(cfg), verbose=False,
                            optimizer_options=options)


def _step_fn(model, optimizer, x, y, marks: list | None):
    """One training step without host synchronization; `marks` gets (start, after backward, end) events."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step():
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if marks is not None else None
        if ev:
            ev[0].record()
        _, loss = model(x, y)
        loss.backward()
        if ev:
            ev[1].record()
        clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ev:
            ev[2].record()
            marks.append(ev)
        return loss
    return step


def step_setup(cfg: BenchConfig, level: str, compiled: bool):
    """``(model, optimizer, x, y)`` of the step level: ``level``'s model and optimizer (``_build``), each block
    compiled when ``compiled`` (after a Dynamo reset), and random token ids (B, T) fixed per run."""
    if compiled:
        torch._dynamo.reset()
    model, optimizer = _build(cfg, level)
    if compiled:
        from fp8lm.train import compile_blocks
        compile_blocks(model)
    gen = torch.Generator(device=cfg.device).manual_seed(0)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), device=cfg.device, generator=gen)  # (B, T)
    y = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), device=cfg.device, generator=gen)  # (B, T)
    return model, optimizer, x, y


def bench_step_one(cfg: BenchConfig, variant: str, compiled: bool) -> dict:
    """Time one step-level configuration; returns its row (raises on failure)."""
    cuda = cfg.device.startswith("cuda")
    suffix = next((s for s in ALTERNATIVE_ROWS if variant.endswith(s)), "")  # Triton fused casts on
    model, optimizer, x, y = step_setup(cfg, variant.removesuffix(suffix) if suffix else variant, compiled)
    if cuda:
        torch.cuda.reset_peak_memory_stats(cfg.device)
    marks = [] if cuda else None
    step = _step_fn(model, optimizer, x, y, marks)
    step = _with_fused_cast(step, *ALTERNATIVE_ROWS[suffix]) if suffix else step
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        step()
    _sync(cfg.device)
    warmup_s = time.perf_counter() - t0
    if cuda:
        marks.clear()
        for _ in range(cfg.steps):
            loss = step()
        torch.cuda.synchronize(cfg.device)
        step_ms = [a.elapsed_time(c) for a, _, c in marks]
        fb_ms = [a.elapsed_time(b) for a, b, _ in marks]
        opt_ms = [b.elapsed_time(c) for _, b, c in marks]
    else:
        step_ms, fb_ms, opt_ms = [], None, None
        for _ in range(cfg.steps):
            t = time.perf_counter()
            loss = step()
            step_ms.append((time.perf_counter() - t) * 1e3)
    ms = statistics.median(step_ms)
    tokens = cfg.batch_size * cfg.seq_len
    tok_s = tokens / (ms / 1e3)
    flops_tok = model.flops_per_token(cfg.seq_len)
    row = {
        "variant": variant, "compile": compiled, "ms_per_step": ms,
        "fwd_bwd_ms": statistics.median(fb_ms) if fb_ms else None,
        "optimizer_ms": statistics.median(opt_ms) if opt_ms else None,
        "tokens_per_s": tok_s, "tflops": flops_tok * tok_s / 1e12,
        "mfu": flops_tok * tok_s / (cfg.peak_tflops * 1e12) if cfg.peak_tflops else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(cfg.device) / 2**30 if cuda else None,
        "loss": float(loss.detach()), "warmup_s": warmup_s, "steps": len(step_ms),
        "step_ms_all": step_ms,
    }
    del model, optimizer, step, marks, x, y, loss
    return row


def grad_check_level(cfg: BenchConfig, level: str, checks: dict) -> None:
    """Before `level`'s first compiled row: `fp8lm.compile_check.compiled_gradient_check` of one tiny block of
    that level (the bench's recipe), stored in `checks[level]` (an error is stored as such); once per level."""
    from fp8lm.compile_check import compiled_gradient_check
    if level in checks:
        return
    try:
        check = compiled_gradient_check(level, _recipe(cfg), cfg.device)
        checks[level] = {k: v for k, v in check.items() if k != "per_tensor"}
        worst = f"worst max diff {check['worst_max_diff']:.3g}, relative L2 {check['worst_rel_l2']:.3g}"
        zeros = f"; zero only when compiled: {', '.join(check['zero_only_compiled'])}" if check["zero_only_compiled"] else ""
        _log(cfg, f"gradient check {level}: compiled {check['verdict']} ({worst}{zeros})")
    except Exception as err:  # report, keep benchmarking
        checks[level] = {"level": level, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
        _log(cfg, f"gradient check {level}: {checks[level]['error']}")


def bench_steps(cfg: BenchConfig, budget: _Budget, rows: list | None = None, on_row=None,
                checks: dict | None = None) -> list[dict]:
    """Step-level rows for every level (and torchao) at each compile setting; ratios to O0.

    Rows are appended to `rows` (a new list if None); `on_row()` runs after each one (partial saves).
    With `cfg.grad_check`, each level's first compiled row is preceded by `grad_check_level` into `checks`
    (torchao's rows share O0's blocks apart from their linears; O0's check covers those).
    """
    from fp8lm.ops.cast import triton_available
    variants = list(cfg.levels) + (["torchao"] if cfg.torchao and torchao_version() else [])
    settings = {"off": [False], "on": [True], "both": [False, True]}[cfg.compile]
    rows = rows if rows is not None else []
    for compiled in settings:
        extra = []
        if cfg.device.startswith("cuda") and triton_available(cfg.device):
            extra = [lv + s for lv in ("O0", "O1") if lv in cfg.levels
                     for s in (O0_ROWS if lv == "O0" else ALTERNATIVE_ROWS)]
        for variant in variants + extra:
            tag = f"{variant} {'compiled' if compiled else 'eager'}"
            if not budget.left():
                rows.append({"variant": variant, "compile": compiled, "skipped": "time budget spent"})
                _log(cfg, f"step {tag}: skipped (time budget spent)")
                continue
            _log(cfg, f"step {tag}: {cfg.preset}, {cfg.batch_size} x {cfg.seq_len} tokens, "
                      f"{cfg.warmup} warm-up + {cfg.steps} timed steps ...")
            level = next((lv for lv in BENCH_LEVELS if variant.startswith(lv)), None)
            if compiled and cfg.grad_check and checks is not None and level is not None:
                grad_check_level(cfg, level, checks)
            try:
                row = bench_step_one(cfg, variant, compiled)
            except Exception as err:  # report, keep benchmarking the other configurations
                row = {"variant": variant, "compile": compiled,
                       "error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
            _free(cfg.device)
            rows.append(row)
            _set_ratios(rows)
            if on_row is not None:
                on_row()
            _log(cfg, f"step {tag}: " + (f"{row['ms_per_step']:.1f} ms/step, {row['tokens_per_s']:,.0f} tok/s "
                                         f"(warm-up {row['warmup_s']:.1f} s)" if "ms_per_step" in row else
                                         row.get("error", "")))
    return rows


def _set_ratios(rows: list[dict]) -> None:
    """`ratio_vs_O0`: O0's ms/step at the same compile setting over the row's."""
    for row in rows:
        base = next((r for r in rows if r["variant"] == "O0" and r["compile"] == row["compile"]
                     and "ms_per_step" in r), None)
        if base and "ms_per_step" in row:
            row["ratio_vs_O0"] = base["ms_per_step"] / row["ms_per_step"]


# ----------------------------------------------------------------------------------------------- run and report

def _meta(cfg: BenchConfig) -> dict:
    cuda = cfg.device.startswith("cuda")
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": cfg.device,
        "device_name": torch.cuda.get_device_name(cfg.device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_v, "torchao": torchao_version(),
        "timer": "cuda events" if cuda else "wall clock", "peak_tflops": cfg.peak_tflops,
        "peak_note": ("H100/H200 SXM dense BF16 peak (989 TFLOP/s), used for every level"
                      if cfg.peak_tflops == H100_BF16_DENSE_PEAK_TFLOPS else None),
        "command": cfg.command, "config": {k: v for k, v in asdict(cfg).items() if k not in ("command", "out")},
    }


def run_bench(cfg: BenchConfig) -> dict:
    """Run the benchmark `cfg` describes; print progress and the tables; write JSON to `cfg.out`."""
    cfg = resolve(cfg)
    budget = _Budget(cfg.time_budget_s)
    if cfg.device.startswith("cuda"):
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    result = {"meta": _meta(cfg), "gemm": [], "step": []}
    t0 = time.perf_counter()
    def save():  # the JSON so far, after every configuration: a killed run still leaves its numbers
        result["meta"]["wall_s"] = time.perf_counter() - t0
        if cfg.out:
            write_json(result, cfg.out)

    if cfg.gemm:
        _log(cfg, f"GEMM level: {len(cfg.gemm_shapes)} shapes, median of {cfg.gemm_repeats} repeats "
                  "in interleaved rounds")
        result["gemm"] = bench_gemm(cfg, budget)
        save()
    if cfg.step:
        bench_steps(cfg, budget, result["step"], save, result.setdefault("grad_check", {}))
    save()
    print(format_tables(result))
    return result


def write_json(obj: dict, path: str) -> None:
    """Write `obj` as standard JSON (non-finite floats become null), creating parent folders."""
    def safe(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: safe(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [safe(v) for v in o]
        return o
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(safe(obj), fh, indent=2)
        fh.write("\n")


def _tflops(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def _cell(v: dict, key: str, fmt: str) -> str:
    if "error" in v:
        return "error"
    if "skipped" in v:
        return "skipped"
    if v.get(key) is None:
        return "-"
    return format(v[key], fmt)


def format_tables(result: dict) -> str:
    """The GEMM-level and step-level tables as text (printed last by `run_bench`)."""
    meta = result["meta"]
    lines = [f"fp8lm bench: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
             f"triton {meta['triton']}, torchao {meta['torchao']}, {meta['date_utc']} UTC, timer: {meta['timer']}"]
    cfg = meta.get("config", {})
    if cfg:
        lines.append(f"FP8 recipe: {cfg.get('recipe')}, forward GEMM fast accumulation "
                     f"{'on' if cfg.get('fast_accum') else 'off'}, fp8lm AdamW step "
                     f"{'fused (Triton)' if cfg.get('fused_optimizer') else 'unfused'} at O1/O2")
    if not str(meta["device"]).startswith("cuda"):
        lines.append("CPU smoke run: these times measure emulation and software BF16, not FP8 speed")
    if result["gemm"]:
        names = [n for n in GEMM_VARIANTS if any(n in r["variants"] for r in result["gemm"])]
        lines += ["", "GEMM level: one linear, forward + backward (3 GEMMs, 6MKN FLOPs), quantization included;"
                  " TFLOP/s (ratio to bf16; 'scaled_mm only': to 3 bare BF16 mm)",
                  f"{'M x K->N':<20}" + "".join(f"{n:>20}" for n in names)]
        for r in result["gemm"]:
            cells = []
            for n in names:
                v = r["variants"].get(n, {})
                ratio = f" ({v['ratio']:.2f}x)" if "ratio" in v else ""
                cells.append(f"{_tflops(v['tflops'])}{ratio}" if "tflops" in v else _cell(v, "tflops", ".0f"))
            lines.append(f"{r['label']:<20}" + "".join(f"{c:>20}" for c in cells))
        if any("host_ms" in v for r in result["gemm"] for v in r["variants"].values()):
            lines += ["", "GEMM level: host ms to issue one forward + backward / GPU ms per call (median); where the "
                      "first is larger, the layer runs at its host's pace",
                      f"{'M x K->N':<20}" + "".join(f"{n:>20}" for n in names)]
            for r in result["gemm"]:
                cells = [f"{v['host_ms']:.2f} / {v['ms']:.2f}" if "host_ms" in v else "-"
                         for v in (r["variants"].get(n, {}) for n in names)]
                lines.append(f"{r['label']:<20}" + "".join(f"{c:>20}" for c in cells))
    if result["step"]:
        cfg = meta["config"]
        width = max([12] + [len(r["variant"]) + 1 for r in result["step"]])  # the variant column
        peak = (f"MFU vs {meta['peak_tflops']:.0f} TFLOP/s ({meta['peak_note'] or 'given peak'})"
                if meta["peak_tflops"] else "MFU n/a (no peak for this device)")
        lines += ["", f"Step level: {cfg['preset']}, {cfg['batch_size']} x {cfg['seq_len']} tokens, median of "
                  f"{cfg['steps']} steps after {cfg['warmup']} warm-up; {peak}",
                  f"{'variant':<{width}}{'compile':>9}{'ms/step':>10}{'fwd+bwd':>10}{'optim':>8}{'tokens/s':>11}"
                  f"{'MFU':>7}{'peak GiB':>10}{'vs O0':>8}"]
        for r in result["step"]:
            comp = "yes" if r["compile"] else "no"
            if "ms_per_step" not in r:
                lines.append(f"{r['variant']:<{width}}{comp:>9}  {r.get('error') or r.get('skipped')}")
                continue
            mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
            ratio = f"{r['ratio_vs_O0']:.2f}x" if "ratio_vs_O0" in r else "-"
            lines.append(f"{r['variant']:<{width}}{comp:>9}{r['ms_per_step']:>10.1f}{_cell(r, 'fwd_bwd_ms', '.1f'):>10}"
                         f"{_cell(r, 'optimizer_ms', '.1f'):>8}{r['tokens_per_s']:>11,.0f}{mfu:>7}"
                         f"{_cell(r, 'peak_mem_gib', '.2f'):>10}{ratio:>8}")
    lines += _grad_check_lines(result.get("grad_check") or {})
    return "\n".join(lines)


def _grad_check_lines(checks: dict) -> list[str]:
    """The gradient checks under the step table: one line, and a warning per level whose compiled block differs."""
    if not checks:
        return []
    cells = [f"{lv} {c['verdict']}" if "verdict" in c else f"{lv} error" for lv, c in checks.items()]
    backend = next((c["backend"] for c in checks.values() if "backend" in c), "-")
    lines = ["", f"Compiled block against eager, gradients of one tiny block ({backend}): " + ", ".join(cells)]
    for lv, c in checks.items():
        if c.get("verdict") == "different":
            lines.append(f"WARNING: {lv}'s compiled block computes other gradients than eager "
                         f"(zero only when compiled: {', '.join(c['zero_only_compiled']) or 'none'}; worst relative "
                         f"L2 {c['worst_rel_l2']:.3g}): its compiled rows time another computation")
    return lines
