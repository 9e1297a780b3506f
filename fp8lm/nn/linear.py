"""FP8 linear layer: the three GEMMs of ``nn.Linear`` in FP8, forward and backward.

Numerics (``x`` is the input reshaped to (M, K), ``w`` the (N, K) weight, see ``scaling.py``)::

    out         = x_fp8 @ w_fp8.T            E4M3 x E4M3, output in the autocast dtype (else x.dtype)
    grad_input  = grad_out_fp8 @ w_fp8       E5M2 x E4M3 (E4M3 x E4M3 with grad_format="e4m3")
    grad_weight = grad_out_fp8.T @ x_fp8     E5M2 x E4M3, output in the weight's dtype
    grad_bias   = grad_out.sum(0)            high precision

Each cast has its own per-tensor scale from the recipe (current, delayed, or static = 1); a weight that
arrives already in E4M3 (a ``ScaledTensor`` with FP8 data: level O3's all-gathered weight,
``fp8lm.distributed.fsdp``) is used as ``w_fp8`` with its own scale, without a second cast. The forward saves
``x_fp8`` and ``w_fp8`` (1 byte per element) for backward, never the high-precision input.

When is scaling state updated? Exactly once per training forward + backward:

* training forward with grad enabled: the x and w histories (delayed) and the last-used scales;
* its backward: the grad_out history;
* ``torch.no_grad()`` / ``inference_mode`` / ``module.eval()``: nothing is updated and, with grad
  disabled, nothing is saved (the GEMM runs outside autograd);
* the forward that activation checkpointing recomputes inside backward: nothing is updated and,
  under delayed scaling, the scales of the original forward are reused so the recomputed
  activations are bit-identical.

A module called several times per step (weight sharing) pushes one history entry per call.

Fused casts (CUDA runs with Triton; ``set_fused_cast``): each amax is one read-only Triton pass and
each cast one pass that writes the FP8 tensor *and* its transpose (``fp8lm.ops.cast``), instead of
about ten unfused elementwise passes with float32 temporaries plus the transposing copies ``fp8_mm``
makes in backward. Backward then receives ``x_fp8`` and ``w_fp8`` as column-major views of the
transposed copies (the layouts its GEMMs read), and ``grad_out``'s transpose comes from its cast.
With a ready delayed scale (``fp8_scale``) the amax for the history comes from the cast's own pass,
so each operand is read once. The bytes are identical to the plain path's (the kernels' test
compares them with their twin bit for bit). Under ``torch.compile`` the plain path is traced and
Inductor fuses it; a fused cast is called as the opaque operator ``fp8lm::cast_transpose_amax``
(the amax passes of current scaling stay Inductor's).

The default is the plain path everywhere (``set_fused_cast(False)``): under ``torch.compile`` Inductor
fuses each cast, and the amax its delayed history needs, into the kernel that produces the operand
(RMSNorm, SwiGLU and their backward passes, the concatenation of dq, dk, dv). Two details make that
work. The amax is a max of row maxima (``_amax_by_rows``, the same number), a reduction over the cast's
own (M, N) loop that Inductor computes inside the cast's kernel; a whole-tensor amax ran as a second
pass over the producer's inputs. The transposed copies the weight-gradient GEMM reads come from
``fp8lm.ops.cast.transpose_fp8``, an operator of its own; written from inside Inductor's kernel, they
slowed it to about half of memory bandwidth. Measured on the H100 (``fp8lm bench``, compiled, delayed,
``benchmarks/RESULTS.md``, fourth session of 2026-11-23), ms per O1 step: plain casts with
whole-tensor amaxes 117.2, with row maxima 110.5, with the transpose operator 109.3; in the same run
``"grad"`` (the output gradients' casts in the Triton kernel, the earlier default) 110.9 and ``True``
(every cast in the kernel) 118.9.

A fused SwiGLU (``forward(x, activation="swiglu")``, used by ``fp8lm.nn.activations.linear_swiglu`` while
``set_fused_swiglu`` is on): the layer's output ``gu = [g | u]`` goes straight into ``silu(g) * u`` in the
same autograd operation, which saves ``gu`` (as the separate SwiGLU would) and in backward computes
SwiGLU's gradient and its FP8 cast in one kernel (``fp8lm.ops.swiglu``) instead of writing a BF16 gradient
for this layer's backward to read and cast. The gradient is cast from float32 values (one rounding, not
BF16 then FP8), its amax feeds the history as usual (a first delayed step or current scaling takes an
amax-only pass first). Measured on the H100: 2.9 ms per llama-0.75b O1 step (``benchmarks/RESULTS.md``,
fifth session of 2026-11-23).

Scaling state lives in non-persistent buffers (``fp8_amax_history``, ``fp8_last_scale``,
``fp8_wgrad_scale``): it moves with ``.to()`` but stays out of ``state_dict`` so converted and plain
models share checkpoint keys.

FP16 master weights and FP8 weight gradients (levels O1/O2: ``from_linear(..., master="fp16")``)
----------------------------------------------------------------------------------------------
The weight becomes an ``nn.Parameter`` holding a ``fp8lm.tensor.ScaledTensor``: FP16 ``_data`` and a
power-of-two ``_scale`` (2 bytes per parameter; no FP32 copy is kept). The forward casts it to E4M3
from ``_data``: ``w_fp8 = cast((_data / _scale) * s_w)``, where the division by a power of two is
exact, so the FP8 bits are those an FP32 weight with the same values would give (a transient FP32
buffer inside the cast, as for any weight); its amax is ``amax(_data) / _scale``, also exact. The
weight-gradient GEMM writes BF16 (float32 accumulation, 8 significant bits out), which lives only
inside backward: it is cast at once to FP8 with a power-of-two scale from its own amax and returned
as a ``ScaledTensor`` (1 byte per parameter + a 4-byte scale), which autograd stores in
``weight.grad``. On CUDA that encoding reads the BF16 gradient once, not twice, on every step where its
power-of-two scale equals the step before's (``fp8lm.ops.cast.encode_pow2``; the same bits either way).
BF16 rather than float32 halves the bytes the GEMM writes and the amax and cast read (measured on the
H100, ``benchmarks/kernel_sweep.py``: 87 us less per llama-0.75b layer for GEMM + encoding); rounding
twice (BF16, then E4M3 or E5M2) moves a value by at most 2^-9 of itself beyond the FP8 rounding, against
FP8's own 2^-4 (E4M3) or 2^-3 (E5M2).

Stored gradient format: ``wgrad_format`` (default ``"e4m3"``), measured with
``benchmarks/o1_numerics.py`` (numbers in ``benchmarks/RESULTS.md``). On the 16 FP8 layers' weight
gradients of the ``tiny`` GPT, at initialization and after 150 O1 steps, E4M3 storage is 31.3-31.7 dB
(SQNR against the GEMM's float32 output) and E5M2 25.2-25.7 dB: a per-tensor scale fits a weight
gradient's whole range into E4M3 (it loses at most 3e-12 of the energy to flushing), so E5M2's wider
range buys nothing and costs a mantissa bit. The 300-step val loss could not tell them apart (O1 vs
O0, mean of seeds 1337 and 7: E4M3 +0.16%, E5M2 +0.02%; single seeds move by 2-3% between
variants), so the choice rests on the 6 dB. The gradient GEMM itself keeps the recipe's formats
(E5M2 ``grad_out`` by default): only the storage of its result is chosen here.

Gradient accumulation: when several backward passes run before ``zero_grad``, autograd adds each new
FP8 gradient in place into ``weight.grad``; a ``ScaledTensor`` then widens its ``_data`` to a float32
accumulation buffer (4 bytes per parameter, counted by ``fp8lm.tensor.storage_bytes``), so small
micro-batch contributions are summed exactly in float32 rather than rounded away in FP8.
"""
from __future__ import annotations

