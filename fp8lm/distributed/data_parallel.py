"""Data parallelism over ``torch.distributed`` collectives: gradients synchronized after backward.

Why not DDP: DDP's gradient buckets are flat tensors of the parameters' dtype (2 or 4 bytes per
parameter, kept for the run) and its communication hook only ever sees those buckets, never the
1-byte FP8 ``ScaledTensor`` gradients that O1/O2 produce. ``GradSync`` reads the gradients
where autograd left them and writes the means back, with no persistent buffers.

What is sent, per step (every rank ends with identical gradients equal to the mean):

* Parameters that are ``ScaledTensor`` FP16 masters (the FP8 linear layers at O1/O2): their FP8
  gradients go through ``FP8AllReduce`` (FP8 payloads, shared scales, automatic scaling; see
  ``allreduce.py``). The result (FP8 data + one scale per tensor) *is* the new gradient: a
  ``ScaledTensor`` with 1-byte storage, as backward made it.
* Every other parameter (norms, embeddings, the BF16 output head, biases; and everything at O0):
  one flat FP32 buffer, ``all_reduce(SUM)`` then ``/ N``. FP32 keeps these small tensors exact
  (no extra rounding next to the single-process run); they are a few percent of a transformer's
  parameters. Their bytes are reported separately (``hp_bytes``).

Memory: nothing persistent. During a sync, for L bytes of FP8 gradients: the send and receive
buffers (2 L bytes), the FP32 sums of this rank's chunk (4 L / N), the gathered result (L bytes,
which becomes the gradients while the old ones are released) and an FP32 copy of one tensor at
a time; the other gradients need one flat FP32 buffer of their size.

A parameter whose gradient is None on this rank is sent as zeros and gets the mean (every rank
must use the same parameter list, so membership never depends on which gradients exist).

When: ``sync()`` by hand, or automatically at the end of every backward pass (``auto=True``, the
default when wrapped by ``fp8lm.initialize(..., dp="ddp")``): the first gradient hook of a
backward queues ``sync`` on autograd's engine, which runs it once all gradients of that pass
are accumulated. Inside ``with grad_sync.no_sync():`` backward passes only accumulate (gradient
accumulation); the next backward outside it synchronizes the sum.

At wrap time rank 0's parameters and persistent buffers are broadcast, so every rank starts equal.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from fp8lm.distributed import compat
from fp8lm.distributed.allreduce import FP8AllReduce, bf16_allreduce_bytes, bytes_sent
from fp8lm.tensor import ScaledTensor, is_scaled

__all__ = ["GradSync", "broadcast_module"]


def broadcast_module(module: nn.Module, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s parameters (FP16 masters: data and scale) and persistent buffers to all ranks."""
    for p in module.parameters():
        if isinstance(p, ScaledTensor):
            dist.broadcast(p._data.view(torch.uint8), src, group=group)  # any dtype travels as bytes
            dist.broadcast(p._scale, src, group=group)
        else:
            dist.broadcast(p.data, src, group=group)
    persistent = {name for name, _ in module.named_buffers()} - _non_persistent(module)
    for name, b in module.named_buffers():
        if name in persistent:
            dist.broadcast(b, src, group=group)


def _non_persistent(module: nn.Module) -> set[str]:
    out = set()
    for prefix, m in module.named_modules():
        out |= {f"{prefix}.{n}" if prefix else n for n in m._non_persistent_buffers_set}
    return out


