"""The one FP8 GEMM entry point: CUDA's _scaled_mm contract enforced on every device, odd shapes."""
import pytest
import torch

from conftest import randn_heavy
from fp8lm.formats import dequantize, quantize_dynamic
from fp8lm.ops import ScaledMMContractError, check_scaled_mm_args, fp8_mm

ONE = torch.ones((), dtype=torch.float32)


def _fp8(rows, cols, dtype=torch.float8_e4m3fn):
    return torch.randn(rows, cols).to(dtype)


@pytest.mark.parametrize("case", ["a_col_major", "b_row_major", "k_not_16", "n_not_16", "e5m2_pair",
                                  "scale_dtype", "scale_shape", "out_dtype", "not_fp8"])
def test_contract_rejects_what_cuda_refuses(case):
    a, b = _fp8(32, 64), _fp8(48, 64).t()  # legal: (32, 64) row-major x (64, 48) column-major
    sa, sb, out = ONE, ONE, torch.bfloat16
    check_scaled_mm_args(a, b, sa, sb, out)
    if case == "a_col_major":
        a = _fp8(64, 32).t()
    elif case == "b_row_major":
        b = _fp8(64, 48)
    elif case == "k_not_16":
        a, b = _fp8(32, 40), _fp8(48, 40).t()
    elif case == "n_not_16":
        b = _fp8(40, 64).t()
    elif case == "e5m2_pair":
        a, b = _fp8(32, 64, torch.float8_e5m2), _fp8(48, 64, torch.float8_e5m2).t()
    elif case == "scale_dtype":
        sa = ONE.double()
    elif case == "scale_shape":
        sb = torch.ones(48)
    elif case == "out_dtype":
        out = torch.int32
    elif case == "not_fp8":
        a = torch.randn(32, 64)
    with pytest.raises(ScaledMMContractError):
        check_scaled_mm_args(a, b, sa, sb, out)


@pytest.mark.parametrize("mkn", [(1, 16, 16), (37, 100, 33), (64, 48, 80), (5, 7, 3), (130, 256, 17)])
@pytest.mark.parametrize("pair", [("e4m3", "e4m3"), ("e5m2", "e4m3"), ("e4m3", "e5m2")])
@pytest.mark.parametrize("b_layout", ["row", "col"])
def test_fp8_mm_matches_float64_on_odd_shapes(seed, mkn, pair, b_layout):
    m, k, n = mkn
    a_fp8, sa = quantize_dynamic(randn_heavy(m, k, dist="student_t"), pair[0])
    b_hp = randn_heavy(k, n)
    b_fp8, sb = quantize_dynamic(b_hp if b_layout == "row" else b_hp.t().contiguous().t(), pair[1])
    out = fp8_mm(a_fp8, 1 / sa, b_fp8, 1 / sb, torch.float32)
    ref = dequantize(a_fp8, sa, torch.float64) @ dequantize(b_fp8, sb, torch.float64)
    assert out.shape == (m, n) and out.dtype == torch.float32
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 1e-5, rel  # operands are exact; only float32 accumulation differs
    emulated = fp8_mm(a_fp8, 1 / sa, b_fp8, 1 / sb, torch.float32, emulate=True)
    assert ((emulated.double() - ref).norm() / ref.norm()) < 1e-5


def test_every_scaled_mm_call_of_a_training_step_is_cuda_legal(monkeypatch):
    """Wrap torch._scaled_mm itself: every call made by an O1 forward+backward must pass the contract."""
    import fp8lm
    from fp8lm.ops import fp8_gemm_supported
    if not fp8_gemm_supported(torch.device("cpu")):
        pytest.skip("this torch's CPU FP8 GEMM is a slow reference kernel; fp8lm emulates instead")
    real, calls = torch._scaled_mm, []

    def checked(a, b, scale_a=None, scale_b=None, out_dtype=None, **kw):
        check_scaled_mm_args(a, b, scale_a, scale_b, out_dtype)
        calls.append((tuple(a.shape), tuple(b.shape), a.dtype, b.dtype))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    model = torch.nn.Sequential(torch.nn.Linear(50, 70), torch.nn.ReLU(), torch.nn.Linear(70, 24, bias=False))
    model, _ = fp8lm.initialize(model, level="O1", verbose=False)
    x = torch.randn(3, 11, 50, requires_grad=True)
    model(x).float().sum().backward()
    assert len(calls) == 6  # 2 layers x 3 GEMMs
    assert {(c[2], c[3]) for c in calls} == {(torch.float8_e4m3fn, torch.float8_e4m3fn),
                                             (torch.float8_e5m2, torch.float8_e4m3fn)}


def test_fp8_mm_refuses_mismatched_inner_dims():
    with pytest.raises(ScaledMMContractError, match="inner"):
        fp8_mm(_fp8(4, 47), ONE, _fp8(48, 16), ONE, torch.float32)


def test_no_fp8_device_falls_back_to_emulation_with_one_warning(monkeypatch, seed):
    import warnings

    from fp8lm.ops import gemm
    monkeypatch.setattr(gemm, "fp8_gemm_supported", lambda device: False)
    gemm._warn_emulation.cache_clear()
    monkeypatch.setattr(torch, "_scaled_mm", None)  # any real FP8 GEMM call would now fail
    a_fp8, sa = quantize_dynamic(torch.randn(24, 40), "e4m3")
    b_fp8, sb = quantize_dynamic(torch.randn(40, 24), "e4m3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [fp8_mm(a_fp8, 1 / sa, b_fp8, 1 / sb, torch.float32) for _ in range(3)]
    assert sum("emulated" in str(w.message) for w in caught) == 1
    ref = dequantize(a_fp8, sa, torch.float64) @ dequantize(b_fp8, sb, torch.float64)
    assert ((outs[0].double() - ref).norm() / ref.norm()) < 1e-5
    gemm._warn_emulation.cache_clear()
