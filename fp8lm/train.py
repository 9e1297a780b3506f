"""The training loop: one preset, one precision level, one corpus, metrics out.

    from fp8lm.train import TrainConfig, train
    metrics = train(TrainConfig(preset="tiny", level="O1", steps=300))

What a step does:
    x, y = sampler.next()                      # (B, T) random windows, the sampler's own RNG
    logits, loss = model(x, y)                 # fp8lm.initialize put the model at `level`
    loss.backward()                            # (no torch.autocast here: the model applies it)
    clip_grad_norm_(params, grad_clip)         # fp8lm.optim's: torch's, FP8 gradients without per-tensor Python
    optimizer.step()                           # AdamW, warmup + cosine learning rate

A step whose loss or gradient norm is not finite is skipped (gradients zeroed, counted in
`skipped_steps`). In one process that decision is made on the device (`train_step_async`,
`step_unless`: the optimizer reads a `found_inf` flag), and losses are read back only at progress
updates (every 10 steps), validation, checkpoints and the end, so the host issues the next step
while the device runs this one; under data parallelism each step reads its global loss (`train_step`).
On the H100 (llama-0.75b, compiled) that took the loop's O1 step from 131.7 to 115.8 ms, the bench's
113.6 (`benchmarks/RESULTS.md`, eleventh session). Validation uses a fixed set of batches drawn once
from the validation split, runs under `torch.no_grad()` in eval mode and touches neither the sampler
nor the global RNG, so the training trajectory does not depend on how often it is evaluated. With the
same config two CPU runs produce bit-identical loss histories.

Throughput (`tokens_per_s`) counts training steps only, from the second step on (the first
pays one-off costs; with `compile`, from the fourth: the first steps compile the blocks, and
delayed scaling recompiles them once its histories fill), without validation. On a CPU it
measures emulation speed, not FP8 speed.

Memory: right after backward, before the optimizer step, of the first step in which the
optimizer holds its state (a fresh run's second step), `fp8lm.memory_report` measures weights,
gradients and optimizer state; its line is printed and the report goes to `metrics["memory"]`.

Checkpoints and resume (`fp8lm.checkpoint`): with `out_dir`, a checkpoint is written to
`out_dir/step-<k>` every `save_every` steps and after the last one. `resume` (a checkpoint, or
a run folder: its latest) continues up to `steps`, which is always the run's total (the LR
schedule depends on it). Everything the continuation reads is in the checkpoint: weights and
scaling state, optimizer state (with its rounding generator), the sampler's generator, the
global RNGs, and the loop state (loss and validation histories, skipped steps, timers). The
model is built from the seed as usual and then overwritten, so the resumed run is bit-identical
to one that never stopped (on the same device and thread count). Settings that would change
the trajectory (`RESUME_MUST_MATCH`, the data) must match the checkpoint's.

`inspect_every=N` logs `fp8lm.inspect`'s per-layer figures (rms, amax, E4M3/E5M2 saturated and
flushed fractions of every linear's six tensors) before steps 0, N, 2N, ... (and after the last
step when N divides `steps`) to `metrics["inspect"]`, on the first validation batch; the
inspection changes neither the model nor its scaling state, so the losses stay bit-identical.
"""
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from tqdm.auto import tqdm

import fp8lm
from fp8lm.checkpoint import checkpoint_dir, checkpoint_info, load_checkpoint, resolve_checkpoint, save_checkpoint
from fp8lm.data import BatchSampler, fixed_batches, load_corpus
from fp8lm.memory import memory_report
from fp8lm.inspection import inspect as inspect_model
from fp8lm import models
from fp8lm import distributed as fp8dist
from fp8lm.distributed import launch as dist_launch
from fp8lm.models import PRESETS
from fp8lm.optim import clip_grad_norm_

