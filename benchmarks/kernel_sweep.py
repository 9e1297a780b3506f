"""Where the O1 step's FP8-only kernels lose time (a GPU measuring aid, issue 5): three sweeps, one process.

    python benchmarks/kernel_sweep.py        (a CUDA GPU with Triton)

1. ``cast``: the output-gradient cast kernel (``fp8lm.ops.cast._cast_kernel``: BF16 in, E5M2 out,
   transposed copy, tile amax) at llama-0.75b's gradient shapes, per tile shape and warp count;
   every configuration's bytes are checked against the shipped one's. GB/s counts 4 bytes per
   element (read 2, write 1 + 1); ``copy`` is a BF16 ``clone`` (also 4 bytes per element), the
   bandwidth ceiling of the same size.
2. ``wgrad``: the weight-gradient GEMM (``_scaled_mm``, E5M2 x E4M3) with a float32 output and its
   E4M3 ``ScaledTensor`` encoding (amax, scale, cast: compiled), against a BF16 GEMM output.
3. ``adam``: the O1 FP16-master AdamW kernel (``fp8lm.optim.fused._fp32_state_kernel``, pass 2 with
   the bound scale) on one flat tensor of 600M elements, against variants of its arithmetic:
   no random bits (round to nearest), one Philox ``rand4x`` per four elements, approximate
   division and square root.

Times: CUDA events, median of repeats after warm-up (``fp8lm.bench.time_ms``). Tables last.
"""
import statistics

import torch
import triton
import triton.language as tl

from fp8lm.bench import time_ms
from fp8lm.ops import cast as cast_mod
from fp8lm.optim import fused as F
from fp8lm.tensor import _encode

M = 16384
GRAD_N = (6144, 2048, 11264)
CAST_CONFIGS = [(64, 64, 4), (64, 64, 8), (128, 64, 4), (128, 64, 8), (64, 128, 4), (64, 128, 8),
                (128, 128, 4), (128, 128, 8), (32, 128, 4), (128, 32, 4)]


def med(fn, warmup=3, repeats=15):
    return statistics.median(time_ms(fn, warmup, repeats, "cuda"))


