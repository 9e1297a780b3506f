"""What the 2-process gloo tests share (tests/test_distributed.py, tests/test_fsdp.py).

Each test file has its own worker (what the ranks compute); this module starts the workers, gives
them a process group, and holds the shrunk training configuration both parity tests use.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fp8lm.train import TrainConfig, train

WORLD = 2
PARITY_STEPS = 24


def write_corpus(folder: Path) -> str:
    """A small text file to train on; returns its path."""
    path = folder / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i % 7} + {i}  # line {i}\n" for i in range(800)))
    return str(path)


def parity_config(text_file: str, **kw) -> TrainConfig:
    """The `tiny` preset shrunk for CPU: 4 x 32 tokens per step, 24 steps, O1 unless ``kw`` says otherwise.

    lr 1e-3 with 5 warmup steps: the preset's 3e-3 after a 2-step warmup (24 // 10) spikes at 128
    tokens per step in one run or the other, and a spike in one run only says nothing about
    communication (measured: 1-process O1 jumped to 6.26 at step 5, its 2-process twin did not).
    """
    base = dict(preset="tiny", level="O1", steps=PARITY_STEPS, batch_size=4, seq_len=32, eval_batches=2, eval_every=12,
                lr=1e-3, warmup=5, device="cpu", data=text_file, progress=False)
    return TrainConfig(**{**base, **kw})


def join_group(rank: int, world: int, out_dir: str) -> None:
    """In a worker: one thread, and the gloo group (a rendezvous file, not a TCP port: no port race)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)


def run_ranks(worker, out: Path, text_file: str) -> list[dict]:
    """Run ``worker(rank, WORLD, out_dir, text_file)`` in WORLD processes; return each rank's saved results."""
    mp.spawn(worker, args=(WORLD, str(out), text_file), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def train_one_thread(cfg: TrainConfig) -> dict:
    """``train(cfg)`` with one intra-op thread, as each worker runs (the 1-process reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg)
    finally:
        torch.set_num_threads(threads)