import torch
from torch import nn

from fp8lm.formats import FORMATS, Format, amax, quantize, scale_from_amax
from fp8lm.nn.activations import quantize_rows, swiglu_reference
from fp8lm.ops.cast import encode_pow2, fused_amax, fused_cast, transpose_fp8, triton_available
from fp8lm.ops.gemm import fp8_mm
from fp8lm.ops.swiglu import swiglu_backward_cast, swiglu_grad_amax
from fp8lm.scaling import Recipe, compute_scale, static_scale, update_history
from fp8lm.tensor import ScaledTensor

__all__ = ["Float8Linear", "set_fused_cast", "set_fused_swiglu", "ACTIVATIONS", "HINT_BUFFERS"]

_X, _W, _G = 0, 1, 2  # rows of the scaling-state buffers
# buffers that only save time: no result depends on their values (a checkpoint without them still loads)
HINT_BUFFERS = ("fp8_wgrad_scale",)
MASTERS = ("fp32", "fp16")
WGRAD_FORMATS = tuple(FORMATS)
DEFAULT_WGRAD_FORMAT = "e4m3"  # storage of FP8 weight gradients (module docstring: measured)
FUSED_CAST_MODES = (False, True, "grad")
_FUSED = {"cast": False, "swiglu": True}  # plain casts (Inductor fuses them into their producers); SwiGLU fused
ACTIVATIONS = (None, "swiglu")  # what Float8Linear.forward's `activation` takes


