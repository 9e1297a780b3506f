"""Adam / AdamW with FP32 or FP8/FP16 state and FP16 master weights (levels O1 and O2).

The math is torch's (``torch.optim.Adam`` / ``AdamW`` with ``foreach=False``), for step t:

    g   = grad (+ wd * w when decoupled=False: Adam's L2 penalty)
    w  *= 1 - lr * wd                               (decoupled=True: AdamW)
    m   = b1 * m + (1 - b1) * g                     (``exp_avg``)
    v   = b2 * v + (1 - b2) * g^2                   (``exp_avg_sq``)
    w  -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

``state="fp32"`` (level O1, and the reference mode) keeps m and v as torch does and runs
torch's own sequence of in-place ops, so on plain FP32 parameters it reproduces
``torch.optim.AdamW(foreach=False)`` / ``Adam`` bit for bit.

``state="fp8"`` (level O2) stores, per parameter, 1 + 2 bytes of state plus scales:

* ``exp_avg``: ``float8_e4m3fn`` (3 mantissa bits: relative rounding error <= 2^-4, 6.25%;
  normal range 2^-6..448, subnormals down to 2^-9, so about 17.8 binades of dynamic range);
* ``exp_avg_sq``: ``float16`` (10 mantissa bits; 2^-24..65504, 40 binades with subnormals);
* ``exp_avg_scale`` / ``exp_avg_sq_scale``: float32 scales; true value = stored / scale.

Numerics of the FP8 state
-------------------------
Each step decodes m and v to FP32, applies the update above in FP32 and re-encodes them. The
problems, and what this module does about each (measurements: ``benchmarks/optim_numerics.py``,
recorded in ``benchmarks/RESULTS.md``):

1. Range of v. v is an EMA of g^2, so it spans twice the binades g does: gradients of 1e-8
   and 1e2 give v of 1e-16 and 1e4. Without a scale, g^2 < 6e-8 (|g| < 2.4e-4) flushes to
   zero in FP16 and g^2 > 65504 (|g| > 256) overflows. With a per-tensor scale FP16 holds
   30 binades at full precision (normals, 2^-14..2^16) and 40 before flushing (subnormals):
   for v itself that is a ratio of only 2^15 (3e4) between the largest and smallest |g| of a
   tensor at full precision, 2^20 (1e6) before flushing. A v flushed to 0 under an m that is
   not makes the update m / eps, a step of thousands of learning rates. So the default
   ``v_storage="sqrt"`` stores r = sqrt(v): r spans the binades g spans, so |g| ratios of
   2^30 (1e9) keep full precision and 2^40 (1e12) stay nonzero, and the denominator sqrt(v)
   is read without a square root. The price: the denominator's relative rounding error is
   r's, 2^-11, instead of half of v's, 2^-12; both are far below m's 2^-4. On gradients
   spanning 1e-8..1e2 inside a tensor, storing v stalls 8-22% of the elements and misses the
   float64 trajectory by 20-36%; storing sqrt(v) stalls 0.7% and misses by 2.5%.
   ``v_storage="square"`` stores v itself (for comparison).
2. Scales. Every scale is a power of two (rescaling is exact) chosen from the new amax each
   step, so the largest element lands in the top binade: (224, 448] for E4M3, (32752, 65504]
   for FP16. Nothing overflows by construction (casts also saturate). The step runs in two
   passes over the tensor: the first computes the new m and v only for their amax, the second
   recomputes them, encodes them with the new scales and updates the weights.
3. Range of m. m carries the sign and magnitude of g, so inside one tensor it spans what the
   gradient spans; with one per-tensor E4M3 scale every element below amax(m) * 2^-17.8
   (4.4e-6 amax) flushes to zero and its weight stops moving, although Adam's step for it is
   as large as anyone's (Adam is scale-free per element). The default
   ``m_scaling="normalized"`` therefore stores q = m / r (r the stored sqrt(v)), not m.
   By Cauchy-Schwarz |m_t| <= (1 - b1) sqrt(S_t v_t / (1 - b2)), S_t = sum_{k<t} (b1^2/b2)^k,
   so |q| <= 7.3 for betas (0.9, 0.999) and 1.2 for (0.9, 0.95) whatever the gradient's
   scale: q is the not-bias-corrected update itself, one E4M3 scale covers it, and r acts as
   a per-element FP16 scale for m (decode: m = q * r). Same 1 byte per element, no extra
   scale. Against float64 AdamW (200 steps, betas (0.9, 0.999), relative error of the
   distance travelled): gradients spanning 1e-8..1e2 per element: normalized 2.5%, per-tensor
   (FP8-LM / MS-AMP, ``m_scaling="tensor"``) 57% with 28% of the elements stalled, per-block
   of 128 (``m_scaling="block"``, +4/128 byte per element) 54%; the same spread by rows:
   2.6% / 52% / 29%; log-normal magnitudes around 1e-4: 2.6% / 17% / 5.2%. Per-block helps
   only where magnitudes cluster in blocks and costs memory; "normalized" beats both at equal
   memory, so it is the default; the other two stay selectable for comparison.
4. Rounding. An EMA re-rounded every step has a dead band under round-to-nearest: the step
   (1 - b1)(g - m) is lost whenever it is below half an ulp of m, i.e. whenever |g - m| is
   below 31-62% of |m| for E4M3, and (1 - b2)(g^2 - v) is lost whenever |g^2 - v| is below
   24-49% of v in FP16 with b2 = 0.999: the stored moments stall short of their targets.
   Measured with a constant gradient (200 steps, betas (0.9, 0.999)): nearest leaves m off by
   92% on average; on a deterministic regression problem the weights end 48% away from
   float64 Adam's. The default ``rounding="stochastic"`` rounds up with probability equal to
   the remainder's fraction of an ulp, so the stored moments are unbiased (constant gradient:
   m within 5%, v 0.4%; regression: weights within 1.1%). Its noise is re-injected every step and
   damped by the EMA (stationary relative std about 0.4 ulp / sqrt(2 (1 - b))), which is why
   on very noisy gradients nearest measures slightly better (1.9% vs 2.5% open loop): the
   gradient noise there hides the dead band, while nothing hides it on a smooth problem. The
   random bits come from the optimizer's generator (one per device, saved in ``state_dict()``),
   so a resumed run is bit-identical. ``rounding="nearest"`` is the plain saturating cast.
5. Safety bound. With exact moments |m_hat| / (sqrt(v_hat) + eps) <= C_t with
   C_t = (1 - b1)/(1 - b1^t) * sqrt(S_t (1 - b2^t) / (1 - b2)) (the bound above, bias
   corrected; C_1 = 1, and the bound is attained by g_{t-k} ~ (b1 / b2)^k). The FP8 mode clamps
   each update element to C_t (1 + 2^-6) and q to its bound likewise, so a decoded m that
   outlives a flushed v cannot produce a giant step; with exact arithmetic the clamp never binds.
6. The update of step t uses the FP32 m and v computed in this step (before re-encoding), so
   the quantization error of step t's state first acts at step t + 1.

Master weights: a parameter that is an ``fp8lm.tensor.ScaledTensor`` (FP16 data + scale) is
decoded to FP32 with ``p.dequantize()``, updated in FP32, and written back with
``p.assign_hp_(w, stochastic=True, generator=...)`` (stochastic rounding into FP16, so
updates below half an FP16 ulp survive in expectation); plain parameters are updated in
place. ScaledTensor gradients are read from their ``_data`` / ``_scale`` chunk by chunk.

The master's new power-of-two scale puts a value in ``(FP16_AMAX_TARGET / 2, FP16_AMAX_TARGET]`` =
(128, 256], 2^8 below FP16's largest value. State "fp8" takes it from the new weights' amax (its
pass 1 reduces the moments' amaxes anyway). State "fp32" (O1) takes it *before* the step, from a
bound on the new amax: ``|w_new| <= |w| * |1 - lr wd| + lr * C_t``, with ``C_t`` the bound on
``|m_hat| / sqrt(v_hat)`` of point 5 below (FP32 moments hold it up to rounding, covered by its
2^-6 slack). So the fused step needs only the old master's amax instead of a whole first pass
(11 bytes: master, FP8 gradient, FP32 m and v), and from its second step on it has it for free:
the previous step's kernel reduced it from the bytes it stored (``fused.py``). The bound is tight when the
weights dominate ``lr * C_t`` and exact at step 1 from zero (Adam's first update is ``lr * sign(g)``);
the stored amax then lands 0-4 binades below 256, never above it (``tests/test_optim.py``), which
costs no precision (FP16's relative precision is the same across its normal range, and 2^-22 of
the amax is still normal). Betas without a bound (``beta2 = 0 < beta1``) take the new amax.

Fused step: on CUDA (with Triton) each parameter's step runs as one or two Triton kernels
(``fp8lm.optim.fused``: pass 1 reduces the amaxes the new scales need, or for an O1 master only
the old master's amax; pass 2 recomputes, encodes and stores) instead of 15-40 torch ops; the plain-torch code below is its reference (the
twin) and the CPU path. ``fused=None`` (default) takes it wherever it applies (``fp8lm.optim.set_fused_step(False)``
turns that off; it is on since the kernels ran on the H100 against their twin and measured 9-21x
faster, ``benchmarks/RESULTS.md``): a CUDA parameter
(FP32, or an FP16 ``ScaledTensor`` master), state "fp32", or state "fp8" with the default
m_scaling="normalized", v_storage="sqrt"; ``fused=True`` requires it, ``fused=False`` never
takes it. Same state (keys, dtypes, scales), same formulas and scales; stochastic rounding draws
from Philox seeded per parameter and step from the CPU generator instead of torch's generator,
so the two paths resume each other's ``state_dict()`` but their random bits differ.

Memory: state tensors are plain tensors in ``self.state[p]`` (``exp_avg``, ``exp_avg_scale``,
``exp_avg_sq``, ``exp_avg_sq_scale``, ``step``), so ``state_dict()`` holds the stored bytes;
``exp_avg_sq`` holds sqrt(v) and ``exp_avg`` holds q = m / sqrt(v) under the defaults
(``moments(p)`` decodes the true m and v). Parameters are updated one at a time, the FP8 step
in chunks of ``chunk_size`` elements (default 2^22): its temporaries are about ten FP32 chunks
(16 MiB each at the default), whatever the parameter's size. A ScaledTensor parameter adds
one FP32 copy of itself (``dequantize``, then ``assign_hp_``'s own temporaries). The FP32
mode runs torch's ops on whole tensors (two FP32 temporaries of the parameter, as torch).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fp8lm import formats
from fp8lm.formats import E4M3, Format

from fp8lm.optim import fused as _fused
from fp8lm.tensor import FP16_AMAX_TARGET, ScaledTensor, _pow2_scale, is_scaled, round_stochastic

__all__ = ["AdamW", "FP16", "STATES", "M_SCALINGS", "V_STORAGES", "ROUNDINGS"]

FP16 = Format("fp16", torch.float16, 65504.0, 2.0**-14, 2.0**-24, 10)
STATES = ("fp32", "fp8")
M_SCALINGS = ("normalized", "tensor", "block")
V_STORAGES = ("sqrt", "square")
ROUNDINGS = ("stochastic", "nearest")
_SLACK = 1.0 + 2.0**-6
_REFUSED_FLAGS = ("amsgrad", "maximize", "differentiable", "capturable")


# --------------------------------------------------------------------------------------------
# rounding and encoding


def _encode(x_hp: torch.Tensor, fmt: Format, scale: torch.Tensor, stochastic: bool, generator) -> torch.Tensor:
    """``x_hp * scale`` cast to ``fmt`` (saturating), stochastically or to nearest."""
    if not stochastic:
        return formats.quantize(x_hp, fmt, scale)
    return round_stochastic(x_hp * scale, fmt.dtype, generator)


def _block_view(x: torch.Tensor, block: int) -> torch.Tensor:
    """The flattened ``x`` zero-padded to whole blocks, as (num_blocks, block)."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block)


