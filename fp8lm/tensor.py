"""``ScaledTensor``: a float32 tensor stored as narrow ``_data`` and a float32 ``_scale``.

Numerics
--------
A ``ScaledTensor`` holds ``_data`` (``torch.float16``, ``float8_e4m3fn``, ``float8_e5m2`` or
``float32``) and a 0-dim float32 ``_scale``; its true value is ``_data.float() / _scale``. To
torch it *is* a float32 tensor (a wrapper subclass, ``dtype == torch.float32``), so it can be an
``nn.Parameter`` or a ``.grad``, and any aten op on it computes on the dequantized values.

Scales are powers of two, so rescaling is exact (multiplying by ``2**k`` only moves the exponent),
and they come from the tensor's largest magnitude (amax):

* FP8 ``_data`` (weight gradients): ``amax * scale`` lands in ``(fmt.max / 2, fmt.max]`` (448 for
  E4M3, 57344 for E5M2), the usual per-tensor current scaling with a power-of-two scale.
* FP16 ``_data`` (master weights): ``amax * scale`` lands in ``(2**7, 2**8]``. FP16 has 11 bits of
  precision across its normal range ``[2**-14, 65504]``; relative precision is the same at any
  scale, so the target only splits the range between *below* amax (values down to
  ``amax * 2**-22`` stay normal: a weight entry a million times smaller than the largest one keeps
  full precision) and *above* it (``2**8``-fold headroom: FP16 arithmetic done directly on
  ``_data``, e.g. a fused kernel adding an update or an FP16 GEMM reading it, cannot overflow even
  if the weight grows 256-fold). The scale is recomputed at every write, so growth never
  accumulates against it.
* FP32 ``_data``: scale 1 (an accumulation buffer, see below).

Rounding: round-to-nearest-even by default. ``stochastic=True`` (``from_hp``, ``assign_hp_``)
rounds each element to one of its two neighbouring representable values with probability
proportional to the distance to the other one, so ``E[rounded] == x``: an update much smaller than
half an ulp (FP16: 2**-11 relative, about 4.9e-4) is not lost but applied with the right
probability. The neighbours are computed exactly in float32 (``lo = floor(x / ulp) * ulp``; ``x / ulp``
is a power-of-two rescale), so the only bias left is the 2**-24 granularity of ``torch.rand``.

Non-finite values never become finite: a non-finite amax gives scale 1; FP16 keeps inf and NaN;
an FP8 cast turns every non-finite element into NaN (``formats.quantize``); FP32 keeps them.

What ops do (``__torch_dispatch__``):

* ``detach``/``alias`` return a ``ScaledTensor`` sharing ``_data`` and ``_scale``; ``clone`` and
  ``_to_copy`` to float32 (``.to(device)``) return a ``ScaledTensor`` with copies.
* p-norms of whole tensors (``linalg_vector_norm``, ``_foreach_norm``; p != 0) read ``_data`` (FP8
  widened to bfloat16, which holds it exactly) and divide by ``|scale|``: ``clip_grad_norm_`` over
  FP8 gradients makes no float32 copy of them. Float32 accumulation as for any float32 tensor.
* Every other out-of-place op computes on the dequantized values and returns plain tensors
  (views too: ``w.t()`` is a plain float32 copy, not a view of ``_data``).
* In-place ops (``copy_``, ``add_``, ``mul_``, ``_foreach_*_``, ``out=``) compute on the dequantized
  values and re-quantize the result into the same Python object:

  - ``copy_``/``zero_``/``fill_`` store in the tensor's home dtype (the one it was created with);
    ``copy_`` from a ``ScaledTensor`` of the same dtypes copies ``_data`` and ``_scale`` bit-exactly.
  - ``mul_``/``div_`` of FP8 ``_data`` by a scalar (a number or a 0-dim tensor, e.g. the factor of
    ``clip_grad_norm_``) only changes the scale: ``_scale / c`` (``_scale * c``). That is exact
    up to one float32 rounding of the scale, keeps the sign, zero, inf and NaN semantics of
    ``x * c``, and needs no host synchronization; the scale is then no longer a power of two.
  - Any other in-place op on FP8 ``_data`` (``grad += new_grad`` when autograd accumulates
    gradients of several backward passes) **widens** ``_data`` to float32 with scale 1: an
    accumulation buffer of 4 bytes per element that holds the exact float32 sum, so a micro-batch
    contributing 1e-4 of the others is not rounded away. ``zero_()`` or ``copy_`` bring ``_data``
    back to its home dtype; ``zero_grad(set_to_none=True)`` simply drops the tensor.
    ``storage_bytes`` counts what is allocated, widened or not.
  - On FP16 ``_data`` (master weights) other in-place ops re-quantize with round-to-nearest;
    updates smaller than half an ulp are lost there, which is why fp8lm's optimizer writes masters
    with ``assign_hp_(..., stochastic=True)``.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._pytree import tree_flatten, tree_map, tree_map_only

from fp8lm.formats import FORMATS, quantize, scale_from_amax

__all__ = ["ScaledTensor", "is_scaled", "storage_bytes", "DATA_DTYPES", "FP16_AMAX_TARGET", "round_stochastic"]

_FP8 = {f.dtype: f for f in FORMATS.values()}
DATA_DTYPES = (torch.float16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float32)
FP16_AMAX_TARGET = 2.0**8  # an FP16 master's amax lands in (2**7, 2**8]: see the module docstring
_MAX_SCALE = 2.0**100
# (mantissa bits, smallest normal exponent, largest finite value) of the narrow formats
_GRID = {
    torch.float16: (10, -14, 65504.0),
    torch.bfloat16: (7, -126, 3.3895313892515355e38),
    torch.float8_e4m3fn: (3, -6, 448.0),
    torch.float8_e5m2: (2, -14, 57344.0),
}
aten = torch.ops.aten
_SHARE = {aten.detach.default, aten.alias.default}
_RESET = {aten.copy_.default, aten.zero_.default, aten.fill_.Scalar, aten.fill_.Tensor,
          aten._foreach_zero_.default, aten._foreach_copy_.default}
_SCALAR_MUL = {aten.mul_.Tensor: False, aten.mul_.Scalar: False, aten.div_.Tensor: True, aten.div_.Scalar: True,
               aten._foreach_mul_.Scalar: False, aten._foreach_mul_.Tensor: False,
               aten._foreach_div_.Scalar: True, aten._foreach_div_.Tensor: True}  # op -> divides


def _pow2_scale(amax: torch.Tensor, target: float) -> torch.Tensor:
    """Power-of-two scale putting ``amax`` in ``(target / 2, target]``; 1 for a zero or non-finite amax."""
    amax = amax.float()
    ok = torch.isfinite(amax) & (amax > 0)
    scale = torch.where(ok, target / amax, torch.ones_like(amax)).clamp(min=1.0 / _MAX_SCALE, max=_MAX_SCALE)
    return torch.exp2(torch.floor(torch.log2(scale)))


def _scale_for(x_hp: torch.Tensor, data_dtype: torch.dtype) -> torch.Tensor:
    """The scale a tensor ``x_hp`` gets when stored as ``data_dtype`` (module docstring)."""
    if data_dtype == torch.float32:
        return torch.ones((), dtype=torch.float32, device=x_hp.device)
    amax = x_hp.abs().amax().float() if x_hp.numel() else torch.zeros((), device=x_hp.device)
    if data_dtype == torch.float16:
        return _pow2_scale(amax, FP16_AMAX_TARGET)
    return scale_from_amax(amax, _FP8[data_dtype], pow2=True)


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round float32 ``x`` to ``dtype`` stochastically: ``E[result] == x`` (module docstring).

    FP8 targets saturate at the format's largest value; non-finite elements take the
    round-to-nearest path (inf/NaN stay non-finite).
    """
    mant, emin, fmax = _GRID[dtype]
    x_in = x.float()
    x = x_in.clamp(-fmax, fmax) if dtype in _FP8 else x_in
    exp = torch.frexp(x).exponent - 1  # floor(log2|x|) for x != 0
    ulp = torch.exp2((exp.clamp(min=emin) - mant).float())
    lo = torch.floor(x / ulp) * ulp  # exact: a power-of-two rescale, a floor, the inverse rescale
    frac = (x - lo) / ulp  # exact, in [0, 1)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    rounded = lo + ulp * (u < frac).float()
    rounded = torch.where(torch.isfinite(x_in), rounded, x_in)  # inf and NaN stay non-finite
    if dtype in _FP8:
        return quantize(rounded, _FP8[dtype], torch.ones((), device=x.device))  # exact; non-finite -> NaN
    return rounded.to(dtype)