# Training defaults per preset. `warmup` is capped at a tenth of the run when not set explicitly.
PRESET_TRAINING = {
    "tiny": dict(batch_size=16, lr=3e-3, warmup=30, eval_every=50, eval_batches=8),
    "gpt-125m": dict(batch_size=16, lr=6e-4, warmup=200, eval_every=250, eval_batches=20),
    "llama-0.75b": dict(batch_size=8, lr=3e-4, warmup=200, eval_every=250, eval_batches=20),
    # unit-scaled twins: lr is u-muP's base rate (per-group scales in UnitGPT.optimizer_param_groups)
    "unit-tiny": dict(batch_size=16, lr=0.5, warmup=30, eval_every=50, eval_batches=8),
    "unit-125m": dict(batch_size=16, lr=0.5, warmup=200, eval_every=250, eval_batches=20),
}
DEVICES = ("auto", "cpu", "cuda")
UNTIMED_STEPS = {False: 1, True: 3}  # first steps of a process left out of tokens_per_s: eager, compiled


@dataclass
class TrainConfig:
    """Everything a training run needs; None means "the preset's default"."""

    preset: str = "tiny"
    level: str = "O1"
    recipe: str = "current"
    fp8_activations: bool | None = None  # FP8 storage of saved activations; None: on at O2 (fp8lm.initialize)
    master_rounding: str = "stochastic"  # FP16 master weights at O1/O2: "stochastic" or "nearest"
    steps: int = 300
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    device: str = "auto"
    data: str | None = None
    corpus: str = "python-stdlib"
    tokenizer: str = "byte"
    vocab_size: int | None = None
    eval_every: int | None = None
    eval_batches: int | None = None
    metrics_out: str | None = None
    out_dir: str | None = None  # checkpoints go to out_dir/step-<k> (every save_every steps and at the end)
    save_every: int | None = None
    resume: str | None = None  # a checkpoint folder, or a run folder (its latest step-*)
    progress: bool = True
    inspect_every: int | None = None  # log fp8lm.inspect figures every N steps (metrics["inspect"])
    dp: str | None = None  # "ddp" / "fsdp" (O0, O3): data parallel under torchrun (fp8lm.distributed); batch_size stays global
    compile: bool = False  # torch.compile each transformer block (`compile_blocks`), as `fp8lm bench` does


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" if available else "cpu"; raise ValueError if CUDA is asked for but absent."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; allowed: {', '.join(DEVICES)} (or cuda:N)")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available; use --device cpu")
    return device


