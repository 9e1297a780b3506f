"""Does ``torch._scaled_mm`` slow down when a scale is a view at an offset into a larger tensor? (GPU aid)

    python benchmarks/scale_align.py

Times the forward GEMM of a 16384 x 2048 -> 11264 FP8 linear with its two scales as 0-d tensors of their
own, and as views of a (3,) float32 tensor at element offsets 1 and 2 (4 and 8 bytes), medians of 50
CUDA-event timings each, interleaved; the outputs are checked equal. A variant that cuBLASLt refuses is
reported with its error (seen on the H100, torch 2.11 + CUDA 13: the views give
CUBLAS_STATUS_NOT_SUPPORTED, so a scale must start 16-byte aligned: a tensor of its own).
"""
import statistics

import torch


def main() -> None:
    m, k, n = 16384, 2048, 11264
    a = (torch.randn(m, k, device="cuda") * 4).to(torch.float8_e4m3fn)
    b = (torch.randn(n, k, device="cuda") * 4).to(torch.float8_e4m3fn).t()
    own = (torch.tensor(0.5, device="cuda"), torch.tensor(0.25, device="cuda"))
    packed = torch.tensor([0.125, 0.5, 0.25], device="cuda")
    views = {"own tensors": own, "views at +4/+8 bytes": (packed[1], packed[2])}
    outs = {}
    for name, (sa, sb) in list(views.items()):
        try:
            outs[name] = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        except RuntimeError as err:
            print(f"scale_align: {name:<22} refused: {str(err).splitlines()[0][:160]}")
            del views[name]
    if len(outs) == 2:
        assert torch.equal(outs["own tensors"], outs["views at +4/+8 bytes"])
    times = {name: [] for name in views}
    for _ in range(50):
        for name, (sa, sb) in views.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    for name, ts in times.items():
        print(f"scale_align: {name:<22} {statistics.median(ts):.3f} ms")


if __name__ == "__main__":
    main()
