"""Fused amax + FP8 cast (+ transpose): the Triton kernels against their plain-torch twin, bit for bit.

* CPU: the twin against ``fp8lm.formats``, argument errors, and Float8Linear's fused-path wiring
  (transposed copies handed to backward) with the twin standing in for the kernels.
* GPU (skipped without CUDA and Triton): every output byte of the Triton kernels against the twin
  on inputs with heavy tails, sizes not divisible by the tile, and planted -0, inf, NaN, saturating
  and subnormal values; Float8Linear with the kernels switched on against the plain path.
* Triton's interpreter on a CPU (``TRITON_INTERPRET=1 python -m pytest tests/test_cast.py -k
  interpreter``, needs Triton installed): everything but the FP32->FP8 rounding itself, which the
  interpreter emulates differently from hardware (see ``test_interpreter_kernels_match_oracle``).
"""

import pytest
import torch

from conftest import INTERPRET, interpreter_fp8_cast, needs_interpreter, needs_triton, randn_heavy
from fp8lm.formats import E4M3, E5M2, amax, quantize, scale_from_amax
from fp8lm.ops.cast import (cast_reference, encode_pow2, encode_pow2_reference, fused_amax, fused_cast,
                            triton_available)

SHAPES = [(37, 100), (1000, 515), (2048, 4096)]


def _input(m, n, dtype, device, specials=True):
    x = randn_heavy(m, n, dist="student_t") * 3.0  # (m, n)
    if specials:
        flat = x.view(-1)
        idx = torch.randperm(flat.numel())[:12]
        flat[idx] = torch.tensor([-0.0, 0.0, 1e-30, -1e-30, 1e6, -1e6, 3e-5, -3e-5, 2.5, -2.5, 1e-8, 7.0])
    return x.to(dtype=dtype, device=device)