def check_config(cfg: TrainConfig) -> None:
    """Raise ValueError (one line) for the first thing wrong in `cfg`."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; allowed: {', '.join(PRESETS)}")
    if cfg.level not in fp8lm.LEVELS:
        raise ValueError(f"unknown level {cfg.level!r}; allowed: {', '.join(fp8lm.LEVELS)}")
    fp8dist.check_dp(cfg.dp, cfg.level)
    if cfg.dp is not None and cfg.inspect_every:
        raise ValueError("inspect_every is not supported with dp yet (its backward pass would synchronize)")
    if cfg.compile and (cfg.dp is not None or cfg.inspect_every):
        raise ValueError("compile runs in one process without inspect_every for now; drop --compile, or --dp / "
                         "--inspect-every")
    if cfg.dp == "fsdp" and (cfg.out_dir or cfg.resume):
        raise ValueError("checkpoints are not supported with dp='fsdp' yet (sharded state); drop --out/--resume "
                         "or use dp='ddp'")
    if cfg.recipe not in fp8lm.RECIPES:
        raise ValueError(f"unknown recipe {cfg.recipe!r}; allowed: {', '.join(fp8lm.RECIPES)}")
    if cfg.master_rounding not in ("stochastic", "nearest"):
        raise ValueError(f"unknown master_rounding {cfg.master_rounding!r}; allowed: stochastic, nearest")
    if not isinstance(cfg.steps, int) or cfg.steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {cfg.steps!r}")
    for name in ("batch_size", "seq_len", "eval_every", "eval_batches", "inspect_every"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"lr must be positive, got {cfg.lr!r}")
    if cfg.warmup is not None and cfg.warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {cfg.warmup!r}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio!r}")
    if cfg.weight_decay < 0 or cfg.grad_clip < 0:
        raise ValueError("weight_decay and grad_clip must be >= 0 (grad_clip 0 turns clipping off)")
    if cfg.data is not None:
        check_data_path(cfg.data)
    check_checkpointing(cfg)
    resolve_device(cfg.device)


def check_checkpointing(cfg: TrainConfig) -> None:
    """Raise ValueError for a bad save_every / out_dir / resume combination."""
    if cfg.save_every is not None and (not isinstance(cfg.save_every, int) or cfg.save_every <= 0):
        raise ValueError(f"save_every must be a positive integer, got {cfg.save_every!r}")
    if cfg.save_every is not None and not cfg.out_dir:
        raise ValueError("save_every needs out_dir (--out DIR): the folder the checkpoints go to")
    if cfg.resume is not None:
        resolve_checkpoint(cfg.resume)


def check_data_path(data: str) -> None:
    """Raise ValueError if `data` does not exist or is an empty file (before any loading starts)."""
    path = os.path.expanduser(data)
    if not os.path.exists(path):
        raise ValueError(f"data path '{data}' does not exist")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"data file '{data}' is empty; it needs text")


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Check `cfg` and fill every None with the preset's default (device "auto" resolved too)."""
    check_config(cfg)
    defaults = PRESET_TRAINING[cfg.preset]
    warmup = cfg.warmup if cfg.warmup is not None else min(defaults["warmup"], cfg.steps // 10)
    return replace(
        cfg,
        device=resolve_device(cfg.device),
        batch_size=cfg.batch_size or defaults["batch_size"],
        seq_len=cfg.seq_len or PRESETS[cfg.preset].seq_len,
        lr=cfg.lr or defaults["lr"],
        warmup=warmup,
        eval_every=cfg.eval_every or defaults["eval_every"],
        eval_batches=cfg.eval_batches or defaults["eval_batches"],
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_steps = max(1, cfg.steps - cfg.warmup - 1)
    progress = min(1.0, (step - cfg.warmup) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def build_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    """The preset's model for a tokenizer of `vocab_size` ids, seeded by `cfg.seed`, on `cfg.device`.

    `cfg` must be resolved (`resolve_config`). Not yet put at a level: call `fp8lm.initialize` next.
    """
    torch.manual_seed(cfg.seed)
    return models.build_model(cfg.preset, vocab_size, seq_len=cfg.seq_len).to(cfg.device)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (not norms); fused on CUDA.

    A model with `optimizer_param_groups(lr, weight_decay)` (the unit-scaled GPT: u-muP learning
    rates) supplies its own groups; a group's "lr_scale" multiplies the scheduled rate (`train_step`).
    """
    if hasattr(model, "optimizer_param_groups"):
        groups = model.optimizer_param_groups(cfg.lr, cfg.weight_decay)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = str(cfg.device).startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches) -> float:
    """Mean loss over fixed batches, in eval mode; the model goes back to train mode after."""
    model.eval()
    losses = [model(x, y)[1].float() for x, y in batches]
    model.train()
    mean = torch.stack(losses).mean()
    return fp8dist.mean_over_ranks(mean) if fp8dist.grad_sync(model) else mean.item()  # the global mean


def train(cfg: TrainConfig) -> dict:
    """Train `cfg.preset` at `cfg.level` for `cfg.steps` steps; return (and maybe write) the metrics."""
    t_start = time.perf_counter()
    cfg = resolve_config(cfg)
    cfg, rank, world, own_group = setup_data_parallel(cfg)
    # Reading files is quick; only BPE training is slow enough to deserve a progress bar.
    corpus = load_corpus(cfg.corpus, data=cfg.data, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                         progress=cfg.progress and cfg.tokenizer == "bpe")
    B, T = cfg.batch_size, cfg.seq_len
    sampler = BatchSampler(corpus.train, B, T, seed=cfg.seed, device=cfg.device)
    val_batches = fixed_batches(corpus.val, B, T, cfg.eval_batches, seed=0, device=cfg.device)
    if cfg.dp is not None:  # each rank takes its rows of every global batch
        sampler = dist_launch.RankSlice(sampler, rank, world)
        val_batches = dist_launch.slice_batches(val_batches, rank, world)
    resume_meta = check_resume(cfg, corpus.fingerprint) if cfg.resume else None

    check = compile_check(cfg) if cfg.compile else None  # before the model: it reseeds torch's RNG
    model = build_model(cfg, corpus.vocab_size)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = fp8lm.initialize(model, optimizer, level=cfg.level, recipe=cfg.recipe,
                                        verbose=cfg.progress, fp8_activations=cfg.fp8_activations, dp=cfg.dp,
                                        optimizer_options={"master_rounding": cfg.master_rounding})
    if cfg.compile:
        compile_blocks(model)
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(cfg.device)

    state = resume_state(model, optimizer, sampler, cfg, resume_meta) if resume_meta else None
    save = checkpoint_saver(model, optimizer, sampler, cfg, corpus.fingerprint) if cfg.out_dir and rank == 0 else None
    with contextlib.ExitStack() as quiet:
        if rank != 0:  # only rank 0 prints
            quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
        loop = run_loop(model, optimizer, sampler, val_batches, cfg, state, save)
    if cfg.dp is not None:
        loop["distributed"] = fp8dist.grad_sync(model).summary()
    metrics = {
        "preset": cfg.preset, "level": cfg.level, "recipe": cfg.recipe, "device": cfg.device,
        "steps": cfg.steps, "seed": cfg.seed, "num_params": model.num_params(),
        "flops_per_token": model.flops_per_token(T), "tokens_per_step": B * T,
        **loop,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(cfg.device) if cfg.device.startswith("cuda") else None,
        "data_fingerprint": corpus.fingerprint, "torch_version": torch.__version__,
        "config": asdict(cfg), "wall_s": time.perf_counter() - t_start,
    }
    if check is not None:
        metrics["compile_check"] = check
    if own_group:
        # every rank past its last collective before any closes its connections: without the barrier
        # a gloo rank sometimes aborted at teardown ("terminate called without an active exception";
        # 2 of 40 two-process CPU runs of `fp8lm train --nproc 2 --dp fsdp --level O3`)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return metrics
    print(summary_line(metrics))
    if cfg.dp is not None:
        print(fp8dist.grad_sync(model).summary_line())
    if cfg.metrics_out:
        write_json(metrics, cfg.metrics_out)
    return metrics


def compile_check(cfg: TrainConfig) -> dict:
    """``fp8lm.compile_check`` of one tiny block at ``cfg.level`` on ``cfg.device`` (compiled gradients against
    eager's); prints its verdict, with a warning when they differ. Reseeds torch's global RNG."""
    from fp8lm.compile_check import compiled_gradient_check
    check = compiled_gradient_check(cfg.level, cfg.recipe, cfg.device)
    check = {k: v for k, v in check.items() if k != "per_tensor"}
    line = (f"compiled blocks: gradient check at {cfg.level} {check['verdict']} "
            f"(worst relative L2 {check['worst_rel_l2']:.2g})")
    if check["verdict"] == "different":
        line = "WARNING: " + line + "; compiled training may not compute what eager does (fp8lm.compile_check)"
    if cfg.progress or check["verdict"] == "different":
        print(line)
    return check


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` each transformer block in place (``block.compile()``: ``state_dict`` keys unchanged),
    the way ``fp8lm bench`` measures the compiled step."""
    for block in model.layers:
        block.compile()


def setup_data_parallel(cfg: TrainConfig) -> tuple[TrainConfig, int, int, bool]:
    """With `cfg.dp`, join torchrun's process group: `(cfg on this rank's device, rank, world, created)`.

    Checks that the global batch divides by the number of processes; only rank 0 shows progress.
    """
    if cfg.dp is None:
        return cfg, 0, 1, False
    created = not fp8dist.is_distributed()
    device = dist_launch.init_from_env(cfg.device)
    rank, world = fp8dist.rank(), fp8dist.world_size()
    dist_launch.local_batch_size(cfg.batch_size, world)
    return replace(cfg, device=device, progress=cfg.progress and rank == 0), rank, world, created


def run_loop(model, optimizer, sampler, val_batches, cfg: TrainConfig, state: dict | None = None,
             save=None) -> dict:
    """The step loop; returns loss histories, skipped steps, throughput and the memory report.

    `state` is the loop state of a checkpoint (`resume_state`), None for a fresh run; `save(step,
    loop_state)` (`checkpoint_saver`) is called every `save_every` steps and after the last one.
    Each process times its steps from its second one on, its fourth when compiled (`UNTIMED_STEPS`).
    """
    st = state or {"losses": [], "val_history": [(0, evaluate(model, val_batches))], "skipped": 0,
                   "train_s": 0.0, "eval_s": 0.0, "timed_steps": 0, "inspect": [], "inspect_s": 0.0}
    losses, val_history, skipped = list(st["losses"]), [tuple(v) for v in st["val_history"]], st["skipped"]
    eval_s, inspections, inspect_s = st["eval_s"], list(st["inspect"]), st["inspect_s"]
    start, memory, save_s, saved = len(losses), [], 0.0, []
    untimed = min(UNTIMED_STEPS[cfg.compile], cfg.steps - start - 1)  # warm-up steps of this process
    timer = _StepTimer(cfg.device, st["train_s"], st["timed_steps"])
    pending = []  # (loss, found_inf) device tensors of the steps not yet read back (one process)

    def read_back() -> None:  # one host read for all pending steps
        nonlocal skipped
        if pending:
            values = torch.cat([torch.stack([loss.float().reshape(1), flag]) for loss, flag in pending], 1).tolist()
            losses.extend(values[0])
            skipped += sum(v != 0 for v in values[1])
            pending.clear()

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress,
               desc=f"{cfg.preset} {cfg.level}", unit="step")
    for step in bar:
        if cfg.inspect_every and step % cfg.inspect_every == 0:
            timer.stop()
            inspect_s += log_inspection(inspections, step, model, val_batches[0])
        if step - start >= untimed:
            timer.start()
        on_grads = None if memory else partial(record_memory, memory, model, optimizer, step, cfg.steps)
        args = (model, optimizer, sampler, lr_at(step, cfg), cfg.grad_clip)
        if cfg.dp is None:
            pending.append(train_step_async(*args, on_grads=on_grads))
        else:
            loss, ok = train_step(*args, on_grads=on_grads)
            losses.append(loss)
            skipped += not ok
        timer.count()
        done = step + 1
        evaluate_now = done % cfg.eval_every == 0 or done == cfg.steps
        save_now = save is not None and (done == cfg.steps or bool(cfg.save_every and done % cfg.save_every == 0))
        show_now = cfg.progress and done % 10 == 0
        if not (evaluate_now or save_now or show_now):
            continue  # nothing read on the host: the next step is issued while this one runs
        timer.stop()
        read_back()
        if evaluate_now:
            t0 = time.perf_counter()
            val_history.append((done, evaluate(model, val_batches)))
            eval_s += time.perf_counter() - t0
        if show_now or done == cfg.steps:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", val=f"{val_history[-1][1]:.3f}",
                            tok_s=f"{timer.tokens_per_s(sampler):.0f}")
        if save_now:
            t0 = time.perf_counter()
            saved.append(save(done, {"losses": losses, "val_history": val_history, "skipped": skipped,
                                     "train_s": timer.train_s, "eval_s": eval_s, "timed_steps": timer.timed_steps,
                                     "inspect": inspections, "inspect_s": inspect_s}))
            save_s += time.perf_counter() - t0
    if cfg.inspect_every and cfg.steps % cfg.inspect_every == 0:
        inspect_s += log_inspection(inspections, cfg.steps, model, val_batches[0])
    extra = {"inspect": inspections, "inspect_s": inspect_s} if cfg.inspect_every else {}
    return {
        "final_train_loss": losses[-1], "val_loss": val_history[-1][1], "val_history": val_history,
        "loss_history": losses, "skipped_steps": skipped, "tokens_per_s": timer.tokens_per_s(sampler),
        "train_s": timer.train_s, "eval_s": eval_s, **extra,
        "memory": memory[0].to_dict() if memory else None, "start_step": start,
        "checkpoints": saved, "save_s": save_s,
    }


class _StepTimer:
    """Wall time of training steps, in spans that start and end with the device idle (synchronized), so a span
    holds the steps' device time even though the host issues them ahead of the device."""

    def __init__(self, device: str, train_s: float, timed_steps: int):
        self.device, self.train_s, self.timed_steps = device, train_s, timed_steps
        self._t0, self._steps = None, 0

    def _sync(self) -> None:
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        """Open a span (if none is open) once the device has finished what came before."""
        if self._t0 is None:
            self._sync()
            self._t0 = time.perf_counter()

    def count(self) -> None:
        """One more step in the open span (none open: an untimed warm-up step)."""
        self._steps += self._t0 is not None

    def stop(self) -> None:
        """Close the open span once the device has finished its steps."""
        if self._t0 is not None:
            self._sync()
            self.train_s += time.perf_counter() - self._t0
            self.timed_steps += self._steps
            self._t0, self._steps = None, 0

    def tokens_per_s(self, sampler) -> float:
        return self.timed_steps * sampler.batch_size * sampler.seq_len / max(self.train_s, 1e-9)


def record_memory(memory: list, model, optimizer, step: int, steps: int) -> None:
    """Append `fp8lm.memory_report` (and print its line) if the optimizer holds its state.

    Called right after backward, before the optimizer step. Optimizers create their state in
    their first step, so a fresh run is measured in its second step (or its only one).
    """
    if optimizer.state or step == steps - 1:
        report = memory_report(model, optimizer)
        tqdm.write(f"{report.line()} (step {step + 1}, after backward, before the optimizer step)")
        memory.append(report)


# Settings a resumed run must share with the checkpoint's run (anything else would change its path).
RESUME_MUST_MATCH = ("preset", "level", "recipe", "fp8_activations", "master_rounding", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup",
                     "weight_decay", "grad_clip", "seed", "tokenizer", "vocab_size")


def checkpoint_saver(model, optimizer, sampler, cfg: TrainConfig, fingerprint: dict):
    """A `save(step, loop_state) -> path` writing `cfg.out_dir/step-<step>` with everything resume needs."""
    def save(step: int, loop_state: dict) -> str:
        extra = {"config": asdict(cfg), "data_fingerprint": fingerprint, "loop": loop_state}
        return save_checkpoint(checkpoint_dir(cfg.out_dir, step), model, optimizer, step, sampler=sampler,
                               extra=extra)
    return save


def check_resume(cfg: TrainConfig, fingerprint: dict) -> dict:
    """The meta of checkpoint `cfg.resume` (a checkpoint, or a run folder's latest), checked.

    Raises ValueError if it was written with other settings (`RESUME_MUST_MATCH`), on other
    data, or beyond `cfg.steps`: before any model is built.
    """
    meta = checkpoint_info(cfg.resume)
    saved = (meta.get("extra") or {}).get("config")
    if not isinstance(saved, dict) or "loop" not in meta["extra"]:
        raise ValueError(f"checkpoint '{meta['path']}' was not written by fp8lm train (no training config in it)")
    saved = {**{k: getattr(TrainConfig(), k) for k in RESUME_MUST_MATCH}, **saved}  # fields newer than the checkpoint
    diffs = [f"{k} {saved.get(k)!r} vs {getattr(cfg, k)!r}" for k in RESUME_MUST_MATCH if saved.get(k) != getattr(cfg, k)]
    if (meta["extra"].get("data_fingerprint") or {}).get("sha256") != fingerprint["sha256"]:
        diffs.append("data (its fingerprint differs)")
    if diffs:
        raise ValueError(f"cannot resume from '{meta['path']}': it was saved with other settings "
                         f"(checkpoint vs this run): {'; '.join(diffs)}")
    if meta["step"] > cfg.steps:
        raise ValueError(f"checkpoint '{meta['path']}' is at step {meta['step']}, beyond steps={cfg.steps}")
    return meta


def resume_state(model, optimizer, sampler, cfg: TrainConfig, meta: dict) -> dict:
    """Load the checkpoint `meta` (from `check_resume`) into the run; return its loop state."""
    info = load_checkpoint(meta["path"], model, optimizer, sampler=sampler)
    if cfg.progress:
        tqdm.write(f"resumed from {info['path']} at step {info['step']} of {cfg.steps}")
    return info["extra"]["loop"]


def log_inspection(inspections: list, step: int, model, batch) -> float:
    """Append `fp8lm.inspect`'s compact figures after `step` optimizer steps; return the seconds spent.

    The batch is fixed (the first validation batch), so entries differ only by the model; the
    inspection leaves the model, its scaling state and the RNG as they were (training is unchanged).
    """
    t0 = time.perf_counter()
    inspections.append({"step": step, **inspect_model(model, batch).to_dict(compact=True)})
    return time.perf_counter() - t0


def _forward_backward_clip(model, optimizer, sampler, lr: float, grad_clip: float, on_grads=None):
    """The step up to the optimizer: the learning rate set, forward, backward, gradient clipping.
    Returns ``(loss, grad_norm)`` as tensors (nothing read on the host)."""
    x, y = sampler.next()  # (B, T) each
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    _, loss = model(x, y)
    loss.backward()
    if on_grads is not None:
        on_grads()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return loss.detach(), clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))


