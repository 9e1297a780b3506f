"""Cross entropy straight from BF16 logits: no float32 copies, one read forward, one read + one write backward.

A language model's loss over N tokens with logits ``z`` (N, V) and targets ``t`` is::

    lse_i  = log(sum_j exp(z_ij))                       (float32)
    loss   = sum_{i counted} (lse_i - z_i[t_i]) / n      n = number of rows whose t_i != ignore_index
    dz_ij  = (exp(z_ij - lse_i) - [j == t_i]) * g / n   (0 on rows not counted; g the loss's gradient)

The plain expression ``F.cross_entropy(logits.float(), t)`` (the twin, ``cross_entropy_reference``)
widens the logits into a float32 copy, keeps float32 log-probabilities for backward, and its backward
fills a float32 zero tensor, scatters into it, writes a float32 gradient and casts that back to the
logits' dtype. On ``llama-0.75b`` (16384 x 32000 logits: 1.05 GB in BF16) that took 8.8 ms of the
H100's step and 4.9 GiB of temporaries at its peak, for O0 and every FP8 level alike
(``benchmarks/xent_bench.py``, ``benchmarks/RESULTS.md``). Here, with Triton (1.2 ms, no temporaries
beyond the gradient):

* forward, one program per row: read ``z_i`` once in blocks of the vocabulary, keeping a running
  maximum ``m`` and a running sum ``s`` of ``exp(z - m)`` (rescaled by ``exp(m_old - m_new)`` when the
  maximum grows: the "online softmax"), then store ``lse_i = m + log(s)`` and the row's loss;
* backward, one program per row: read ``z_i`` again and write ``dz_i`` in the logits' dtype.

Saved for backward: the logits (which the model returns anyway), the targets and ``lse`` (4 bytes a
row). Bytes per logit: 2 read forward, 2 read and 2 written backward.

Numerics: every value is computed in float32 from logits widened exactly, as in the twin; the two
differ only in the order of float32 roundings (the twin's ``log_softmax`` subtracts the row maximum
before summing exponentials, as this does, but in one pass over the whole row). The loss agrees to a
few float32 ulps, each gradient element to one ulp of its dtype (it is rounded once, from float32,
in both). Non-finite logits give NaN, as the twin does. A target outside ``[0, V)`` that is not
``ignore_index``: the twin raises; the kernel, which cannot raise without a host synchronization,
makes that row's loss (and so the mean) NaN. Every row ignored: the mean is 0 / 0 = NaN, as torch's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fp8lm.ops.cast import _launch, _operator, triton, triton_available

__all__ = ["cross_entropy", "cross_entropy_reference", "set_fused_cross_entropy"]

_BLOCK, _WARPS = 4096, 16  # logits per program per iteration (H100 sweep: benchmarks/xent_bench.py); a program per row
_FUSED = {"on": True}  # set_fused_cross_entropy

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _xent_fwd_kernel(z_ptr, t_ptr, lse_ptr, loss_ptr, V, stride_z, ignore_index, BLOCK: tl.constexpr):
        """lse and loss of one row (module docstring)."""
        row = tl.program_id(0)
        z_row = z_ptr + row.to(tl.int64) * stride_z
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)  # running maximum
        s = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)  # running sum of exp(z - m)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep exp() finite
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), axis=0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.load(t_ptr + row)
        in_range = (t >= 0) & (t < V)
        z_t = tl.load(z_row + tl.where(in_range, t, 0)).to(tl.float32)
        loss = tl.where(in_range, lse - z_t, float("nan"))
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(t == ignore_index, 0.0, loss))

    @triton.jit
    def _xent_bwd_kernel(z_ptr, t_ptr, lse_ptr, g_ptr, dz_ptr, V, stride_z, stride_dz, ignore_index,
                         BLOCK: tl.constexpr):
        """dz of one row: (exp(z - lse) - onehot(t)) * g, g = the loss's gradient / n (0 if ignored)."""
        row = tl.program_id(0)
        z_row = z_ptr + row.to(tl.int64) * stride_z
        dz_row = dz_ptr + row.to(tl.int64) * stride_dz
        t = tl.load(t_ptr + row)
        lse = tl.load(lse_ptr + row)
        g = tl.where(t == ignore_index, 0.0, tl.load(g_ptr))
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            dz = (tl.exp(z - lse) - tl.where(cols == t, 1.0, 0.0)) * g
            tl.store(dz_row + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _check(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"cross_entropy: logits must be a 2-D floating-point (N, V) tensor, got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    if targets.shape != logits.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"cross_entropy: targets must be int64 of shape ({logits.shape[0]},), got "
                         f"{tuple(targets.shape)} {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"cross_entropy: targets are on {targets.device}, logits on {logits.device}; "
                         "both must be on one device")
    return logits if logits.stride(1) == 1 else logits.contiguous()


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The plain-torch twin: ``F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)`` (mean)."""
    _check(logits, targets)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def _block(v: int) -> int:
    return min(_BLOCK, triton.next_power_of_2(max(v, 16)))


def _options(logits: torch.Tensor) -> dict:
    return {"num_warps": _WARPS} if logits.is_cuda else {}


def _fake_forward(logits, targets, ignore_index):
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n,), dtype=torch.float32)


def _forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, v = logits.shape
    loss_rows = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _launch(_xent_fwd_kernel)[(n,)](logits, targets, lse, loss_rows, v, logits.stride(0), ignore_index,
                                        BLOCK=_block(v), **_options(logits))
    return loss_rows, lse


def _fake_backward(logits, targets, lse, g, ignore_index):
    return torch.empty_like(logits)


def _backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
              ignore_index: int) -> torch.Tensor:
    n, v = logits.shape
    dz = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n:
        _launch(_xent_bwd_kernel)[(n,)](logits, targets, lse, g, dz, v, logits.stride(0), dz.stride(0),
                                        ignore_index, BLOCK=_block(v), **_options(logits))
    return dz


if triton is not None:
    _forward_op = _operator("fp8lm::cross_entropy_forward", _fake_forward)(_forward)
    _backward_op = _operator("fp8lm::cross_entropy_backward", _fake_backward)(_backward)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        compiling = torch.compiler.is_compiling()
        loss_rows, lse = (_forward_op if compiling else _forward)(logits, targets, ignore_index)
        counted = (targets != ignore_index).sum().to(torch.float32)  # on the device: no sync
        ctx.save_for_backward(logits, targets, lse, counted)
        ctx.ignore_index = ignore_index
        return loss_rows.sum() / counted

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse, counted = ctx.saved_tensors
        g = (grad_loss.float() / counted).reshape(1)  # (1,) float32
        call = _backward_op if torch.compiler.is_compiling() else _backward
        return call(logits, targets, lse, g, ctx.ignore_index), None, None


def set_fused_cross_entropy(enabled: bool) -> bool:
    """Turn the Triton kernels of ``cross_entropy`` on (the default) or off (the twin everywhere: the plain
    expression, for A/B measurements such as ``fp8lm bench``'s ``plain loss`` rows); returns the old setting."""
    old, _FUSED["on"] = _FUSED["on"], bool(enabled)
    return old


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross entropy of ``logits`` (N, V) against ``targets`` (N,) int64, rows with ``ignore_index`` left out.

    The value of ``F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)``, and the
    gradient in the logits' dtype. On CUDA (and under Triton's interpreter) the Triton kernels run
    without float32 copies of the logits (module docstring); elsewhere, or after
    ``set_fused_cross_entropy(False)``, the twin runs. Compiled code
    calls the kernels through the operators ``fp8lm::cross_entropy_forward`` / ``_backward``.
    """
    logits = _check(logits, targets)
    if not (_FUSED["on"] and triton_available(logits.device)):
        return cross_entropy_reference(logits, targets, ignore_index)
    return _CrossEntropy.apply(logits, targets, int(ignore_index))