def _encode(x_hp: torch.Tensor, data_dtype: torch.dtype, stochastic: bool, generator,
            scale: torch.Tensor | None = None):
    """``(data, scale)`` representing ``x_hp`` in ``data_dtype`` (``scale``: given instead of chosen)."""
    if data_dtype not in DATA_DTYPES:
        raise ValueError(f"data_dtype {data_dtype} is not allowed; allowed: {', '.join(map(str, DATA_DTYPES))}")
    x_f32 = x_hp.detach()
    x_f32 = x_f32.dequantize() if isinstance(x_f32, ScaledTensor) else x_f32.float()
    scale = _scale_for(x_f32, data_dtype) if scale is None else scale.reshape(()).float()
    if data_dtype == torch.float32:  # a new tensor either way: never alias the caller's
        return (x_f32 * scale).contiguous(), scale  # exact for scale 1 (the chosen one)
    x_scaled = x_f32 * scale
    if stochastic:
        return round_stochastic(x_scaled, data_dtype, generator).contiguous(), scale
    if data_dtype in _FP8:
        return quantize(x_scaled, _FP8[data_dtype], torch.ones_like(scale)).contiguous(), scale
    return x_scaled.to(data_dtype).contiguous(), scale


class ScaledTensor(torch.Tensor):
    """A float32 tensor stored as ``_data`` (FP16, FP8 or FP32) and a float32 0-dim ``_scale``.

    The true value is ``_data.float() / _scale`` (see the module docstring for the numerics).
    Build one with ``ScaledTensor.from_hp(x, torch.float16)`` or ``ScaledTensor(data, scale)``.
    """

    _data: torch.Tensor
    _scale: torch.Tensor
    _home_dtype: torch.dtype
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, *, home_dtype: torch.dtype | None = None,
                requires_grad: bool = False):
        if data.dtype not in DATA_DTYPES:
            raise ValueError(f"ScaledTensor data dtype {data.dtype} is not allowed; "
                             f"allowed: {', '.join(map(str, DATA_DTYPES))}")
        if scale.dtype != torch.float32 or scale.dim() != 0 or scale.device != data.device:
            raise ValueError(f"ScaledTensor scale must be a float32 0-dim tensor on {data.device}, "
                             f"got {scale.dtype} shape {tuple(scale.shape)} on {scale.device}")
        data = data.contiguous()
        self = torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), dtype=torch.float32, device=data.device,
            requires_grad=requires_grad)
        self._data, self._scale = data, scale
        self._home_dtype = home_dtype or data.dtype
        return self

    @classmethod
    def from_hp(cls, x_hp: torch.Tensor, data_dtype: torch.dtype, *, stochastic: bool = False,
                generator: torch.Generator | None = None) -> "ScaledTensor":
        """Quantize a high-precision tensor into a new ``ScaledTensor`` with ``data_dtype`` storage."""
        data, scale = _encode(x_hp, data_dtype, stochastic, generator)
        return cls(data, scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The true value as a plain tensor: ``_data.float() / _scale`` in ``dtype``."""
        return (self._data.float() / self._scale).to(dtype)

    def assign_hp_(self, x_hp: torch.Tensor, *, stochastic: bool = False,
                   generator: torch.Generator | None = None, scale: torch.Tensor | None = None) -> "ScaledTensor":
        """Re-quantize ``x_hp`` into this tensor in place (new scale, same object, same ``_data`` dtype).

        The scale is chosen from ``x_hp``'s amax, or is ``scale`` when given (a one-element float32
        tensor: the caller answers for the range; FP16 masters are not saturated, FP8 data is).
        """
        if tuple(x_hp.shape) != tuple(self.shape):
            raise ValueError(f"assign_hp_: shape {tuple(x_hp.shape)} does not match {tuple(self.shape)}")
        if scale is not None and scale.numel() != 1:
            raise ValueError(f"assign_hp_: scale must have one element, got shape {tuple(scale.shape)}")
        data, scale = _encode(x_hp, self._data.dtype, stochastic, generator, scale)
        self._data.copy_(data)
        self._scale.copy_(scale)
        return self

    @property
    def data(self) -> "ScaledTensor":
        """A ``ScaledTensor`` alias without autograd history (shares ``_data`` and ``_scale``)."""
        return self.detach()

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        # torch's setter would swap the wrapper's metadata and leave _data behind (stale, wrong dtype)
        if value.dtype != torch.float32:
            raise ValueError(f"cannot set .data of a ScaledTensor to a {value.dtype} tensor: a ScaledTensor is "
                             "float32 (FP16/FP8 storage + scale); dequantize() it and build a plain tensor instead")
        new = value if isinstance(value, ScaledTensor) else ScaledTensor.from_hp(value, self._data.dtype)
        torch._C.TensorBase.data.__set__(self, new)  # shape and device of the wrapper
        self._data, self._scale, self._home_dtype = new._data, new._scale, new._home_dtype

    def __repr__(self) -> str:
        # Compilers repr their metadata (torch 2.11's Inductor on CUDA did, for a cache key): a fake
        # scale has no value, and reading one (float()) would fail the compile. Describe it instead.
        if is_fake(self._scale):
            return f"ScaledTensor(data={self._data.dtype}, scale=<fake>, shape={tuple(self.shape)})"
        return (f"ScaledTensor(data={self._data.dtype}, scale={float(self._scale):g}, shape={tuple(self.shape)}, "
                f"value={self.dequantize()})")

    def __tensor_flatten__(self):
        return ["_data", "_scale"], (self._home_dtype,)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        return ScaledTensor(inner_tensors["_data"], inner_tensors["_scale"], home_dtype=ctx[0])

    # ---- storage changes used by in-place ops -------------------------------------------------
    def _store_(self, value: torch.Tensor, reset: bool) -> None:
        """Put float32 ``value`` into this tensor after an in-place op (module docstring)."""
        if tuple(value.shape) != tuple(self.shape):
            raise RuntimeError(f"ScaledTensor: an in-place op changed the shape {tuple(self.shape)} -> "
                               f"{tuple(value.shape)}; dequantize() first")
        dtype = self._home_dtype if reset else self._data.dtype
        if dtype in _FP8 and not reset:
            dtype = torch.float32  # widen: an accumulation buffer
        data, scale = _encode(value, dtype, False, None)
        if data.dtype == self._data.dtype:
            self._data.copy_(data)
        else:
            self._data = data
        self._scale.copy_(scale)

    def _mul_scalar_(self, factor, divide: bool) -> None:
        """Multiply (divide) FP8 storage by a scalar through the scale only."""
        if isinstance(factor, torch.Tensor):
            factor = factor.dequantize() if isinstance(factor, ScaledTensor) else factor
            factor = factor.to(device=self._scale.device)
        new = self._scale * factor if divide else self._scale / factor
        self._scale.copy_(new)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SHARE:
            t = args[0]
            return ScaledTensor(t._data, t._scale, home_dtype=t._home_dtype)
        if func is aten.clone.default:
            t = args[0]
            return ScaledTensor(t._data.clone(), t._scale.clone(), home_dtype=t._home_dtype)
        if func is aten._to_copy.default:
            return _to_copy(*args, **kwargs)
        if func in _NORMS and _homogeneous(func, args, kwargs):
            return _norm(func, args, kwargs)
        if func._schema.is_mutable:
            return _inplace(func, args, kwargs)
        return func(*tree_map_only(ScaledTensor, lambda t: t.dequantize(), args),
                    **tree_map_only(ScaledTensor, lambda t: t.dequantize(), kwargs))


_NORMS = {aten.linalg_vector_norm.default, aten._foreach_norm.Scalar}


def _homogeneous(func, args, kwargs) -> bool:
    """A p-norm with p != 0 scales with |x| (``||x / s|| = ||x|| / |s|``); float32 results only."""
    p = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    dtype = kwargs.get("dtype")
    extra = (*args[2:], kwargs.get("dim"), kwargs.get("keepdim"))  # a dim or keepdim: the generic path
    return float(p) != 0.0 and dtype in (None, torch.float32) and not any(e for e in extra if e is not None)


def _scaled_norm(t, p):
    """The p-norm of a tensor's true value; a ScaledTensor's from its narrow ``_data`` and ``|scale|``:
    no float32 copy of it (``clip_grad_norm_`` over FP8 gradients: one bfloat16 read instead of a
    float32 write and read)."""
    if not isinstance(t, ScaledTensor):
        return torch.linalg.vector_norm(t, p)
    data = t._data.to(torch.bfloat16) if t._data.dtype in _FP8 else t._data  # bfloat16 holds FP8 exactly
    return torch.linalg.vector_norm(data, p, dtype=torch.float32) / t._scale.abs()


def _norm(func, args, kwargs):
    """``linalg_vector_norm`` / ``_foreach_norm`` (whole tensors, p != 0) without dequantizing."""
    p = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    if func is aten._foreach_norm.Scalar:
        return [_scaled_norm(t, p) for t in args[0]]
    return _scaled_norm(args[0], p)


def _to_copy(t: ScaledTensor, *, dtype=None, device=None, **kwargs):
    """``.to(...)``: float32 (or no dtype) keeps the type with copies; another dtype dequantizes."""
    if dtype in (None, torch.float32):
        device = t.device if device is None else device
        return ScaledTensor(t._data.to(device, copy=True), t._scale.to(device, copy=True), home_dtype=t._home_dtype)
    return aten._to_copy.default(t.dequantize(), dtype=dtype, device=device, **kwargs)


def _written_scaled(func, args, kwargs) -> list[ScaledTensor]:
    """The ScaledTensors an in-place op writes into (from the op's schema)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        leaves, _ = tree_flatten(value)
        out += [v for v in leaves if isinstance(v, ScaledTensor)]
    return out


def _is_scalar(x) -> bool:
    return isinstance(x, (int, float)) or (isinstance(x, torch.Tensor) and x.dim() == 0)


def _inplace(func, args, kwargs):
    """Run an in-place op on dequantized copies, then store the results back (module docstring)."""
    if func in _SCALAR_MUL and _is_scalar(args[1]):
        items = list(args[0]) if isinstance(args[0], (list, tuple)) else [args[0]]
        fp8 = [t for t in items if isinstance(t, ScaledTensor) and t._data.dtype in _FP8]
        rest = [t for t in items if not any(t is f for f in fp8)]
        if fp8:
            for t in fp8:
                t._mul_scalar_(args[1], _SCALAR_MUL[func])
            if rest:  # a foreach list: the other tensors take the ordinary path
                _inplace(func, (rest, *args[1:]), kwargs)
            return args[0] if func._schema.returns else None
    targets = _written_scaled(func, args, kwargs)
    if (func is aten.copy_.default and isinstance(args[0], ScaledTensor) and isinstance(args[1], ScaledTensor)
            and args[0]._data.dtype == args[1]._data.dtype and args[0]._home_dtype == args[1]._home_dtype
            and args[0].shape == args[1].shape):
        dst, src = args[0], args[1]
        dst._data.copy_(src._data)
        dst._scale.copy_(src._scale)
        return dst
    plain = {}

    def unwrap(t):
        if id(t) not in plain:
            plain[id(t)] = (t, t.dequantize())
        return plain[id(t)][1]

    result = func(*tree_map_only(ScaledTensor, unwrap, args), **tree_map_only(ScaledTensor, unwrap, kwargs))
    reset = func in _RESET
    for t in targets:
        t._store_(plain[id(t)][1], reset)
    if not func._schema.returns:
        return None
    back = {id(p): t for t, p in plain.values()}
    return tree_map(lambda r: back.get(id(r), r) if isinstance(r, torch.Tensor) else r, result)


def is_scaled(t) -> bool:
    """Whether ``t`` is a ``ScaledTensor`` (an ``nn.Parameter`` wrapping one counts)."""
    return isinstance(t, ScaledTensor)


def storage_bytes(t) -> int:
    """Bytes allocated by ``t``: a ScaledTensor's ``_data`` + ``_scale`` (widened or not); a plain
    tensor's ``numel * element_size``; 0 for None."""
    if t is None:
        return 0
    if isinstance(t, ScaledTensor):
        return storage_bytes(t._data) + storage_bytes(t._scale)
    return t.numel() * t.element_size()


torch.serialization.add_safe_globals([ScaledTensor])
