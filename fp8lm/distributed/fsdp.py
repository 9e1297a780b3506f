"""Level O3 on FSDP2 (``fully_shard``): sharded FP16 masters and FP8/FP16 Adam state, 1-byte weight all-gathers.

    model, optimizer = fp8lm.initialize(model, optimizer, level="O3", dp="fsdp")   # under torchrun

Numerics
--------
Each FP8 linear weight ``w`` (N x K) is an ``FSDPMaster``: a ``ScaledTensor`` (FP16 ``_data``, float32
``_scale``, value ``_data / _scale``) that FSDP2 shards by rows (rank r keeps rows ``[r*R, (r+1)*R)``,
``R = ceil(N / world)``, the last shard zero-padded). Every shard carries the *whole* weight's scale:
the optimizer writes its shard (``assign_hp_``) with a power-of-two scale from the global amax (one
``all_reduce(MAX)`` of a float per weight), so the FP16 master is the single-process master cut in rows.

All-gather (``fsdp_pre_all_gather``, called by FSDP2 before each block's forward and backward)::

    amax    = all_reduce_max(amax(w_shard_fp16) / scale)      exact: the scale is a power of two
    s_w     = scale_from_amax(amax, E4M3, recipe)             one scale for the whole weight
    w_fp8   = cast_e4m3(w_shard_hp * s_w)                     the rank's rows, 1 byte each
    all_gather(w_fp8 as uint8)                                gloo carries no float8; bytes are only moved

``fsdp_post_all_gather`` views the gathered bytes as E4M3 and returns ``FSDPMaster(w_fp8, s_w)``:
``Float8Linear`` uses an FP8 weight as its ``w_fp8`` directly (no second cast). The cast is elementwise
and ``s_w`` depends only on the global amax, so the bits equal the single-process cast of the current
recipe (delayed recipes: the weight is cast with current scaling here; static: scale 1).

Gradients: ``Float8Linear`` makes the weight gradient FP8 + scale as at O2; FSDP2 widens it into its
float32 reduce-scatter buffer, and each block's reduce-scatter is ``FP8ReduceScatter`` (FSDP2's
``set_custom_reduce_scatter``): one E4M3 scale per weight from the global amax, the rank-to-rank
payload 1 byte per element (``all_to_all``), summed in float32 where it lands. Re-casting an E4M3
gradient with a coarser power-of-two scale is exact above E4M3's normal minimum and the float32 sum
is exact, so this is the single-process gradient mean up to flushing. Block norms ride in the same
payload as float32; the root's parameters (embedding, final norm, head) use FSDP2's float32
reduce-scatter. As soon as FSDP2 sets a weight's gradient shard (its post-accumulate-grad hook),
the float32 sum is stored as E4M3 + a power-of-two scale from the shard's amax (one more rounding,
as the O2 all-reduce casts its sum), so a block's float32 gradients live only while it is reduced.

Optimizer: ``ShardedAdamW`` is ``fp8lm.optim.AdamW(state="fp8")`` over FSDP2's DTensor parameters,
stepping each rank's local shard: FP8 m / FP16 v exist only for the rank's rows.

Bytes per rank per linear parameter: 2/N (master) + 1/N (gradient, between backward and
``zero_grad``) + 1/N (m) + 2/N (v) = 6/N, plus scales, the transient 1-byte gathered weights of the
block being computed and the float32 gradients of the block being reduced. Gradients accumulated
over micro-batches widen to float32 (4/N) until ``zero_grad``, as at O1/O2. Norms, embeddings and the output head stay float32 and are
all-gathered and reduce-scattered in float32 (reported separately).

Bytes sent are counted where they are made: ``fsdp_pre_all_gather`` adds each weight's FP8 payload
(``(world-1) * padded shard bytes``, ring accounting) and its amax all-reduce to ``FSDPStats``, and
``FP8ReduceScatter`` its payloads; ``CollectiveCounter`` counts every c10d collective called
(both levels, for comparisons).

Limits: the default mesh only (all ranks, one shard group); no checkpoint save/load (``save_checkpoint``
refuses); the root's parameters are gathered and reduced in float32; a torch without
``set_custom_reduce_scatter`` reduces all gradients in float32.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fp8lm.distributed import compat
from fp8lm.distributed.allreduce import bytes_sent
from fp8lm.formats import E4M3, amax, quantize, scale_from_amax
from fp8lm.optim.adam import AdamW
from fp8lm.tensor import FP16_AMAX_TARGET, ScaledTensor, _pow2_scale, round_stochastic, storage_bytes

__all__ = ["FSDPMaster", "FSDPStats", "FSDPSync", "FP8ReduceScatter", "ShardedAdamW", "CollectiveCounter", "shard",
           "fsdp_blocks", "block_segments", "local_bytes"]

aten = torch.ops.aten
# ops FSDP2 applies to a parameter while sharding / unsharding: run on ``_data``, keep the type and scale
_KEEP = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.view.default,
         aten.as_strided.default, aten.narrow.default, aten.slice.Tensor, aten.new_zeros.default,
         aten.empty_like.default, aten.detach.default, aten.alias.default, aten.clone.default,
         aten._unsafe_view.default}


@dataclass
class FSDPStats:
    """Bytes one rank sent for O3 weight all-gathers (``fsdp_pre_all_gather``), summed over calls."""

    world: int = 1
    gathers: int = 0  # weight all-gathers (one per FP8 weight per forward or backward)
    fp8_numel: int = 0  # elements gathered (padded shards x world)
    fp8_bytes: int = 0  # FP8 payload bytes sent
    amax_bytes: int = 0  # the amax all-reduces
    rs_calls: int = 0  # FP8 gradient reduce-scatters (one per block per backward)
    rs_fp8_numel: int = 0  # gradient elements sent in FP8 (all ranks' chunks)
    rs_other_numel: int = 0  # gradient elements sent in float32 in the same payloads (norms)
    rs_bytes: int = 0  # bytes sent for them (payload all-to-all + amax all-reduce)
    rs_fallbacks: int = 0  # reduce-scatters that took the plain float32 path

    def to_dict(self) -> dict:
        return asdict(self)


class FSDPMaster(ScaledTensor):
    """A ``ScaledTensor`` that FSDP2 can shard and all-gather in FP8 (module docstring).

    Shape ops used by FSDP2 (split, narrow, view, as_strided, new_zeros, detach, ...) run on ``_data``
    and keep the type and the shared scale; everything else behaves as ``ScaledTensor``.
    """

    _fp8_cast: tuple  # (margin, pow2, static) of the forward recipe's weight cast
    _stats: FSDPStats | None

    @classmethod
    def from_scaled(cls, t: ScaledTensor, cast: tuple, stats: FSDPStats | None) -> "FSDPMaster":
        """An ``FSDPMaster`` sharing ``t``'s data and scale."""
        return _wrap(cls(t._data, t._scale, home_dtype=t._home_dtype), cast, stats)

    def __tensor_flatten__(self):
        return ["_data", "_scale"], (self._home_dtype, self._fp8_cast, self._stats)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        t = FSDPMaster(inner_tensors["_data"], inner_tensors["_scale"], home_dtype=ctx[0])
        return _wrap(t, ctx[1], ctx[2])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _KEEP:
            return _keep(func, args, kwargs)
        if func is aten.copy_.default and all(isinstance(a, FSDPMaster) for a in args[:2]):
            dst, src = args[0], args[1]
            dst._data.copy_(src._data)
            dst._scale.copy_(src._scale)
            return dst
        return super().__torch_dispatch__(func, types, args, kwargs)

    # ---- FSDP2 all-gather extension -------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """This rank's rows cast to E4M3 with the whole weight's scale, as padded ``uint8`` rows."""
        group = mesh.get_group()
        world = dist.get_world_size(group)
        amax_w = (amax(self._data) / self._scale).reshape(1)  # exact: a power-of-two scale
        compat.all_reduce(amax_w, op=dist.ReduceOp.MAX, group=group)
        margin, pow2, static = self._fp8_cast
        s_w = torch.ones((), device=self.device) if static else scale_from_amax(amax_w[0], E4M3, margin, pow2)
        rows = -(-outer_size[0] // world)
        w_fp8 = torch.zeros((rows, *outer_size[1:]), dtype=torch.uint8, device=self.device)
        w_fp8[: self.shape[0]] = quantize(self.dequantize(), E4M3, s_w).view(torch.uint8)
        if self._stats is not None:
            s = self._stats
            s.gathers += 1
            s.fp8_numel += w_fp8.numel() * world
            s.fp8_bytes += bytes_sent("all_gather", w_fp8.numel(), world)
            s.amax_bytes += bytes_sent("all_reduce", 4, world)
        return (w_fp8,), (s_w,)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """The gathered bytes as an FP8 ``FSDPMaster`` (E4M3 data, the whole weight's scale)."""
        (w_bytes,), (s_w,) = all_gather_outputs, metadata
        if out is not None:  # FSDP2 reuses the first call's tensor: the bytes are already in place
            out._scale = s_w  # a new tensor: the forward saved the old one for backward
            return None
        w_fp8 = w_bytes.view(torch.float8_e4m3fn)
        return _wrap(FSDPMaster(w_fp8, s_w.clone()), self._fp8_cast, None), (w_fp8,)

    # ---- optimizer write-back ---------------------------------------------------------------
    def assign_hp_(self, x_hp: torch.Tensor, *, stochastic: bool = False,
                   generator: torch.Generator | None = None) -> "FSDPMaster":
        """Write this rank's rows ``x_hp`` into FP16 with the scale of the whole weight (global amax)."""
        if tuple(x_hp.shape) != tuple(self.shape):
            raise ValueError(f"assign_hp_: shape {tuple(x_hp.shape)} does not match {tuple(self.shape)}")
        x_f32 = x_hp.float()
        amax_w = amax(x_f32).reshape(1)
        if compat.is_distributed():
            compat.all_reduce(amax_w, op=dist.ReduceOp.MAX)
        scale = _pow2_scale(amax_w[0], FP16_AMAX_TARGET)
        x_scaled = x_f32 * scale
        w_fp16 = round_stochastic(x_scaled, torch.float16, generator) if stochastic else x_scaled.to(torch.float16)
        self._data.copy_(w_fp16)
        self._scale.copy_(scale)
        return self


def _wrap(t: FSDPMaster, cast: tuple, stats) -> FSDPMaster:
    t._fp8_cast, t._stats = cast, stats
    return t


def _keep(func, args, kwargs):
    """Run a shape op on ``_data`` and rewrap every tensor result with the source's scale."""
    src = args[0]
    kwargs = {k: v for k, v in kwargs.items() if not (k == "dtype" and v == torch.float32)}
    if func is aten.clone.default:
        out = FSDPMaster(src._data.clone(), src._scale.clone(), home_dtype=src._home_dtype)
        return _wrap(out, src._fp8_cast, src._stats)
    result = func(src._data, *args[1:], **kwargs)

    def rewrap(d):
        return _wrap(FSDPMaster(d, src._scale, home_dtype=src._home_dtype), src._fp8_cast, src._stats)

    if isinstance(result, torch.Tensor):
        return rewrap(result)
    return type(result)(rewrap(d) for d in result)


# --------------------------------------------------------------------------------------------
# the FP8 reduce-scatter


class FP8ReduceScatter:
    """FSDP2's reduce-scatter of one block's gradients with the FP8 weights' gradients sent in FP8.

    FSDP2 hands over its flat float32 input: N row-chunks (chunk r goes to rank r), each the
    concatenation of every parameter's padded shard r, in parameter order (``segments``). Numerics::

        amax_j = all_reduce_max(amax over all chunks of segment j)      per FP8 weight, one scale each
        s_j    = pow2 scale putting amax_j in (224, 448]               shared by all ranks
        g_fp8  = cast_e4m3(g_j * s_j)                                   1 byte per element
        all_to_all(payload)                                             chunk r -> rank r
        out_j  = (sum over ranks of g_fp8.float()) / s_j  [/ N for AVG]  float32 sum where it lands

    The gradients are already E4M3 with a power-of-two per-rank scale (``Float8Linear``) and
    ``s_j`` is a power of two no larger than it, so the cast is exact except for values it pushes
    below E4M3's normal range (gradients accumulated over micro-batches are float32: one E4M3
    rounding); the float32 sum of N E4M3 payloads is exact (N <= 64). Other
    parameters' segments (norms) travel as float32 in the same payload. Anything FSDP2 sends that
    does not match ``segments``, or another reduce op, takes the plain ``reduce_scatter_tensor``
    (counted in ``stats.rs_fallbacks``).
    """

    def __init__(self, segments: list[tuple[int, bool]], stats: FSDPStats):
        self.segments, self.stats = segments, stats

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A fresh buffer (FSDP2's ``Comm`` interface)."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        """``output_tensor`` = this rank's chunk of the sum (AVG: the mean) over ranks of ``input_tensor``."""
        world = dist.get_world_size(group)
        chunks = input_tensor.view(world, -1)  # (N, C)
        avg = op == dist.ReduceOp.AVG
        if (sum(n for n, _ in self.segments) != chunks.shape[1] or input_tensor.dtype != torch.float32
                or not (avg or op == dist.ReduceOp.SUM) or not any(fp8 for _, fp8 in self.segments)):
            self.stats.rs_fallbacks += 1
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        segs = _segment_bounds(self.segments)  # (start, end, index of the scale or None)
        fp8_segs = [(a, b) for a, b, k in segs if k is not None]
        amax_g = torch.stack([amax(chunks[:, a:b]) for a, b in fp8_segs])  # (number of FP8 weights,)
        compat.all_reduce(amax_g, op=dist.ReduceOp.MAX, group=group)
        scales = scale_from_amax(amax_g, E4M3, pow2=True)
        payload = torch.cat([quantize(chunks[:, a:b], E4M3, scales[k]).view(torch.uint8) if k is not None
                             else chunks[:, a:b].contiguous().view(torch.uint8) for a, b, k in segs], dim=1)
        received = torch.empty_like(payload)  # (N, bytes per chunk): row r came from rank r
        compat.all_to_all_single(received, payload, group=group)
        parts, off = [], 0
        for a, b, k in segs:
            nbytes = (b - a) * (1 if k is not None else 4)
            raw = received[:, off:off + nbytes].contiguous()
            off += nbytes
            g = raw.view(torch.float8_e4m3fn).float() / scales[k] if k is not None else raw.view(torch.float32)
            parts.append(g.sum(0))  # (b - a,) float32, ranks in order
        out = torch.cat(parts)
        output_tensor.copy_(out / world if avg else out)
        fp8_numel = sum(b - a for a, b in fp8_segs)
        st = self.stats
        st.rs_calls += 1
        st.rs_fp8_numel += fp8_numel * world
        st.rs_other_numel += (chunks.shape[1] - fp8_numel) * world
        st.rs_bytes += (bytes_sent("all_to_all", payload.numel(), world)
                        + bytes_sent("all_reduce", 4 * len(fp8_segs), world))
        return None


def _segment_bounds(segments: list[tuple[int, bool]]) -> list[tuple[int, int, int | None]]:
    """``(start, end, k)`` of each segment in a chunk; ``k`` numbers the FP8 ones (None for the others)."""
    out, start, k = [], 0, 0
    for n, fp8 in segments:
        out.append((start, start + n, k if fp8 else None))
        start, k = start + n, k + fp8
    return out


def block_segments(block: nn.Module, world: int) -> list[tuple[int, bool]]:
    """Per parameter of a sharded block, in FSDP2's order: (padded shard numel, is an FP8 master)."""
    out = []
    for p in block.parameters():
        rows = -(-p.shape[0] // world) if p.dim() else 1
        out.append((rows * math.prod(p.shape[1:]), isinstance(_local(p), FSDPMaster)))
    return out


def _grad_shard_to_fp8(p: torch.Tensor) -> None:
    """Store a fresh float32 gradient shard as E4M3 + scale (1 byte per element), as O2 stores gradients.

    FSDP2 calls this right after it sets ``p.grad`` from the reduce-scatter output, so a block's float32
    gradients live only until its shards are converted. A shard already holding a ``ScaledTensor``
    (micro-batches accumulating) is left to widen to float32, as at O1/O2.
    """
    grad_local = p.grad._local_tensor
    if type(grad_local) is torch.Tensor and grad_local.dtype == torch.float32:
        p.grad._local_tensor = ScaledTensor.from_hp(grad_local, torch.float8_e4m3fn)


# --------------------------------------------------------------------------------------------
# the optimizer


class ShardedAdamW(AdamW):
    """``fp8lm.optim.AdamW`` over FSDP2's DTensor parameters: each rank steps its own shards.

    State is keyed by the DTensor parameter and holds the local shard's tensors (FP8 m, FP16 v),
    so ``state_dict()`` is this rank's shard of the state.
    """

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        """Step the local shard of ``p`` (its state moved under the shard for the step, then back)."""
        local = _local(p)
        local.grad = _local(p.grad)
        self.state[local] = self.state.pop(p, {})
        try:
            super()._step_param(local, group)
        finally:
            self.state[p] = self.state.pop(local)
            local.grad = None


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself otherwise)."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


# --------------------------------------------------------------------------------------------
# wrapping


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one: the elements of the model's first ``nn.ModuleList`` (its blocks)."""
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            return list(child)
    return []


def _to_fsdp_masters(model: nn.Module, stats: FSDPStats) -> None:
    """Replace every ``ScaledTensor`` parameter (the FP8 linears' masters) by an ``FSDPMaster``."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, ScaledTensor) and not isinstance(p, FSDPMaster):
                r = getattr(module, "recipe", None)
                cast = (r.margin, r.pow2_scales, r.scaling == "static") if r is not None else (0, False, False)
                setattr(module, name, nn.Parameter(FSDPMaster.from_scaled(p, cast, stats), p.requires_grad))


def shard(model: nn.Module, optimizer, level: str, param_map: dict, optimizer_options: dict | None = None):
    """Shard ``model`` with FSDP2 (each block, then the root) and rebuild ``optimizer`` on the shards.

    ``level`` "O3": FP8 linear masters become ``FSDPMaster`` (1-byte all-gathers) and the optimizer a
    ``ShardedAdamW(state="fp8")``; "O0": plain BF16 FSDP2 (parameters gathered in BF16, gradients
    reduced in float32) with the optimizer's own class. ``param_map`` maps the given optimizer's
    parameters to the converted ones (``initialize``). Returns the new optimizer (None if none given).
    """
    if not compat.is_distributed():
        raise ValueError("dp='fsdp' needs torch.distributed initialized: run under torchrun "
                         "(or call torch.distributed.init_process_group first)")
    if getattr(model, "_fp8lm_dp", None) is not None:
        raise ValueError("model is already data parallel (fp8lm dp); wrap a fresh model")
    if optimizer is not None and any(len(s) for s in optimizer.state.values()):
        raise ValueError("dp='fsdp' needs an optimizer that has not taken a step yet; build it fresh")
    from fp8lm.distributed.data_parallel import broadcast_module
    broadcast_module(model, 0)  # every rank starts from rank 0's weights
    stats = FSDPStats(world=dist.get_world_size())
    names = {id(p): n for n, p in model.named_parameters()}  # the converted parameters' names
    if level == "O3":
        _to_fsdp_masters(model, stats)
    mp = (compat.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if level == "O0"
          else compat.MixedPrecisionPolicy())
    for block in fsdp_blocks(model):
        compat.fully_shard(block, mp_policy=mp)
        if level == "O3" and hasattr(block, "set_custom_reduce_scatter"):
            block.set_custom_reduce_scatter(FP8ReduceScatter(block_segments(block, stats.world), stats))
    compat.fully_shard(model, mp_policy=mp)
    after = dict(model.named_parameters())
    for p in after.values():
        if isinstance(_local(p), FSDPMaster) and p.requires_grad:
            p.register_post_accumulate_grad_hook(_grad_shard_to_fp8)  # FSDP2 calls it on each new shard
    model._fp8lm_dp = FSDPSync(model, level, stats)
    if optimizer is None:
        return None
    new_param = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names.get(id(param_map.get(p, p)))
            if name is None:
                raise ValueError("dp='fsdp': the optimizer holds a parameter that is not the model's")
            new_param[p] = after[name]
    if level == "O0":  # the same optimizer (it has not stepped), holding the sharded parameters
        for group in optimizer.param_groups:
            group["params"] = [new_param[p] for p in group["params"]]
        return optimizer
    return ShardedAdamW.from_optimizer(optimizer, state="fp8", param_map=new_param, **(optimizer_options or {}))


class FSDPSync:
    """What ``fp8lm.distributed.grad_sync`` returns for a ``dp="fsdp"`` model: bytes sent, for the metrics."""

    kind = "fsdp"

    def __init__(self, model: nn.Module, level: str, stats: FSDPStats):
        self.level, self.stats, self.world = level, stats, stats.world
        self.fp8_param_numel = sum(p.numel() for p in model.parameters() if isinstance(_local(p), FSDPMaster))
        self.other_param_numel = sum(p.numel() for p in model.parameters()) - self.fp8_param_numel

    def summary(self) -> dict:
        """Weight all-gather bytes per rank (FP8 linears: counted; the rest: float32, or BF16 at O0)."""
        s = self.stats
        bf16 = bytes_sent("all_gather", 2 * self.fp8_param_numel, self.world) // self.world
        return {"dp": "fsdp", "level": self.level, "world_size": self.world, **s.to_dict(),
                "fp8_param_numel": self.fp8_param_numel, "other_param_numel": self.other_param_numel,
                "bf16_weight_bytes_per_gather": bf16,
                "grad_reduce": "fp8 (block weights), float32 (the rest)" if s.rs_calls else "float32"}

    def summary_line(self) -> str:
        """One line for the training summary."""
        s = self.stats
        if not s.gathers:
            return f"fp8lm fsdp x{self.world} {self.level}: BF16 all-gathers, float32 reduce-scatters"
        per = s.fp8_bytes / max(1, s.fp8_numel) * self.world / max(1, self.world - 1)
        line = (f"fp8lm fsdp x{self.world} {self.level}: {s.gathers} FP8 weight all-gathers, {s.fp8_bytes:,} bytes "
                f"sent per rank ({per:.2f} bytes per gathered element, BF16: 2)")
        if s.rs_calls:
            return line + (f"; {s.rs_calls} FP8 gradient reduce-scatters, {s.rs_bytes:,} bytes sent per rank "
                           f"({s.rs_fp8_numel:,} elements in FP8, {s.rs_other_numel:,} in float32)")
        return line + "; gradients reduce-scattered in float32"


def local_bytes(model: nn.Module, optimizer) -> dict:
    """This rank's bytes at rest for the FP8 linear weights: master (data + scale) and optimizer state."""
    out = {"numel": 0, "local_numel": 0, "master": 0, "state": 0, "grad": 0}
    for p in model.parameters():
        local = _local(p)
        if not isinstance(local, FSDPMaster):
            continue
        out["numel"] += p.numel()
        out["local_numel"] += local.numel()
        out["master"] += local._data.numel() * local._data.element_size() + 4
        st = optimizer.state.get(p, {}) if optimizer is not None else {}
        out["state"] += sum(v.numel() * v.element_size() for k, v in st.items()
                            if isinstance(v, torch.Tensor) and k != "step")
        if p.grad is not None:
            out["grad"] += storage_bytes(_local(p.grad))
    return out


class CollectiveCounter(TorchDispatchMode):
    """Count the bytes of every c10d collective called inside (``with CollectiveCounter() as c:``).

    ``sent`` maps collective name -> bytes this rank sent, by ring accounting: all-gather
    ``(world-1) * input bytes``, reduce-scatter and all-to-all ``(world-1)/world * input bytes``,
    all-reduce twice that.
    """

    def __init__(self, world: int):
        super().__init__()
        self.world, self.sent, self.calls = world, {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__ if func.namespace == "c10d" else None
        if name is not None:
            nbytes = self._bytes(name, args)
            if nbytes is not None:
                key = name.split(".")[0]
                self.sent[key] = self.sent.get(key, 0) + nbytes
                self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **kwargs)

    def _bytes(self, name: str, args) -> int | None:
        tensors = [t for t in _leaves(args) if isinstance(t, torch.Tensor)]
        if not tensors:
            return None
        n = self.world
        if name.startswith("_allgather_base_"):
            return (n - 1) * _nbytes(tensors[1])  # (output, input)
        if name.startswith("allgather_"):
            return (n - 1) * _nbytes(tensors[-1])
        if name.startswith("_reduce_scatter_base_") or name.startswith("reduce_scatter_tensor"):
            return (n - 1) * _nbytes(tensors[1]) // n
        if name.startswith("alltoall_base_"):
            return (n - 1) * _nbytes(tensors[1]) // n  # (output, input)
        if name.startswith("allreduce_"):
            return 2 * (n - 1) * sum(_nbytes(t) for t in tensors) // n
        return None


def _leaves(args):
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += _leaves(a)
        else:
            out.append(a)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
