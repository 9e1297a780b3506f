"""Launching and feeding data-parallel training runs (used by ``fp8lm train --nproc N --dp ddp``).

* ``torchrun_command``: the ``python -m torch.distributed.run --standalone ...`` line that
  ``fp8lm train --nproc N`` runs on one machine (multi-node: run torchrun yourself, README).
* ``init_from_env``: inside a torchrun worker, create the default process group (gloo on CPU,
  NCCL on CUDA, one GPU per local rank) and return this rank's device.
* ``RankSlice``: the global batch is drawn by the same sampler (same seed) on every rank and
  each rank keeps rows ``[r*B/N, (r+1)*B/N)``, so N processes see exactly the data of one.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from fp8lm.distributed.compat import backend_for, is_distributed

__all__ = ["torchrun_command", "under_torchrun", "init_from_env", "RankSlice", "slice_batches", "local_batch_size"]


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command that runs ``fp8lm <argv>`` in ``nproc`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "fp8lm", *argv]


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (its rank variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_from_env(device: str) -> str:
    """Create the default process group from torchrun's variables if needed; return this rank's device.

    ``device`` is the resolved run device ("cpu", "cuda" or "cuda:N"); on CUDA each rank takes
    ``cuda:LOCAL_RANK``.
    """
    if not under_torchrun() and not is_distributed():
        raise ValueError("data-parallel training needs torchrun: use fp8lm train --nproc N --dp ddp, "
                         "or start fp8lm under torchrun")
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not is_distributed():
        dist.init_process_group(backend_for(device))
    return device


def local_batch_size(global_batch: int, world: int) -> int:
    """Per-rank batch of a global batch; ValueError unless ``world`` divides it."""
    if global_batch % world:
        raise ValueError(f"batch size {global_batch} is not divisible by {world} processes; "
                         f"use a multiple of {world} (per-rank batch = global batch / processes)")
    return global_batch // world


class RankSlice:
    """A sampler drawing the global (B, T) batch and returning this rank's B/N rows.

    ``batch_size`` stays the global one (throughput counts the tokens of all ranks);
    ``state_dict`` is the wrapped sampler's, so checkpoints match single-process ones.
    """

    def __init__(self, sampler, rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world
        self.local = local_batch_size(sampler.batch_size, world)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.sampler.next()  # (B, T) each
        rows = slice(self.rank * self.local, (self.rank + 1) * self.local)
        return x[rows], y[rows]  # (B/N, T)

    def __getattr__(self, name):
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def slice_batches(batches, rank: int, world: int):
    """This rank's rows of every fixed (x, y) batch (validation: the mean over ranks is the global mean)."""
    out = []
    for x, y in batches:
        local = local_batch_size(x.shape[0], world)
        rows = slice(rank * local, (rank + 1) * local)
        out.append((x[rows], y[rows]))
    return out