def set_fused_cast(mode: bool | str) -> bool | str:
    """Choose which casts of CUDA runs take the Triton fused kernels (``fp8lm.ops.cast``); returns the old setting.

    ``mode``: False (the default: plain casts, which Inductor fuses into the kernels that produce
    their operands; module docstring), ``"grad"`` (the output gradients' casts in backward, whose
    transposed copies the weight-gradient GEMM reads, take the kernel) or True (every operand).
    CPU runs always take the plain casts. Either way the FP8 bytes, scales and outputs are
    bit-identical (the kernels' twin is the plain path); only the number of passes over memory
    differs. Compiled code calls the cast kernel as the opaque operator ``fp8lm::cast_transpose_amax``
    (the amax passes stay Inductor's), and reads the setting when it is compiled.
    """
    if not (mode is True or mode is False or mode == "grad"):
        raise ValueError(f"set_fused_cast: mode must be one of {FUSED_CAST_MODES}, got {mode!r}")
    old, _FUSED["cast"] = _FUSED["cast"], mode
    return old


def set_fused_swiglu(on: bool) -> bool:
    """Whether ``Float8Linear(x, activation="swiglu")`` may be used (``fused_activations``); returns the old setting.

    On (the default), the model's SwiGLU MLP runs its gate/up projection and the SwiGLU as one operation whose
    backward casts the projection's output gradient to FP8 in SwiGLU's own backward kernel
    (``fp8lm.ops.swiglu``; module docstring). Off, the projection and ``fp8lm.nn.activations.swiglu`` run
    apart, the gradient in BF16 between them (the earlier path, kept for comparison and tests).
    """
    if not isinstance(on, bool):
        raise ValueError(f"set_fused_swiglu: on must be True or False, got {on!r}")
    old, _FUSED["swiglu"] = _FUSED["swiglu"], on
    return old


def _fused(t: torch.Tensor, row: int) -> bool:
    """Whether ``t`` (a ScaledTensor: its data), the operand of state row ``row``, takes the Triton
    fused cast: on CUDA, with Triton, switched on for that operand."""
    mode = _FUSED["cast"]
    return bool(mode) and (mode is True or row == _G) and _fusable(t)