def _num_blocks(numel: int, block: int) -> int:
    return max(1, -(-numel // block))


# --------------------------------------------------------------------------------------------
# hyper-parameters


def _to_float(value, name: str) -> float:
    """A Python float from a float or a one-element tensor (``lr`` may be a tensor)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} as a tensor must have one element, got shape {tuple(value.shape)}")
        return float(value.item())
    return float(value)


def _check_group(group: dict) -> None:
    """Validate one param group's hyper-parameters (ValueError naming the bad one)."""
    lr = _to_float(group["lr"], "lr")
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"invalid lr {lr}: must be a finite number >= 0")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        b = _to_float(beta, f"betas[{i}]")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"invalid betas[{i}] {b}: must be in [0, 1)")
    eps = _to_float(group["eps"], "eps")
    if not eps >= 0.0:
        raise ValueError(f"invalid eps {eps}: must be >= 0")
    wd = _to_float(group["weight_decay"], "weight_decay")
    if not wd >= 0.0:
        raise ValueError(f"invalid weight_decay {wd}: must be >= 0")
    for key, allowed in (("state", STATES), ("m_scaling", M_SCALINGS), ("v_storage", V_STORAGES),
                         ("rounding", ROUNDINGS), ("master_rounding", ROUNDINGS)):
        if group[key] not in allowed:
            raise ValueError(f"invalid {key} {group[key]!r}; allowed: {', '.join(allowed)}")
    if not isinstance(group["decoupled"], bool):
        raise ValueError(f"decoupled must be True (AdamW) or False (Adam), got {group['decoupled']!r}")
    for key in ("block_size", "chunk_size"):
        if not (isinstance(group[key], int) and group[key] >= 1):
            raise ValueError(f"invalid {key} {group[key]!r}: must be a positive int")
    for p in group["params"]:
        if torch.is_complex(p):
            raise ValueError("complex parameters are not supported by fp8lm.optim.AdamW")


