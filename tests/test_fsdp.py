"""Level O3 on FSDP2: sharded FP16 masters and FP8/FP16 Adam state, FP8 weight all-gathers.

CPU only: gloo, 2 processes (torch.multiprocessing spawn, one thread each), started once for the
whole module; what the workers measure is saved and checked here against a 1-process O2 run.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint

from torch import nn

import fp8lm
from fp8lm import cli
from fp8lm import distributed as fp8dist
from fp8lm.checkpoint import save_checkpoint
from fp8lm.distributed import grad_sync
from fp8lm.distributed.fsdp import CollectiveCounter, FSDPMaster, local_bytes
from fp8lm.formats import quantize
from fp8lm.models import build_model
from fp8lm.nn import Float8Linear
from fp8lm.train import TrainConfig, check_config, train
from gloo_runs import PARITY_STEPS, WORLD, join_group, parity_config, run_ranks, train_one_thread, write_corpus



def small_gpt():
    """A `tiny`-shaped GPT, shrunk: 2 blocks of width 64 (byte vocabulary)."""
    torch.manual_seed(3)
    return build_model("tiny", vocab_size=256, dim=64, n_layers=2, n_heads=2, ffn_dim=192, seq_len=32)


def measure_step(level: str, rank: int) -> dict:
    """One training step of ``small_gpt`` at ``level`` + fsdp: collective bytes, local bytes at rest."""
    model = small_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = fp8lm.initialize(model, opt, level=level, dp="fsdp", verbose=False)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randint(0, 256, (2, 32), generator=gen), torch.randint(0, 256, (2, 32), generator=gen)
    for _ in range(2):  # the second step is measured (the optimizer state exists)
        with CollectiveCounter(WORLD) as counter:
            _, loss = model(x, y)
            loss.backward()
        after_backward = local_bytes(model, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {"sent": counter.sent, "calls": counter.calls, "after_backward": after_backward,
           "at_rest": local_bytes(model, opt), "summary": grad_sync(model).summary(), "loss": loss.item(),
           "masters": sum(isinstance(p._local_tensor, FSDPMaster) for p in model.parameters())}
    if level == "O3":
        try:
            save_checkpoint("/nonexistent/ckpt", model, opt, 1)
        except ValueError as e:
            out["save_error"] = str(e)
    return out


class UnevenNet(nn.Module):
    """Two residual blocks whose FP8 weights have 37 rows: FSDP2 pads the last shard."""

    def __init__(self, checkpointed: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(40, 37), nn.ReLU(), nn.Linear(37, 40)) for _ in range(2))
        self.out = nn.Linear(40, 3)
        self.checkpointed = checkpointed  # activation checkpointing of every block

    def forward(self, x):
        for block in self.layers:
            x = x + (torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointed
                     else block(x))
        return self.out(x)


def uneven_losses(rank: int, world: int, steps: int = 8, micro: int = 1, checkpointed: bool = False) -> list[float]:
    """Global-mean losses of ``UnevenNet`` regressing a fixed batch of 8 (O3 + fsdp, or O2 in one process).

    ``micro`` > 1 accumulates gradients over that many micro-batches, synchronizing only the last
    (FSDP2's ``set_requires_gradient_sync``: the FP8 unsharded gradients add up in float32).
    """
    model = UnevenNet(checkpointed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dp = "fsdp" if world > 1 else None
    model, opt = fp8lm.initialize(model, opt, level="O3" if dp else "O2", dp=dp, verbose=False)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 40, generator=gen), torch.randn(8, 3, generator=gen)
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    losses = []
    for _ in range(steps):
        for k, part in enumerate(torch.arange(8)[rows].chunk(micro)):
            if micro > 1:
                model.set_requires_gradient_sync(k == micro - 1)
            loss = (model(x[part]) - y[part]).pow(2).mean() / micro
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = (model(x[rows]) - y[rows]).pow(2).mean().detach()  # after the step, on the whole local batch
        losses.append(float(loss) if world == 1 else fp8dist.mean_over_ranks(loss))
    return losses


def gathered_block0(rank: int) -> list:
    """(FP8 bytes, scale) of block 0's FP8 weights as FSDP2 all-gathers them at O3."""
    model, _ = fp8lm.initialize(small_gpt(), None, level="O3", dp="fsdp", verbose=False)
    block = model.layers[0]
    block.unshard()
    out = [(m.weight._data.view(torch.uint8).clone(), m.weight._scale.clone())
           for m in block.modules() if isinstance(m, Float8Linear)]
    block.reshard()
    return out


def _worker(rank: int, world: int, out_dir: str, text_file: str) -> None:
    join_group(rank, world, out_dir)
    res = {level: measure_step(level, rank) for level in ("O3", "O0")}
    res["gathered"] = gathered_block0(rank)
    res["uneven"] = uneven_losses(rank, world)
    res["uneven_accumulated"] = uneven_losses(rank, world, micro=2)
    res["uneven_checkpointed"] = uneven_losses(rank, world, checkpointed=True)
    metrics = train(parity_config(text_file, level="O3", dp="fsdp"))
    res["train"] = {k: metrics[k] for k in ("loss_history", "val_history", "final_train_loss", "distributed")}
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, text_file):
    """Run the workers once; return each rank's results."""
    return run_ranks(_worker, tmp_path_factory.mktemp("ranks"), text_file)


