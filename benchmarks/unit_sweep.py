"""Parallel CPU training sweeps of the unit-scaled GPT (the runs behind benchmarks/RESULTS.md).

    python benchmarks/unit_sweep.py benchmarks/unit_sweeps/lr.json --out runs/unit_lr.jsonl --workers 2

A spec file is a JSON list of runs: {"name", "train": TrainConfig overrides, "model": UnitGPTConfig
overrides, "init": extra fp8lm.initialize arguments (exclude, fp8_head), "group_mult": learning-rate
multipliers per UnitGPT parameter group kind (embedding, hidden, gain, readout)}. Defaults: preset
unit-tiny, level O0, 300 steps, seed 1337, validation once at the end (8 batches), the default
corpus (or --data). Every run gets a fresh single-thread process (results do not depend on the order
or the worker), and prints one JSON line: final val loss, mean train loss of the last 75 steps, the
validation history and, with "inspect_every", fp8lm.inspect's figures.
"""
import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, if not installed
DEFAULTS = dict(preset="unit-tiny", level="O0", steps=300, eval_every=300, eval_batches=8, progress=False, seed=1337)


def _patch(spec: dict) -> None:
    """Apply the spec's model overrides, group multipliers and initialize arguments in this process."""
    import fp8lm
    import fp8lm.train as T
    from fp8lm import models

    build, overrides, mults = models.build_model, spec.get("model", {}), spec.get("group_mult", {})

    def build_model(preset, vocab_size=None, **kw):
        model = build(preset, vocab_size, **{**kw, **overrides})
        if mults:
            groups_of = model.optimizer_param_groups

            def groups(lr, weight_decay):
                out = groups_of(lr, weight_decay)
                for g in out:
                    f = mults.get(g["name"].split()[0], 1.0)
                    g["lr_scale"], g["lr"] = g["lr_scale"] * f, g["lr"] * f
                return out
            model.optimizer_param_groups = groups
        return model

    models.build_model = build_model
    init_kw = spec.get("init", {})
    if init_kw:
        initialize = fp8lm.initialize
        T.fp8lm.initialize = lambda *a, **k: initialize(*a, **{**k, **init_kw})


def run_one(job: tuple) -> dict:
    """Train one spec (in a fresh process) and return its summary."""
    spec, data = job
    import torch
    torch.set_num_threads(1)
    _patch(spec)
    from fp8lm.train import TrainConfig, train
    kw = {**DEFAULTS, **({"data": data} if data else {}), **spec.get("train", {})}
    t0 = time.time()
    m = train(TrainConfig(**kw))
    h = m["loss_history"]
    out = {"name": spec["name"], "val": round(m["val_loss"], 4), "tail": round(sum(h[-75:]) / 75, 4),
           "skipped": m["skipped_steps"], "wall_s": round(time.time() - t0), "val_history": m["val_history"],
           "spec": spec}
    if "inspect" in m:
        out["inspect"] = m["inspect"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", help="JSON list of runs")
    p.add_argument("--out", required=True, help="JSON lines, one per run")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", help="passed to TrainConfig.data (default: the python-stdlib corpus)")
    args = p.parse_args(argv)
    specs = json.load(open(args.spec))
    ctx = mp.get_context("spawn")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with cf.ProcessPoolExecutor(args.workers, mp_context=ctx, max_tasks_per_child=1) as pool, open(args.out, "w") as fh:
        for r in pool.map(run_one, [(s, args.data) for s in specs]):
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            print(r["name"], r["val"], r["tail"], r["skipped"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