def _plant_nonfinite(x):
    flat = x.view(-1)
    flat[flat.numel() // 3] = float("inf")
    flat[flat.numel() // 2] = float("-inf")
    flat[-1] = float("nan")
    return x


def _same_bits(a, b):
    """Equal FP8 bytes, NaN positions compared as NaN (its sign bit is not specified)."""
    assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous() and b.is_contiguous()
    nan_a, nan_b = a.float().isnan(), b.float().isnan()
    assert torch.equal(nan_a, nan_b)
    ok = a.view(torch.uint8)[~nan_a] == b.view(torch.uint8)[~nan_b]
    assert bool(ok.all()), f"{int((~ok).sum())} of {ok.numel()} bytes differ"


def test_twin_is_formats_quantize(seed):
    x = _input(37, 100, torch.bfloat16, "cpu")
    scale = scale_from_amax(amax(x), E4M3)
    x_fp8, x_fp8_t, a = cast_reference(x, E4M3, scale, transpose=True, with_amax=True)
    _same_bits(x_fp8, quantize(x, E4M3, scale))
    _same_bits(x_fp8_t, quantize(x, E4M3, scale).t().contiguous())
    assert torch.equal(a, amax(x))


def test_cpu_runs_the_twin(seed):
    x = _input(64, 48, torch.float32, "cpu")
    scale = torch.tensor(4.0)
    got = fused_cast(x, "e5m2", scale, transpose=True, with_amax=True)
    ref = cast_reference(x, "e5m2", scale, transpose=True, with_amax=True)
    _same_bits(got[0], ref[0])
    _same_bits(got[1], ref[1])
    assert torch.equal(fused_amax(x), amax(x))


def _master(m, n, device):
    """An FP16 ScaledTensor master with heavy-tailed values (the weights' storage at O1/O2)."""
    from fp8lm.tensor import ScaledTensor
    return ScaledTensor.from_hp(_input(m, n, torch.float32, device, specials=False), torch.float16)


def test_in_scale_casts_the_dequantized_values(seed):
    """``in_scale``: the FP16 data of a ScaledTensor is cast as ``dequantize()`` gives it (pow2 and not)."""
    w = _master(37, 100, "cpu")
    for in_scale in (w._scale, w._scale * 3.0):
        w_hp = w._data.float() / in_scale
        for fmt in (E4M3, E5M2):
            scale = scale_from_amax(amax(w_hp), fmt)
            got = fused_cast(w._data, fmt, scale, transpose=True, with_amax=True, in_scale=in_scale)
            ref = cast_reference(w_hp, fmt, scale, transpose=True, with_amax=True)
            _same_bits(got[0], ref[0])
            _same_bits(got[1], ref[1])
            assert torch.equal(got[2], ref[2])
    with pytest.raises(ValueError, match="in_scale must have one element"):
        fused_cast(w._data, E4M3, torch.ones(()), in_scale=torch.ones(2))


TRITON_ON_CPU = pytest.param("triton on cpu", marks=pytest.mark.skipif(INTERPRET, reason="the interpreter runs it"))


@pytest.mark.parametrize("bad", ["3d", "int", "scale", "backend", TRITON_ON_CPU])
def test_bad_arguments_are_value_errors(bad):
    x = torch.randn(8, 8)
    args = dict(x_hp=x, fmt="e4m3", scale=torch.ones(()))
    if bad == "3d":
        args["x_hp"] = torch.randn(2, 8, 8)
    elif bad == "int":
        args["x_hp"] = torch.ones(8, 8, dtype=torch.int32)
    elif bad == "scale":
        args["scale"] = torch.ones(2)
    elif bad == "backend":
        args["backend"] = "cuda"
    else:
        args["backend"] = "triton"
    with pytest.raises(ValueError):
        fused_cast(**args)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_triton_cast_matches_twin_bit_for_bit(shape, dtype, fmt, seed):
    x = _input(*shape, dtype, "cuda")
    for scale in (scale_from_amax(amax(x), fmt), scale_from_amax(amax(x), fmt, pow2=True),
                  scale_from_amax(amax(x), fmt) * 64):  # the last one saturates the largest values
        ref = cast_reference(x, fmt, scale, transpose=True, with_amax=True)
        for trans_tile in (True, False):
            got = fused_cast(x, fmt, scale, transpose=True, with_amax=True, backend="triton", trans_tile=trans_tile)
            _same_bits(got[0], ref[0])
            _same_bits(got[1], ref[1])
            assert torch.equal(got[2], ref[2])
        x_fp8, x_fp8_t, a = fused_cast(x, fmt, scale, backend="triton")
        _same_bits(x_fp8, ref[0])
        assert x_fp8_t is None and a is None


@needs_triton
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_triton_nonfinite_inputs_become_nan(fmt, seed):
    x = _plant_nonfinite(_input(300, 130, torch.bfloat16, "cuda"))
    scale = torch.tensor(2.0, device="cuda")
    ref = cast_reference(x, fmt, scale, transpose=True, with_amax=True)
    got = fused_cast(x, fmt, scale, transpose=True, with_amax=True, backend="triton")
    _same_bits(got[0], ref[0])
    _same_bits(got[1], ref[1])
    assert int(got[0].float().isnan().sum()) == 3
    assert got[2].isnan() and ref[2].isnan()


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_amax_matches_formats_amax(shape, seed):
    x = _input(*shape, torch.bfloat16, "cuda")
    assert torch.equal(fused_amax(x, backend="triton"), amax(x))
    x_t = x.t()  # a column-major view: made contiguous first
    assert torch.equal(fused_amax(x_t, backend="triton"), amax(x_t))
    x[shape[0] // 2, shape[1] // 2] = float("inf")
    assert fused_amax(x, backend="triton") == float("inf")
    x[-1, -1] = float("nan")
    assert fused_amax(x, backend="triton").isnan()


@needs_triton
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("master", ["fp32", "fp16"])
@pytest.mark.parametrize("scaling", ["current", "delayed"])
@pytest.mark.parametrize("mode", [True, "grad"], ids=["all", "grad"])
def test_float8_linear_fused_path_is_bit_identical(master, scaling, compiled, mode, seed):
    """Float8Linear with the Triton casts (every operand, or the gradients only) gives the same output
    and gradients as the plain path, also compiled (AOTAutograd without Inductor: the kernels inside
    ``fp8lm::cast_transpose_amax``)."""
    from torch import nn

    from fp8lm.nn.linear import Float8Linear, set_fused_cast
    from fp8lm.scaling import Recipe

    def run(fused):
        torch.manual_seed(seed)
        layer = Float8Linear.from_linear(nn.Linear(200, 96, device="cuda"), Recipe(scaling=scaling), master=master)
        x = (randn_heavy(3, 50, 200, dist="student_t")).to("cuda", torch.bfloat16).requires_grad_()  # (B, T, K)
        g = randn_heavy(3, 50, 96, dist="student_t").to("cuda", torch.bfloat16) * 1e-3  # (B, T, N)
        call = torch.compile(layer, backend="aot_eager") if fused and compiled else layer
        old = set_fused_cast(mode if fused else False)
        try:
            outs = []
            for _ in range(3):  # later calls read the delayed history the first one wrote
                out = call(x)
                gx, gw = torch.autograd.grad(out, (x, layer.weight), g)
                gw = gw.dequantize() if hasattr(gw, "dequantize") else gw
                outs += [out, gx, gw]
        finally:
            set_fused_cast(old)
        return outs + [layer.fp8_amax_history.clone(), layer.fp8_last_scale.clone()]

    torch._dynamo.reset()
    for plain, fused in zip(run(False), run(True)):
        assert torch.equal(plain, fused)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode", [True, "grad"], ids=["all", "grad"])
def test_float8_linear_fused_wiring_on_cpu(monkeypatch, compiled, mode, seed):
    """The fused path's layouts (transposed copies viewed back for backward) and, once the delayed
    scales are ready (steps 2 and 3), the amaxes taken from the casts' own pass give the plain
    path's bits; compiled, the cast is the operator ``fp8lm::cast_transpose_amax`` (opaque without
    Triton, a ``triton_op`` whose body is traced with it).

    The twin stands in for the kernels (``fused_cast`` falls back to it on a CPU), so this checks
    Float8Linear's wiring everywhere; the GPU test above checks the kernels themselves.
    """
    from torch import nn

    import fp8lm.nn.linear as linear_mod
    from fp8lm.nn.linear import Float8Linear, set_fused_cast
    from fp8lm.scaling import Recipe

    import fp8lm.ops.cast as cast_mod
    calls = {"op": 0, "eager": 0, "push": 0}

    def counted(fn, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    def run(fused):
        torch.manual_seed(seed)
        layer = Float8Linear.from_linear(nn.Linear(200, 96), Recipe(scaling="delayed"), master="fp16")
        call = torch.compile(layer, backend="aot_eager") if fused and compiled else layer
        outs = []
        with monkeypatch.context() as mp:
            if fused:
                mp.setattr(linear_mod, "_fusable", lambda t: t.dim() == 2)  # the mode still decides
                mp.setattr(linear_mod, "_FUSED", {"cast": mode})
                mp.setattr(linear_mod, "fused_cast", counted(cast_mod.fused_cast, "eager"))
                mp.setattr(cast_mod, "fused_cast", counted(cast_mod.fused_cast, "op"))  # inside the operator
                if not compiled:  # (a Python side effect in backward would keep Dynamo from compiling it)
                    mp.setattr(Float8Linear, "push_amax", counted(Float8Linear.push_amax, "push"))
            for step in range(3):
                x = randn_heavy(3, 50, 200, dist="student_t").to(torch.bfloat16).requires_grad_()  # (B, T, K)
                g = randn_heavy(3, 50, 96, dist="student_t").to(torch.bfloat16) * 1e-3 * (step + 1)  # (B, T, N)
                out = call(x)
                gx, gw = torch.autograd.grad(out, (x, layer.weight), g)
                outs += [out, gx, gw.dequantize(), layer.fp8_amax_history.clone(), layer.fp8_last_scale.clone()]
        return outs

    torch._dynamo.reset()
    plain, fused = run(False), run(True)
    torch._dynamo.reset()
    assert len(plain) == len(fused) == 15
    per_step = 3 if mode is True else 1  # x, w and grad_out, or grad_out alone
    if compiled and cast_mod.triton is not None:  # a triton_op: its body is traced, once per compiled graph
        assert calls["op"] > 0 and calls["eager"] == 0, calls
    elif compiled:  # an opaque custom_op: it ran for every fused cast of every step, backward's included
        assert (calls["op"], calls["eager"]) == (3 * per_step, 0), calls
    else:  # every fused cast took the eager kernel call; steps 2 and 3 pushed amaxes from the casts
        assert (calls["op"], calls["eager"], calls["push"]) == (0, 3 * per_step, 2 * per_step), calls
    for i, (a, b) in enumerate(zip(plain, fused)):
        assert torch.equal(a, b), f"step {i // 5}, output {i % 5}"


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_triton_cast_of_fp16_master_matches_twin(shape, fmt, seed):
    """The kernel reading an FP16 master's data and dividing by its scale: every byte and the amax."""
    w = _master(*shape, "cuda")
    for in_scale in (w._scale, w._scale * 3.0):  # a master's power of two, and not one
        w_hp = w._data.float() / in_scale
        for scale in (scale_from_amax(amax(w_hp), fmt), scale_from_amax(amax(w_hp), fmt) * 64):
            ref = cast_reference(w_hp, fmt, scale, transpose=True, with_amax=True)
            got = fused_cast(w._data, fmt, scale, transpose=True, with_amax=True, backend="triton",
                             in_scale=in_scale)
            _same_bits(got[0], ref[0])
            _same_bits(got[1], ref[1])
            assert torch.equal(got[2], ref[2])


@pytest.mark.parametrize("shape", [(37, 100), (300, 129), (0, 5)])
def test_transpose_fp8_is_a_transposed_copy(shape, seed):
    """The byte transpose (Triton on CUDA, else torch) gives ``t().contiguous()``'s bytes; compiled too."""
    from fp8lm.ops.cast import transpose_fp8
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and triton_available("cuda") else [])
    for device in devices:
        for fmt in (E4M3, E5M2):
            x = quantize(_input(*shape, torch.float32, device, specials=False) if shape[0] else
                         torch.zeros(shape, device=device), fmt, torch.tensor(8.0, device=device))
            ref = x.t().contiguous()
            for fn in (transpose_fp8, torch.compile(lambda t: torch.ops.fp8lm.transpose_fp8(t), backend="aot_eager")):
                got = fn(x)
                assert got.shape == ref.shape and got.is_contiguous()
                assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    with pytest.raises(ValueError, match="2-D 1-byte"):
        transpose_fp8(torch.zeros(4, 4))


def _guesses(right):
    """Guessed scales for ``encode_pow2``: the right one (one pass), others (the second kernel must recast)."""
    return [right, right * 2, right * 0.5, torch.ones_like(right), right * 3]


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_encode_pow2_twin_is_scaled_tensor_from_hp(fmt, seed):
    """The twin stores what ``ScaledTensor.from_hp`` stores (the plain weight-gradient encoding), for
    heavy-tailed inputs, non-finite ones, all zeros and empty ones; the CPU path of ``encode_pow2`` is the twin."""
    from fp8lm.tensor import ScaledTensor
    cases = [_input(37, 100, torch.bfloat16, "cpu"), _plant_nonfinite(_input(20, 33, torch.bfloat16, "cpu")),
             torch.zeros(8, 16, dtype=torch.bfloat16), _input(64, 48, torch.float32, "cpu") * 1e-30,
             torch.zeros(0, 16, dtype=torch.bfloat16)]
    for x in cases:
        ref = ScaledTensor.from_hp(x, fmt.dtype)
        for got in (encode_pow2_reference(x, fmt), encode_pow2(x, fmt, torch.tensor(4.0))):
            _same_bits(got[0], ref._data)
            assert got[1].shape == () and torch.equal(got[1], ref._scale)
    with pytest.raises(ValueError, match="guess must have one element"):
        encode_pow2(cases[0], fmt, torch.ones(2))


@needs_triton
@pytest.mark.parametrize("shape", SHAPES + [(11264, 2048)])
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_triton_encode_pow2_matches_twin(shape, fmt, seed):
    """The one-pass encoding on the GPU: every byte and the scale of the twin, whether the guess was right
    (one pass) or not (recast), eager and as the compiled operator; with non-finite inputs too."""
    x = _input(*shape, torch.bfloat16, "cuda")
    for x in (x, _plant_nonfinite(x.clone())):
        ref = encode_pow2_reference(x, fmt)
        compiled = torch.compile(lambda t, g: torch.ops.fp8lm.encode_pow2(t, g, fmt.name), fullgraph=True)
        for guess in _guesses(ref[1]):
            for got in (encode_pow2(x, fmt, guess, backend="triton"), compiled(x, guess)):
                _same_bits(got[0], ref[0])
                assert torch.equal(got[1], ref[1])


@needs_interpreter
def test_interpreter_encode_pow2(seed):
    """``encode_pow2``'s two kernels under Triton's interpreter: a right guess leaves the first pass's bytes,
    a wrong one is recast (the oracle casts under the same interpreter, see the test below)."""
    x = _input(130, 65, torch.bfloat16, "cpu")
    for fmt in (E4M3, E5M2):
        scale = encode_pow2_reference(x, fmt)[1]
        x_f32 = x.float()
        ref = interpreter_fp8_cast((x_f32 * scale).clamp(-fmt.max, fmt.max) + (x_f32 - x_f32), fmt)
        for guess in _guesses(scale):
            x_fp8, got_scale = encode_pow2(x, fmt, guess, backend="triton")
            _same_bits(x_fp8, ref)
            assert torch.equal(got_scale, scale)


@needs_interpreter
def test_interpreter_transpose_kernel(seed):
    """The byte-transpose kernel under Triton's interpreter: tiles, edges and masks at odd sizes."""
    from fp8lm.ops.cast import _transpose_kernel
    x = torch.randint(0, 256, (300, 129), dtype=torch.uint8)
    out = torch.empty(129, 300, dtype=torch.uint8)
    _transpose_kernel[(3, 2)](x, out, 300, 129, BLOCK=128)
    assert torch.equal(out, x.t().contiguous())


@needs_interpreter
@pytest.mark.parametrize("shape", [(37, 100), (130, 65), (200, 129)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_interpreter_kernels_match_oracle(shape, dtype, seed):
    """Under Triton's interpreter: indexing, masks, tiles, transposes, NaN/inf handling and amax.

    The oracle is the twin's float32 pre-cast values, ``clamp(x * s) + (x - x)``, cast under the same
    interpreter (``conftest.interpreter_fp8_cast``: its FP8 rounding differs from torch's).
    """
    def oracle(x, fmt, scale):
        x_f32 = x.float()
        return interpreter_fp8_cast((x_f32 * scale).clamp(-fmt.max, fmt.max) + (x_f32 - x_f32), fmt)

    m, n = shape
    x = _plant_nonfinite(_input(m, n, dtype, "cpu"))
    for fmt in (E4M3, E5M2):
        for scale in (scale_from_amax(amax(x[x.isfinite()]), fmt), torch.tensor(64.0)):
            ref = oracle(x, fmt, scale)
            for trans_tile in (True, False):
                x_fp8, x_fp8_t, a = fused_cast(x, fmt, scale, transpose=True, with_amax=True, backend="triton",
                                               trans_tile=trans_tile)
                _same_bits(x_fp8, ref)
                _same_bits(x_fp8_t, ref.t().contiguous())
                assert a.isnan()
    w = _master(m, n, "cpu")  # an FP16 master's data divided by its scale inside the kernel
    scale = torch.tensor(3.0)
    # the master's power of two (a multiply in the kernel), then scales the kernel divides by: not a power
    # of two, a power of two whose reciprocal is not a normal float32, a subnormal one
    for in_scale in (w._scale, w._scale * 3.0, torch.tensor(2.0 ** 127), torch.tensor(2.0 ** -127)):
        x_fp8, x_fp8_t, a = fused_cast(w._data, E4M3, scale, transpose=True, with_amax=True, backend="triton",
                                       in_scale=in_scale)
        w_true = w._data.float() / in_scale
        ref = oracle(w_true, E4M3, scale)
        _same_bits(x_fp8, ref)
        _same_bits(x_fp8_t, ref.t().contiguous())
        assert torch.equal(a, amax(w_true))
    x_fin = torch.where(x.isfinite(), x, torch.ones_like(x))
    for t in (x_fin, x_fin.t()):
        assert torch.equal(fused_amax(t, backend="triton"), amax(t))
        assert torch.equal(fused_cast(t, E4M3, torch.tensor(1.0), with_amax=True, backend="triton")[2], amax(t))
    x_fin[m // 2, n // 2] = float("-inf")
    assert fused_amax(x_fin, backend="triton") == float("inf")
    assert fused_amax(x, backend="triton").isnan()


def _wgrad_runs(device, monkeypatch, fusable, compiled, steps=4):
    """Weight gradients (data, scale) and the layer's guess buffer over ``steps`` O1 backward passes (FP16
    master), with ``_encode_wgrad`` taking encode_pow2 (``fusable`` True) or ``ScaledTensor.from_hp`` (False)."""
    from torch import nn

    import fp8lm.nn.linear as linear_mod
    from fp8lm.scaling import Recipe
    torch.manual_seed(0)
    layer = linear_mod.Float8Linear.from_linear(nn.Linear(200, 96, device=device), Recipe(scaling="delayed"),
                                                master="fp16")
    call = torch.compile(layer, backend="aot_eager" if device == "cpu" else "inductor") if compiled else layer
    outs = []
    with monkeypatch.context() as mp:
        mp.setattr(linear_mod, "_fusable", lambda t: fusable)
        for step in range(steps):
            x = randn_heavy(3, 50, 200, dist="student_t").to(device, torch.bfloat16).requires_grad_()
            g = randn_heavy(3, 50, 96, dist="student_t").to(device, torch.bfloat16) * 1e-3 * 4.0 ** step
            gw = torch.autograd.grad(call(x), layer.weight, g)[0]  # (step: the scale moves by powers of two)
            outs.append((gw._data.clone(), gw._scale.clone(), layer.fp8_wgrad_scale.clone()))
    return outs


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_wgrad_encoding_wiring_on_cpu(monkeypatch, compiled, seed):
    """Float8Linear's weight gradient through ``encode_pow2`` (the twin stands in for the kernels on a CPU;
    compiled: the operator ``fp8lm::encode_pow2``) is ``ScaledTensor.from_hp``'s, and ``fp8_wgrad_scale``
    follows each gradient's scale (the next guess)."""
    torch._dynamo.reset()
    plain = _wgrad_runs("cpu", monkeypatch, False, compiled)
    torch._dynamo.reset()
    fused = _wgrad_runs("cpu", monkeypatch, True, compiled)
    torch._dynamo.reset()
    assert len({float(s) for _, s, _ in plain}) > 1  # the scale moved between steps
    for (d0, s0, g0), (d1, s1, g1) in zip(plain, fused):
        _same_bits(d0, d1)
        assert torch.equal(s0, s1) and torch.equal(g1, s1)
        assert float(g0) == 1.0  # the plain path leaves the guess alone


@needs_triton
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_triton_wgrad_encoding_is_from_hp(monkeypatch, compiled, seed):
    """On the GPU the layer's one-pass weight-gradient encoding (Inductor-compiled too) gives
    ``ScaledTensor.from_hp``'s bytes and scale at every step, the scale moving between steps."""
    torch._dynamo.reset()
    plain = _wgrad_runs("cuda", monkeypatch, False, compiled)
    torch._dynamo.reset()
    fused = _wgrad_runs("cuda", monkeypatch, True, compiled)
    torch._dynamo.reset()
    assert len({float(s) for _, s, _ in plain}) > 1
    for (d0, s0, _), (d1, s1, g1) in zip(plain, fused):
        _same_bits(d0, d1)
        assert torch.equal(s0, s1) and torch.equal(g1, s1)


def test_set_fused_cast_modes():
    """The three modes are taken and returned; anything else is refused with the allowed list."""
    from fp8lm.nn.linear import FUSED_CAST_MODES, set_fused_cast

    old = set_fused_cast("grad")
    try:
        assert set_fused_cast(True) == "grad" and set_fused_cast(False) is True
        for bad in ("all", 1, None):
            with pytest.raises(ValueError, match="must be one of"):
                set_fused_cast(bad)
        assert set_fused_cast(False) is False  # a refused mode left the setting alone
    finally:
        set_fused_cast(old)
    assert FUSED_CAST_MODES == (False, True, "grad")