def _update_bound(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """(bound on |m_t| / sqrt(v_t), bound on |m_hat| / sqrt(v_hat)) at step t; inf when unbounded."""
    if beta2 == 0.0:
        return (_SLACK, _SLACK) if beta1 == 0.0 else (math.inf, math.inf)
    ratio = beta1 * beta1 / beta2
    try:
        s_t = float(step) if ratio == 1.0 else (1.0 - ratio**step) / (1.0 - ratio)
    except OverflowError:
        return math.inf, math.inf
    raw = (1.0 - beta1) * math.sqrt(s_t / (1.0 - beta2))
    hat = raw * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    return raw * _SLACK, hat * _SLACK


def master_bound_args(lr: float, wd: float, beta1: float, beta2: float, step: int,
                      decoupled: bool) -> tuple[float, float] | None:
    """``(|decay|, lr * bound)`` for the FP32-state master scale (module docstring), None when unbounded."""
    hat = _update_bound(beta1, beta2, step)[1]
    if not math.isfinite(hat):
        return None
    return abs(1 - lr * wd) if (decoupled and wd != 0) else 1.0, lr * hat


_STREAM_MIX = 0x5851F42D4C957F2D  # an odd 64-bit constant (PCG's multiplier)


def rounding_stream_seed(generator_seed: int, device: torch.device) -> int:
    """The seed of the rounding generator of ``device``: ``generator_seed`` mixed with a constant and
    the device, so it is never ``generator_seed`` itself. ``torch.manual_seed(s)`` seeds torch's own
    generators with ``s``, which is also the default ``generator_seed``; an equal seed would make the
    rounding draws replay the random numbers that made the data and weights (on the CPU: the same
    Mersenne Twister stream), correlating the rounding with the values it rounds. Measured on
    ``tests/test_optim.py``'s FP16-master test (300 seeds): the mean displacement was 0.26 standard
    errors of its rounding noise above float64 Adam's with equal seeds, 0.01 with mixed ones."""
    index = 0 if device.type == "cpu" else 1 + (device.index or 0)
    return (generator_seed * _STREAM_MIX + 7919 * index + 1) % 2**63


def _master_scale_from_bound(p, lr: float, wd: float, beta1: float, beta2: float, step: int,
                             group: dict) -> torch.Tensor | None:
    """The new scale of FP16 master ``p`` before its FP32-state step: ``_pow2_scale`` of a bound on
    the new amax, ``amax(old) * |decay| + lr * bound`` (None when the betas give no bound: the
    scale then comes from the new weights' amax)."""
    args = master_bound_args(lr, wd, beta1, beta2, step, group["decoupled"])
    if args is None or type(p) is not ScaledTensor:  # FSDP2's masters take a global amax on write-back
        return None
    if p._data.dtype != torch.float16:  # an FP32-data master keeps scale 1 (tensor._scale_for)
        return None
    decay_abs, lr_bound = args
    amax_old = p._data.abs().amax().float() / p._scale
    return _pow2_scale(amax_old * decay_abs + lr_bound, FP16_AMAX_TARGET)


class _PendingSkip:
    """A device-side ``found_inf`` of one step, copied to the host without waiting; ``skipped()`` waits only
    for that copy (recorded right after the step's kernels, long done by the next step on a busy GPU)."""

    def __init__(self, flag: torch.Tensor, params: list):
        self.params = params
        if flag.is_cuda:
            self.host = torch.empty(1, dtype=torch.float32, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = flag.clone(), None

    def skipped(self) -> bool:
        if self.done is not None:
            self.done.synchronize()
        return bool(self.host[0] != 0)


# master -> (scratch of its last fused bounded step, its _master_key after that step). Keyed by the tensor,
# not kept per optimizer, so a step by any optimizer is seen by all; weak, so it never keeps a master alive.
_LAST_MASTER_STEP = WeakIdKeyDictionary()


def _last_master_step(p: ScaledTensor) -> torch.Tensor | None:
    """The scratch of ``p``'s last fused bounded step, if ``p`` still holds the bytes and scale that step
    stored (the kernels write without bumping torch's version counters, so any other write to
    ``_data`` or ``_scale``, or a new ``_data``, changes ``_master_key``); else None."""
    hit = _LAST_MASTER_STEP.get(p)
    return hit[0] if hit is not None and hit[1] == _master_key(p) else None


def _master_key(p: ScaledTensor) -> tuple:
    """What identifies the current bytes of master ``p``: its tensors and their version counters (the
    wrapper's counts in-place ops through ``p``, whose inner writes run below the counting; the inner
    ones count direct writes to ``_data`` / ``_scale``)."""
    return p._version, id(p._data), p._data.data_ptr(), p._data._version, id(p._scale), p._scale._version


# --------------------------------------------------------------------------------------------
# the optimizer


class AdamW(torch.optim.Optimizer):
    """Adam / AdamW with FP32 (``state="fp32"``) or FP8 m + FP16 v (``state="fp8"``) state.

    Args:
        params: parameters or param groups (dicts may override every hyper-parameter below).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``; ``lr`` may be a one-element tensor.
        decoupled: True for AdamW (``w *= 1 - lr * wd``), False for Adam's L2 (``g += wd * w``).
        state: "fp32" (torch's math and state) or "fp8" (E4M3 m and FP16 v with scales).
        m_scaling: how the FP8 m is scaled: "normalized" (default), "tensor" or "block".
        v_storage: "sqrt" (FP16 stores sqrt(v), default) or "square" (stores v).
        rounding: "stochastic" (default) or "nearest" for the FP8/FP16 state.
        master_rounding: "stochastic" (default) or "nearest" for FP16 ``ScaledTensor`` master weights
            ("nearest" drops updates below half an FP16 ulp: kept for measuring that loss).
        block_size: elements per scale for ``m_scaling="block"``.
        chunk_size: elements processed at a time by the FP8 step (bounds its temporaries).
        generator_seed: seed of the stochastic-rounding generators (each device's is mixed from it:
            ``rounding_stream_seed``); default ``torch.initial_seed()``.
        fused: None (default) runs the fused Triton step (``fp8lm.optim.fused``), when
            ``fp8lm.optim.set_fused_step(True)`` has switched it on (off by default: not yet run on a GPU),
            for every parameter it supports (on CUDA, Triton importable, FP32 state or FP8 state with m_scaling="normalized",
            v_storage="sqrt") and the plain-torch step for the others; True requires it (ValueError
            naming what is missing otherwise); False always takes the plain-torch step.
        foreach: accepted for compatibility and ignored.
    See the module docstring for the numerics.
    """

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, decoupled: bool = True, state: str = "fp32",
                 m_scaling: str = "normalized", v_storage: str = "sqrt", rounding: str = "stochastic",
                 master_rounding: str = "stochastic", block_size: int = 128, chunk_size: int = 1 << 22, generator_seed: int | None = None,
                 foreach=None, fused=None):
        del foreach  # kept so torch-style call sites keep working
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None (automatic), True or False, got {fused!r}")
        self._fused = fused
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                        state=state, m_scaling=m_scaling, v_storage=v_storage, rounding=rounding,
                        master_rounding=master_rounding, block_size=block_size, chunk_size=chunk_size)
        self._generator_seed = int(torch.initial_seed() if generator_seed is None else generator_seed)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending_skips: list[_PendingSkip] = []  # step(found_inf=...) on the device, not yet read back
        self._skip_flag: torch.Tensor | None = None  # that flag while a step runs
        super().__init__(params, defaults)

    # ---- construction ------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group (torch's rules), then validate its hyper-parameters."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        try:
            _check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, *, state: str,
                       param_map: dict | None = None, **options) -> "AdamW":
        """An fp8lm AdamW with ``optimizer``'s groups and hyper-parameters (a fresh torch Adam/AdamW).

        ``param_map`` ({old_param: new_param}) replaces parameters; parameters not in it are
        kept. ``options`` (m_scaling, v_storage, rounding, master_rounding, block_size, generator_seed, fused) pass
        through. Refuses other optimizer classes, optimizers that have already stepped, and
        the torch flags this optimizer does not implement (amsgrad, maximize, differentiable,
        capturable); foreach and fused are ignored.
        """
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            raise ValueError(f"from_optimizer needs a torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
        if any(len(s) for s in optimizer.state.values()):
            raise ValueError("from_optimizer needs an optimizer without state: this one has already stepped "
                             "(build it fresh, or load its state after conversion)")
        param_map = param_map or {}
        decoupled_default = isinstance(optimizer, torch.optim.AdamW)
        groups = []
        for group in optimizer.param_groups:
            for flag in _REFUSED_FLAGS:
                if group.get(flag, False):
                    raise ValueError(f"fp8lm.optim.AdamW does not support {flag}=True; allowed: {flag}=False")
            new = {k: v for k, v in group.items()
                   if k not in _REFUSED_FLAGS + ("foreach", "fused", "decoupled_weight_decay", "params")}
            new["decoupled"] = bool(group.get("decoupled_weight_decay", decoupled_default))
            new["params"] = [param_map.get(p, p) for p in group["params"]]
            groups.append(new)
        d = optimizer.defaults
        return cls(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
                   decoupled=bool(d.get("decoupled_weight_decay", decoupled_default)), state=state, **options)

    # ---- generators --------------------------------------------------------------------

    def generator_for(self, device: torch.device | str) -> torch.Generator:
        """The stochastic-rounding generator of ``device`` (created, seeded, on first use)."""
        device = torch.device(device)
        if device.type != "cpu" and device.index is None:
            device = torch.device(device.type, torch.get_device_module(device.type).current_device())
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(rounding_stream_seed(self._generator_seed, device))
            self._generators[device] = gen
        return self._generators[device]

    @property
    def generator(self) -> torch.Generator:
        """The generator of the first parameter's device (the one a single-device run uses)."""
        for group in self.param_groups:
            for p in group["params"]:
                return self.generator_for(p.device)
        return self.generator_for("cpu")

    # ---- state dict ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (the stored FP8/FP16 tensors, not widened) plus the generators' states."""
        self._settle_skips()
        sd = super().state_dict()
        sd["generator_seed"] = self._generator_seed
        sd["generators"] = {str(dev): gen.get_state() for dev, gen in self._generators.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``: state tensors keep their stored dtypes; generators resume exactly."""
        sd = dict(state_dict)
        generators = sd.pop("generators", {})
        seed = sd.pop("generator_seed", self._generator_seed)
        for i, (mine, saved) in enumerate(zip(self.param_groups, sd["param_groups"])):
            if mine.get("state") != saved.get("state"):
                raise ValueError(f"param group {i}: optimizer state is {mine.get('state')!r} here but "
                                 f"{saved.get('state')!r} in the loaded state dict")
        super().load_state_dict(sd)
        # torch casts every state tensor to the parameter's dtype; put back the stored ones, copied.
        saved_ids = [pid for g in sd["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in sd["state"]:
                self.state[p] = {k: (v.to(device=p.device if k != "step" else v.device, copy=True).contiguous()
                                     if isinstance(v, torch.Tensor) else v)
                                 for k, v in sd["state"][pid].items()}
        for group in self.param_groups:  # a state dict from an older version may lack newer options
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._generator_seed = int(seed)
        self._generators = {}
        for dev, gen_state in generators.items():
            self.generator_for(dev).set_state(gen_state.clone())

    # ---- the step -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None, *, found_inf: torch.Tensor | None = None):
        """One optimizer step over every parameter with a gradient; returns the closure's loss.

        ``found_inf`` (a one-element tensor, e.g. "the loss or the gradient norm is not finite"): where it is
        nonzero the step changes nothing. Where every parameter takes the fused step, the kernels read it on
        the device, so the host does not wait for it; the step counts it advanced are taken back at the next
        ``step`` or ``state_dict`` (a skipped step still draws its rounding seeds). Otherwise it is read here.
        """
        self._settle_skips()
        self._scratch_pool = {}  # the fused step's per-parameter amax buffers, zeroed once per step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if found_inf is not None:
            if found_inf.numel() != 1:
                raise ValueError(f"found_inf must have one element, got shape {tuple(found_inf.shape)}")
            on_device = all(self._use_fused(p, group) for p, group in stepped)
            if not on_device and bool(found_inf.reshape(()) != 0):  # read on the host
                return loss
            self._skip_flag = found_inf.reshape(1).float() if on_device else None
        try:
            for p, group in stepped:
                self._step_param(p, group)
        finally:
            flag, self._skip_flag = getattr(self, "_skip_flag", None), None
        if flag is not None and stepped:
            self._pending_skips.append(_PendingSkip(flag, [p for p, _ in stepped]))
        return loss

    def _settle_skips(self) -> None:
        """Take back the step counts of earlier device-skipped steps (``step(found_inf=...)``) once their flag
        is known; forget those masters' cached amax (their bytes are not the ones the kernels would have stored)."""
        pending, self._pending_skips = getattr(self, "_pending_skips", []), []
        for record in pending:
            if record.skipped():
                for p in record.params:
                    self.state[p]["step"] -= 1
                    _LAST_MASTER_STEP.pop(p, None)

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        """Step one parameter that has a gradient: the fused Triton step, else the FP32 or FP8 plain path."""
        if p.grad.is_sparse:
            raise ValueError("fp8lm.optim.AdamW does not support sparse gradients")
        if self._use_fused(p, group):
            self._step_fused(p, group)
        elif group["state"] == "fp32":
            self._step_fp32(p, group)
        else:
            self._step_fp8(p, group)

    def _use_fused(self, p: torch.Tensor, group: dict) -> bool:
        """Whether ``p`` takes the fused Triton step (the ``fused`` argument; ValueError if required but impossible)."""
        fused = getattr(self, "_fused", None)
        if fused is False:
            return False
        reason = _fused.unsupported_reason(p, group, self.state.get(p))
        if fused is True and reason is not None:
            raise ValueError(f"fused=True but the fused optimizer step cannot run: {reason}")
        return reason is None and (fused is True or (p.is_cuda and _fused.fused_step_enabled()))

    def _scratch(self, device: torch.device) -> torch.Tensor:
        """A zeroed float32 device buffer of ``SCRATCH_SLOTS`` for one parameter's fused step (one
        allocation serves 256 parameters)."""
        pool = self.__dict__.setdefault("_scratch_pool", {})
        buf, used = pool.get(device, (None, 0))
        slots = _fused.SCRATCH_SLOTS
        if buf is None or used == buf.numel():
            buf, used = torch.zeros(256 * slots, dtype=torch.float32, device=device), 0
        pool[device] = (buf, used + slots)
        return buf[used: used + slots]

    def _step_fused(self, p: torch.Tensor, group: dict) -> None:
        """The fused Triton step (``fp8lm.optim.fused``): the same state, the twin's numerics, two passes."""
        state = self.state[p]
        if not state:
            if group["state"] == "fp32":
                self._init_fp32_state(p)
            else:
                self._init_fp8_state(p, group)
        scalars = self._begin(p, group)
        lr, beta1, beta2, _, wd, step = scalars
        bounds = _update_bound(beta1, beta2, step) if group["state"] == "fp8" else None
        master_bound = (master_bound_args(lr, wd, beta1, beta2, step, group["decoupled"])
                        if group["state"] == "fp32" and type(p) is ScaledTensor else None)
        # one Philox seed per parameter and step, from the CPU generator (saved in state_dict())
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator_for("cpu")))
        scratch = self._scratch(p.device)
        prev = _last_master_step(p) if master_bound is not None else None
        _fused.fused_step(p, state, group, scalars, seed, scratch, bounds, master_bound, prev,
                          skip=getattr(self, "_skip_flag", None))
        if master_bound is not None:
            _LAST_MASTER_STEP[p] = (scratch, _master_key(p))

    def _grad_hp(self, p: torch.Tensor) -> torch.Tensor:
        """The gradient as a plain tensor (dequantized when it is a ScaledTensor)."""
        return p.grad.dequantize() if is_scaled(p.grad) else p.grad

    def _begin(self, p: torch.Tensor, group: dict) -> tuple[float, float, float, float, float, int]:
        """Advance ``step`` and read the group's scalars: (lr, beta1, beta2, eps, wd, step)."""
        step_t = self.state[p]["step"]
        step_t += 1
        beta1, beta2 = (_to_float(b, "beta") for b in group["betas"])
        return (_to_float(group["lr"], "lr"), beta1, beta2, _to_float(group["eps"], "eps"),
                _to_float(group["weight_decay"], "weight_decay"), int(step_t.item()))

    def _write_back(self, p: torch.Tensor, w_hp: torch.Tensor, group: dict, scale: torch.Tensor | None = None) -> None:
        """Store the FP32 result ``w_hp`` into ``p`` (ScaledTensors: the group's ``master_rounding``,
        the scale from ``w_hp``'s amax or ``scale`` when given)."""
        if is_scaled(p):
            stochastic = group.get("master_rounding", "stochastic") == "stochastic"
            gen = self.generator_for(p.device) if stochastic else None
            extra = {} if scale is None else {"scale": scale}
            p.assign_hp_(w_hp, stochastic=stochastic, generator=gen, **extra)
        elif w_hp is not p:
            p.copy_(w_hp)

    def _step_fp32(self, p: torch.Tensor, group: dict) -> None:
        """torch's single-tensor Adam step, op for op, on FP32 state (reference mode, level O1)."""
        state = self.state[p]
        scaled = is_scaled(p)
        if not state:
            self._init_fp32_state(p)
        lr, beta1, beta2, eps, wd, step = self._begin(p, group)
        w = p.dequantize() if scaled else p
        grad = self._grad_hp(p)
        if wd != 0:
            if group["decoupled"]:
                w.mul_(1 - lr * wd)
            else:
                grad = grad.add(w, alpha=wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        w_scale = _master_scale_from_bound(p, lr, wd, beta1, beta2, step, group) if scaled else None
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        w.addcdiv_(exp_avg, denom, value=-step_size)
        if scaled:
            self._write_back(p, w, group, w_scale)

    def _init_fp32_state(self, p: torch.Tensor) -> None:
        """Zero FP32 m and v shaped like ``p`` (its layout for plain parameters, as torch)."""
        state = self.state[p]
        like = torch.zeros(p.shape, dtype=torch.float32, device=p.device) if is_scaled(p) else p
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def _init_fp8_state(self, p: torch.Tensor, group: dict) -> None:
        """Zero FP8 m and FP16 v with unit scales (one scale per block for m_scaling="block")."""
        state = self.state[p]
        n_scales = _num_blocks(p.numel(), group["block_size"]) if group["m_scaling"] == "block" else None
        ones = dict(dtype=torch.float32, device=p.device)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros(p.shape, dtype=E4M3.dtype, device=p.device)
        state["exp_avg_scale"] = torch.ones((), **ones) if n_scales is None else torch.ones(n_scales, **ones)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=FP16.dtype, device=p.device)
        state["exp_avg_sq_scale"] = torch.ones((), **ones)

    def _step_fp8(self, p: torch.Tensor, group: dict) -> None:
        """One step with FP8 m / FP16 v state, in chunks of ``chunk_size`` elements (module docstring).

        Pass 1 computes the new m and v chunk by chunk only for their amax (the new scales);
        pass 2 recomputes them, encodes them with those scales and updates the weights.
        """
        state = self.state[p]
        if not state:
            self._init_fp8_state(p, group)
        lr, beta1, beta2, eps, wd, step = self._begin(p, group)
        bound_q, bound_update = _update_bound(beta1, beta2, step)
        w = p.dequantize() if is_scaled(p) else p
        w_hp = w if (w.dtype == torch.float32 and w.is_contiguous()) else w.float().contiguous()
        if wd != 0 and group["decoupled"]:
            w_hp.mul_(1 - lr * wd)
        ctx = _Fp8Step(state, group, p.grad, w_hp.view(-1), beta1, beta2, 0.0 if group["decoupled"] else wd)
        v_scale, m_scale = ctx.new_scales(bound_q)
        ctx.encode_and_update(v_scale, m_scale, bound_q, bound_update, self.generator_for(p.device),
                              step_size=lr / (1 - beta1**step), bc2_sqrt=(1 - beta2**step) ** 0.5, eps=eps)
        if is_scaled(p):
            self._write_back(p, w_hp, group)
        elif w_hp is not p:
            p.copy_(w_hp)

    @torch.no_grad()
    def moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adam's (m, v) of parameter ``p`` as FP32 tensors, decoded from whatever is stored."""
        state, group = self.state.get(p), self._group_of(p)
        if not state:
            raise ValueError("this parameter has no optimizer state yet (no step taken with a gradient)")
        if group["state"] == "fp32":
            return state["exp_avg"].float().clone(), state["exp_avg_sq"].float().clone()
        ctx = _Fp8Step(state, group, None, None, 0.0, 0.0, 0.0)
        r, m = ctx.decode(0, p.numel())
        return m.view(p.shape), r.square_().view(p.shape)

    def _group_of(self, p: torch.Tensor) -> dict:
        """The param group holding ``p``."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("this parameter is not managed by this optimizer")


class _Fp8Step:
    """The FP8-state update of one parameter, chunk by chunk over its flattened elements.

    Every temporary is a chunk (``group["chunk_size"]`` elements, rounded to whole blocks), so
    the transient memory is a few FP32 chunks whatever the parameter's size.
    """

    def __init__(self, state: dict, group: dict, grad, w_flat, beta1: float, beta2: float, l2: float):
        self.state, self.group, self.grad, self.w_flat = state, group, grad, w_flat
        self.beta1, self.beta2, self.l2 = beta1, beta2, l2
        self.m_fp8 = state["exp_avg"].view(-1)
        self.v_fp16 = state["exp_avg_sq"].view(-1)
        self.m_scale_old = state["exp_avg_scale"].clone()
        self.v_scale_old = state["exp_avg_sq_scale"].clone()
        self.block = group["block_size"]
        chunk = max(1, group["chunk_size"])
        self.chunk = -(-chunk // self.block) * self.block if group["m_scaling"] == "block" else chunk
        self.sqrt_storage = group["v_storage"] == "sqrt"
        self.stochastic = group["rounding"] == "stochastic"

    def chunks(self):
        n = self.m_fp8.numel()
        return ((i, min(i + self.chunk, n)) for i in range(0, n, self.chunk))

    # ---- decoding -------------------------------------------------------------------------

    def decode(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(v), m) of elements i:j in FP32, fresh buffers, from the stored bytes and old scales."""
        r = self.v_fp16[i:j].float().div_(self.v_scale_old)
        if not self.sqrt_storage:
            r.sqrt_()
        m_scaling = self.group["m_scaling"]
        if m_scaling == "block":
            blocks = _block_view(self.m_fp8[i:j].float(), self.block)
            blocks.div_(self.m_scale_old[i // self.block: i // self.block + blocks.shape[0], None])
            return r, blocks.view(-1)[: j - i].clone()
        m = self.m_fp8[i:j].float().div_(self.m_scale_old)
        return r, (m.mul_(r) if m_scaling == "normalized" else m)

    def grad_chunk(self, i: int, j: int) -> torch.Tensor:
        """The gradient of elements i:j in FP32 (plus Adam's L2 term); never written to."""
        g = self.grad
        if is_scaled(g):  # the contract's storage: _data (FP8, or a wider accumulation buffer) / _scale
            g_hp = g._data.reshape(-1)[i:j].float() / g._scale
        else:
            g_hp = g.reshape(-1)[i:j].float()
        return g_hp.add(self.w_flat[i:j], alpha=self.l2) if self.l2 != 0 else g_hp

    def moments_new(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's (m, v) of elements i:j in FP32."""
        g = self.grad_chunk(i, j)
        r, m = self.decode(i, j)
        m.lerp_(g, 1 - self.beta1)
        v = r.square_().mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)  # reuses r's buffer
        return m, v

    # ---- pass 1: scales ---------------------------------------------------------------------

    def new_scales(self, bound_q: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Power-of-two scales for the new v (or sqrt(v)) and the new m (or q), from their amax."""
        device = self.m_fp8.device
        amax_v = torch.zeros((), device=device)
        amax_m = torch.zeros((), device=device)
        m_scaling = self.group["m_scaling"]
        for i, j in self.chunks():
            m, v = self.moments_new(i, j)
            r = v.sqrt_()
            amax_v = torch.maximum(amax_v, r.amax())
            if m_scaling == "normalized":
                q = torch.where(r > 0, m.abs_().div_(r), torch.zeros((), device=device))
                amax_m = torch.maximum(amax_m, q.amax())
            elif m_scaling == "tensor":
                amax_m = torch.maximum(amax_m, m.abs_().amax())
        v_scale = formats.scale_from_amax(amax_v if self.sqrt_storage else amax_v.square(), FP16, pow2=True)
        if m_scaling == "block":
            return v_scale, None
        if m_scaling == "normalized":  # room for the rounding of the stored sqrt(v) that q divides by
            amax_m = amax_m.clamp(max=bound_q) * (1 + 2.0**-8)
        return v_scale, formats.scale_from_amax(amax_m, E4M3, pow2=True)

    # ---- pass 2: encode and update ----------------------------------------------------------

    def encode_and_update(self, v_scale, m_scale, bound_q: float, bound_update: float, gen, *,
                          step_size: float, bc2_sqrt: float, eps: float) -> None:
        """Recompute each chunk's m and v, store them with the new scales, update its weights."""
        block_scales = []
        for i, j in self.chunks():
            m, v = self.moments_new(i, j)
            r = v.sqrt_()  # this step's exact sqrt(v), in v's buffer
            r_stored = self._store_v(i, j, r, v_scale, gen)
            block_scales.append(self._store_m(i, j, m, r_stored, m_scale, bound_q, gen))
            del r_stored
            denom = r.div_(bc2_sqrt).add_(eps)
            update = m.div_(denom).clamp_(-bound_update, bound_update)
            self.w_flat[i:j].add_(update, alpha=-step_size)
        self.state["exp_avg_sq_scale"].copy_(v_scale)
        if self.group["m_scaling"] == "block":
            if block_scales:
                self.state["exp_avg_scale"].copy_(torch.cat(block_scales))
        else:
            self.state["exp_avg_scale"].copy_(m_scale)

    def _store_v(self, i: int, j: int, r: torch.Tensor, v_scale, gen) -> torch.Tensor:
        """Encode sqrt(v) = ``r`` (or v) of elements i:j into FP16; return the stored sqrt(v) in FP32."""
        x = r if self.sqrt_storage else r.square()
        self.v_fp16[i:j].copy_(_encode(x, FP16, v_scale, self.stochastic, gen))
        r = self.v_fp16[i:j].float().div_(v_scale)
        return r if self.sqrt_storage else r.sqrt_()

    def _store_m(self, i: int, j: int, m: torch.Tensor, r_stored, m_scale, bound_q: float, gen):
        """Encode m (or q = m / stored sqrt(v)) of elements i:j into E4M3; returns block scales or None."""
        m_scaling = self.group["m_scaling"]
        if m_scaling == "block":
            blocks = _block_view(m, self.block)
            scales = formats.scale_from_amax(blocks.abs().amax(dim=1), E4M3, pow2=True)
            m_fp8 = _encode(blocks, E4M3, scales[:, None], self.stochastic, gen)
            self.m_fp8[i:j].copy_(m_fp8.view(-1)[: j - i])
            return scales
        if m_scaling == "normalized":
            x = torch.where(r_stored > 0, m / r_stored, torch.zeros((), device=m.device)).clamp_(-bound_q, bound_q)
        else:
            x = m
        self.m_fp8[i:j].copy_(_encode(x, E4M3, m_scale, self.stochastic, gen))
        return None