@pytest.fixture(scope="module")
def single(text_file):
    """The 1-process O2 reference on the same global batches (one thread, as each worker)."""
    return train_one_thread(parity_config(text_file, level="O2"))


# ---------------------------------------------------------------- training parity
def test_two_process_o3_matches_one_process_o2(ranks, single):
    two = ranks[0]["train"]
    assert two["loss_history"] == ranks[1]["train"]["loss_history"]  # every rank reports the global mean
    final_1, final_2 = single["final_train_loss"], two["final_train_loss"]
    assert abs(final_2 - final_1) / final_1 <= 0.02, (final_1, final_2)
    rel = [abs(a - b) / b for a, b in zip(two["loss_history"], single["loss_history"])]
    assert len(rel) == PARITY_STEPS and max(rel) <= 0.05 and sum(rel) / len(rel) <= 0.01, rel
    for (s1, v1), (s2, v2) in zip(single["val_history"], two["val_history"]):
        assert s1 == s2 and abs(v1 - v2) / v1 <= 0.02
    d = two["distributed"]
    assert d["dp"] == "fsdp" and d["level"] == "O3" and d["gathers"] > 0
    print(f"final train loss: 1 process O2 {final_1:.4f}, 2 processes O3 {final_2:.4f}; step deviation max "
          f"{max(rel):.2%}, mean {sum(rel) / len(rel):.2%}")


def test_uneven_shards_train_like_one_process(ranks):
    """37-row FP8 weights (a padded last shard): the O3 run tracks the 1-process O2 run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = uneven_losses(0, 1)
    finally:
        torch.set_num_threads(threads)
    two = ranks[0]["uneven"]
    assert two == ranks[1]["uneven"] and two[-1] < 0.2 * two[0]
    rel = [abs(a - b) / b for a, b in zip(two, single)]
    assert max(rel) <= 0.15, (two, single)  # each rank casts its own activations: tiny batches differ a little


def test_activation_checkpointing_changes_nothing(ranks):
    """Blocks recomputed in backward (FSDP2 gathers the FP8 weights again): the same losses, bit for bit."""
    assert ranks[0]["uneven_checkpointed"] == ranks[0]["uneven"]


def test_gradient_accumulation_matches_whole_batches(ranks):
    """Two micro-batches per step, synchronized once: the trajectory of whole batches."""
    whole, accumulated = ranks[0]["uneven"], ranks[0]["uneven_accumulated"]
    assert accumulated == ranks[1]["uneven_accumulated"]
    rel = [abs(a - b) / b for a, b in zip(accumulated, whole)]
    assert max(rel) <= 0.15, (accumulated, whole)  # micro-batches cast their activations with their own scales


def test_gathered_fp8_weights_are_the_one_process_cast(ranks):
    """The all-gathered E4M3 bytes and scale equal what one process's O2 forward casts from the whole master."""
    model, _ = fp8lm.initialize(small_gpt(), None, level="O2", verbose=False)
    layers = [m for m in model.layers[0].modules() if isinstance(m, Float8Linear)]
    assert len(layers) == len(ranks[0]["gathered"]) > 0
    for layer, (data0, scale0), (data1, scale1) in zip(layers, ranks[0]["gathered"], ranks[1]["gathered"]):
        w, fmt = layer.weight, layer.recipe.fwd
        scale = layer.fp8_scale(1, w, fmt, update=False, recompute=False)  # row 1: the weight's scale
        expected = quantize(w.dequantize(), fmt, scale).view(torch.uint8)
        assert torch.equal(data0, expected) and torch.equal(data1, expected)
        assert torch.equal(scale0, scale) and torch.equal(scale1, scale)


