"""SwiGLU's backward fused with the FP8 cast (``fp8lm.ops.swiglu``) and its use by ``Float8Linear``."""
import pytest
import torch
from torch import nn

from conftest import interpreter_fp8_cast, needs_interpreter, needs_triton, randn_heavy
from fp8lm.formats import E4M3, E5M2, amax, dequantize, quantize, scale_from_amax
from fp8lm.nn.activations import linear_swiglu, quantize_rows, swiglu
from fp8lm.nn.linear import Float8Linear, set_fused_swiglu
from fp8lm.ops.swiglu import swiglu_backward_cast, swiglu_backward_cast_reference, swiglu_grad_amax
from fp8lm.scaling import Recipe



def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


def _inputs(m, f, dtype=torch.bfloat16, device="cpu"):
    gu = (randn_heavy(m, 2 * f, dist="student_t") * 2).to(dtype=dtype, device=device)  # (M, 2F) = [g | u]
    da = (randn_heavy(m, f, dist="student_t") * 1e-3).to(dtype=dtype, device=device)  # (M, F)
    return gu, da


def _grad64(gu, da):
    g, u = gu.double().chunk(2, dim=-1)
    sig = torch.sigmoid(g)
    da = da.double()
    return torch.cat([da * u * sig * (1 + g * (1 - sig)), da * g * sig], dim=-1)


