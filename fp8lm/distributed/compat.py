"""The few ``torch.distributed`` calls fp8lm makes, one spelling for torch 2.11 (GPUs) and 2.13 (CI).

Differences found (and handled here, nowhere else):

* torch 2.13 renames ``all_gather_into_tensor`` to ``all_gather_single`` and makes the old name a
  deprecated alias that warns (``FutureWarning``) on every call; torch 2.11 has only the old name.
  ``all_gather_single`` below picks whichever the running torch has, without the warning.

* FSDP2's ``fully_shard`` and ``MixedPrecisionPolicy``: public in ``torch.distributed.fsdp`` in both
  2.11 and 2.13 (older torch: ``torch.distributed._composable.fsdp``); imported from here.

``all_to_all_single`` and ``all_reduce`` have the same signature in both. Neither gloo nor stock
NCCL needs anything else from this layer: FP8 payloads travel as ``uint8`` views on both (gloo
rejects float8 dtypes with "Invalid scalar type"), so one code path runs everywhere.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_single", "all_to_all_single", "all_reduce", "backend_for", "is_distributed",
           "fully_shard", "MixedPrecisionPolicy"]

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_distributed() -> bool:
    """Whether a default process group exists (torch.distributed is available and initialized)."""
    return dist.is_available() and dist.is_initialized()


def backend_for(device: str | torch.device) -> str:
    """The collective backend for tensors on ``device``: "nccl" for CUDA, "gloo" otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def all_gather_single(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    """``output`` (N * input.numel()) = every rank's ``input``, in rank order."""
    _ALL_GATHER(output, input, group=group)


def all_to_all_single(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    """Equal splits: chunk r of ``input`` goes to rank r; ``output`` chunk r comes from rank r."""
    dist.all_to_all_single(output, input, group=group)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> None:
    """In-place all-reduce of ``t`` with ``op``."""
    dist.all_reduce(t, op=op, group=group)


try:  # torch >= 2.6 (2.11 on the lent GPUs, 2.13 in CI): FSDP2 is public here
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # older spellings
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
