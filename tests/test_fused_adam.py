"""The fused Triton step of fp8lm.optim.AdamW (``fp8lm/optim/fused.py``) against its plain-torch twin.

* CPU (normal CI, no Triton needed): ``fused=True`` on a CPU parameter is a clear ValueError,
  ``fused=None`` on a CPU takes the plain path (bit for bit ``fused=False``).
* Triton's interpreter on a CPU (``TRITON_INTERPRET=1 python -m pytest tests/test_fused_adam.py``,
  needs Triton installed): small odd shapes, heavy-tailed gradients, several steps, both states.
  Every step starts both optimizers from the same state (the plain one's, loaded into the fused
  one), so a difference cannot hide behind, or snowball through, the steps before.
  Round-to-nearest: every scale equal, every stored FP8/FP16 value within one ulp of its format
  (and almost all bit-exact: torch's CPU ``sqrt`` is not correctly rounded on every CPU while
  the kernel's is, so a few FP32 values differ in their last bit), FP32 values within 4 FP32 ulps (+ 1e-8 for weights).
  Stochastic rounding: each stored value is one of the two grid neighbours of the exact FP32
  value, and the mean over many seeds is that exact value (per-element z-test).
* GPU (skipped without CUDA and Triton; not under the interpreter): the same at 2048x5632.
"""
import math

import pytest
import torch

from conftest import INTERPRET, needs_interpreter, needs_triton
from fp8lm.formats import E4M3
from fp8lm.optim import AdamW, fused_step_enabled, set_fused_step
from fp8lm.optim.adam import FP16, _Fp8Step, _update_bound
from fp8lm.tensor import ScaledTensor

# Weights: FP32 arithmetic on operands up to about 0.1 (the update lr / (1 - b1^t) * m / denom and the
# weight) may round differently by a few FP32 ulps of 0.1 (7.5e-9 each) before the FP16 rounding of a
# master (in its stored units: times its scale); when the update nearly cancels the weight, that
# exceeds one FP16 ulp of the small result. 4 ulps:
W_ATOL = 3e-8
# (mantissa bits, smallest normal exponent) of the stored formats
_GRID = {torch.float16: (10, -14), torch.float8_e4m3fn: (3, -6)}
# (state, master): O1 = fp32 state + FP16 master; O2 = fp8 state + FP16 master; fp8 state + FP32 params
CONFIGS = [("fp32", True), ("fp8", True), ("fp8", False), ("fp32", False)]
CONFIG_IDS = ["O1-master", "O2-master", "fp8-plain", "fp32-plain"]


# ---- helpers ---------------------------------------------------------------------------------


def _grad(shape, device, step: int) -> torch.Tensor:
    """Heavy-tailed gradients: log-uniform magnitudes 1e-6..1e2 times random signs, Student-t noise."""
    mags = 10.0 ** (torch.rand(shape) * 8 - 6)
    noise = torch.distributions.StudentT(torch.tensor(3.0)).sample(shape) * 0.3
    return (mags * (torch.randn(shape).sign() + noise) * (1 + 0.1 * step)).to(device)


def _make(state: str, master: bool, shape, device, fused: bool, rounding: str, **options):
    w0 = (torch.randn(shape) * 0.02).to(device)
    p = ScaledTensor.from_hp(w0, torch.float16) if master else w0.clone()
    p = torch.nn.Parameter(p)
    opt = AdamW([p], lr=3e-3, weight_decay=0.1, state=state, fused=fused, rounding=rounding,
                master_rounding=rounding, generator_seed=1234, **options)
    return p, opt


def _copy_param(dst: torch.Tensor, src: torch.Tensor) -> None:
    if isinstance(src, ScaledTensor):
        dst._data.copy_(src._data)
        dst._scale.copy_(src._scale)
    else:
        dst.data.copy_(src.data)


def _set_grad(p: torch.Tensor, g: torch.Tensor, scaled: bool) -> None:
    p.grad = ScaledTensor.from_hp(g, torch.float8_e4m3fn) if scaled else g.clone()


def _pair(state, master, shape, device, rounding="nearest", **options):
    """(plain param, plain optimizer, fused param, fused optimizer) starting equal."""
    pp, op = _make(state, master, shape, device, False, rounding, **options)
    pf, of = _make(state, master, shape, device, True, rounding, **options)
    _copy_param(pf, pp)
    return pp, op, pf, of


