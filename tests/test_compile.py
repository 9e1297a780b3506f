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

