"""torch.compile of FP8 models: no graph breaks in a block, and compiled training equals eager.

Uses Dynamo with the ``aot_eager`` backend (tracing and autograd as compiled code does, without
Inductor's code generation) so the test stays fast on a CPU; ``fp8lm bench --compile on`` runs
Inductor itself.
"""
import pytest
import torch
import torch._dynamo as dynamo

import fp8lm
from fp8lm.models import build_model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _model(level: str, recipe: str):
    torch.manual_seed(0)
    model = build_model("tiny", 256, n_layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return fp8lm.initialize(model, optimizer, level=level, recipe=recipe, verbose=False)


@pytest.mark.parametrize("level", ["O0", "O1"])
def test_block_compiles_to_one_graph(level):
    model, _ = _model(level, "current")
    block = model.layers[0]
    x = torch.randn(2, 32, 128, requires_grad=True)  # (B, T, C)
    cos, sin = model.rope_cos[:32], model.rope_sin[:32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = dynamo.explain(block)(x, cos, sin)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["delayed"])
def test_compiled_training_equals_eager(recipe):
    """Losses and delayed-scaling state of 3 O1 steps, per-block compiled vs eager, bit for bit.

    Marked slow: Dynamo traces the block's forward and backward once (16 s alone on the 2-core dev
    machine, up to 70 s under pytest with the machine shared).
    """
    runs = []
    for compiled in (False, True):
        dynamo.reset()
        model, optimizer = _model("O1", recipe)
        if compiled:
            for block in model.layers:
                block.compile(backend="aot_eager")
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            x = torch.randint(0, 256, (2, 32), generator=gen)  # (B, T)
            y = torch.randint(0, 256, (2, 32), generator=gen)  # (B, T)
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        runs.append((torch.stack(losses), model.layers[1].mlp.down.fp8_amax_history.clone()))
    dynamo.reset()
    (eager_loss, eager_hist), (comp_loss, comp_hist) = runs
    assert torch.equal(eager_loss, comp_loss)
    assert torch.equal(eager_hist, comp_hist) and bool((eager_hist[:, :3] > 0).all())


def test_o2_block_compiles_with_fp8_saved_activations():
    """O2 saves q, k, v and SwiGLU's input in FP8 and recomputes attention in backward (a ``torch.func.vjp``
    of it): the whole block, forward and backward, is one graph, and training through the compiled block
    equals eager bit for bit."""
    model, _ = _model("O2", "current")
    block = model.layers[0]
    assert block.attn.fp8_saved_activations and block.mlp.fp8_saved_activations
    cos, sin = model.rope_cos[:32], model.rope_sin[:32]
    x = torch.randn(2, 32, 128, requires_grad=True)  # (B, T, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = dynamo.explain(block)(x, cos, sin)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1
    outs = []
    for compiled in (False, True):
        dynamo.reset()
        run = torch.compile(block, backend="aot_eager") if compiled else block
        xi = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = run(xi, cos, sin)
        y.float().square().sum().backward()
        outs.append((y.detach(), xi.grad))
    dynamo.reset()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("emulate", [True, False])
def test_compiled_layer_gradients_equal_eager_under_autocast(emulate):
    """One FP8 layer run under BF16 autocast, its backward after the autocast region (as training does):
    compiled (aot_eager) gives eager's output and gradients bit for bit over 3 steps whose delayed scales
    move, with the GEMMs emulated (dequantize + float32 matmul, as on GPUs without FP8 or torch < 2.13 on
    CPUs) or through ``torch._scaled_mm``. Compiled, the backward is traced under the forward's autocast;
    the emulated GEMM once ran in BF16 there (torch 2.11's CPU path failed two tests above that way)."""
    import copy
    import dataclasses

    from fp8lm.nn import Float8Linear
    from fp8lm.scaling import get_recipe

    torch.manual_seed(3)
    recipe = dataclasses.replace(get_recipe("delayed"), emulate=emulate)
    layer = Float8Linear.from_linear(torch.nn.Linear(136, 88, bias=False), recipe, master="fp16")  # K, N not /16
    x = (torch.randn(40, 136) * torch.rand(40, 1) * 8).to(torch.bfloat16).requires_grad_()  # (M, K)
    grad_out = torch.randn(40, 88).to(torch.bfloat16)  # (M, N)
    runs = []
    for compiled in (False, True):
        dynamo.reset()
        model = copy.deepcopy(layer)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        steps = []
        for step in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = run(x * (1 + step))  # (M, N)
            grad_x, grad_w = torch.autograd.grad(out, (x, model.weight), grad_out)
            steps.append((out.detach().float(), grad_x.float(), grad_w.dequantize().float()))
        runs.append(steps)
    dynamo.reset()
    for eager_step, compiled_step in zip(*runs):
        for eager_t, compiled_t in zip(eager_step, compiled_step):
            assert torch.isfinite(eager_t).all() and torch.equal(eager_t, compiled_t)
