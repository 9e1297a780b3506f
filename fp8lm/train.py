"""The training loop: one preset, one precision level, one corpus, metrics out.

    from fp8lm.train import TrainConfig, train
    metrics = train(TrainConfig(preset="tiny", level="O1", steps=300))

What a step does:
    x, y = sampler.next()                      # (B, T) random windows, the sampler's own RNG
    logits, loss = model(x, y)                 # fp8lm.initialize put the model at `level`
    loss.backward()                            # (no torch.autocast here: the model applies it)
    clip_grad_norm_(params, grad_clip)
    optimizer.step()                           # AdamW, warmup + cosine learning rate

A step whose loss or gradient norm is not finite is skipped (gradients zeroed, counted in
`skipped_steps`). Validation uses a fixed set of batches drawn once from the validation split,
runs under `torch.no_grad()` in eval mode and touches neither the sampler nor the global RNG,
so the training trajectory does not depend on how often it is evaluated. With the same config
two CPU runs produce bit-identical loss histories.

Throughput (`tokens_per_s`) counts training steps only, from the second step on (the first
pays one-off costs), without validation. On a CPU it measures emulation speed, not FP8 speed.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm

import fp8lm
from fp8lm.data import BatchSampler, fixed_batches, load_corpus
from fp8lm.models import GPT, PRESETS, get_config

# Training defaults per preset. `warmup` is capped at a tenth of the run when not set explicitly.
PRESET_TRAINING = {
    "tiny": dict(batch_size=16, lr=3e-3, warmup=30, eval_every=50, eval_batches=8),
    "gpt-125m": dict(batch_size=16, lr=6e-4, warmup=200, eval_every=250, eval_batches=20),
    "llama-0.75b": dict(batch_size=8, lr=3e-4, warmup=200, eval_every=250, eval_batches=20),
}
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """Everything a training run needs; None means "the preset's default"."""

    preset: str = "tiny"
    level: str = "O1"
    recipe: str = "current"
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
    progress: bool = True


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
    if cfg.recipe not in fp8lm.RECIPES:
        raise ValueError(f"unknown recipe {cfg.recipe!r}; allowed: {', '.join(fp8lm.RECIPES)}")
    if not isinstance(cfg.steps, int) or cfg.steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {cfg.steps!r}")
    for name in ("batch_size", "seq_len", "eval_every", "eval_batches"):
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
    resolve_device(cfg.device)


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


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (not norms); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = str(cfg.device).startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches) -> float:
    """Mean loss over fixed batches, in eval mode; the model goes back to train mode after."""
    model.eval()
    losses = [model(x, y)[1].float() for x, y in batches]
    model.train()
    return torch.stack(losses).mean().item()


def train(cfg: TrainConfig) -> dict:
    """Train `cfg.preset` at `cfg.level` for `cfg.steps` steps; return (and maybe write) the metrics."""
    t_start = time.perf_counter()
    cfg = resolve_config(cfg)
    # Reading files is quick; only BPE training is slow enough to deserve a progress bar.
    corpus = load_corpus(cfg.corpus, data=cfg.data, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                         progress=cfg.progress and cfg.tokenizer == "bpe")
    B, T = cfg.batch_size, cfg.seq_len
    sampler = BatchSampler(corpus.train, B, T, seed=cfg.seed, device=cfg.device)
    val_batches = fixed_batches(corpus.val, B, T, cfg.eval_batches, seed=0, device=cfg.device)

    torch.manual_seed(cfg.seed)
    model_cfg = replace(get_config(cfg.preset, corpus.vocab_size), seq_len=T)
    model = GPT(model_cfg).to(cfg.device)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = fp8lm.initialize(model, optimizer, level=cfg.level, recipe=cfg.recipe,
                                        verbose=cfg.progress)
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(cfg.device)

    loop = run_loop(model, optimizer, sampler, val_batches, cfg)
    metrics = {
        "preset": cfg.preset, "level": cfg.level, "recipe": cfg.recipe, "device": cfg.device,
        "steps": cfg.steps, "seed": cfg.seed, "num_params": model.num_params(),
        "flops_per_token": model.flops_per_token(T), "tokens_per_step": B * T,
        **loop,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(cfg.device) if cfg.device.startswith("cuda") else None,
        "data_fingerprint": corpus.fingerprint, "torch_version": torch.__version__,
        "config": asdict(cfg), "wall_s": time.perf_counter() - t_start,
    }
    print(summary_line(metrics))
    if cfg.metrics_out:
        write_json(metrics, cfg.metrics_out)
    return metrics


def run_loop(model, optimizer, sampler, val_batches, cfg: TrainConfig) -> dict:
    """The step loop; returns loss histories, skipped steps and throughput."""
    losses, val_history, skipped = [], [(0, evaluate(model, val_batches))], 0
    train_s, eval_s = 0.0, 0.0
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc=f"{cfg.preset} {cfg.level}", unit="step")
    for step in bar:
        t0 = time.perf_counter()
        loss, ok = train_step(model, optimizer, sampler, lr_at(step, cfg), cfg.grad_clip)
        losses.append(loss)
        skipped += not ok
        if step > 0 or cfg.steps == 1:
            train_s += time.perf_counter() - t0
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            t0 = time.perf_counter()
            val_history.append((done, evaluate(model, val_batches)))
            eval_s += time.perf_counter() - t0
        if done % 10 == 0 or done == cfg.steps:
            timed = max(1, step)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_history[-1][1]:.3f}",
                            tok_s=f"{timed * sampler.batch_size * sampler.seq_len / max(train_s, 1e-9):.0f}")
    timed_steps = max(1, cfg.steps - 1)
    return {
        "final_train_loss": losses[-1], "val_loss": val_history[-1][1], "val_history": val_history,
        "loss_history": losses, "skipped_steps": skipped,
        "tokens_per_s": timed_steps * sampler.batch_size * sampler.seq_len / max(train_s, 1e-9),
        "train_s": train_s, "eval_s": eval_s,
    }


def train_step(model, optimizer, sampler, lr: float, grad_clip: float) -> tuple[float, bool]:
    """One optimizer step; returns (loss, applied). A non-finite loss or gradient skips the update."""
    x, y = sampler.next()  # (B, T) each
    for group in optimizer.param_groups:
        group["lr"] = lr
    _, loss = model(x, y)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    loss_value = loss.item()
    ok = math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, ok


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
