"""How fast can the FP8 cast kernel write both layouts? A GPU measuring aid for issue 5 (tenth session).

    python benchmarks/cast_sweep.py [--budget SECONDS]      (a CUDA GPU with Triton)

The layer-level probes of the ninth session put ``fp8lm.ops.cast._cast_kernel`` (64 x 128 tiles, 4 warps)
at 2.0 TB/s on 8192 x 8192 and 1.5-2.2 TB/s on the small x and w casts of 16384 x 2048->11264, against
2.6-2.8 TB/s on the large output gradients and about 3.0 TB/s for a BF16 copy. This sweep runs a
variant of the kernel (same numerics: ``_saturating_cast``, ``_tile_amax``) over the operands the
GEMM-level bench casts, with these knobs:

* tile (BLOCK_M x BLOCK_N) and warps;
* RELOAD: the transposed copy from the bytes just stored, read back after a barrier (the form the
  float32 path uses), instead of the tile transposed in registers;
* ORDER: which program index runs fastest (0: along M, as shipped; 1: along N; 2: groups of 8 row
  blocks, N fastest inside a group);
* TILES: row tiles per program (a loop; one partial amax per program);
* EVICT: input loads marked evict-first.

Stage 1 sweeps tiles x RELOAD; stage 2 sweeps ORDER x TILES x EVICT on the two best tiles of stage 1.
Every configuration's bytes (FP8, transposed FP8, amax) are compared with the shipped ``fused_cast``.
Times: CUDA events, median of 25 calls after warm-up (``fp8lm.bench.time_ms``), the partial-amax
reduction included. GB/s counts the bytes moved: input read, two FP8 copies written. Tables last.
"""
import argparse
import statistics
import time

import torch
import triton
import triton.language as tl

from fp8lm.bench import time_ms
from fp8lm.formats import get_format
from fp8lm.ops import cast as cast_mod

TILES_1 = [(64, 128, 4), (64, 128, 8), (128, 128, 4), (128, 128, 8), (128, 64, 4), (64, 256, 4), (64, 256, 8),
           (128, 256, 8), (256, 128, 8), (32, 256, 4)]
# (label, M, N, input dtype, FP8 format, input is a ScaledTensor's FP16 data)
SHAPES = [("x 16384x2048", 16384, 2048, torch.bfloat16, "e4m3", False),
          ("w 11264x2048", 11264, 2048, torch.float16, "e4m3", True),
          ("g 16384x11264", 16384, 11264, torch.bfloat16, "e5m2", False),
          ("x 8192x8192", 8192, 8192, torch.bfloat16, "e4m3", False),
          ("w 8192x8192", 8192, 8192, torch.float16, "e4m3", True)]


@triton.jit
def _cast_variant(x_ptr, scale_ptr, out_ptr, out_t_ptr, partial_ptr, in_scale_ptr, M, N, stride_m,
                  FMT_MAX: tl.constexpr, E4M3: tl.constexpr, IN_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, RELOAD: tl.constexpr, ORDER: tl.constexpr, TILES: tl.constexpr,
                  EVICT: tl.constexpr):
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M * TILES)
    n_n = tl.cdiv(N, BLOCK_N)
    if ORDER == 0:
        pid_m = pid % n_m
        pid_n = pid // n_m
    elif ORDER == 1:
        pid_n = pid % n_n
        pid_m = pid // n_n
    else:
        per_group = 8 * n_n
        first_m = (pid // per_group) * 8
        size = tl.minimum(n_m - first_m, 8)
        pid_m = first_m + (pid % per_group) % size
        pid_n = (pid % per_group) // size
    scale = tl.load(scale_ptr)
    a = tl.zeros([1], tl.float32)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    for t in tl.static_range(TILES):
        rm = (pid_m * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        ptrs = x_ptr + rm[:, None] * stride_m + rn[None, :]
        if EVICT:
            x = tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        else:
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if IN_SCALE:
            x = tl.div_rn(x, tl.load(in_scale_ptr))
        y8 = cast_mod._saturating_cast(x, scale, FMT_MAX, E4M3)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], y8, mask=mask)
        mask_t = (rn[:, None] < N) & (rm[None, :] < M)
        if RELOAD:
            tl.debug_barrier()
            row8 = out_ptr.to(tl.pointer_type(tl.uint8)) + rm[:, None] * N + rn[None, :]
            out_t8 = out_t_ptr.to(tl.pointer_type(tl.uint8)) + rn[:, None] * M + rm[None, :]
            tl.store(out_t8, tl.trans(tl.load(row8, mask=mask, other=0)), mask=mask_t)
        else:
            tl.store(out_t_ptr + rn[:, None] * M + rm[None, :], tl.trans(y8), mask=mask_t)
        ta = cast_mod._tile_amax(x)
        a = tl.where(a != a, a, tl.where(ta != ta, ta, tl.maximum(a, ta)))  # NaN stays NaN
    tl.store(partial_ptr + pid + tl.arange(0, 1), a)


