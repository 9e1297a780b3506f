"""The model-level training runs of the test suite, declared in one place and run once.

Every model-level test reads its runs from the session fixture ``model_runs`` (conftest.py),
which trains all of ``RUNS`` the first time any of them is asked for: two worker processes with
one thread each (on the 2-core CI machine that is 1.4x the throughput of one process with two
threads). Each run is deterministic for a given thread count, so results do not depend on which
worker runs it or in what order.

To add a run: give it a name here and read ``model_runs[name]`` in the test.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os

STEPS = 200  # 300 took 12.8 of the suite's minutes once O2 and the unit runs joined; 200 keeps every bar (measured)
_BASE = dict(steps=STEPS, eval_every=STEPS, eval_batches=8, progress=False)

# name -> TrainConfig keyword arguments (the `tiny` preset: 16 x 128 tokens per step)
RUNS: dict[str, dict] = {
    "tiny-O0-s1337": dict(preset="tiny", level="O0", seed=1337),
    "tiny-O1-s1337": dict(preset="tiny", level="O1", seed=1337),
    "tiny-O0-s7": dict(preset="tiny", level="O0", seed=7),
    "tiny-O1-s7": dict(preset="tiny", level="O1", seed=7),
    "tiny-O2-s1337": dict(preset="tiny", level="O2", seed=1337),
    "tiny-O2-s7": dict(preset="tiny", level="O2", seed=7),
    # the unit-scaled twin of tiny, BF16 and FP8 with static scales (tests/test_model_level_unit.py)
    "unit-tiny-O0-s1337": dict(preset="unit-tiny", level="O0", seed=1337),
    "unit-tiny-O1static-s1337": dict(preset="unit-tiny", level="O1", recipe="static", seed=1337),
}


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)


def _train(kwargs: dict) -> dict:
    from fp8lm.train import TrainConfig, train
    return train(TrainConfig(**_BASE, **kwargs))


def run_all(names=None, workers: int | None = None) -> dict[str, dict]:
    """Train the named runs (all of ``RUNS`` by default) and return name -> metrics."""
    names = list(RUNS) if names is None else list(names)
    workers = workers or min(2, os.cpu_count() or 1, len(names))
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        results = pool.map(_train, [RUNS[n] for n in names])
        return dict(zip(names, results))