def train_step(model, optimizer, sampler, lr: float, grad_clip: float, on_grads=None) -> tuple[float, bool]:
    """One optimizer step; returns (loss, applied). A non-finite loss or gradient skips the update.

    `on_grads()`, if given, runs right after backward, while the gradients exist (memory report). Reads the
    loss and the gradient norm on the host (the loss averaged over ranks under data parallelism);
    `train_step_async` is the same step without that read.
    """
    loss, grad_norm = _forward_backward_clip(model, optimizer, sampler, lr, grad_clip, on_grads)
    loss_value = fp8dist.mean_over_ranks(loss) if fp8dist.grad_sync(model) else loss.item()  # global mean
    ok = math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, ok


def train_step_async(model, optimizer, sampler, lr: float, grad_clip: float, on_grads=None):
    """``train_step`` without waiting for the device: returns ``(loss, found_inf)`` as device tensors. The skip
    of a non-finite step happens on the device (``step_unless``), so the host goes on issuing the next step
    while this one runs (one process; ``train_step`` under data parallelism)."""
    loss, grad_norm = _forward_backward_clip(model, optimizer, sampler, lr, grad_clip, on_grads)
    found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float().reshape(1)  # (1,)
    step_unless(optimizer, found_inf)
    optimizer.zero_grad(set_to_none=True)
    return loss, found_inf