def cast_run(x, scale, bm, bn, nw):
    m, n = x.shape
    out = torch.empty(m, n, dtype=torch.float8_e5m2, device=x.device)
    out_t = torch.empty(n, m, dtype=torch.float8_e5m2, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    partial = torch.empty(grid, dtype=torch.float32, device=x.device)

    def fn():
        cast_mod._cast_kernel[grid](x, scale, out, out_t, partial, m, n, x.stride(0), FMT_MAX=57344.0, E4M3=False,
                                    TRANSPOSE=True, TRANS_TILE=True, AMAX=True, BLOCK_M=bm, BLOCK_N=bn,
                                    num_warps=nw)
        return partial.amax()
    return fn, out, out_t


def sweep_cast():
    rows = []
    for n in GRAD_N:
        x = (torch.randn(M, n, device="cuda") * torch.rand(M, n, device="cuda").pow(8) * 100).bfloat16()
        scale = torch.tensor([0.5], device="cuda")
        ref_fn, ref, ref_t = cast_run(x, scale, 64, 64, 4)
        a_ref = ref_fn()
        gb = 4 * x.numel() / 1e9
        t_copy = med(lambda: x.clone())
        rows.append((f"{M}x{n}", "copy", t_copy, gb / t_copy * 1e3, ""))
        for bm, bn, nw in CAST_CONFIGS:
            fn, out, out_t = cast_run(x, scale, bm, bn, nw)
            a = fn()
            same = (torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
                    and torch.equal(out_t.view(torch.uint8), ref_t.view(torch.uint8)) and torch.equal(a, a_ref))
            t = med(fn)
            rows.append((f"{M}x{n}", f"{bm}x{bn} w{nw}", t, gb / t * 1e3, "ok" if same else "DIFFERENT BYTES"))
        del x
    return rows


@torch.compile
def _encode_e4m3(w_hp):
    return _encode(w_hp, torch.float8_e4m3fn, False, None)


def sweep_wgrad():
    rows = []
    one = torch.ones((), device="cuda")
    for n, k in ((6144, 2048), (2048, 2048), (11264, 2048), (2048, 5632)):
        g_t = torch.randn(n, M, device="cuda").to(torch.float8_e5m2)  # (N, M) row-major
        x = torch.randn(k, M, device="cuda").to(torch.float8_e4m3fn).t()  # (M, K) column-major
        for dtype in (torch.float32, torch.bfloat16):
            def gemm():
                return torch._scaled_mm(g_t, x, one, one, out_dtype=dtype)
            def both():
                return _encode_e4m3(gemm())
            both()
            rows.append((f"{n}x{k}", str(dtype).replace("torch.", ""), med(gemm), med(both)))
    return rows


if triton is not None:
    @triton.jit
    def _o1_body(w_ptr, g_ptr, m_ptr, v_ptr, offs, mask, u, w_scale_old, w_scale, g_scale, decay, lerp_w, beta2,
                 one_minus_b2, neg_step_size, bc2, eps, RNG: tl.constexpr, FAST: tl.constexpr):
        w = F._div_by_scale(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32), w_scale_old) * decay
        g = F._div_by_scale(F._load_e4m3(g_ptr, offs, mask), g_scale)
        m = F._lerp(tl.load(m_ptr + offs, mask=mask, other=0.0), g, lerp_w, True)
        v = F._new_v(tl.load(v_ptr + offs, mask=mask, other=0.0), g, beta2, one_minus_b2)
        if FAST:
            w_new = tl.fma(neg_step_size, tl.fdiv(m, tl.sqrt(v) * bc2 + eps), w)
        else:
            w_new = tl.fma(neg_step_size, tl.div_rn(m, F._denom(tl.sqrt_rn(v), bc2, eps, True)), w)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(w_ptr + offs, F._encode_fp16_master(w_new, w_scale, u, RNG != 0), mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def _o1_variant(w_ptr, g_ptr, m_ptr, v_ptr, scales_ptr, n, seed, decay, lerp_w, beta2, one_minus_b2,
                    neg_step_size, bc2, eps, RNG: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        w_scale_old, w_scale, g_scale = tl.load(scales_ptr), tl.load(scales_ptr + 1), tl.load(scales_ptr + 2)
        if RNG == 2:  # one Philox call for four elements: four quarter-blocks
            Q: tl.constexpr = BLOCK // 4
            o = pid * BLOCK + tl.arange(0, Q)
            u0, u1, u2, u3 = tl.rand4x(seed, o)
            _o1_body(w_ptr, g_ptr, m_ptr, v_ptr, o, o < n, u0, w_scale_old, w_scale, g_scale, decay, lerp_w, beta2,
                     one_minus_b2, neg_step_size, bc2, eps, RNG, FAST)
            _o1_body(w_ptr, g_ptr, m_ptr, v_ptr, o + Q, o + Q < n, u1, w_scale_old, w_scale, g_scale, decay, lerp_w,
                     beta2, one_minus_b2, neg_step_size, bc2, eps, RNG, FAST)
            _o1_body(w_ptr, g_ptr, m_ptr, v_ptr, o + 2 * Q, o + 2 * Q < n, u2, w_scale_old, w_scale, g_scale, decay,
                     lerp_w, beta2, one_minus_b2, neg_step_size, bc2, eps, RNG, FAST)
            _o1_body(w_ptr, g_ptr, m_ptr, v_ptr, o + 3 * Q, o + 3 * Q < n, u3, w_scale_old, w_scale, g_scale, decay,
                     lerp_w, beta2, one_minus_b2, neg_step_size, bc2, eps, RNG, FAST)
        else:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            if RNG == 1:
                u = tl.rand(seed, offs)
            else:
                u = tl.zeros([BLOCK], tl.float32)
            _o1_body(w_ptr, g_ptr, m_ptr, v_ptr, offs, offs < n, u, w_scale_old, w_scale, g_scale, decay, lerp_w,
                     beta2, one_minus_b2, neg_step_size, bc2, eps, RNG, FAST)


def sweep_adam():
    n = 600_000_000
    dev = "cuda"
    w = (torch.randn(n, device=dev) * 64).half()
    g = torch.randn(n, device=dev).to(torch.float8_e4m3fn).view(torch.uint8)
    m = torch.randn(n, device=dev) * 1e-3
    v = torch.rand(n, device=dev) * 1e-6
    scratch = torch.zeros(16, device=dev)
    w_scale = torch.tensor([4.0], device=dev)
    g_scale = torch.tensor([1.0], device=dev)
    scales = torch.tensor([4.0, 4.0, 1.0], device=dev)
    args = dict(decay=1 - 3e-4 * 0.1, l2=0.0, lerp_w=0.1, beta2=0.95, one_minus_b2=0.05, neg_step_size=-3e-4,
                bc2=1.0, eps=1e-8)
    gb = 23 * n / 1e9
    rows = []

    def real(block=2048, nw=8, iters=F._AMAX_ITERS):
        grid = (triton.cdiv(n, block),)

        def fn():
            F._master_amax_kernel[(triton.cdiv(n, block * iters),)](w, w_scale, scratch, n, BLOCK=block,
                                                                    ITERS=iters, num_warps=nw)
            F._fp32_state_kernel[grid](w, w_scale, g, g_scale, m, v, scratch, scratch, n, 1234, **args, decay_abs=1.0,
                                       lr_bound=3e-4, PASS2=True, BOUND=True, CACHED=False, MASTER=True, GRAD_SCALED=True,
                                       GRAD_E4M3=True, HAS_DECAY=True, HAS_L2=False, LERP_SMALL=True,
                                       BC2_RECIP=True, CPU_ORDER=False, STOCH_W=True, BLOCK=block, num_warps=nw,
                                       enable_fp_fusion=False)
            w_scale.fill_(4.0)
        return fn

    def variant(rng, fast, block=2048, nw=8):
        grid = (triton.cdiv(n, block),)
        a = {k: val for k, val in args.items() if k != "l2"}

        def fn():
            _o1_variant[grid](w, g, m, v, scales, n, 1234, **a, RNG=rng, FAST=fast, BLOCK=block, num_warps=nw,
                              enable_fp_fusion=False)
        return fn

    def amax_only(iters):
        return lambda: F._master_amax_kernel[(triton.cdiv(n, 2048 * iters),)](w, w_scale, scratch, n, BLOCK=2048,
                                                                               ITERS=iters, num_warps=8)
    cases = [("shipped: amax kernel + pass 2", real()), ("amax 1 block per program + pass 2", real(iters=1)),
             ("amax kernel alone", amax_only(F._AMAX_ITERS)), ("amax kernel, 1 block per program", amax_only(1)),
             ("variant: rand per element", variant(1, False)), ("variant: rand4x per 4", variant(2, False)),
             ("variant: nearest (no rand)", variant(0, False)), ("variant: rand4x + fast div/sqrt", variant(2, True)),
             ("variant: rand4x, BLOCK 4096", variant(2, False, 4096, 8)),
             ("variant: rand4x, BLOCK 1024 w4", variant(2, False, 1024, 4))]
    for name, fn in cases:
        t = med(fn, 2, 10)
        rows.append((name, t, gb / t * 1e3))
    return rows


def main():
    cast_rows = sweep_cast()
    torch.cuda.empty_cache()
    wgrad_rows = sweep_wgrad()
    torch.cuda.empty_cache()
    adam_rows = sweep_adam()
    print("\n== cast kernel (BF16 -> E5M2 + transpose + amax), GB/s at 4 bytes per element")
    for shape, cfg, t, bw, ok in cast_rows:
        print(f"{shape:>12}  {cfg:<14} {t * 1e3:8.1f} us  {bw:7.0f} GB/s  {ok}")
    print("\n== weight-gradient GEMM (M = 16384) and its E4M3 encoding (compiled)")
    for shape, dtype, t_gemm, t_both in wgrad_rows:
        print(f"{shape:>12}  out {dtype:<9} gemm {t_gemm * 1e3:7.1f} us   gemm + encode {t_both * 1e3:7.1f} us")
    print("\n== O1 AdamW kernel, 600M elements (GB/s at 23 bytes per element)")
    for name, t, bw in adam_rows:
        print(f"{name:<36} {t:8.3f} ms  {bw:7.0f} GB/s")


if __name__ == "__main__":
    main()