def _narrow_master(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ScaledTensor with FP16/BF16 data (an O1/O2 master weight)."""
    return isinstance(t, ScaledTensor) and t._data.dtype in (torch.float16, torch.bfloat16)


def _fusable(t: torch.Tensor) -> bool:
    """Whether the kernels can cast ``t`` (a ScaledTensor: its data): 2-D, on CUDA, with Triton."""
    t = t._data if isinstance(t, ScaledTensor) else t
    return t.is_cuda and t.dim() == 2 and triton_available(t.device)


def _fused_amax(t: torch.Tensor, row: int) -> bool:
    """Whether ``t``'s amax takes the Triton kernel: the fused path, eager (compiled: Inductor's reduction)."""
    return _fused(t, row) and not torch.compiler.is_compiling()


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed forward being recomputed).

    Under ``torch.compile`` this is False: the query returns a Python int that Dynamo cannot trace
    (it broke the graph at every FP8 linear), and a compiled region's forward is traced for the
    forward pass; compiled activation checkpointing replays the traced graph, not this function.
    """
    if torch.compiler.is_compiling():
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` whose GEMMs run in FP8 (see the module docstring for the numerics).

    Made from an existing ``nn.Linear`` with ``Float8Linear.from_linear(linear, recipe)``, which
    converts the module in place: same object, same parameters, same ``state_dict`` keys.
    """

    recipe: Recipe

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe, master: str = "fp32",
                    wgrad_format: str | None = None) -> "Float8Linear":
        """Convert a plain ``nn.Linear`` in place (its class becomes ``Float8Linear``) and return it.

        ``master="fp32"`` keeps the weight ``Parameter`` as it is (FP32 weight and gradient).
        ``master="fp16"`` replaces it by a new ``Parameter`` holding a ``ScaledTensor`` (FP16 data +
        scale; the old one is dropped: rebuild optimizers with the new one) and makes the weight
        gradient a ``ScaledTensor`` stored in ``wgrad_format`` ("e4m3" or "e5m2"; default
        ``DEFAULT_WGRAD_FORMAT``). See the module docstring.
        """
        wgrad_format = wgrad_format or DEFAULT_WGRAD_FORMAT
        if type(linear) is not nn.Linear:
            raise TypeError(f"Float8Linear.from_linear needs a plain nn.Linear, got {type(linear).__name__}")
        if master not in MASTERS:
            raise ValueError(f"unknown master {master!r}; allowed: {', '.join(MASTERS)}")
        if wgrad_format not in WGRAD_FORMATS:
            raise ValueError(f"unknown wgrad_format {wgrad_format!r}; allowed: {', '.join(WGRAD_FORMATS)}")
        linear.__class__ = cls
        linear._init_fp8(recipe)
        linear.wgrad_format = wgrad_format
        if master == "fp16":
            w = linear.weight
            w_fp16 = ScaledTensor.from_hp(w.detach(), torch.float16)
            linear.weight = nn.Parameter(w_fp16, requires_grad=w.requires_grad)
        return linear

    @property
    def fused_activations(self) -> tuple[str, ...]:
        """The activations ``forward`` can apply inside its own operation: ``("swiglu",)`` for a layer without
        bias and an even number of outputs while ``set_fused_swiglu`` is on, else ``()``."""
        ok = _FUSED["swiglu"] and self.bias is None and self.out_features % 2 == 0
        return ("swiglu",) if ok else ()

    @property
    def master(self) -> str:
        """"fp16" when the weight is an FP16 ``ScaledTensor`` master, else "fp32"."""
        return "fp16" if isinstance(self.weight, ScaledTensor) else "fp32"

    def _init_fp8(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.fp8_history_ready = False  # delayed: set by the first training forward (see fp8_scale)
        dev = self.weight.device
        self.register_buffer("fp8_amax_history", torch.zeros(3, recipe.history_len, device=dev), persistent=False)
        self.register_buffer("fp8_last_scale", torch.ones(3, device=dev), persistent=False)
        # the scale of the last FP8 weight gradient (FP16 masters): the next one's first guess (_encode_wgrad)
        self.register_buffer("fp8_wgrad_scale", torch.ones((), device=dev), persistent=False)

    def extra_repr(self) -> str:
        r = self.recipe
        extra = f", master=fp16, wgrad={self.wgrad_format}" if self.master == "fp16" else ""
        return f"{super().extra_repr()}, fp8={r.scaling}:{r.fwd_format}/{r.grad_format}{extra}"

    def fp8_scale(self, row: int, t: torch.Tensor, fmt: Format, update: bool, recompute: bool,
                  ready: bool = False, amax_later: bool = False, amax_now: torch.Tensor | None = None) -> torch.Tensor:
        """The scale for casting ``t`` (state row ``row``), updating the state when ``update``.

        ``ready`` (delayed scaling after the first training forward): the scale comes from the
        history alone, so the cast does not wait for ``t``'s amax (under ``torch.compile`` it can be
        fused into the kernel that produces ``t``); ``t``'s amax only feeds the history, and with
        ``amax_later`` the caller pushes it (``push_amax``) from the cast's own pass. ``amax_now``: ``t``'s
        amax measured by the caller (``t``'s values are then not read, only its device).
        """
        if self.recipe.scaling == "static":
            return static_scale(t.device)  # no amax: the model is unit-scaled by construction
        delayed = self.recipe.scaling == "delayed"
        if recompute and delayed:
            return self.fp8_last_scale[row].clone()
        history = self.fp8_amax_history[row] if delayed else None
        if delayed and ready:
            r = self.recipe
            scale = scale_from_amax(history.amax(), fmt, r.margin, r.pow2_scales)
            if update:
                if not amax_later:
                    update_history(history, _amax(t, row) if amax_now is None else amax_now)
                self.fp8_last_scale[row].copy_(scale)
            return scale
        amax_now = _amax(t, row) if amax_now is None else amax_now
        scale = compute_scale(amax_now, history, fmt, self.recipe)
        if update:
            if delayed:
                update_history(history, amax_now)
            self.fp8_last_scale[row].copy_(scale)
        return scale

    def forward(self, x: torch.Tensor, activation: str | None = None, save_fp8: bool = False) -> torch.Tensor:
        """``x @ weight.T (+ bias)`` in FP8; with ``activation="swiglu"``, ``silu(g) * u`` of that output's halves
        ``[g | u]`` (..., out_features / 2), computed in the same operation (see ``fused_activations``).
        ``save_fp8`` (with ``activation="swiglu"``; level O2's FP8-saved activations) saves ``[g | u]`` for
        backward as E4M3 with one power-of-two scale per row instead of in its own dtype: the output is the
        same, SwiGLU's backward reads ``g`` and ``u`` rounded to E4M3 (``fp8lm.nn.activations``)."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"Float8Linear: unknown activation {activation!r}; allowed: {ACTIVATIONS}")
        if save_fp8 and activation != "swiglu":
            raise ValueError("Float8Linear: save_fp8 saves SwiGLU's input; it needs activation='swiglu', got "
                             f"activation={activation!r}")
        if activation == "swiglu" and (self.bias is not None or self.out_features % 2):
            raise ValueError("Float8Linear: activation 'swiglu' needs a layer without bias and an even number of "
                             f"outputs (bias: {self.bias is not None}, out_features: {self.out_features})")
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"Float8Linear: input has {x.shape[-1]} features in its last dimension, "
                               f"the layer expects {self.in_features} (input shape {tuple(x.shape)})")
        out_dtype = _out_dtype(x)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad))
        # Dtypes are explicit below; autocast must not re-cast the scaling math or the GEMM
        # (on CPUs it would turn _scaled_mm's internal matmul into a slow BF16 one).
        with torch.autocast(x.device.type, enabled=False):
            ready = self.fp8_history_ready and self.recipe.scaling == "delayed"
            if not needs_grad:
                out, *_ = _fp8_forward(self, x.reshape(-1, x.shape[-1]), self.weight, False, False, out_dtype,
                                       ready, save=False)
                out = out if self.bias is None else out + self.bias.to(out_dtype)
                out = out.reshape(*x.shape[:-1], self.out_features)
                return out if activation is None else swiglu_reference(out)
            recompute = _in_backward()
            update = self.training and not recompute
            if update:
                # Later forwards find the x and w histories filled, and the grad_out history filled by
                # this forward's backward (a Python flag: compiled code recompiles once when it flips).
                self.fp8_history_ready = True
            return _Float8LinearFn.apply(x, self.weight, self.bias, self, out_dtype, update, recompute, ready,
                                         activation, bool(save_fp8))


    def push_amax(self, row: int, amax_now: torch.Tensor) -> None:
        """Push an amax measured by the cast itself into the delayed history (``fp8_scale(amax_later=True)``)."""
        update_history(self.fp8_amax_history[row], amax_now)


def _amax(t: torch.Tensor, row: int) -> torch.Tensor:
    """amax of ``t``'s true values (the operand of state row ``row``); for a ScaledTensor read from
    its narrow ``_data`` (exact)."""
    if isinstance(t, ScaledTensor):
        return (fused_amax(t._data) if _fused_amax(t._data, row) else _amax_by_rows(t._data)) / t._scale
    return fused_amax(t) if _fused_amax(t, row) else _amax_by_rows(t)


def _amax_by_rows(t: torch.Tensor) -> torch.Tensor:
    """``formats.amax`` of a 2-D tensor as the max of its row maxima: the same value (max is exact, NaN
    propagates through both), but compiled, Inductor can reduce the rows in the kernel that casts ``t``
    (a reduction over the same (M, N) loop) instead of in a second pass over ``t``'s producer."""
    if t.dim() != 2 or t.numel() == 0:
        return amax(t)
    return t.abs().amax(dim=1).amax().float()


def _cast_pair(t: torch.Tensor, row: int, fmt: Format, scale: torch.Tensor, transpose: bool = True,
               with_amax: bool = False):
    """``(t_fp8, t_fp8_t, amax)``: the cast, its transposed copy (with ``transpose``, else None) and,
    on the fused path, ``t``'s amax (with ``with_amax``, else None) from the same pass. A
    ScaledTensor is read from ``_data`` (its power-of-two scale divides exactly, so the FP8 bits
    equal those of an FP32 weight holding the same values, and the amax that of those values).

    The plain path makes the transposed copy here too, next to the cast, with the operator
    ``transpose_fp8`` (module docstring: Inductor keeps it out of the cast's kernel), rather than in
    backward, where ``fp8_mm`` would copy."""
    in_scale = None
    if _narrow_master(t) and _fused(t, row):
        t_hp, in_scale = t._data, t._scale  # the kernel divides by the scale (2-byte reads, no FP32 copy)
    else:
        t_hp = t.dequantize() if isinstance(t, ScaledTensor) else t
    if in_scale is not None or _fused(t_hp, row):
        if torch.compiler.is_compiling():  # the kernel as one opaque operator (it always writes both)
            t_fp8, t_fp8_t, a = torch.ops.fp8lm.cast_transpose_amax(t_hp, scale, fmt.name, in_scale)
            return t_fp8, (t_fp8_t if transpose else None), (a if with_amax else None)
        return fused_cast(t_hp, fmt, scale, transpose=transpose, with_amax=with_amax, in_scale=in_scale)
    t_fp8 = quantize(t_hp, fmt, scale)
    return t_fp8, (transpose_fp8(t_fp8) if transpose else None), (amax(t_hp) if with_amax else None)


def _cast_scaled(layer: "Float8Linear", row: int, t: torch.Tensor, fmt: Format, update: bool, recompute: bool,
                 ready: bool, transpose: bool):
    """``(t_fp8, t_fp8_t, scale)`` for one operand: its scale, its cast, and the state update.

    On the fused path with a ready delayed scale, the amax for the history comes from the cast's own
    pass (one read of ``t`` instead of two); otherwise ``fp8_scale`` measures it first."""
    later = update and ready and layer.recipe.scaling == "delayed" and _fused(t, row)
    scale = layer.fp8_scale(row, t, fmt, update, recompute, ready, amax_later=later)
    t_fp8, t_fp8_t, a = _cast_pair(t, row, fmt, scale, transpose, with_amax=later)
    if later:
        layer.push_amax(row, a)
    return t_fp8, t_fp8_t, scale


def _fp8_forward(layer: Float8Linear, x2d, w_hp, update: bool, recompute: bool, out_dtype, ready: bool = False,
                 save: bool = True):
    """Quantize input and weight, run ``x @ w.T`` in FP8; return the output and what backward needs.

    What backward needs is ``x_fp8`` (M, K) and ``w_fp8`` (N, K) as their transposed copies viewed
    back as (M, K) / (N, K) column-major (the layouts the backward GEMMs read without another copy;
    a weight that arrived in FP8 is kept as it is). ``save=False`` (no backward will run) skips the
    transposed copies.
    """
    fmt = layer.recipe.fwd
    x_fp8, x_fp8_t, x_scale = _cast_scaled(layer, _X, x2d, fmt, update, recompute, ready, save)  # (M, K), (K, M)|None
    if isinstance(w_hp, ScaledTensor) and w_hp._data.dtype == fmt.dtype:  # arrived in FP8 (O3 all-gather)
        w_scale, w_fp8, w_fp8_t = w_hp._scale, w_hp._data, None
    else:
        w_fp8, w_fp8_t, w_scale = _cast_scaled(layer, _W, w_hp, fmt, update, recompute, ready, save)  # (N, K), (K, N)
    out = fp8_mm(x_fp8, x_scale.reciprocal(), w_fp8.t(), w_scale.reciprocal(), out_dtype,
                 emulate=layer.recipe.emulate, fast_accum=layer.recipe.fast_accum)  # (M, N)
    x_keep = x_fp8 if x_fp8_t is None else x_fp8_t.t()  # (M, K)
    w_keep = w_fp8 if w_fp8_t is None else w_fp8_t.t()  # (N, K)
    return out, x_keep, x_scale, w_keep, w_scale


class _Float8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hp, w_hp, bias, layer, out_dtype, update, recompute, ready, activation=None, save_fp8=False):
        x2d = x_hp.reshape(-1, x_hp.shape[-1])  # (M, K)
        out, x_fp8, x_scale, w_fp8, w_scale = _fp8_forward(layer, x2d, w_hp, update, recompute, out_dtype, ready)
        if bias is not None:
            out = out + bias.to(out_dtype)
        saved = ()  # gu = [g | u] (M, N) for SwiGLU's backward: as it is, or E4M3 rows and their scales (M, 1)
        if activation == "swiglu":
            saved = quantize_rows(out) if save_fp8 else (out,)
        ctx.save_for_backward(x_fp8, x_scale, w_fp8, w_scale, *saved)
        ctx.layer, ctx.update, ctx.ready, ctx.scaled_w = layer, update, ready, isinstance(w_hp, ScaledTensor)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x_hp.shape, x_hp.dtype, w_hp.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if activation == "swiglu":
            out = swiglu_reference(out)  # (M, N / 2)
        return out.reshape(*x_hp.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, x_scale, w_fp8, w_scale, *gu = ctx.saved_tensors
        layer = ctx.layer
        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # (M, N), or (M, N / 2) after a SwiGLU
        fmt = layer.recipe.grad
        if gu:  # the output gradient from SwiGLU's backward, cast in the same pass: (M, N), (N, M)
            g_fp8, g_fp8_t, g_scale = _swiglu_grad_cast(layer, gu, g2d, ctx.update, ctx.ready)
        else:
            g_fp8, g_fp8_t, g_scale = _cast_scaled(layer, _G, g2d, fmt, ctx.update, False, ctx.ready, True)
        g_inv, emulate = g_scale.reciprocal(), layer.recipe.emulate
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_mm(g_fp8, g_inv, w_fp8, w_scale.reciprocal(), ctx.x_dtype, emulate)  # (M, K)
            grad_x = grad_x.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            g_t = g_fp8.t() if g_fp8_t is None else g_fp8_t  # (N, M)
            out_w = torch.bfloat16 if ctx.scaled_w else ctx.w_dtype  # BF16 when it is cast to FP8 next
            grad_w = fp8_mm(g_t, g_inv, x_fp8, x_scale.reciprocal(), out_w, emulate)  # (N, K)
            if ctx.scaled_w:  # FP8 storage with a scale from this output's amax (1 byte per parameter)
                grad_w = _encode_wgrad(layer, grad_w)
        if ctx.needs_input_grad[2]:
            grad_b = g2d.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _encode_wgrad(layer: Float8Linear, grad_w: torch.Tensor) -> ScaledTensor:
    """``ScaledTensor.from_hp(grad_w, wgrad format)``: the same bits, on CUDA with Triton in one pass over
    ``grad_w`` whenever its power-of-two scale is the one of the layer's previous weight gradient
    (``fp8lm.ops.cast.encode_pow2``; ``fp8_wgrad_scale`` keeps that scale on the device)."""
    fmt = layer.wgrad_format
    if not _fusable(grad_w):
        return ScaledTensor.from_hp(grad_w, FORMATS[fmt].dtype)
    guess = layer.fp8_wgrad_scale
    if torch.compiler.is_compiling():
        data, scale = torch.ops.fp8lm.encode_pow2(grad_w, guess, fmt)
    else:
        data, scale = encode_pow2(grad_w, fmt, guess)
    guess.copy_(scale)
    return ScaledTensor(data, scale)


def _swiglu_grad_cast(layer: Float8Linear, saved: list, da: torch.Tensor, update: bool, ready: bool):
    """``(g_fp8, g_fp8_t, scale)`` of the gradient of ``gu = [g | u]`` (M, N) given that of ``silu(g) * u``
    (``da``, (M, N / 2)): SwiGLU's backward and the FP8 cast in one pass (``fp8lm.ops.swiglu``), the state
    updated as ``_cast_scaled`` does. ``saved`` is ``[gu]`` or, FP8-saved, ``[gu_fp8, gu_row_scales]``.
    A ready delayed scale takes the amax from the cast's pass; a scale that needs the amax first (current
    scaling, a delayed history's first step) gets it from an amax-only pass."""
    gu, gu_scale = saved[0], (saved[1] if len(saved) == 2 else None)
    fmt, scaling = layer.recipe.grad, layer.recipe.scaling
    from_history = scaling == "static" or (scaling == "delayed" and ready)
    later = update and ready and scaling == "delayed"
    amax_now = None if from_history else swiglu_grad_amax(gu, da, gu_scale)
    scale = layer.fp8_scale(_G, da, fmt, update, False, ready, amax_later=later, amax_now=amax_now)
    g_fp8, g_fp8_t, a = swiglu_backward_cast(gu, da, fmt, scale, with_amax=later, gu_scale=gu_scale)
    if later:
        layer.push_amax(_G, a)
    return g_fp8, g_fp8_t, scale