def _within_one_ulp(a, b, max_fraction=0.01):
    """FP8 tensors equal up to one step of the code (same sign, adjacent magnitudes) in at most
    ``max_fraction`` of the elements; NaN at the same places."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan_a, nan_b = a.float().isnan(), b.float().isnan()
    assert torch.equal(nan_a, nan_b)
    ca, cb = a.view(torch.uint8)[~nan_a].int(), b.view(torch.uint8)[~nan_b].int()
    zero = ((ca & 0x7F) == 0) & ((cb & 0x7F) == 0)  # +0 and -0
    diff = torch.where(zero, 0, (ca - cb).abs())
    assert int(diff.max()) <= 1, "bytes differ by more than one FP8 step"
    assert float((diff > 0).float().mean()) <= max_fraction


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("shape", [(37, 19), (130, 64)])
def test_twin_against_float64(fmt, shape, seed):
    """The twin's FP8 gradient, transposed copy and amax against SwiGLU's gradient in float64."""
    gu, da = _inputs(*shape)
    ref = _grad64(gu, da)  # (M, 2F)
    scale = scale_from_amax(amax(ref.float()), fmt)
    out, out_t, a = swiglu_backward_cast_reference(gu, da, fmt, scale, with_amax=True)
    assert out.shape == (shape[0], 2 * shape[1]) and torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8))
    assert torch.allclose(a.double(), ref.abs().max(), rtol=1e-6)
    assert _sqnr_db(ref, dequantize(out, scale)) > (28 if fmt is E4M3 else 22)
    _within_one_ulp(out, quantize(ref.float(), fmt, scale), max_fraction=0.005)  # float32 math: rare boundary cases
    assert torch.equal(swiglu_grad_amax(gu, da), a)
    _, _, none = swiglu_backward_cast(gu, da, fmt, scale)
    assert none is None


@pytest.mark.parametrize("shape", [(37, 19), (130, 64)])
def test_twin_reads_fp8_saved_gu(shape, seed):
    """An E4M3 ``gu`` with per-row scales (O2's FP8-saved activations): the twin's gradient is that of the
    dequantized ``gu`` (float64 reference), and equal to the twin run on the dequantized float32 ``gu``."""
    gu, da = _inputs(*shape)
    gu_fp8, gu_scale = quantize_rows(gu)
    gu_dq = dequantize(gu_fp8, gu_scale)  # (M, 2F) float32, exact
    ref = _grad64(gu_dq, da)
    scale = scale_from_amax(amax(ref.float()), E5M2)
    out, out_t, a = swiglu_backward_cast_reference(gu_fp8, da, E5M2, scale, with_amax=True, gu_scale=gu_scale)
    out_dq, _, a_dq = swiglu_backward_cast_reference(gu_dq, da, E5M2, scale, with_amax=True)
    assert torch.equal(out.view(torch.uint8), out_dq.view(torch.uint8)) and torch.equal(a, a_dq)
    assert torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8))
    assert _sqnr_db(ref, dequantize(out, scale)) > 22
    assert torch.equal(swiglu_grad_amax(gu_fp8, da, gu_scale), a)
    assert _sqnr_db(_grad64(gu, da), ref) > 20  # E4M3-saved gu: 3 mantissa bits of g and u
    with pytest.raises(ValueError, match="gu_scale must be float32 of shape"):
        swiglu_backward_cast(gu_fp8, da, E5M2, scale, gu_scale=gu_scale[:-1])
    with pytest.raises(ValueError, match="is for an E4M3 gu"):
        swiglu_grad_amax(gu, da, gu_scale)


def test_bad_arguments_are_value_errors():
    gu, da = _inputs(8, 6)
    with pytest.raises(ValueError, match=r"\(M, 2F\)"):
        swiglu_backward_cast(gu, da[:, :5], E4M3, torch.tensor(1.0))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        swiglu_grad_amax(gu.to(torch.float8_e4m3fn), da)
    with pytest.raises(ValueError, match="one element"):
        swiglu_backward_cast(gu, da, E4M3, torch.ones(2))
    layer = Float8Linear.from_linear(nn.Linear(16, 12, bias=True), Recipe())
    with pytest.raises(ValueError, match="without bias"):
        layer(torch.randn(3, 16), activation="swiglu")
    with pytest.raises(ValueError, match="unknown activation"):
        layer(torch.randn(3, 16), activation="gelu")
    with pytest.raises(ValueError, match="needs activation='swiglu'"):
        layer(torch.randn(3, 16), save_fp8=True)
    assert layer.fused_activations == ()
    with pytest.raises(ValueError, match="True or False"):
        set_fused_swiglu("yes")


def _run(layer, steps, fused, backend=None, save_fp8=False):
    """Training steps of ``linear_swiglu(layer, x, save_fp8)`` (compiled with ``backend`` if given): outputs,
    input and weight gradients, the amax histories."""
    old = set_fused_swiglu(fused)
    call = (lambda x: linear_swiglu(layer, x, save_fp8=save_fp8))
    call = torch.compile(call, backend=backend) if backend else call
    outs = []
    try:
        for x, g in steps:
            x = x.clone().requires_grad_()
            out = call(x)
            gx, gw = torch.autograd.grad(out, (x, layer.weight), g)
            outs.append((out, gx, gw.dequantize() if hasattr(gw, "dequantize") else gw,
                         layer.fp8_amax_history.clone()))
    finally:
        set_fused_swiglu(old)
    return outs


def _grads64(base_weight, steps, f):
    """Input and weight gradients of ``silu(g) * u`` of ``x @ w.T = [g | u]`` in float64, per step."""
    out = []
    for x, g in steps:
        x64 = x.double().requires_grad_()
        w64 = base_weight.detach().double().requires_grad_()
        gu = x64 @ w64.t()
        a64 = torch.nn.functional.silu(gu[..., :f]) * gu[..., f:]
        out.append(torch.autograd.grad(a64, (x64, w64), g.double()))
    return out


@pytest.mark.parametrize("save_fp8", [False, True], ids=["saved", "fp8_saved"])
@pytest.mark.parametrize("scaling", ["current", "delayed", "static"])
def test_float8_linear_swiglu_matches_unfused(scaling, save_fp8, seed):
    """``linear_swiglu`` through the fused operation against the projection and ``swiglu`` apart (the
    gradient in BF16 between them), with ``gate_up`` saved as it is or in FP8 (O2) on both paths: the same
    forward bits; gradients as close to float64 as the unfused path's, and close to them; amax histories
    within BF16 rounding (the fused cast rounds float32 values once, the unfused path BF16-rounded ones
    again)."""
    torch.manual_seed(seed)
    base = nn.Linear(48, 2 * 37, bias=False)
    steps = [(randn_heavy(2, 21, 48, dist="student_t").bfloat16(),
              (randn_heavy(2, 21, 37, dist="student_t") * 1e-2).bfloat16()) for _ in range(3)]
    runs = []
    for fused in (True, False):
        layer = Float8Linear.from_linear(nn.Linear(48, 2 * 37, bias=False), Recipe(scaling=scaling), master="fp16")
        layer.weight.data.copy_(base.weight.detach())  # same FP16 master for both runs
        assert layer.fused_activations == ("swiglu",)
        runs.append(_run(layer, steps, fused, save_fp8=save_fp8))
    for (out_f, gx_f, gw_f, hist_f), (out_u, gx_u, gw_u, hist_u), (gx64, gw64) in zip(*runs, _grads64(base.weight, steps, 37)):
        assert out_f.shape == (2, 21, 37) and torch.equal(out_f, out_u)
        for ref, fused, apart in ((gx64, gx_f, gx_u), (gw64, gw_f, gw_u)):
            assert _sqnr_db(ref, fused) > _sqnr_db(ref, apart) - 3  # (small tensors: the SQNR itself varies)
            if scaling == "current":  # (static: E5M2 at scale 1; delayed: heavy tails saturate the last step's scale)
                assert _sqnr_db(ref, fused) > (16 if save_fp8 else 18)
            assert _sqnr_db(apart.float(), fused.float()) > 15
        assert torch.allclose(hist_f, hist_u, rtol=2**-7)  # grad_out's amax: float32 against BF16 values


def test_fused_swiglu_compiled_equals_eager(seed):
    """Traced by ``torch.compile`` (the operator's CPU twin), the fused path gives the eager bits."""
    torch.manual_seed(seed)
    base = nn.Linear(32, 40, bias=False)
    steps = [(randn_heavy(3, 9, 32, dist="student_t").bfloat16(), randn_heavy(3, 9, 20).bfloat16() * 1e-2)
             for _ in range(3)]
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        layer = Float8Linear.from_linear(nn.Linear(32, 40, bias=False), Recipe(scaling="delayed"), master="fp16")
        layer.weight.data.copy_(base.weight.detach())
        runs.append(_run(layer, steps, True, "aot_eager" if compiled else None))
    torch._dynamo.reset()
    for a, b in zip(*runs):
        for t_a, t_b in zip(a, b):
            assert torch.equal(t_a, t_b)


def test_no_grad_and_unfused_model_path(seed):
    """Without grad the fused layer returns ``swiglu(layer(x))``; a plain ``nn.Linear`` takes ``swiglu``
    apart; an FP8 layer with O2's FP8-saved activations gets ``save_fp8`` through its own call."""
    torch.manual_seed(seed)
    layer = Float8Linear.from_linear(nn.Linear(32, 40, bias=False), Recipe(), master="fp16")
    x = randn_heavy(5, 32).bfloat16()
    with torch.no_grad():
        assert torch.equal(layer(x, activation="swiglu"), swiglu(layer(x)))
    plain = nn.Linear(32, 40, bias=False)
    assert torch.equal(linear_swiglu(plain, x.float()), swiglu(plain(x.float())))
    calls = []
    layer.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs), with_kwargs=True)
    linear_swiglu(layer, x)
    linear_swiglu(layer, x, save_fp8=True)
    assert calls == [{"activation": "swiglu"}, {"activation": "swiglu", "save_fp8": True}]  # hooks see the call