class GradSync:
    """Synchronize a model's gradients across the ranks of ``group`` (module docstring).

    Args:
        model: the model, already converted (``fp8lm.initialize``) and on its device.
        group: the process group (default: the default group).
        fp8: send ``ScaledTensor`` parameters' gradients in FP8 (O1/O2); False sends all in FP32.
        fmt: FP8 payload format, "e4m3" (default: one more mantissa bit) or "e5m2".
        auto: synchronize at the end of every backward pass (else call ``sync()``).
        broadcast: copy rank 0's parameters and buffers to every rank now.
    """

    def __init__(self, model: nn.Module, group=None, fp8: bool = True, fmt: str = "e4m3", auto: bool = True,
                 broadcast: bool = True):
        if not compat.is_distributed():
            raise ValueError("GradSync needs torch.distributed initialized: run under torchrun "
                             "(or call torch.distributed.init_process_group first)")
        self.group, self.world = group, dist.get_world_size(group)
        params = [p for p in model.parameters() if p.requires_grad]
        self.fp8_params = [p for p in params if fp8 and is_scaled(p)]
        self.hp_params = [p for p in params if not (fp8 and is_scaled(p))]
        self.reducer = FP8AllReduce(group, fmt=fmt, world=self.world)
        self.history: list[dict] = []
        self._enabled, self._queued = True, False
        if broadcast:
            broadcast_module(model, 0, group)
        if auto:
            for p in params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate gradients locally (no communication)."""
        before, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = before

    def _on_grad(self, param) -> None:
        if self._enabled and not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        self._queued = False
        self.sync()

    def sync(self) -> dict:
        """All-reduce the gradients to their mean on every rank; return this step's telemetry."""
        step = {"fp8_bytes": 0, "fp8_numel": 0, "hp_bytes": 0, "hp_numel": 0}
        if self.fp8_params:
            self._sync_fp8()
            t = self.reducer.last
            step.update(t.to_dict(), fp8_bytes=t.bytes_sent, fp8_numel=t.numel, fp8_bf16_bytes=t.bf16_bytes)
        if self.hp_params:
            step.update(hp_bytes=self._sync_hp(), hp_numel=sum(p.numel() for p in self.hp_params))
        step["bytes_sent"] = step["fp8_bytes"] + step["hp_bytes"]
        step["bf16_bytes_all"] = bf16_allreduce_bytes(step["fp8_numel"] + step["hp_numel"], self.world)
        self.history.append(step)
        return step

    def _sync_fp8(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros(p.shape, device=p.device) for p in self.fp8_params]
        for p, (data_fp8, scale) in zip(self.fp8_params, self.reducer.reduce(grads)):
            p.grad = ScaledTensor(data_fp8, scale)  # 1 byte per element + scale, as backward made it

    def _sync_hp(self) -> int:
        """FP32 mean of the other gradients in one flat buffer; returns the bytes sent."""
        grads_hp = [p.grad.float() if p.grad is not None else torch.zeros(p.shape, device=p.device)
                    for p in self.hp_params]
        flat_hp = torch.cat([g.reshape(-1) for g in grads_hp])
        compat.all_reduce(flat_hp, group=self.group)
        flat_hp /= self.world
        off = 0
        for p in self.hp_params:
            mean = flat_hp[off:off + p.numel()].view(p.shape)
            off += p.numel()
            if p.grad is None:
                p.grad = mean.to(p.dtype).clone()
            else:
                p.grad.copy_(mean)
        return bytes_sent("all_reduce", flat_hp.numel() * flat_hp.element_size(), self.world)

    def summary(self) -> dict:
        """Bytes of the last sync and telemetry of every sync so far (the training metrics' "distributed")."""
        h = self.history
        last = h[-1] if h else {}

        def ratio(num: str, den: str):
            return last[num] / last[den] if last.get(den) else None

        def worst(key: str, pick, default: float):
            return pick((s[key] for s in h if key in s), default=default)

        return {
            "dp": "ddp", "world_size": self.world, "steps_synced": len(h),
            "grad_bytes_per_step": last.get("bytes_sent", 0), "fp8_grad_bytes_per_step": last.get("fp8_bytes", 0),
            "hp_grad_bytes_per_step": last.get("hp_bytes", 0),
            "bf16_fp8_grads_bytes_per_step": last.get("fp8_bf16_bytes", 0),
            "bf16_all_grads_bytes_per_step": last.get("bf16_bytes_all", 0),
            "fp8_grad_bytes_vs_bf16": ratio("fp8_bytes", "fp8_bf16_bytes"),
            "all_grad_bytes_vs_bf16": ratio("bytes_sent", "bf16_bytes_all"),
            "fp8_grad_numel": last.get("fp8_numel", 0), "hp_grad_numel": last.get("hp_numel", 0),
            "min_mu": worst("mu", min, 1.0), "max_saturated": worst("saturated", max, 0.0),
            "max_flushed_in": worst("flushed_in", max, 0.0), "max_flushed_out": worst("flushed_out", max, 0.0),
            "steps": h,
        }

    def summary_line(self) -> str:
        """One line for the training summary: bytes per step against BF16, mu, saturation and flushing."""
        s = self.summary()
        if not s["steps_synced"]:
            return f"fp8lm ddp x{self.world}: no gradient synchronized yet"
        line = (f"fp8lm ddp x{s['world_size']}: gradient bytes sent per rank per step "
                f"{s['grad_bytes_per_step']:,} ({s['all_grad_bytes_vs_bf16']:.1%} of a BF16 all-reduce)")
        if s["fp8_grad_numel"]:
            line += (f"; FP8 weight grads {s['fp8_grad_bytes_per_step']:,} ({s['fp8_grad_bytes_vs_bf16']:.1%} of "
                     f"BF16), other grads FP32 {s['hp_grad_bytes_per_step']:,}; min mu {s['min_mu']:g}, "
                     f"post-scaling would saturate up to {s['max_saturated']:.2e}, flushed up to "
                     f"{s['max_flushed_in']:.2e} in / {s['max_flushed_out']:.2e} out")
        return line
