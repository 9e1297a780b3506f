"""Train the same model at several precision levels and compare their losses.

    from fp8lm.compare import compare
    from fp8lm.train import TrainConfig
    result = compare(TrainConfig(preset="tiny", steps=300), ["O0", "O1"], "runs/compare")

Every level trains in this process from the same seed on the same data, so the runs differ
only in precision. The first level is the baseline (usually O0, BF16): for every level the
relative gap of the final train and validation loss to it is reported, in percent.

Outputs in `out_dir`:
    compare.json     the config, each level's metrics (loss histories included) and the gaps
    loss_curves.png  train loss per step (smoothed, raw underneath) and validation points,
                     one color per level
"""
import os
from dataclasses import asdict, replace

import fp8lm
from fp8lm.train import TrainConfig, check_config, train, write_json


def check_levels(levels: list[str]) -> None:
    """Raise ValueError unless `levels` is a non-empty list of distinct known levels."""
    if not levels:
        raise ValueError(f"no levels to compare; give some of: {', '.join(fp8lm.LEVELS)}")
    for level in levels:
        if level not in fp8lm.LEVELS:
            raise ValueError(f"unknown level {level!r}; allowed: {', '.join(fp8lm.LEVELS)}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"levels repeat: {','.join(levels)}; give each level once")


def relative_gap(value: float, baseline: float) -> float:
    """(value - baseline) / baseline, in percent."""
    return 100.0 * (value - baseline) / baseline


def compare(base_cfg: TrainConfig, levels: list[str], out_dir: str) -> dict:
    """Train `base_cfg` once per level; write compare.json and loss_curves.png into `out_dir`."""
    levels = list(levels)
    check_levels(levels)
    for level in levels:
        check_config(_at_level(base_cfg, level))
    runs = {level: train(replace(_at_level(base_cfg, level), metrics_out=None)) for level in levels}
    base = runs[levels[0]]
    result = {
        "baseline": levels[0],
        "levels": levels,
        "config": {k: v for k, v in asdict(base_cfg).items() if k not in ("level", "metrics_out")},
        "gaps_pct": {level: {"train": relative_gap(m["final_train_loss"], base["final_train_loss"]),
                             "val": relative_gap(m["val_loss"], base["val_loss"])}
                     for level, m in runs.items()},
        "runs": runs,
    }
    os.makedirs(out_dir, exist_ok=True)
    write_json(result, os.path.join(out_dir, "compare.json"))
    plot_losses(runs, os.path.join(out_dir, "loss_curves.png"))
    print(format_table(result))
    return result


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(runs: dict, path: str) -> None:
    """Train loss per step (smoothed over raw) and validation points, one color per level."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (level, m) in enumerate(runs.items()):
        color = f"C{i}"
        steps = list(range(1, len(m["loss_history"]) + 1))
        window = max(1, min(25, len(steps) // 20))
        ax.plot(steps, m["loss_history"], color=color, alpha=0.2, linewidth=0.8)
        ax.plot(steps, smooth(m["loss_history"], window), color=color, label=f"{level} train")
        val_steps, val_losses = zip(*m["val_history"])
        ax.plot(val_steps, val_losses, "o--", color=color, markersize=4, label=f"{level} val")
    first = next(iter(runs.values()))
    ax.set_title(f"{first['preset']}, {first['steps']} steps on {first['device']}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: dict) -> str:
    """A fixed-width table: level, final losses, gaps to the baseline, tokens/s, peak memory."""
    base = result["baseline"]
    header = ("level", "train loss", "val loss", f"train gap vs {base}", f"val gap vs {base}",
              "tokens/s", "peak mem")
    rows = [header]
    for level, m in result["runs"].items():
        gap = result["gaps_pct"][level]
        speed = f"{m['tokens_per_s']:,.0f}" + (" (emulated)" if m["device"] == "cpu" else "")
        mem = "n/a" if m["peak_mem_bytes"] is None else f"{m['peak_mem_bytes'] / 2**30:.2f} GiB"
        rows.append((level, f"{m['final_train_loss']:.4f}", f"{m['val_loss']:.4f}",
                     f"{gap['train']:+.2f}%", f"{gap['val']:+.2f}%", speed, mem))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _at_level(cfg: TrainConfig, level: str) -> TrainConfig:
    """``cfg`` at ``level``; the O0 baseline never stores FP8 activations."""
    return replace(cfg, level=level, fp8_activations=None if level == "O0" else cfg.fp8_activations)