@pytest.mark.parametrize("save_fp8", [False, True], ids=["saved", "fp8_saved"])
def test_fused_swiglu_saves_gate_up_as_asked(save_fp8, seed):
    """What the fused operation keeps for backward: ``[g | u]`` (M, 2F) in BF16, or with ``save_fp8`` as
    E4M3 bytes and (M, 1) float32 row scales equal to ``quantize_rows``'s, and never both."""
    layer = Float8Linear.from_linear(nn.Linear(32, 40, bias=False), Recipe(), master="fp16")
    x = randn_heavy(2, 5, 32).bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_swiglu(layer, x, save_fp8=save_fp8)
    gate_up = [t for t in saved if t.shape == (10, 40)]
    assert [t.dtype for t in gate_up] == ([torch.float8_e4m3fn] if save_fp8 else [torch.bfloat16])
    if save_fp8:
        with torch.no_grad():
            ref_fp8, ref_scale = quantize_rows(layer(x).reshape(10, 40))
        assert torch.equal(gate_up[0].view(torch.uint8), ref_fp8.view(torch.uint8))
        assert any(t.shape == (10, 1) and torch.equal(t, ref_scale) for t in saved)


@needs_interpreter
@pytest.mark.parametrize("shape", [(37, 19), (130, 65)])
def test_interpreter_kernel_matches_twin(shape, seed):
    """The kernel under Triton's interpreter: tiles, masks, both halves, the transposed copy and amax.
    The interpreter's numpy FP8 conversion rounds unlike torch (subnormals, binade carries) and turns NaN
    into a finite E4M3 value: the oracle is the twin's float32 values cast by the interpreter itself, bytes
    are compared to one step (float32 ``exp`` may differ in the last bit) without NaN inputs, the
    transposed copy to the kernel's own row-major bytes exactly, and NaN is checked through the amax."""
    from fp8lm.ops import swiglu as mod
    gu, da = _inputs(*shape)
    m, f = da.shape
    grid = mod._grid(m, f, mod._BLOCK_M, mod._BLOCK_N)
    partial = torch.empty(grid, dtype=torch.float32)

    def launch(fmt, scale, out, out_t, cast=True):
        mod._swiglu_bwd_kernel[grid](gu, gu, da, scale.reshape(1), out, out_t, partial, m, f, gu.stride(0),
                                     da.stride(0), FMT_MAX=fmt.max, E4M3=fmt is E4M3, CAST=cast, AMAX=True,
                                     BLOCK_M=mod._BLOCK_M, BLOCK_N=mod._BLOCK_N, TRANS=cast, GU_FP8=False)
    dgu = mod._grad_hp(gu, da)  # the twin's float32 values
    for fmt in (E4M3, E5M2):
        scale = scale_from_amax(amax(dgu), fmt)
        ref = interpreter_fp8_cast((dgu * scale).clamp(-fmt.max, fmt.max) + (dgu - dgu), fmt)
        ref_a = amax(dgu)
        out, out_t = torch.empty(m, 2 * f, dtype=fmt.dtype), torch.empty(2 * f, m, dtype=fmt.dtype)
        launch(fmt, scale, out, out_t)
        _within_one_ulp(out, ref, max_fraction=0.02)
        assert torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8))
        assert torch.allclose(partial.amax(), ref_a, rtol=1e-5)
    gu_fp8, gu_scale = quantize_rows(gu)  # O2's FP8-saved gu: the kernel reads the bytes and row scales
    dgu = mod._grad_hp(gu_fp8, da, gu_scale)
    scale = scale_from_amax(amax(dgu), E5M2)
    out, out_t = torch.empty(m, 2 * f, dtype=E5M2.dtype), torch.empty(2 * f, m, dtype=E5M2.dtype)
    mod._swiglu_bwd_kernel[grid](gu_fp8.view(torch.uint8), gu_scale, da, scale.reshape(1), out, out_t, partial, m, f,
                                 gu_fp8.stride(0), da.stride(0), FMT_MAX=E5M2.max, E4M3=False, CAST=True, AMAX=True,
                                 BLOCK_M=mod._BLOCK_M, BLOCK_N=mod._BLOCK_N, TRANS=True, GU_FP8=True)
    _within_one_ulp(out, interpreter_fp8_cast((dgu * scale).clamp(-E5M2.max, E5M2.max), E5M2), max_fraction=0.02)
    assert torch.allclose(partial.amax(), amax(dgu), rtol=1e-5)
    gu.view(-1)[7] = float("nan")
    launch(E4M3, torch.tensor(1.0), partial, partial, cast=False)
    assert partial.amax().isnan()


