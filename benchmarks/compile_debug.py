"""Find what breaks Inductor on the FP8 block (GPU debugging aid): compile pieces with fullgraph and print tracebacks.

Usage: python benchmarks/compile_debug.py [SUBSTRING ...]   (only the cases whose name contains one)
"""
import sys
import traceback

import torch
from torch import nn

import fp8lm
from fp8lm.models import build_model
from fp8lm.nn.linear import Float8Linear
from fp8lm.scaling import get_recipe

dev = "cuda"


def attempt(name, fn):
    torch._dynamo.reset()
    try:
        fn()
        print(f"[ok] {name}", flush=True)
    except Exception:
        tb = traceback.format_exc().splitlines()
        print(f"[FAIL] {name}\n" + "\n".join(tb[-45:]), flush=True)


def layer_case(master, autocast, x_dtype):
    def run():
        layer = Float8Linear.from_linear(nn.Linear(256, 512, bias=False, device=dev), get_recipe("current"), master=master)
        f = torch.compile(layer, fullgraph=True)
        x = torch.randn(64, 256, device=dev, dtype=x_dtype, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = f(x)
        y.float().sum().backward()
    return run


def block_case(level, recipe):
    def run():
        torch.manual_seed(0)
        model = build_model("tiny", 256, n_layers=1).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, opt = fp8lm.initialize(model, opt, level=level, recipe=recipe, verbose=False)
        block = torch.compile(model.layers[0], fullgraph=True)
        x = torch.randn(2, 32, 128, device=dev, requires_grad=True)
        cos, sin = model.rope_cos[:32], model.rope_sin[:32]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(x, cos, sin)
        y.float().sum().backward()
    return run


CASES = {
    "layer fp32 master, no autocast, bf16 x": layer_case("fp32", False, torch.bfloat16),
    "layer fp16 master, no autocast, bf16 x": layer_case("fp16", False, torch.bfloat16),
    "layer fp16 master, autocast, fp32 x": layer_case("fp16", True, torch.float32),
    "block O1 current": block_case("O1", "current"),
    "block O1 delayed": block_case("O1", "delayed"),
    "block O2 current": block_case("O2", "current"),
}
for name, case in CASES.items():
    if len(sys.argv) == 1 or any(arg in name for arg in sys.argv[1:]):
        attempt(name, case)
