"""Which call of the GEMM-level bench reads outside memory at 8192^3 after another shape (twelfth session)?

    python benchmarks/crash_probe.py [encode|plain] [graph|nograph] [dynamic|static]

One process per configuration (an illegal address poisons the CUDA context): shape 16384 x 2048->11264,
then 8192^3, each with the eager and the compiled FP8 layer (every cast Triton, as ``fp8 triton compiled``),
synchronizing after every call; ``graph`` captures the compiled call in a CUDA graph too; ``plain`` encodes the
weight gradient with ``ScaledTensor.from_hp`` instead of ``encode_pow2``; ``static`` resets Dynamo between
shapes (no dynamic-shape recompile).
"""
import sys

import torch

import fp8lm.nn.linear as linear_mod
from fp8lm.bench import _fp8_layer, _fwd_bwd, _graphed, _with_fused_cast
from fp8lm.scaling import get_recipe
from fp8lm.tensor import ScaledTensor


def main():
    args = sys.argv[1:]
    if "plain" in args:
        linear_mod._encode_wgrad = lambda layer, g: ScaledTensor.from_hp(g, torch.float8_e4m3fn)
    for m, k, n in ((16384, 2048, 11264), (8192, 8192, 8192)):
        if "static" in args:
            torch._dynamo.reset()
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        for name, compiled in (("eager", False), ("compiled", True)):
            layer = _fp8_layer(k, n, "cuda", get_recipe("delayed"))
            call = _with_fused_cast(_fwd_bwd(torch.compile(layer) if compiled else layer, x, g))
            for i in range(3):
                call()
                torch.cuda.synchronize()
            print(f"{args} {m}x{k}->{n} {name}: 3 calls ok", flush=True)
            if compiled and "graph" in args:
                replay = _graphed(call)
                for i in range(3):
                    replay()
                    torch.cuda.synchronize()
                print(f"{args} {m}x{k}->{n} {name} graphed: 3 replays ok", flush=True)


if __name__ == "__main__":
    main()
