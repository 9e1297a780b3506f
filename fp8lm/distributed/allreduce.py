"""FP8 gradient all-reduce with automatic scaling (FP8-LM, arXiv 2310.18313, section 2.2).

Numerics
--------
N ranks hold gradients ``g_r`` (a list of tensors, the same shapes on every rank); every rank
wants the mean ``(1/N) sum_r g_r``, with 1 byte per element on the wire.

* Shared scale. Each tensor's amax is all-reduced (MAX) first, and tensor j gets one
  power-of-two scale ``S_j`` putting the global amax in ``(max/2, max]`` of the payload format
  (E4M3 by default, max 448). All ranks encode tensor j with the same scale, so their FP8
  payloads add up directly.
* The problem (paper): a sum of N FP8 values can reach ``N * max``. Post-scaling (sum, then
  divide by N) overflows; pre-scaling (divide by N, then sum) pushes every value ``log2 N``
  binades down, and E4M3 flushes what lands below ``2**-10`` (about ``2**-18.8`` of the amax).
* Automatic scaling. The 1/N of the mean is split around the FP8 sum: the sum travels as
  ``mu * sum_r S_j g_r`` in FP8 and the remaining ``1/(mu N)`` goes into the result's scale,
  exactly (powers of two). ``mu = 2**-k`` with ``k >= 0`` the smallest shift that fits the
  global amax of the sum into the format, so mu shrinks (down to ``2**-ceil(log2 N)``) when
  values would saturate and is back at 1 as soon as they fit: nothing saturates, and nothing
  is pushed down further than the step's largest sum requires. The paper picks mu *before*
  the sum from the previous steps' saturation (halve above 0.001%, grow slowly), because its
  FP8 sum happens inside NCCL and cannot be seen before it is rounded. Here the payloads are
  summed in FP32 where they land, so the sum is known before its FP8 rounding and mu can be
  exact for every step, with no lag and no threshold; the payloads themselves use the full
  range (``mu = 1`` before the sum, post-scaling's precision). Telemetry keeps the paper's
  figures: the fraction of sums that post-scaling would have saturated, the flushed fractions,
  and mu.

Transport (one algorithm on gloo and NCCL, stock collectives only; FP8 travels as ``uint8``
views, which are only ever moved, never summed as bytes):

1. ``all_reduce(MAX)`` of the per-tensor amax vector (4 bytes per tensor);
2. leg 1: every rank quantizes its tensors into one flat FP8 buffer of ``L`` bytes (padded to a
   multiple of N) and ``all_to_all``s it: rank r receives chunk r (``L/N`` bytes) from every
   rank, the shape of a reduce-scatter;
3. the N chunks are widened to FP32 and summed where they land, in rank order (deterministic;
   exact for E4M3 up to 64 ranks, as payloads are integers times ``2**-9`` below ``2**9``);
4. ``all_gather`` of 5 float64 counters per rank (saturated, flushed, nonzero, the sum's amax);
5. mu from the global amax of the sum, then leg 2: the FP8 sums ``cast(mu * sum)`` (plus 8 bytes:
   this rank's count of sums flushed to zero) are ``all_gather``ed, so every rank holds identical
   bytes. Tensor j's mean is ``data / (S_j * mu * N)``: FP8 data and one float32 scale, which
   become the gradient as they are (no third rounding).

Error: two roundings (payload, sum) of at most half an ulp each: ``2**-4`` relative for E4M3
normal values, so at most about ``2**-3`` relative on an element whose inputs and sum are in the
normal range; about 27-29 dB SQNR on heavy-tailed gradients (``tests/test_distributed.py``).

Bytes sent per rank (what a rank hands to the others, the usual ring accounting): leg 1
``(N-1)/N * L``, leg 2 ``(N-1) * (L/N + 8)``, the amax ``2 (N-1)/N * 4 * n_tensors``, the counters
``(N-1) * 40``. A BF16 all-reduce of the same elements sends ``2 (N-1)/N * 2L``: the FP8 path
sends about half of that.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from fp8lm.distributed import compat
from fp8lm.formats import Format, amax, get_format, quantize, scale_from_amax
from fp8lm.tensor import ScaledTensor

__all__ = ["FP8AllReduce", "StepTelemetry", "auto_mu", "bytes_sent", "bf16_allreduce_bytes", "simulate_all_reduce"]

_N_STATS = 5  # saturated at mu = 1, flushed (leg 1), nonzero (leg 1), nonzero sums, amax of the sum


def bytes_sent(op: str, nbytes: int, world: int) -> int:
    """Bytes one rank sends to the others for a collective on ``nbytes`` of input (ring accounting)."""
    if op == "all_reduce":
        return 2 * (world - 1) * nbytes // world
    if op == "all_to_all":
        return (world - 1) * nbytes // world
    if op == "all_gather":
        return (world - 1) * nbytes
    raise ValueError(f"unknown collective {op!r}; allowed: all_reduce, all_to_all, all_gather")


def bf16_allreduce_bytes(numel: int, world: int) -> int:
    """What a BF16 ring all-reduce of ``numel`` elements sends per rank (the baseline to beat)."""
    return bytes_sent("all_reduce", 2 * numel, world)


@dataclass
class StepTelemetry:
    """What one FP8 all-reduce did (fractions are over all ranks' elements)."""

    mu: float  # the step's auto-scaling factor: the FP8 sum holds mu * sum
    saturated: float  # fraction of sums that post-scaling (mu = 1) would have saturated; auto-scaling: none
    flushed_in: float  # fraction of nonzero gradient values the leg-1 payload turned into 0
    flushed_out: float  # fraction of nonzero sums the leg-2 payload (at mu) turned into 0
    numel: int
    bytes_sent: int  # per rank, counted from the collectives called
    bf16_bytes: int  # a BF16 all-reduce of the same elements, for comparison

    def to_dict(self) -> dict:
        return asdict(self)


def auto_mu(sum_amax: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``2**-k``, ``k >= 0`` the smallest shift with ``sum_amax * 2**-k <= fmt.max`` (1 for 0 or non-finite)."""
    k = torch.ceil(torch.log2(sum_amax / fmt.max)).clamp(min=0)
    return torch.exp2(-torch.where(torch.isfinite(k), k, torch.zeros_like(k)))


def _hp(g: torch.Tensor) -> torch.Tensor:
    """Float32 values of a gradient (a ScaledTensor is dequantized)."""
    return g.dequantize() if isinstance(g, ScaledTensor) else g.float()


def _amax_or_inf(g: torch.Tensor) -> torch.Tensor:
    """amax of ``g`` (exact from a ScaledTensor's narrow data); inf if it holds inf or NaN.

    NaN would make the MAX all-reduce backend-dependent; inf gives every rank scale 1 for the
    tensor, and the non-finite elements then travel as NaN (``formats.quantize``).
    """
    a = amax(g._data.float()) / g._scale if isinstance(g, ScaledTensor) else amax(g)  # CPUs: no FP8 max
    return torch.where(torch.isfinite(a), a, torch.full_like(a, math.inf))


def _encode_leg1(grads, scales: torch.Tensor, fmt: Format, world: int):
    """All tensors quantized into one flat uint8 buffer (padded to a multiple of ``world``)."""
    numel = sum(g.numel() for g in grads)
    chunk = -(-numel // world)
    dev = scales.device
    buf = torch.zeros(chunk * world, dtype=torch.uint8, device=dev)
    flushed = torch.zeros((), dtype=torch.float64, device=dev)
    nonzero = torch.zeros((), dtype=torch.float64, device=dev)
    off = 0
    for g, s in zip(grads, scales):
        g_hp = _hp(g).reshape(-1)
        g_fp8 = quantize(g_hp, fmt, s)
        buf[off:off + g_hp.numel()].copy_(g_fp8.view(torch.uint8))
        flushed += ((g_fp8.float() == 0) & (g_hp != 0)).sum()
        nonzero += (g_hp != 0).sum()
        off += g_hp.numel()
    return buf, flushed, nonzero


def _all_reduce_steps(grads, fmt: Format, world: int):
    """The algorithm as a generator: yields ``(collective, tensor)``, receives each result.

    Returns ``(data_fp8 (L,), out_scales (n,), stats)``. Driven by ``FP8AllReduce`` with real
    collectives and by ``simulate_all_reduce`` with N ranks in one process: the same code.
    """
    amax_hp = yield "all_reduce_max", torch.stack([_amax_or_inf(g) for g in grads])  # (n,) global amax
    scales = scale_from_amax(amax_hp, fmt, pow2=True)  # (n,) shared payload scales, full range
    buf_u8, flushed, nonzero = _encode_leg1(grads, scales, fmt, world)  # (L,) 1 byte per element
    recv_u8 = yield "all_to_all", buf_u8  # (L,): chunk r of every rank, this rank being r
    sum_hp = recv_u8.view(fmt.dtype).float().view(world, -1).sum(0)  # (L/N,) FP32 sum, scaled domain
    local = torch.stack([(sum_hp.abs() > fmt.max).sum().double(), flushed, nonzero,
                         (sum_hp != 0).sum().double(), amax(sum_hp).double()])
    counters = (yield "all_gather", local).view(world, _N_STATS)
    mu = auto_mu(counters[:, 4].max().float(), fmt)  # the same on every rank
    sum_fp8 = quantize(sum_hp, fmt, mu)  # (L/N,) mu * sum: nothing saturates
    flushed_out = ((sum_fp8.float() == 0) & (sum_hp != 0)).sum().double().reshape(1)
    payload = torch.cat([sum_fp8.view(torch.uint8), flushed_out.view(torch.uint8)])
    gathered = (yield "all_gather", payload).view(world, -1)  # (N, L/N + 8)
    data_fp8 = gathered[:, :-8].reshape(-1).view(fmt.dtype)  # (L,) identical on every rank
    flushed_out = gathered[:, -8:].contiguous().view(torch.float64).sum()
    out_scales = scales * mu * world  # mean = data / out_scale
    return data_fp8, out_scales, {"counts": counters[:, :4].sum(0), "mu": mu, "flushed_out": flushed_out}


def _split(data_fp8: torch.Tensor, out_scales: torch.Tensor, grads) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-tensor ``(data_fp8 shaped like the gradient, float32 0-dim scale)`` from the flat result."""
    out, off = [], 0
    for g, s in zip(grads, out_scales):
        out.append((data_fp8[off:off + g.numel()].view(g.shape), s.clone()))
        off += g.numel()
    return out


class FP8AllReduce:
    """Mean of gradient lists across ranks through FP8 payloads with automatic scaling.

    ``reduce(grads)`` returns, for each gradient, ``(data_fp8, scale)`` with ``mean = data / scale``,
    the same bits on every rank. Telemetry of the last call is in ``last`` (``StepTelemetry``).
    """

    def __init__(self, group=None, fmt: str = "e4m3", world: int | None = None):
        self.group, self.fmt = group, get_format(fmt)
        self.world = world if world is not None else dist.get_world_size(group)
        self.last: StepTelemetry | None = None

    def reduce(self, grads: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The mean of ``grads`` over the group's ranks, as FP8 data + scale per tensor (collective)."""
        if not grads:
            raise ValueError("FP8AllReduce.reduce needs at least one gradient tensor")
        sent, steps = 0, _all_reduce_steps(grads, self.fmt, self.world)
        request = next(steps)
        try:
            while True:
                result, nbytes = _run_collective(*request, self.world, self.group)
                sent += nbytes
                request = steps.send(result)
        except StopIteration as done:
            data_fp8, out_scales, stats = done.value
        self.last = self._telemetry(stats, sum(g.numel() for g in grads), sent)
        return _split(data_fp8, out_scales, grads)

    def _telemetry(self, stats: dict, numel: int, sent: int) -> StepTelemetry:
        sat, flushed, nonzero, nonzero_sums = stats["counts"].tolist()
        return StepTelemetry(mu=float(stats["mu"]), saturated=sat / max(numel, 1),
                             flushed_in=flushed / max(nonzero, 1),
                             flushed_out=float(stats["flushed_out"]) / max(nonzero_sums, 1), numel=numel,
                             bytes_sent=sent, bf16_bytes=bf16_allreduce_bytes(numel, self.world))


def _run_collective(op: str, t: torch.Tensor, world: int, group) -> tuple[torch.Tensor, int]:
    """Run one request of ``_all_reduce_steps`` with torch.distributed; return (result, bytes sent)."""
    nbytes = t.numel() * t.element_size()
    if op == "all_reduce_max":
        compat.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t, bytes_sent("all_reduce", nbytes, world)
    if op == "all_to_all":
        out = torch.empty_like(t)
        compat.all_to_all_single(out, t, group=group)
        return out, bytes_sent("all_to_all", nbytes, world)
    out = torch.empty(world * t.numel(), dtype=t.dtype, device=t.device)
    compat.all_gather_single(out, t, group=group)
    return out, bytes_sent("all_gather", nbytes, world)


def _simulate_collective(op: str, ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """What each of ``len(ts)`` ranks receives from collective ``op`` given every rank's input."""
    world = len(ts)
    if op == "all_reduce_max":
        return [torch.stack(ts).amax(0)] * world
    if op == "all_to_all":
        chunks = [t.view(world, -1) for t in ts]
        return [torch.cat([c[r] for c in chunks]) for r in range(world)]
    return [torch.cat(ts)] * world


def simulate_all_reduce(grads_per_rank: list[list[torch.Tensor]], reducer: FP8AllReduce):
    """Run ``reducer``'s algorithm for ``len(grads_per_rank)`` simulated ranks in one process.

    The same code as ``reducer.reduce`` with the collectives computed locally; sets ``reducer.last``
    (bytes as the real collectives would send). Returns the result every rank would get.
    """
    world = len(grads_per_rank)
    if world != reducer.world:
        raise ValueError(f"reducer is for {reducer.world} ranks, got gradients of {world}")
    gens = [_all_reduce_steps(g, reducer.fmt, world) for g in grads_per_rank]
    requests, sent = [next(g) for g in gens], 0
    try:
        while True:
            op, t0 = requests[0]
            sent += bytes_sent("all_reduce" if op == "all_reduce_max" else op, t0.numel() * t0.element_size(), world)
            results = _simulate_collective(op, [t for _, t in requests])
            requests = [g.send(r) for g, r in zip(gens, results)]
    except StopIteration as done:  # rank 0 finished (the others hold the same result)
        data_fp8, out_scales, stats = done.value
    for g in gens[1:]:
        g.close()
    reducer.last = reducer._telemetry(stats, sum(g.numel() for g in grads_per_rank[0]), sent)
    return _split(data_fp8, out_scales, grads_per_rank[0])
