"""Which inputs the Triton cast kernel's transposed store gets right (a GPU debugging aid).

Usage: python benchmarks/cast_debug.py. For BF16 and FP32 inputs of several shapes and both stores
of ``fp8lm.ops.cast._cast_kernel`` (TRANS_TILE 0: strided stores, 1: the tile transposed on chip)
it calls the kernel directly (bypassing ``fused_cast``'s FP32 workaround), counts the bytes of the
FP8 tensor and of its transpose that differ from the plain-torch twin, and prints the first wrong
(row, col) of the transpose. Run on the H100 with Triton 3.6 (benchmarks/RESULTS.md): FP32 inputs
with sizes that are multiples of 16 got about a quarter of the transposed bytes wrong in both modes.
"""
import torch


from fp8lm.formats import E4M3, E5M2, amax, scale_from_amax
from fp8lm.ops import cast


def heavy(shape):
    """Student-t (3 degrees of freedom) values times 3, with a few planted zeros."""
    x = torch.distributions.StudentT(torch.tensor(3.0)).sample(shape) * 3.0
    x.view(-1)[:: 97] = 0.0
    return x


def run(x, fmt, mode):
    m, n = x.shape
    scale = scale_from_amax(amax(x), fmt)
    ref, ref_t, _ = cast.cast_reference(x, fmt, scale, transpose=True)
    out = torch.empty(m, n, dtype=fmt.dtype, device="cuda")
    out_t = torch.full((n, m), 0x55, dtype=torch.uint8, device="cuda").view(fmt.dtype)
    cast._cast_kernel[cast._grid(m, n)](x, scale.reshape(1).float(), out, out_t, out, m, n, x.stride(0),
                                        FMT_MAX=fmt.max, E4M3=fmt.name == "e4m3", TRANSPOSE=True, TRANS_TILE=bool(mode),
                                        AMAX=False, BLOCK_M=cast._BLOCK_M, BLOCK_N=cast._BLOCK_N)
    bad = (out.view(torch.uint8) != ref.view(torch.uint8)).sum().item()
    wrong_t = out_t.view(torch.uint8) != ref_t.view(torch.uint8)
    first = wrong_t.nonzero()[:1].tolist()
    return bad, int(wrong_t.sum()), first


def main():
    torch.manual_seed(0)
    print("dtype     shape        fmt   mode  bad out  bad out_t  first wrong in out_t")
    for dtype in (torch.bfloat16, torch.float32):
        for shape in ((2048, 4096), (4096, 2048), (1024, 1024), (128, 128), (64, 64), (1000, 515)):
            x = heavy(shape).to(dtype=dtype, device="cuda")
            for fmt in (E4M3, E5M2):
                for mode in (0, 1):
                    bad, bad_t, first = run(x, fmt, mode)
                    print(f"{str(dtype)[6:]:9s} {str(shape):12s} {fmt.name}  {mode:4d}  {bad:7d}  {bad_t:9d}  {first}",
                          flush=True)


if __name__ == "__main__":
    main()
