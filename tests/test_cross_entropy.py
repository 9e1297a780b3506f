"""Cross entropy from BF16 logits (``fp8lm.ops.cross_entropy``): the Triton kernels against the twin and float64."""
import pytest
import torch
import torch.nn.functional as F

from conftest import needs_interpreter, needs_triton, randn_heavy
from fp8lm.ops.cast import triton_available
from fp8lm.ops.cross_entropy import cross_entropy, cross_entropy_reference, set_fused_cross_entropy

IGNORE = -100


def _inputs(n, v, dtype, device="cpu"):
    """Heavy-tailed logits with hard rows: a large outlier, a constant row, a row mostly -inf, an ignored target."""
    z = (randn_heavy(n, v, dist="student_t") * 3).to(dtype)  # (N, V)
    t = torch.randint(0, v, (n,))
    z[0, t[0]] = 80.0  # one dominant logit: lse must not overflow
    z[1] = 0.5  # all equal: softmax is 1 / V
    z[2, : v - 7] = float("-inf")  # most of the vocabulary masked, including whole first blocks
    t[2] = v - 3
    t[3] = IGNORE
    return z.to(device), t.to(device)


def _loss_and_grad(fn, z, t):
    z = z.clone().requires_grad_()
    loss = fn(z, t)
    loss.backward()
    return loss.detach(), z.grad


def _assert_grad_close(grad, ref, t):
    """Within one ulp of ``grad``'s dtype (2^-7 relative for BF16; 1e-5 relative for float32), plus the
    absolute error of float32 math: ``exp(z - lse)`` carries |lse|'s ulps (lse near 80 has ulp 8e-6), which
    ``p - 1`` at the target keeps whole, times the scale 1 / n. NaN at the same places."""
    assert torch.equal(grad.isnan(), ref.isnan())
    rel = 2**-7 if grad.dtype == torch.bfloat16 else 1e-5
    atol = 2e-5 / int((t != IGNORE).sum())
    err = (grad.double() - ref.double()).abs()
    assert torch.all(err <= rel * ref.double().abs() + atol), float((err - rel * ref.double().abs()).max())


def _check_against_float64(z, t, loss, grad):
    z64 = z.double().requires_grad_()
    loss64 = F.cross_entropy(z64, t, ignore_index=IGNORE)
    loss64.backward()
    assert abs(loss.double() - loss64.detach()) <= 1e-5 * loss64.detach().abs()
    _assert_grad_close(grad, z64.grad, t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, v", [(9, 37), (13, 1003)])
def test_cross_entropy_matches_float64(seed, n, v, dtype):
    z, t = _inputs(n, v, dtype)
    loss, grad = _loss_and_grad(cross_entropy, z, t)
    assert grad.dtype == dtype and grad.shape == z.shape
    assert torch.all(grad[3] == 0)  # the ignored row
    _check_against_float64(z, t, loss, grad)


def test_cross_entropy_errors():
    z, t = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="2-D"):
        cross_entropy(z.view(2, 2, 10), t)
    with pytest.raises(ValueError, match="int64"):
        cross_entropy(z, t.int())
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        cross_entropy(z, t[:3])
    with pytest.raises(ValueError, match="floating-point"):
        cross_entropy(z.long(), t)
    with pytest.raises(ValueError, match="one device"):
        cross_entropy(z.to("meta"), t)


def test_cross_entropy_all_ignored_and_nan():
    z, t = torch.randn(4, 10), torch.full((4,), IGNORE)
    assert cross_entropy(z, t).isnan()
    z[1, 2] = float("nan")
    assert cross_entropy(z, torch.randint(0, 10, (4,))).isnan()


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cross_entropy_kernel_interpreter(seed, dtype):
    """The kernels (under Triton's interpreter, V above one block) against the twin and float64."""
    z, t = _inputs(6, 4096 + 905, dtype)
    loss, grad = _loss_and_grad(cross_entropy, z, t)
    loss_ref, grad_ref = _loss_and_grad(cross_entropy_reference, z, t)
    assert abs(loss - loss_ref) <= 1e-5 * loss_ref.abs()
    _assert_grad_close(grad, grad_ref, t)  # the interpreter's BF16 conversion may truncate: one ulp
    _check_against_float64(z, t, loss, grad)
    z_nan = z.clone()
    z_nan[4, 5] = float("nan")
    assert cross_entropy(z_nan, t).isnan()  # NaN propagates through the online maximum
    t_bad = t.clone()
    t_bad[5] = z.shape[1]  # out of range: the twin raises, the kernel returns NaN
    assert cross_entropy(z, t_bad).isnan()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("n, v", [(512, 32000), (77, 50257)])
def test_cross_entropy_kernel_gpu(seed, n, v):
    """On the GPU: kernel against twin (loss to a few float32 ulps, BF16 gradient within one ulp); compiled, the
    same kernels give the same gradient bits (the loss's sum over rows may round differently in Inductor's code)."""
    z, t = _inputs(n, v, torch.bfloat16, device="cuda")
    loss, grad = _loss_and_grad(cross_entropy, z, t)
    loss_ref, grad_ref = _loss_and_grad(cross_entropy_reference, z, t)
    assert abs(loss - loss_ref) <= 1e-5 * loss_ref.abs()
    _assert_grad_close(grad, grad_ref, t)
    _check_against_float64(z.cpu(), t.cpu(), loss.cpu(), grad.cpu())
    loss_c, grad_c = _loss_and_grad(torch.compile(cross_entropy, fullgraph=True), z, t)
    assert torch.equal(grad_c, grad)
    assert abs(loss_c - loss) <= 1e-6 * loss.abs()


def test_set_fused_cross_entropy_picks_the_path():
    """On: the kernels where Triton runs on the device (here: under the interpreter), the twin elsewhere; off: the twin."""
    z = torch.randn(5, 40, requires_grad=True)
    t = torch.randint(0, 40, (5,))
    fused_here = triton_available("cpu")
    assert (type(cross_entropy(z, t).grad_fn).__name__ == "_CrossEntropyBackward") == fused_here
    old = set_fused_cross_entropy(False)
    try:
        assert old is True
        assert type(cross_entropy(z, t).grad_fn).__name__.startswith("NllLoss")
    finally:
        assert set_fused_cross_entropy(old) is False
