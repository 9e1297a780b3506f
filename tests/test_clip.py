"""fp8lm.optim.clip_grad_norm_: torch's clip over FP8 ScaledTensor and plain gradients, against float64."""
import math

import pytest
import torch

from conftest import randn_heavy
from fp8lm.formats import E4M3, E5M2
from fp8lm.optim import clip_grad_norm_
from fp8lm.tensor import ScaledTensor
from test_norm import KERNEL_DEVICES, fp8_tensors


def _params(device, n_plain=3):
    """Parameters whose gradients are FP8 ScaledTensors (E4M3 and E5M2, odd shapes) and plain float32:
    (params, float64 total norm)."""
    params, ref_sq = [], 0.0
    for fmt in (E4M3, E5M2):
        datas, scales, ref = fp8_tensors(fmt, device, sizes=[(37, 100), (300, 515), (1,)])
        for d, s, r in zip(datas, scales, ref):
            p = torch.nn.Parameter(torch.zeros(d.shape, device=device))
            p.grad = ScaledTensor(d, s)
            params.append(p)
            ref_sq += float(r) ** 2
    for i in range(n_plain):
        g = randn_heavy(13 + i, 7, dist="student_t").to(device) * 1e-2  # (13 + i, 7)
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        params.append(p)
        ref_sq += float(g.double().square().sum())
    return params, math.sqrt(ref_sq)


def _snapshot(params):
    return [(p.grad._data.clone(), p.grad._scale.clone()) if isinstance(p.grad, ScaledTensor) else p.grad.clone()
            for p in params]


def _restore(params, snap):
    for p, s in zip(params, snap):
        p.grad = ScaledTensor(s[0].clone(), s[1].clone()) if isinstance(s, tuple) else s.clone()


@pytest.mark.parametrize("device", ["cpu"] + KERNEL_DEVICES)
@pytest.mark.parametrize("n_plain", [0, 3])
def test_matches_torch_and_float64(device, n_plain, seed):
    """Total norm against float64 and torch's clip; clipped gradients against torch's; FP8 bytes kept."""
    params, ref = _params(device, n_plain)
    max_norm = ref / 3.0  # clipping binds
    snap = _snapshot(params)
    total = clip_grad_norm_(params, max_norm)
    ours = [p.grad.detach().dequantize() if isinstance(p.grad, ScaledTensor) else p.grad.clone() for p in params]
    for p, s in zip(params, snap):
        if isinstance(s, tuple):
            assert torch.equal(p.grad._data.view(torch.uint8), s[0].view(torch.uint8))  # only the scale moved
    _restore(params, snap)
    total_torch = torch.nn.utils.clip_grad_norm_(params, max_norm)
    assert abs(float(total) - ref) / ref < 1e-4
    assert abs(float(total) - float(total_torch)) / ref < 1e-4
    for a, p in zip(ours, params):
        b = p.grad.detach().dequantize() if isinstance(p.grad, ScaledTensor) else p.grad
        assert torch.allclose(a, b, rtol=2e-4, atol=0), "clipped gradients differ from torch's"
    after = math.sqrt(sum(float(x.double().square().sum()) for x in ours))
    assert abs(after - max_norm) / max_norm < 1e-4


def test_no_clip_below_max_norm_keeps_gradients_bit_for_bit(seed):
    params, ref = _params("cpu")
    snap = _snapshot(params)
    clip_grad_norm_(params, ref * 10)
    for p, s in zip(params, snap):
        if isinstance(s, tuple):
            assert torch.equal(p.grad._data.view(torch.uint8), s[0].view(torch.uint8)) and torch.equal(p.grad._scale, s[1])
        else:
            assert torch.equal(p.grad, s)


def test_other_norms_and_kinds_take_torchs_path(seed):
    """norm_type inf, and a ScaledTensor gradient holding float32 data (an accumulation buffer), give
    exactly torch's results."""
    params, _ = _params("cpu")
    snap = _snapshot(params)
    total = clip_grad_norm_(params, 0.1, norm_type=float("inf"))
    _restore(params, snap)
    assert torch.equal(total, torch.nn.utils.clip_grad_norm_(params, 0.1, norm_type=float("inf")))
    p = torch.nn.Parameter(torch.zeros(5, 3))
    p.grad = ScaledTensor.from_hp(torch.randn(5, 3), torch.float32)
    q = torch.nn.Parameter(torch.zeros(5, 3))
    q.grad = ScaledTensor(p.grad._data.clone(), p.grad._scale.clone())
    assert torch.equal(clip_grad_norm_([p], 0.5), torch.nn.utils.clip_grad_norm_([q], 0.5))
    assert torch.equal(p.grad.dequantize(), q.grad.dequantize())


def test_nonfinite_total(seed):
    """A NaN gradient: NaN total (no error by default), RuntimeError with error_if_nonfinite."""
    params, ref = _params("cpu")
    params[0].grad._data.view(torch.uint8)[0, 0] = 0x7F  # an E4M3 NaN
    assert math.isnan(float(clip_grad_norm_(params, ref)))
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, ref, error_if_nonfinite=True)


def test_no_gradients_returns_zero():
    assert float(clip_grad_norm_([torch.nn.Parameter(torch.zeros(3))], 1.0)) == 0.0