@needs_triton
@pytest.mark.parametrize("shape", [(37, 19), (1000, 515), (4096, 2816)])
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_matches_twin(shape, fmt, dtype, seed):
    """On the GPU: the kernel's FP8 bytes within one step of the twin's (run on the GPU too), in at most
    1e-3 of the elements; the transposed copy exact; the amax to float32 rounding; NaN propagated."""
    gu, da = _inputs(*shape, dtype=dtype, device="cuda")
    scale = scale_from_amax(amax(_grad64(gu, da).float()), fmt)
    out, out_t, a = swiglu_backward_cast(gu, da, fmt, scale, with_amax=True)
    ref, _, ref_a = swiglu_backward_cast_reference(gu, da, fmt, scale, with_amax=True)
    _within_one_ulp(out, ref, max_fraction=1e-3)
    assert torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8))
    assert torch.allclose(a, ref_a, rtol=1e-5)
    assert torch.allclose(swiglu_grad_amax(gu, da), ref_a, rtol=1e-5)
    gu_fp8, gu_scale = quantize_rows(gu)  # O2's FP8-saved gu
    out, out_t, a = swiglu_backward_cast(gu_fp8, da, fmt, scale, with_amax=True, gu_scale=gu_scale)
    ref, _, ref_a = swiglu_backward_cast_reference(gu_fp8, da, fmt, scale, with_amax=True, gu_scale=gu_scale)
    _within_one_ulp(out, ref, max_fraction=1e-3)
    assert torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8))
    assert torch.allclose(a, ref_a, rtol=1e-5)
    assert torch.allclose(swiglu_grad_amax(gu_fp8, da, gu_scale), ref_a, rtol=1e-5)
    gu[0, 0] = float("nan")
    assert swiglu_grad_amax(gu, da).isnan()
    assert swiglu_backward_cast(gu, da, fmt, scale, with_amax=True)[2].isnan()