# ---------------------------------------------------------------- memory and traffic
def test_linear_bytes_at_rest_are_about_6_over_n(ranks):
    """Per rank: FP16 master + FP8 gradient + FP8 m + FP16 v shards = 6/N bytes per linear parameter (+ scales)."""
    for r in range(WORLD):
        m = ranks[r]["O3"]
        rest, grads = m["at_rest"], m["after_backward"]
        assert m["masters"] > 0 and rest["local_numel"] * WORLD == rest["numel"]  # rows split evenly here
        per_param = (grads["master"] + grads["grad"] + grads["state"]) / rest["numel"]  # before the step
        assert 6 / WORLD <= per_param <= 6 / WORLD * 1.01, per_param  # 2 + 1 + 1 + 2 bytes, sharded
        assert rest["grad"] == 0 and 0 < grads["grad"] - rest["local_numel"] < 0.01 * rest["local_numel"]
        print(f"rank {r}: {per_param:.3f} bytes per linear parameter between backward and step "
              f"(6/N = {6 / WORLD:.3f}); {(rest['master'] + rest['state']) / rest['numel']:.3f} after zero_grad")


def test_fp8_weight_all_gather_at_most_55_percent_of_bf16(ranks):
    """Counted from the c10d collectives FSDP2 called: O3 (FP8 linears) against BF16 FSDP2 (O0)."""
    o3, o0 = ranks[0]["O3"], ranks[0]["O0"]
    assert o3["calls"]["_allgather_base_"] == o0["calls"]["_allgather_base_"]
    fp8 = o3["summary"]["fp8_bytes"] // 2  # stats cover both measured steps
    other_fp32 = o3["sent"]["_allgather_base_"] - fp8  # norms, embeddings, head: float32 at O3
    linear_bf16 = o0["sent"]["_allgather_base_"] - other_fp32 // 2  # the same tensors in BF16 at O0
    assert linear_bf16 == 2 * fp8  # 1 byte against 2 for every gathered linear weight element
    amax = o3["sent"]["allreduce_"]  # the per-weight amax all-reduces that precede the FP8 casts
    ratio = (fp8 + amax) / linear_bf16
    total = (o3["sent"]["_allgather_base_"] + amax) / o0["sent"]["_allgather_base_"]
    assert ratio <= 0.55, ratio
    print(f"weight all-gather bytes per rank per step: FP8 linears {fp8 + amax:,} vs BF16 {linear_bf16:,} "
          f"({ratio:.1%}); whole model {o3['sent']['_allgather_base_'] + amax:,} vs "
          f"{o0['sent']['_allgather_base_']:,} ({total:.1%}, non-linear parameters gathered in float32 at O3)")


