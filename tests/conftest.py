"""Shared test helpers: fresh random inputs every run (the seed is printed on failure)."""
import os
import random

import pytest
import torch

from fp8lm.ops.cast import triton_available

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(INTERPRET or not (torch.cuda.is_available() and triton_available("cuda")),
                                  reason="needs a CUDA GPU and Triton (not the interpreter)")
needs_interpreter = pytest.mark.skipif(not (INTERPRET and triton_available("cpu")),
                                       reason="needs Triton and TRITON_INTERPRET=1")
_INTERPRETER_CAST = {}

# Keep CPU runs deterministic in thread count (the CI machine has 2 cores).
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def seed(request):
    """A fresh seed per test, shown in the test id output when it fails."""
    s = int(os.environ.get("FP8LM_TEST_SEED") or random.SystemRandom().randrange(2**31))  # set it to replay a failure
    torch.manual_seed(s)
    request.node.user_properties.append(("seed", s))
    print(f"seed={s}")
    return s


def randn_heavy(*shape, dist="gauss", dtype=torch.float32, device="cpu"):
    """Gaussian, or Student-t with 4 degrees of freedom (heavy tails: infinite kurtosis, outliers).

    With 3 degrees of freedom a single outlier can carry most of a small tensor's energy, so an
    SQNR bar measures that one element's rounding (about 1 failure in 400 draws at 23 dB for E5M2
    gradients); 4 keeps the outliers while the bars stay meaningful.
    """
    if dist == "gauss":
        x = torch.randn(*shape, dtype=torch.float64)
    elif dist == "student_t":
        x = torch.distributions.StudentT(torch.tensor(4.0, dtype=torch.float64)).sample(shape)
    else:
        raise ValueError(dist)
    return x.to(dtype=dtype, device=device)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny ops ran several times (up to 20x) slower with 2 threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_runs():
    """All model-level training runs of ``tests/model_runs.py``, trained once per session."""
    from model_runs import run_all
    return run_all()


def interpreter_fp8_cast(y: torch.Tensor, fmt) -> torch.Tensor:
    """``y`` (float32 values already scaled and clamped) cast to ``fmt`` by a one-line Triton kernel under
    Triton's interpreter. The interpreter converts to FP8 in numpy, rounding unlike torch and hardware (a
    carry into the next binade, subnormals, NaN to a finite E4M3 value), so a kernel run there is checked
    against this cast of its twin's float32 values, not against torch's cast."""
    import triton
    import triton.language as tl

    if "kernel" not in _INTERPRETER_CAST:
        @triton.jit
        def plain_cast(y_ptr, o_ptr, n, IS_E4M3: tl.constexpr, BLOCK: tl.constexpr):
            r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            v = tl.load(y_ptr + r, mask=r < n)
            if IS_E4M3:
                tl.store(o_ptr + r, v.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=r < n)
            else:
                tl.store(o_ptr + r, v.to(tl.float8e5, fp_downcast_rounding="rtne"), mask=r < n)
        _INTERPRETER_CAST["kernel"] = plain_cast
    y = y.float().contiguous()
    out = torch.empty(y.shape, dtype=fmt.dtype)
    _INTERPRETER_CAST["kernel"][(triton.cdiv(y.numel(), 1024),)](y, out, y.numel(), IS_E4M3=fmt.name == "e4m3",
                                                                 BLOCK=1024)
    return out