def step_unless(optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``found_inf`` (a one-element tensor) is nonzero, read on the device where the
    optimizer can: ``fp8lm.optim.AdamW`` (``step(found_inf=)``) and torch's fused Adam/AdamW (the ``found_inf``
    attribute ``torch.amp.GradScaler`` uses); any other optimizer reads it on the host first."""
    if isinstance(optimizer, fp8lm.optim.AdamW):
        optimizer.step(found_inf=found_inf)
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf.float().reshape(())  # 0-d, as GradScaler passes it
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(found_inf.reshape(()) != 0):
        optimizer.step()


def summary_line(m: dict) -> str:
    """One line: final train/val loss, throughput (labelled emulated on CPU) and peak memory."""
    speed = f"{m['tokens_per_s']:,.0f} tok/s" + (" (CPU emulation)" if m["device"] == "cpu" else "")
    mem = "n/a" if m["peak_mem_bytes"] is None else f"{m['peak_mem_bytes'] / 2**30:.2f} GiB"
    skipped = f", {m['skipped_steps']} skipped" if m["skipped_steps"] else ""
    return (f"fp8lm {m['preset']} {m['level']} ({m['recipe']}) {m['steps']} steps on {m['device']}: "
            f"train loss {m['final_train_loss']:.4f}, val loss {m['val_loss']:.4f}, {speed}, "
            f"peak mem {mem}{skipped}, {m['wall_s']:.1f} s")


def _json_safe(obj):
    """Replace non-finite floats (a skipped step's loss) by None so the JSON stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(obj: dict, path: str) -> None:
    """Write `obj` as indented standard JSON (NaN/inf become null), creating parent folders."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(_json_safe(obj), fh, indent=2)
        fh.write("\n")
