"""Two O1/O2 choices measured for their cost in loss on the CPU (`tiny` preset).

    .venv/bin/python benchmarks/o2_ablations.py activations [--steps 300] [--seeds 1337,7]
    .venv/bin/python benchmarks/o2_ablations.py master [--steps 300] [--seeds 1337] [--lr 3e-4]

`activations`: O0, O2 with FP8 saved activations (the O2 default) and O2 without them.
`master`: O0, O1 with stochastic rounding of the FP16 master weights (the default) and O1 with
round-to-nearest, at the learning rate given (default: the preset's).
Same data and seeds for every variant, 2 single-thread workers; prints the mean final validation
loss per variant and its gap to O0, and writes benchmarks/results/o2_<study>.json.
"""
import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import statistics
from pathlib import Path

STUDIES = {
    "activations": {"O0": dict(level="O0"), "O2": dict(level="O2", fp8_activations=True),
                    "O2-bf16-act": dict(level="O2", fp8_activations=False)},
    "master": {"O0": dict(level="O0"), "O1-stochastic": dict(level="O1", master_rounding="stochastic"),
               "O1-nearest": dict(level="O1", master_rounding="nearest")},
}


def _train(kwargs):
    import torch
    torch.set_num_threads(1)
    from fp8lm.train import TrainConfig, train
    return train(TrainConfig(**kwargs))["val_loss"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("study", choices=list(STUDIES))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    ap.add_argument("--seeds", default="1337,7")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = STUDIES[args.study]
    jobs = {(name, seed): dict(preset="tiny", steps=args.steps, eval_every=args.steps, eval_batches=8,
                               progress=False, seed=seed, lr=args.lr, **kw)
            for name, kw in variants.items() for seed in seeds}
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        losses = dict(zip(jobs, pool.map(_train, jobs.values())))
    table = {name: statistics.mean(losses[name, s] for s in seeds) for name in variants}
    print(f"tiny, {args.steps} steps, lr {args.lr or 'preset'}, seeds {seeds}: mean final validation loss")
    for name, loss in table.items():
        print(f"  {name:12} {loss:.4f}  ({loss / table['O0'] - 1:+.2%} vs O0)")
    out = Path(__file__).parent / "results" / f"o2_{args.study}{'_lr' + str(args.lr) if args.lr else ''}.json"
    out.write_text(json.dumps({"steps": args.steps, "lr": args.lr, "seeds": seeds, "mean": table,
                               "runs": {f"{n}-s{s}": v for (n, s), v in losses.items()}}, indent=1))


if __name__ == "__main__":
    main()
