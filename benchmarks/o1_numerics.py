"""Level O1's two storage choices, measured: FP16 master rounding and the FP8 weight-gradient format.

1. Master weights (FP16 + scale): the optimizer writes them with stochastic rounding (SR). The
   alternative, round-to-nearest (RNE), drops every update below half an FP16 ulp (2**-11 relative).
   Variant "O1-rne" trains with ``master_rounding="nearest"`` (``fp8lm train --master-rounding``).
2. Weight gradients are stored in FP8: E4M3 (default) or E5M2 (variant "O1-e5m2", through
   ``fp8lm.nn.linear.DEFAULT_WGRAD_FORMAT``). ``--sqnr`` also measures the storage error alone:
   SQNR of each linear's FP8-stored gradient against the float32 output of its gradient GEMM, on
   the ``tiny`` GPT at initialization and after ``--sqnr-steps`` O1 training steps.

Every run is ``fp8lm.train.train(TrainConfig(preset="tiny", level=..., steps=..., seed=..., lr=...))``
on the default corpus, one fresh single-thread process per run, so runs are deterministic; the table gives each
final validation loss and its gap to the O0 run with the same seed and learning rate.

    python benchmarks/o1_numerics.py --variants O0,O1,O1-rne,O1-e5m2 --seeds 1337,7 --lrs 3e-3,3e-4 --sqnr
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import statistics
import sys

VARIANTS = {  # name -> (level, patch)
    "O0": ("O0", None),
    "O1": ("O1", None),
    "O1-rne": ("O1", "nearest"),
    "O1-e5m2": ("O1", "e5m2"),
    "O2": ("O2", None),
    "O2-rne": ("O2", "nearest"),
}


def _patch(patch: str | None) -> None:
    """Apply a variant's change inside a worker process."""
    from fp8lm.nn import linear
    if patch == "e5m2":
        linear.DEFAULT_WGRAD_FORMAT = "e5m2"