@needs_triton
@pytest.mark.parametrize("save_fp8", [False, True], ids=["saved", "fp8_saved"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_triton_float8_linear_swiglu_matches_unfused(compiled, save_fp8, seed):
    """On the GPU, eager and compiled, ``gate_up`` saved as it is or in FP8: the fused layer's gradients
    against the unfused path's."""
    torch.manual_seed(seed)
    base = nn.Linear(256, 2 * 384, bias=False, device="cuda")
    steps = [(randn_heavy(4, 64, 256, dist="student_t", device="cuda").bfloat16(),
              (randn_heavy(4, 64, 384, dist="student_t", device="cuda") * 1e-2).bfloat16()) for _ in range(3)]
    runs = []
    for fused in (True, False):
        torch._dynamo.reset()
        layer = Float8Linear.from_linear(nn.Linear(256, 2 * 384, bias=False, device="cuda"), Recipe(scaling="delayed"),
                                         master="fp16")
        layer.weight.data.copy_(base.weight.detach())
        runs.append(_run(layer, steps, fused, "inductor" if compiled else None, save_fp8=save_fp8))
    torch._dynamo.reset()
    for (out_f, gx_f, gw_f, hist_f), (out_u, gx_u, gw_u, hist_u), (gx64, gw64) in zip(
            *runs, _grads64(base.weight, steps, 384)):
        assert torch.equal(out_f, out_u)
        for ref, fused, apart in ((gx64, gx_f, gx_u), (gw64, gw_f, gw_u)):
            assert _sqnr_db(ref, fused) > _sqnr_db(ref, apart) - 3
            assert _sqnr_db(apart.float(), fused.float()) > 15
        assert torch.allclose(hist_f, hist_u, rtol=2**-7)
