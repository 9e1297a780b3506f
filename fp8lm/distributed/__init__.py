"""Distributed FP8 training: FP8 gradient all-reduce with automatic scaling, data parallelism.

    torchrun --nproc_per_node 2 train.py          # each process:
    torch.distributed.init_process_group()
    model, optimizer = fp8lm.initialize(model, optimizer, level="O1", dp="ddp")
    loss.backward()                               # gradients are the global mean when it returns
    optimizer.step()

``dp="ddp"`` wraps the model in a ``GradSync`` (``data_parallel.py``): rank 0's weights are
broadcast, and at the end of each backward pass the FP8 weight gradients are averaged through
``FP8AllReduce`` (``allreduce.py``) and the rest in FP32. ``grad_sync(model)`` returns it (for
``no_sync()`` and the per-step telemetry in ``history``).

``dp="fsdp"`` shards the model with FSDP2 (``fsdp.py``): at O3 the FP8 linears' FP16 masters and their
FP8/FP16 Adam state are sharded and weights are all-gathered in FP8 (1 byte per parameter); at O0 it
is plain BF16 FSDP2, the baseline. ``grad_sync(model)`` then returns an ``FSDPSync`` (bytes sent).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fp8lm.distributed.allreduce import (FP8AllReduce, StepTelemetry, auto_mu, bf16_allreduce_bytes, bytes_sent,
                                         simulate_all_reduce)
from fp8lm.distributed.compat import is_distributed
from fp8lm.distributed.data_parallel import GradSync, broadcast_module
from fp8lm.optim.adam import rounding_stream_seed

__all__ = ["DP_MODES", "DP_LEVELS", "FP8AllReduce", "StepTelemetry", "auto_mu", "GradSync", "broadcast_module",
           "simulate_all_reduce", "bytes_sent", "bf16_allreduce_bytes", "check_dp", "wrap", "grad_sync",
           "is_distributed", "rank", "world_size", "mean_over_ranks"]

DP_MODES = ("ddp", "fsdp")
DP_LEVELS = {"ddp": ("O0", "O1", "O2"), "fsdp": ("O0", "O3")}


def check_dp(dp: str | None, level: str) -> None:
    """Raise ValueError (one line) if ``dp`` cannot run at ``level``."""
    if level == "O3" and dp != "fsdp":
        raise ValueError(f"level O3 shards weights and optimizer state with FSDP2: it needs dp='fsdp', not dp={dp!r}")
    if dp is None:
        return
    if dp not in DP_MODES:
        raise ValueError(f"unknown dp {dp!r}; allowed: {', '.join(DP_MODES)} (or None)")
    if level not in DP_LEVELS[dp]:
        raise ValueError(f"dp={dp!r} runs at levels {', '.join(DP_LEVELS[dp])}, not {level!r}")


def wrap(model: nn.Module, optimizer, level: str, dp: str, group=None) -> GradSync:
    """Make ``model`` data parallel (``dp="ddp"``): broadcast rank 0's state, sync grads after backward.

    At O1/O2 FP8 weight gradients travel in FP8; at O0 everything travels in FP32 (the baseline).
    """
    check_dp(dp, level)
    if not is_distributed():
        raise ValueError(f"dp={dp!r} needs torch.distributed initialized: run under torchrun "
                         "(or call torch.distributed.init_process_group first)")
    if getattr(model, "_fp8lm_dp", None) is not None:
        raise ValueError("model is already data parallel (fp8lm dp); wrap a fresh model")
    sync = GradSync(model, group=group, fp8=level != "O0")
    _align_rounding_generators(optimizer, model)
    model._fp8lm_dp = sync
    return sync


def _align_rounding_generators(optimizer, model: nn.Module) -> None:
    """Give every rank rank 0's stochastic-rounding stream, so FP16 masters stay identical.

    ``fp8lm.optim.AdamW`` seeds its generators from ``torch.initial_seed()`` (which ranks may not
    share) and a CUDA generator also from its device index (cuda:0 and cuda:1 would round
    differently): rank 0's seed is broadcast, and each rank seeds its device as index 0 would.
    """
    if getattr(optimizer, "_generator_seed", None) is None or getattr(optimizer, "_generators", None) is None:
        return
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    seed = torch.tensor([optimizer._generator_seed], dtype=torch.int64,
                        device=device if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(seed, 0)
    optimizer._generator_seed = int(seed)
    optimizer._generators.clear()
    if device.type == "cuda":
        as_index_0 = torch.device(device.type, 0)
        optimizer._generators[device] = torch.Generator(device=device).manual_seed(
            rounding_stream_seed(int(seed), as_index_0))


def grad_sync(model: nn.Module) -> GradSync | None:
    """The ``GradSync`` of a model wrapped with ``dp="ddp"``, else None."""
    return getattr(model, "_fp8lm_dp", None)


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def mean_over_ranks(value: torch.Tensor | float) -> float:
    """The mean of a scalar over all ranks (the value itself when not distributed); a collective."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1)
    if not is_distributed():
        return float(t)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()