def _sync(pp, op, pf, of) -> None:
    """Start the fused optimizer from the plain one's parameter and state."""
    _copy_param(pf, pp)
    of.load_state_dict(op.state_dict())


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s grid at |x| (as FP32)."""
    mant, emin = _GRID[dtype]
    exp = torch.frexp(x.float()).exponent - 1
    return torch.exp2((exp.clamp(min=emin) - mant).float())


def _stored(t: torch.Tensor) -> torch.Tensor:
    return t._data if isinstance(t, ScaledTensor) else t.detach()


def _assert_close_stored(fused: torch.Tensor, plain: torch.Tensor, name: str, min_exact: float = 0.99,
                         atol: float = 0.0) -> None:
    """Equal NaN positions; within one ulp of the stored format (4 ulps for FP32); mostly bit-exact."""
    assert fused.dtype == plain.dtype and fused.shape == plain.shape, name
    a, b = fused.float(), plain.float()
    nan_a, nan_b = a.isnan(), b.isnan()
    assert torch.equal(nan_a, nan_b), f"{name}: NaN positions differ"
    a, b = a[~nan_a], b[~nan_b]
    if fused.dtype == torch.float32:
        # FP32 values carry the CPU's sqrt rounding (module docstring): 4 ulps, plus ``atol`` for the
        # weights, whose update (lr / (1 - b1^t) * |update| <= 0.1 here) brings its own error
        tol = 4 * torch.finfo(torch.float32).eps * torch.maximum(a.abs(), b.abs()) + atol
        min_exact = 0.0
    else:  # one ulp of the stored format, plus ``atol`` (in stored units) from the FP32 arithmetic before it
        tol = _ulp(torch.maximum(a.abs(), b.abs()), fused.dtype) + atol
    same_inf = (a == b)
    diff = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
    bad = diff > tol
    worst = ", ".join(f"fused {x:.9g} plain {y:.9g} tol {t:.3g}" for x, y, t in
                      zip(a[bad][:4].tolist(), b[bad][:4].tolist(), tol[bad][:4].tolist()))
    assert not bool(bad.any()), f"{name}: {int(bad.sum())} elements beyond tolerance ({worst})"
    exact = float(same_inf.float().mean()) if a.numel() else 1.0
    assert exact >= min_exact, f"{name}: only {exact:.4f} bit-exact"


def _compare(pp, op, pf, of, master: bool) -> None:
    """Scales equal, stored values within one ulp (``_assert_close_stored``)."""
    sp, sf = op.state[pp], of.state[pf]
    assert sp.keys() == sf.keys()
    for key in sp:
        if key == "step":
            assert torch.equal(sp[key], sf[key]) and sf[key].device.type == "cpu"
        elif key.endswith("_scale"):
            assert torch.equal(sp[key], sf[key]), f"{key}: {sp[key]} != {sf[key]}"
        else:
            _assert_close_stored(sf[key], sp[key], key)
    if master:
        assert torch.equal(pp._scale, pf._scale), f"master scale {pp._scale} != {pf._scale}"
    atol = W_ATOL * (float(pp._scale) if master else 1.0)
    _assert_close_stored(_stored(pf), _stored(pp), "weight", atol=atol)


def _run_nearest(state, master, shape, device, steps=4, grad_fn=_grad, **options):
    pp, op, pf, of = _pair(state, master, shape, device, "nearest", **options)
    for step in range(steps):
        _sync(pp, op, pf, of)
        g = grad_fn(shape, device, step)
        _set_grad(pp, g, master)
        _set_grad(pf, g, master)
        if master and step == 1:  # clip_grad_norm_-style: a scale that is not a power of two
            pp.grad.mul_(0.7)
            pf.grad.mul_(0.7)
        if master and step == 2:  # accumulation widens the FP8 gradient to FP32 data, scale 1
            pp.grad.add_(pp.grad.dequantize())
            pf.grad.add_(pf.grad.dequantize())
            assert pf.grad._data.dtype == torch.float32
        op.step()
        of.step()
        _compare(pp, op, pf, of, master)


# ---- the exact values (FP32, before rounding) of the plain path, for stochastic rounding --------


def _exact(opt: AdamW, p: torch.Tensor, grad: torch.Tensor) -> dict:
    """This step's FP32 results of the plain path before any rounding, from ``p``'s current state.

    sqrt is taken in float64 (correctly rounded, as the kernel's and CUDA's): torch's CPU sqrt is not.
    Returns r (sqrt(v)), m and w_new (flattened FP32), and (bound_q) for q.
    """
    group, state = opt.param_groups[0], opt.state[p]
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    step = int(state["step"].item()) + 1
    w = (p.dequantize() if isinstance(p, ScaledTensor) else p.detach().clone()).reshape(-1)
    w.mul_(1 - lr * wd)
    g = ScaledTensor.from_hp(grad, torch.float8_e4m3fn) if isinstance(p, ScaledTensor) else grad
    if group["state"] == "fp8":
        ctx = _Fp8Step(state, group, g, w, b1, b2, 0.0)
        m, v = ctx.moments_new(0, w.numel())
        bound_q, bound_update = _update_bound(b1, b2, step)
    else:
        g_hp = g.dequantize() if isinstance(g, ScaledTensor) else g
        m = state["exp_avg"].reshape(-1).lerp(g_hp.reshape(-1), 1 - b1)
        v = state["exp_avg_sq"].reshape(-1).mul(b2).addcmul(g_hp.reshape(-1), g_hp.reshape(-1), value=1 - b2)
        bound_q, bound_update = math.inf, math.inf
    r = v.double().sqrt().float()
    denom = r.div((1 - b2**step) ** 0.5).add(eps)
    step_size = lr / (1 - b1**step)
    if group["state"] == "fp8":
        w_new = w.add(m.div(denom).clamp(-bound_update, bound_update), alpha=-step_size)
    else:
        w_new = w.addcdiv(m, denom, value=-step_size)
    return dict(r=r, m=m, w_new=w_new, bound_q=bound_q)


def _neighbours(x: torch.Tensor, dtype: torch.dtype, saturate: float | None = None):
    """The two grid points of ``dtype`` around FP32 ``x`` (lo <= x < hi), as ``round_stochastic``."""
    if saturate is not None:
        x = x.clamp(-saturate, saturate)
    ulp = _ulp(x, dtype)
    lo = torch.floor(x / ulp) * ulp
    return lo, lo + ulp


def _assert_neighbour(stored: torch.Tensor, x: torch.Tensor, name: str, saturate=None, atol: float = 0.0) -> None:
    """Each stored value is a grid neighbour of x, or of x moved by 2 FP32 ulps either way, or within
    one grid step plus ``atol`` of x (the exact value is recomputed here with torch's ops, which may
    round FP32 steps differently; ``atol`` covers a result that nearly cancels, see ``W_ATOL``)."""
    y = stored.float().reshape(-1)
    ok = y.isnan() & x.isnan()
    for direction in (None, math.inf, -math.inf):
        to = torch.full_like(x, direction if direction is not None else 0.0)
        x_near = x if direction is None else torch.nextafter(torch.nextafter(x, to), to)
        lo, hi = _neighbours(x_near, stored.dtype, saturate)
        ok |= (y == lo) | (y == hi)
    if atol:  # or within one grid step plus atol of x
        ok |= (y - x).abs() <= _ulp(torch.maximum(y.abs(), x.abs()), stored.dtype) + atol
    lo, hi = _neighbours(x, stored.dtype, saturate)
    worst = ", ".join(f"stored {a:.9g} exact {b:.9g} neighbours {c:.9g} {d:.9g}" for a, b, c, d in
                      zip(y[~ok][:4].tolist(), x[~ok][:4].tolist(), lo[~ok][:4].tolist(), hi[~ok][:4].tolist()))
    assert bool(ok.all()), f"{name}: {int((~ok).sum())} of {ok.numel()} not a neighbour of the exact value ({worst})"


# ---- CPU (normal CI) ---------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRET, reason="the interpreter runs the fused step on CPUs")
@pytest.mark.parametrize("state", ["fp32", "fp8"])
def test_fused_true_on_cpu_is_a_clear_error(state):
    p = torch.nn.Parameter(torch.randn(8, 8))
    p.grad = torch.randn(8, 8)
    opt = AdamW([p], state=state, fused=True)
    with pytest.raises(ValueError, match="fused=True"):
        opt.step()


def test_fused_argument_is_checked():
    with pytest.raises(ValueError, match="fused"):
        AdamW([torch.nn.Parameter(torch.randn(3))], fused="yes")


@pytest.mark.parametrize("state,master", CONFIGS, ids=CONFIG_IDS)
def test_fused_none_on_cpu_is_the_plain_path(state, master, seed):
    shape = (37, 53)
    pa, oa = _make(state, master, shape, "cpu", None, "stochastic")
    pb, ob = _make(state, master, shape, "cpu", False, "stochastic")
    _copy_param(pb, pa)
    for step in range(3):
        g = _grad(shape, "cpu", step)
        _set_grad(pa, g, master)
        _set_grad(pb, g, master)
        oa.step()
        ob.step()
    assert torch.equal(_stored(pa), _stored(pb))
    if master:
        assert torch.equal(pa._scale, pb._scale)
    for key, value in oa.state[pa].items():
        other = ob.state[pb][key]
        assert value.dtype == other.dtype and torch.equal(value, other), key


# ---- Triton's interpreter on a CPU -----------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("shape", [(37, 53), (1000,)])
@pytest.mark.parametrize("state,master", CONFIGS, ids=CONFIG_IDS)
def test_interpreter_nearest_matches_plain(state, master, shape, seed):
    _run_nearest(state, master, shape, "cpu")


@needs_interpreter
@pytest.mark.parametrize("state,master", CONFIGS, ids=CONFIG_IDS)
def test_interpreter_adam_l2_and_large_beta1(state, master, seed):
    """decoupled=False (Adam's L2 term in the gradient) and beta1 < 0.5 (torch's other lerp formula)."""
    _run_nearest(state, master, (37, 53), "cpu", steps=3, decoupled=False, betas=(0.3, 0.95))


def _grad_nonfinite(shape, device, step):
    g = _grad(shape, device, step)
    flat = g.view(-1)
    flat[3], flat[flat.numel() // 2] = float("nan"), float("inf")
    return g


@needs_interpreter
@pytest.mark.parametrize("state,master", CONFIGS, ids=CONFIG_IDS)
def test_interpreter_nonfinite_gradients_propagate(state, master, seed):
    """NaN and inf gradients: the same NaN positions and the same (fallback) scales as the plain path."""
    _run_nearest(state, master, (37, 53), "cpu", steps=2, grad_fn=_grad_nonfinite)


def _stochastic_step(state, master, shape, device, seeds=1):
    """From one shared state: the plain (nearest) step, then ``seeds`` fused stochastic steps.

    Returns (exact values, plain optimizer/param, list of fused results per seed).
    """
    pp, op, _, _ = _pair(state, master, shape, device, "stochastic")
    g0 = _grad(shape, device, 0)
    _set_grad(pp, g0, master)
    op.step()  # a non-trivial state to start from
    g = _grad(shape, device, 1)
    _set_grad(pp, g, master)
    ex = _exact(op, pp, g)
    results = []
    for k in range(seeds):
        pf, of = _make(state, master, shape, device, True, "stochastic")
        _sync(pp, op, pf, of)
        of.generator_for("cpu").manual_seed(1000 + k)
        _set_grad(pf, g, master)
        of.step()
        results.append((pf, of))
    ref_p, ref_o = _make(state, master, shape, device, False, "nearest")
    _sync(pp, op, ref_p, ref_o)
    _set_grad(ref_p, g, master)
    ref_o.step()  # the plain path's scales (rounding does not change them)
    return ex, (ref_p, ref_o), results


def _check_stochastic_one(ex, ref, pf, of, master):
    ref_p, ref_o = ref
    sf, sr = of.state[pf], ref_o.state[ref_p]
    for key in sf:
        if key.endswith("_scale"):
            assert torch.equal(sf[key], sr[key]), key
    if master:
        assert torch.equal(pf._scale, ref_p._scale)
        _assert_neighbour(pf._data, ex["w_new"] * pf._scale, "master", atol=W_ATOL * float(pf._scale))
    if "exp_avg_scale" in sf:  # the FP8 state: r in FP16, q = m / r_stored in E4M3
        v_scale, m_scale = sf["exp_avg_sq_scale"], sf["exp_avg_scale"]
        _assert_neighbour(sf["exp_avg_sq"], ex["r"] * v_scale, "sqrt(v)")
        r_stored = sf["exp_avg_sq"].float().reshape(-1) / v_scale
        q = torch.where(r_stored > 0, ex["m"] / r_stored, torch.zeros(())).clamp(-ex["bound_q"], ex["bound_q"])
        _assert_neighbour(sf["exp_avg"], q * m_scale, "q", saturate=E4M3.max)


def _check_unbiased(stored: list[torch.Tensor], x: torch.Tensor, name: str) -> None:
    """Per element, the mean over seeds is within 5 sigma of the exact value (Bernoulli rounding)."""
    lo, hi = _neighbours(x, stored[0].dtype)
    frac = ((x - lo) / (hi - lo)).double()
    mean = torch.stack([s.float().reshape(-1) for s in stored]).double().mean(0)
    sigma = (hi - lo).double() * (frac * (1 - frac) / len(stored)).sqrt()
    bad = (mean - x.double()).abs() > 5 * sigma + 1e-6 * (hi - lo).double()
    assert float(bad.float().mean()) < 0.01, f"{name}: {int(bad.sum())} of {bad.numel()} elements biased"
    moved = (frac > 0.05) & (frac < 0.95)  # a nearest rounding would fail these: make sure there are some
    assert int(moved.sum()) > 50, name


@needs_interpreter
@pytest.mark.parametrize("state,master", CONFIGS[:3], ids=CONFIG_IDS[:3])
def test_interpreter_stochastic_neighbours(state, master, seed):
    ex, ref, results = _stochastic_step(state, master, (37, 53), "cpu", seeds=2)
    for pf, of in results:
        _check_stochastic_one(ex, ref, pf, of, master)


@needs_interpreter
@pytest.mark.parametrize("state,master", CONFIGS[:2], ids=CONFIG_IDS[:2])
def test_interpreter_stochastic_is_unbiased(state, master, seed):
    ex, ref, results = _stochastic_step(state, master, (1000,), "cpu", seeds=96)
    _check_unbiased([pf._data for pf, _ in results], ex["w_new"] * results[0][0]._scale, "master")
    if state == "fp8":
        v_scale = results[0][1].state[results[0][0]]["exp_avg_sq_scale"]
        _check_unbiased([of.state[pf]["exp_avg_sq"] for pf, of in results], ex["r"] * v_scale, "sqrt(v)")


@needs_interpreter
def test_interpreter_fused_and_plain_resume_each_other(seed):
    """state_dict() of a fused run loads into a plain one and back: same keys, dtypes, devices."""
    pf, of = _make("fp8", True, (37, 53), "cpu", True, "stochastic")
    for step in range(2):
        _set_grad(pf, _grad((37, 53), "cpu", step), True)
        of.step()
    pp, op = _make("fp8", True, (37, 53), "cpu", False, "stochastic")
    _copy_param(pp, pf)
    op.load_state_dict(of.state_dict())
    for key, value in of.state[pf].items():
        assert op.state[pp][key].dtype == value.dtype and torch.equal(op.state[pp][key], value), key
    _set_grad(pp, _grad((37, 53), "cpu", 2), True)
    op.step()


def _cached_master_amax(device: str, shape) -> None:
    """O1 masters: from step 2 on the old amax comes from the previous step's pass 2 (no amax kernel), bit
    for bit what the amax kernel gives; a write to the master between steps is seen, never a stale amax."""
    from fp8lm.optim import adam as adam_mod, fused as fused_mod
    launches = []
    real = fused_mod._master_amax_kernel

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    runs = [_make("fp32", True, shape, device, True, "nearest") for _ in range(2)]
    _copy_param(runs[1][0], runs[0][0])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_mod, "_master_amax_kernel", Counted())
        for step in range(4):
            g = _grad(shape, device, step)
            if step == 2:  # a write between steps (a checkpoint load, a user's in-place op) on both
                for p, _ in runs:
                    with torch.no_grad():
                        p.mul_(2.0)
            for i, (p, opt) in enumerate(runs):
                _set_grad(p, g, True)
                if i == 1:  # the second run never reuses anything
                    adam_mod._LAST_MASTER_STEP.pop(p, None)
                before = len(launches)
                opt.step()
                hit = len(launches) == before
                assert hit == (i == 0 and step in (1, 3)), f"run {i} step {step}: amax kernel launched: {not hit}"
            (pa, oa), (pb, ob) = runs
            assert torch.equal(pa._scale, pb._scale) and torch.equal(pa._data, pb._data), f"step {step}"
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(oa.state[pa][key], ob.state[pb][key]), key


@needs_interpreter
def test_interpreter_cached_master_amax():
    torch.manual_seed(0)
    _cached_master_amax("cpu", (37, 53))


# ---- GPU -----------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("state,master", CONFIGS, ids=CONFIG_IDS)
def test_gpu_nearest_matches_plain(state, master, seed):
    _run_nearest(state, master, (2048, 5632), "cuda", steps=3)


@needs_triton
@pytest.mark.parametrize("state,master", CONFIGS, ids=CONFIG_IDS)
def test_gpu_nonfinite_and_adam_l2(state, master, seed):
    _run_nearest(state, master, (1000, 515), "cuda", steps=2, grad_fn=_grad_nonfinite, decoupled=False,
                 betas=(0.3, 0.95))


@needs_triton
@pytest.mark.parametrize("state,master", CONFIGS[:3], ids=CONFIG_IDS[:3])
def test_gpu_stochastic_neighbours_and_unbiased(state, master, seed):
    ex, ref, results = _stochastic_step(state, master, (2048, 5632), "cuda", seeds=2)
    for pf, of in results:
        _check_stochastic_one(ex, ref, pf, of, master)
    if master:
        ex, ref, results = _stochastic_step(state, master, (4096,), "cuda", seeds=256)
        _check_unbiased([pf._data for pf, _ in results], ex["w_new"] * results[0][0]._scale, "master")


@needs_triton
def test_gpu_cached_master_amax():
    torch.manual_seed(0)
    _cached_master_amax("cuda", (2048, 5632))


@needs_triton
def test_gpu_fused_none_takes_the_fused_path_unless_switched_off():
    p = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
    p.grad = torch.randn(64, 64, device="cuda")
    opt = AdamW([p], state="fp8")
    assert fused_step_enabled() and opt._use_fused(p, opt.param_groups[0])  # on by default
    old = set_fused_step(False)
    try:
        assert not opt._use_fused(p, opt.param_groups[0])
    finally:
        set_fused_step(old)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float8_e4m3fn
    opt_block = AdamW([p], state="fp8", m_scaling="block")
    assert not opt_block._use_fused(p, opt_block.param_groups[0])
    with pytest.raises(ValueError, match="m_scaling"):
        AdamW([p], state="fp8", m_scaling="tensor", fused=True).step()


# ---- found_inf: a step skipped on the device ----------------------------------------------------------


def _found_inf_run(state, master, shape, device, fused, seed):
    """Two optimizers from the same start: A steps g1, a NaN gradient flagged by found_inf=1, then g2; B steps
    g1 and g2 without a flag. Round-to-nearest (no rounding seeds), so both must end bit-identical, step counts
    included: the flagged step changed nothing and its count was taken back."""
    torch.manual_seed(seed)
    pa, oa = _make(state, master, shape, device, fused, "nearest")
    pb, ob = _make(state, master, shape, device, fused, "nearest")
    _copy_param(pb, pa)
    g1, g2 = _grad(shape, device, 0), _grad(shape, device, 2)
    zero, one = torch.zeros(1, device=device), torch.ones(1, device=device)
    for p, o, plan in ((pa, oa, [(g1, zero), (g1 * float("nan"), one), (g2, zero)]), (pb, ob, [(g1, None), (g2, None)])):
        for g, flag in plan:
            _set_grad(p, g, master)
            o.step(found_inf=flag)
    return pa, oa, pb, ob


def _assert_same(pa, oa, pb, ob):
    assert torch.equal(_stored(pa).view(torch.uint8), _stored(pb).view(torch.uint8))
    if isinstance(pa, ScaledTensor):
        assert torch.equal(pa._scale, pb._scale)
    sa, sb = oa.state_dict()["state"][0], ob.state_dict()["state"][0]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].view(torch.uint8) if sa[k].dtype.itemsize == 1 else sa[k],
                           sb[k].view(torch.uint8) if sb[k].dtype.itemsize == 1 else sb[k]), k


@pytest.mark.parametrize("state,master", CONFIGS, ids=CONFIG_IDS)
def test_found_inf_skips_the_step_plain(state, master, seed):
    """The plain path reads found_inf on the host and changes nothing for a set flag."""
    pa, oa, pb, ob = _found_inf_run(state, master, (37, 53), "cpu", False, seed)
    _assert_same(pa, oa, pb, ob)
    with pytest.raises(ValueError, match="one element"):
        oa.step(found_inf=torch.zeros(2))


@needs_interpreter
@pytest.mark.parametrize("state,master", CONFIGS, ids=CONFIG_IDS)
def test_interpreter_found_inf_skips_on_the_device(state, master, seed):
    """The fused kernels store nothing for a set flag; the step count is taken back at the next step."""
    pa, oa, pb, ob = _found_inf_run(state, master, (37, 53), "cpu", True, seed)
    _assert_same(pa, oa, pb, ob)


@needs_triton
@pytest.mark.parametrize("state,master", CONFIGS, ids=CONFIG_IDS)
def test_gpu_found_inf_skips_on_the_device(state, master, seed):
    pa, oa, pb, ob = _found_inf_run(state, master, (1000, 515), "cuda", True, seed)
    _assert_same(pa, oa, pb, ob)
    assert not oa._pending_skips  # state_dict() settled them