def _run(job: tuple) -> dict:
    name, seed, lr, steps = job
    import torch
    torch.set_num_threads(1)
    level, patch = VARIANTS[name]
    _patch(patch)
    from fp8lm.train import TrainConfig, train
    m = train(TrainConfig(preset="tiny", level=level, steps=steps, seed=seed, lr=lr, eval_every=steps,
                          eval_batches=8, progress=False,
                          master_rounding="nearest" if patch == "nearest" else "stochastic"))
    tail = m["loss_history"][-steps // 4:]  # mean train loss over the last quarter: less batch noise
    return {"variant": name, "seed": seed, "lr": lr, "val_loss": m["val_loss"],
            "final_train_loss": m["final_train_loss"], "tail_train_loss": sum(tail) / len(tail),
            "skipped": m["skipped_steps"], "wall_s": m["wall_s"]}


def _sqnr_job(job: tuple) -> list[dict]:
    """Per-layer SQNR of E4M3 / E5M2 storage of the gradient GEMM's output, after ``train_steps``."""
    train_steps, seed = job
    import torch
    torch.set_num_threads(1)
    import fp8lm
    from fp8lm.data import BatchSampler, load_corpus
    from fp8lm.formats import sqnr_db
    from fp8lm.tensor import ScaledTensor
    from fp8lm.train import TrainConfig, build_optimizer, lr_at, resolve_config, train_step
    from fp8lm.models import GPT, get_config
    cfg = resolve_config(TrainConfig(preset="tiny", level="O1", steps=300, seed=seed, device="cpu", progress=False))
    corpus = load_corpus(cfg.corpus)
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, seed=seed, device="cpu")
    torch.manual_seed(seed)
    model = GPT(get_config("tiny", corpus.vocab_size))
    model, opt = fp8lm.initialize(model, build_optimizer(model, cfg), level="O1", verbose=False)
    for step in range(train_steps):
        train_step(model, opt, sampler, lr_at(step, cfg), cfg.grad_clip)
    captured = []
    original = ScaledTensor.__dict__["from_hp"]

    def spy(cls, x_hp, data_dtype, **kw):
        if data_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            captured.append(x_hp.detach().clone())
        return original.__func__(cls, x_hp, data_dtype, **kw)
    ScaledTensor.from_hp = classmethod(spy)
    x, y = sampler.next()
    model(x, y)[1].backward()
    ScaledTensor.from_hp = original
    names = fp8lm.conversion_report(model).fp8_layers
    rows = []
    for name, g in zip(reversed(names), captured):  # backward visits layers last to first
        row = {"steps": train_steps, "layer": name}
        for fmt, dtype in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
            q = ScaledTensor.from_hp(g, dtype).dequantize()
            flushed = (q == 0) & (g != 0)
            row[fmt] = sqnr_db(g, q)
            row[f"{fmt}_flushed_energy"] = float((g[flushed].double() ** 2).sum() / (g.double() ** 2).sum())
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="O0,O1,O1-rne,O1-e5m2")
    ap.add_argument("--seeds", default="1337,7")
    ap.add_argument("--lrs", default="3e-3")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--sqnr", action="store_true", help="also measure the FP8 gradient storage SQNR per layer")
    ap.add_argument("--sqnr-steps", default="0,150")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; allowed: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(s) for s in args.lrs.split(",")]
    jobs = [(v, s, lr, args.steps) for lr in lrs for s in seeds for v in variants]
    ctx = mp.get_context("spawn")
    # one fresh process per job: a variant's patch must not leak into the next job of the same worker
    with cf.ProcessPoolExecutor(args.workers, mp_context=ctx, max_tasks_per_child=1) as pool:
        sqnr_futs = [pool.submit(_sqnr_job, (int(k), seeds[0])) for k in args.sqnr_steps.split(",")] if args.sqnr else []
        runs = list(pool.map(_run, jobs))
        sqnr = [row for f in sqnr_futs for row in f.result()]
    report(runs, sqnr, lrs, seeds, variants)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"runs": runs, "sqnr": sqnr, "argv": sys.argv}, fh, indent=2)
    return 0


def report(runs, sqnr, lrs, seeds, variants) -> None:
    """Print the val-loss table (gap to O0 per seed and lr, mean over seeds) and the SQNR summary."""
    by = {(r["variant"], r["seed"], r["lr"]): r for r in runs}
    print(f"{'lr':>7} {'variant':<9} " + " ".join(f"{'seed ' + str(s):>18}" for s in seeds) + f" {'mean gap':>9}")
    for lr in lrs:
        for v in variants:
            cells, gaps = [], []
            for s in seeds:
                r, base = by[(v, s, lr)], by.get(("O0", s, lr))
                gap = None if base is None else 100 * (r["val_loss"] - base["val_loss"]) / base["val_loss"]
                gaps += [] if gap is None else [gap]
                cells.append(f"{r['val_loss']:.4f}" + ("" if gap is None else f" ({gap:+.2f}%)"))
            mean = f"{statistics.mean(gaps):+.2f}%" if gaps else ""
            print(f"{lr:>7.0e} {v:<9} " + " ".join(f"{c:>18}" for c in cells) + f" {mean:>9}")
    if sqnr:
        print("\nFP8 storage of the weight gradient (SQNR dB vs the GEMM's float32 output; flushed energy)")
        for k in sorted({r["steps"] for r in sqnr}):
            rows = [r for r in sqnr if r["steps"] == k]
            for fmt in ("e4m3", "e5m2"):
                vals = [r[fmt] for r in rows]
                flushed = max(r[f"{fmt}_flushed_energy"] for r in rows)
                print(f"after {k:>3} steps  {fmt}: median {statistics.median(vals):.1f} dB, "
                      f"min {min(vals):.1f}, max {max(vals):.1f}; max flushed energy {flushed:.2e}")


if __name__ == "__main__":
    sys.exit(main())