def test_fp8_gradient_reduce_scatter_at_most_55_percent_of_bf16(ranks):
    """Block gradients: FP8 payloads through all-to-all (counted), against a BF16 reduce-scatter of them."""
    o3 = ranks[0]["O3"]
    s = o3["summary"]
    assert s["rs_calls"] == 2 * 2 and s["rs_fallbacks"] == 0  # 2 blocks, 2 measured steps
    fp8_numel, other_numel = s["rs_fp8_numel"] // 2, s["rs_other_numel"] // 2  # per step, all ranks' chunks
    sent = o3["sent"]["alltoall_base_"]
    assert sent == (fp8_numel + 4 * other_numel) * (WORLD - 1) // WORLD  # 1 byte per FP8 element, norms float32
    fp8_bytes = fp8_numel * (WORLD - 1) // WORLD
    bf16 = 2 * fp8_numel * (WORLD - 1) // WORLD  # a BF16 reduce-scatter of the same gradients
    amax = s["rs_bytes"] // 2 - sent  # the amax all-reduces (one float per FP8 weight)
    assert 0 < amax < 0.01 * sent
    ratio = (fp8_bytes + amax) / bf16
    assert ratio <= 0.55, ratio
    print(f"gradient bytes per rank per step: FP8 weight gradients {fp8_bytes + amax:,} vs BF16 reduce-scatter "
          f"{bf16:,} ({ratio:.1%}); block norms in float32 {4 * other_numel * (WORLD - 1) // WORLD:,}; "
          f"root float32 reduce-scatter {o3['sent']['_reduce_scatter_base_']:,}")


def test_o0_fsdp_is_plain_bf16_fsdp2(ranks):
    o0 = ranks[0]["O0"]
    assert o0["masters"] == 0 and o0["summary"]["gathers"] == 0 and o0["summary"]["rs_calls"] == 0
    assert "allreduce_" not in o0["sent"] and "alltoall_base_" not in o0["sent"]
    assert abs(o0["loss"] - ranks[0]["O3"]["loss"]) / o0["loss"] < 0.05


def test_save_checkpoint_refuses_fsdp_models(ranks):
    assert "does not support FSDP2-sharded models" in ranks[0]["O3"]["save_error"]


def test_cli_nproc_fsdp_o3_launches_torchrun(text_file, tmp_path):
    """`fp8lm train --nproc 2 --dp fsdp --level O3`: torchrun, one summary from rank 0, bytes in the metrics."""
    import json
    import subprocess
    import sys
    out = tmp_path / "m.json"
    cmd = [sys.executable, "-m", "fp8lm", "train", "--nproc", "2", "--dp", "fsdp", "--level", "O3", "--steps", "2",
           "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--device", "cpu", "--data", text_file,
           "--no-progress", "--metrics-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("fp8lm tiny O3") == 1 and proc.stdout.count("fp8lm fsdp x2 O3") == 1, proc.stdout
    d = json.loads(out.read_text())["distributed"]
    assert d["world_size"] == 2 and d["gathers"] > 0 and d["rs_calls"] > 0 and d["rs_fallbacks"] == 0


# ---------------------------------------------------------------- configuration errors
def test_initialize_refuses_bad_combinations():
    with pytest.raises(ValueError, match="level O3 .* needs dp='fsdp', not dp=None"):
        fp8lm.initialize(small_gpt(), level="O3", verbose=False)
    with pytest.raises(ValueError, match="needs dp='fsdp', not dp='ddp'"):
        fp8lm.initialize(small_gpt(), level="O3", dp="ddp", verbose=False)
    for level in ("O1", "O2"):
        with pytest.raises(ValueError, match="dp='fsdp' runs at levels O0, O3, not"):
            fp8lm.initialize(small_gpt(), level=level, dp="fsdp", verbose=False)
    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        fp8lm.initialize(small_gpt(), level="O3", dp="fsdp", verbose=False)


def test_train_refuses_fsdp_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="checkpoints are not supported with dp='fsdp'"):
        check_config(TrainConfig(level="O3", dp="fsdp", out_dir=str(tmp_path), device="cpu"))


@pytest.mark.parametrize("argv, message", [
    (["train", "--level", "O3"], "needs dp='fsdp'"),
    (["train", "--nproc", "2", "--dp", "fsdp", "--level", "O2"], "runs at levels O0, O3"),
])
def test_cli_refuses_bad_fsdp_launches(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--steps", "1", "--device", "cpu", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