def heavy(m, n, dtype):
    """Random values with heavy tails (a few large outliers), not only unit normals."""
    x = torch.randn(m, n, device="cuda") * (1 + 50 * torch.rand(m, n, device="cuda").pow(16))
    return x.to(dtype)


def variant(x, fmt, scale, in_scale, bm, bn, nw, reload, order, tiles, evict):
    m, n = x.shape
    out = torch.empty(m, n, dtype=fmt.dtype, device="cuda")
    out_t = torch.empty(n, m, dtype=fmt.dtype, device="cuda")
    programs = triton.cdiv(m, bm * tiles) * triton.cdiv(n, bn)
    partial = torch.empty(programs, dtype=torch.float32, device="cuda")
    ins = in_scale if in_scale is not None else scale

    def fn():
        _cast_variant[(programs,)](x, scale, out, out_t, partial, ins, m, n, x.stride(0), FMT_MAX=fmt.max,
                                   E4M3=fmt.name == "e4m3", IN_SCALE=in_scale is not None, BLOCK_M=bm, BLOCK_N=bn,
                                   RELOAD=reload, ORDER=order, TILES=tiles, EVICT=evict, num_warps=nw)
        return partial.amax()
    return fn, out, out_t


def med(fn):
    return statistics.median(time_ms(fn, 3, 25, "cuda"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; stops starting new shapes after it")
    args = parser.parse_args()
    t_start = time.time()
    torch.manual_seed(0)
    results = []  # (shape label, config label, us, GB/s, status)
    best = {}
    for label, m, n, dtype, fmt_name, scaled in SHAPES:
        if time.time() - t_start > args.budget:
            print(f"budget spent before {label}", flush=True)
            break
        fmt = get_format(fmt_name)
        x = heavy(m, n, dtype)
        in_scale = torch.tensor([2.0 ** 6], device="cuda") if scaled else None
        if scaled:
            x = (x.float() * 2.0 ** 6).clamp(-60000, 60000).to(dtype)
        scale = torch.tensor([2.0 ** -3], device="cuda")
        ref, ref_t, ref_a = cast_mod.fused_cast(x, fmt, scale, transpose=True, with_amax=True, in_scale=in_scale)
        gbytes = (x.element_size() + 2) * x.numel() / 1e9

        def shipped():
            return cast_mod.fused_cast(x, fmt, scale, transpose=True, with_amax=True, in_scale=in_scale)
        t = med(shipped)
        results.append((label, "shipped 64x128 w4", t * 1e3, gbytes / t * 1e3, "ref"))
        t = med(lambda: x.clone())
        results.append((label, "copy (x.clone)", t * 1e3, 2 * x.element_size() * x.numel() / 1e9 / t * 1e3, ""))

        def run(cfg):
            fn, out, out_t = variant(x, fmt, scale, in_scale, *cfg)
            a = fn()
            same = (torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
                    and torch.equal(out_t.view(torch.uint8), ref_t.view(torch.uint8))
                    and torch.equal(a, ref_a))
            t = med(fn)
            bm, bn, nw, reload, order, tiles, evict = cfg
            name = f"{bm}x{bn} w{nw} {'reload' if reload else 'regs'} o{order} t{tiles} e{int(evict)}"
            results.append((label, name, t * 1e3, gbytes / t * 1e3, "ok" if same else "DIFFERENT BYTES"))
            print(f"{label:16s} {name:34s} {t * 1e3:8.1f} us {gbytes / t:7.0f} GB/s {results[-1][4]}", flush=True)
            return t if same else float("inf")
        stage1 = sorted(((run((bm, bn, nw, reload, 0, 1, False)), (bm, bn, nw, reload))
                         for bm, bn, nw in TILES_1 for reload in (False, True)))
        for _, (bm, bn, nw, reload) in stage1[:2]:
            for order in (0, 1, 2):
                for tiles in (1, 2, 4):
                    for evict in (False, True):
                        if (order, tiles, evict) != (0, 1, False):
                            run((bm, bn, nw, reload, order, tiles, evict))
        rows = [r for r in results if r[0] == label and r[4] == "ok"]
        best[label] = min(rows, key=lambda r: r[2])
        del x, ref, ref_t
        torch.cuda.empty_cache()
    print("\n== cast kernel variants (us, GB/s of bytes moved), every shape")
    for r in results:
        print(f"{r[0]:16s} {r[1]:34s} {r[2]:8.1f} {r[3]:7.0f}  {r[4]}")
    print("\n== best per shape against the shipped kernel")
    for label, r in best.items():
        ship = next(s for s in results if s[0] == label and s[1].startswith("shipped"))
        print(f"{label:16s} shipped {ship[2]:7.1f} us {ship[3]:6.0f} GB/s   best {r[1]:34s} {r[2]:7.1f} us "
              f"{r[3]:6.0f} GB/s  ({ship[2] - r[2]:+.1f} us saved)")


if __name__ == "__main__":
    main()
