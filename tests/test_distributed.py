"""Distributed FP8: the auto-scaled FP8 all-reduce, GradSync, and 2-process data-parallel training.

CPU only: gloo, 2 processes (torch.multiprocessing spawn, one thread each), started once for the
whole module. Everything a worker computes is saved and checked here against single-process
references: the simulated all-reduce (the same code without collectives) and float64 means.
"""
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fp8lm
from fp8lm import cli
from fp8lm.distributed import FP8AllReduce, grad_sync, simulate_all_reduce
from fp8lm.formats import E4M3, quantize, scale_from_amax, sqnr_db
from fp8lm.tensor import ScaledTensor
from fp8lm.train import train
from gloo_runs import WORLD, join_group, parity_config, run_ranks, train_one_thread, write_corpus

SHAPES = [(37, 53), (101,), (3, 5, 7), (1,), (257, 3), (64, 33)]
MAGNITUDES = [1e-2, 3.0, 1e-6, 0.5, 1e2, 1e-4]  # per tensor: across 8 decades, as layers' gradients are
HALF_ULP = 2.0**-4  # E4M3: 3 mantissa bits, relative rounding error of a normal value <= 2**-4


# ---------------------------------------------------------------- helpers shared with the workers
def heavy_grads(rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s gradients: Student-t (4 dof, outliers) at per-tensor magnitudes, odd sizes.

    The last one is an FP8 ScaledTensor, as O1 weight gradients are.
    """
    gen = torch.Generator().manual_seed(1000 + rank)
    grads = [(_student_t(shape, gen) * mag).float() for shape, mag in zip(SHAPES, MAGNITUDES)]
    grads[-1] = ScaledTensor.from_hp(grads[-1], torch.float8_e4m3fn)
    return grads


def _student_t(shape, gen) -> torch.Tensor:
    """Student-t with 4 degrees of freedom from a seeded generator: z / sqrt(chi2_4 / 4)."""
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    chi2 = (torch.randn((4, *shape), generator=gen, dtype=torch.float64) ** 2).sum(0)
    return z / torch.sqrt(chi2 / 4)


def small_model() -> nn.Module:
    """Two linears (FP8 at O1, with FP32 biases) and a norm, seeded."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.LayerNorm(24), nn.Linear(24, 19))


def small_step(model: nn.Module, rank: int) -> None:
    """One forward + backward on rank ``rank``'s own batch."""
    x = torch.randn(13, 40, generator=torch.Generator().manual_seed(50 + rank))
    model(x).pow(2).mean().backward()


def grads_of(model: nn.Module) -> list:
    """(data bytes, scale) of ScaledTensor grads, the float tensor of the others."""
    out = []
    for p in model.parameters():
        g = p.grad
        out.append((g._data.view(torch.uint8).clone(), g._scale.clone()) if isinstance(g, ScaledTensor)
                   else g.detach().clone())
    return out


def params_of(model: nn.Module) -> list:
    return [(p._data.clone(), p._scale.clone()) if isinstance(p, ScaledTensor) else p.detach().clone()
            for p in model.parameters()]


# ---------------------------------------------------------------- the 2-process run
def _worker(rank: int, world: int, out_dir: str, text_file: str) -> None:
    join_group(rank, world, out_dir)
    res = {}
    reducer = FP8AllReduce()
    res["allreduce"] = [(d.view(torch.uint8).clone(), s) for d, s in reducer.reduce(heavy_grads(rank))]
    res["allreduce_telemetry"] = reducer.last.to_dict()
    for level in ("O1", "O0"):
        model = small_model()
        torch.manual_seed(100 + rank)  # ranks seeded apart: the masters' rounding stream must be rank 0's
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt = fp8lm.initialize(model, opt, level=level, min_features=16, verbose=False, dp="ddp")
        small_step(model, rank)  # the sync runs at the end of backward
        res[f"sync_{level}"] = {"grads": grads_of(model), "history": grad_sync(model).history}
        opt.step()
        res[f"params_{level}"] = params_of(model)
    model, _ = fp8lm.initialize(small_model(), None, level="O1", min_features=16, verbose=False, dp="ddp")
    with grad_sync(model).no_sync():  # gradient accumulation: the first micro-batch stays local
        small_step(model, rank)
    small_step(model, rank + 2)  # the second backward synchronizes the sum
    res["accumulated"] = {"grads": grads_of(model), "history": grad_sync(model).history}
    metrics = train(parity_config(text_file, dp="ddp"))
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
    """The 1-process O1 reference run on the same global batches (one thread, as each worker)."""
    return train_one_thread(parity_config(text_file))


# ---------------------------------------------------------------- auto-scaling, no processes
def _naive(grads_per_rank, mu_before: float) -> torch.Tensor:
    """FP8 all-reduce with a fixed split: payloads cast(mu * S * g), FP8 sum cast(sum), mean sum / (mu S N).

    ``mu_before = 1``: post-scaling; ``1/N``: pre-scaling (the paper's two failure modes).
    """
    n = len(grads_per_rank)
    scale = scale_from_amax(torch.stack([g.abs().amax() for g in grads_per_rank]).amax(), E4M3, pow2=True) * mu_before
    sum_hp = sum(quantize(g, E4M3, scale).float() for g in grads_per_rank)
    return quantize(sum_hp, E4M3, torch.ones(())).float() / (scale * n)


def test_auto_scaling_neither_overflows_nor_underflows():
    """32 simulated ranks: large same-sign values (their sum is 32x the amax) and tiny ones."""
    n, gen = 32, torch.Generator().manual_seed(0)
    big = 0.5 + 0.5 * torch.rand(n, 500, generator=gen)  # amax ~1: S = 256, sums ~24x max
    tiny = 2.0**-14 * (1 + torch.rand(n, 300, generator=gen))  # scaled: [2**-6, 2**-5), E4M3 normals
    grads = [torch.cat([big[r], -tiny[r]]) for r in range(n)]
    ref = torch.stack(grads).double().mean(0)
    post, pre = _naive(grads, 1.0), _naive(grads, 1.0 / n)
    assert (post[:500] - ref[:500]).abs().div(ref[:500]).min() > 0.9  # post-scaling saturates every big sum
    assert (pre[500:] == 0).all()  # pre-scaling flushes every tiny value

    reducer = FP8AllReduce(world=n)
    for _ in range(2):  # mu is chosen for every step: the second call is as good as the first
        (data, scale), = simulate_all_reduce([[g] for g in grads], reducer)
        out = data.float() / scale
        rel = (out.double() - ref).abs() / ref.abs()
        bound = 2 * HALF_ULP + HALF_ULP**2  # two roundings of normal values: payload and sum
        assert rel.max() <= bound, f"max relative error {rel.max():.4f} > {bound:.4f}"
        t = reducer.last
        assert t.mu == 2.0**-4  # sums up to 32 * 256 = 8192 > 448 * 2**4 only for inputs all near 1: not drawn
        assert t.saturated > 0.6 and t.flushed_in == 0 and t.flushed_out == 0


def test_auto_scaling_keeps_mu_1_when_sums_fit():
    grads = [torch.tensor([1.0, -1.0, 2.0**-12]), torch.tensor([-1.0, 1.0, 2.0**-12])]  # sums cancel
    reducer = FP8AllReduce(world=2)
    (data, scale), = simulate_all_reduce([[g] for g in grads], reducer)
    assert reducer.last.mu == 1.0 and reducer.last.saturated == 0
    torch.testing.assert_close(data.float() / scale, torch.tensor([0.0, 0.0, 2.0**-12]))


def test_non_finite_gradients_stay_non_finite():
    grads = [[torch.tensor([1.0, float("inf"), 3.0])], [torch.tensor([1.0, 2.0, float("nan")])]]
    (data, scale), = simulate_all_reduce(grads, FP8AllReduce(world=2))
    out = data.float() / scale
    assert out[0] == 1.0 and out[1:].isnan().all()


# ---------------------------------------------------------------- the 2-process all-reduce
def _bound(out, scale, grads_hp, ref, mu):
    """Per-element bound: two relative half-ulps plus the subnormal quantum of each leg (module docs)."""
    mean_abs = torch.stack([g.abs() for g in grads_hp]).mean(0)
    payload_scale = scale.double() / (mu * WORLD)
    quantum = 2.0**-10 / payload_scale * (1 + 1 / (mu * WORLD))
    return HALF_ULP * (mean_abs * (1 + HALF_ULP) + ref.abs()) + quantum


def test_allreduce_matches_fp32_mean(ranks):
    per_rank = [heavy_grads(r) for r in range(WORLD)]
    grads_hp = [[g.dequantize() if isinstance(g, ScaledTensor) else g for g in gs] for gs in per_rank]
    simulated = simulate_all_reduce(per_rank, FP8AllReduce(world=WORLD))
    mu = ranks[0]["allreduce_telemetry"]["mu"]
    for j, shape in enumerate(SHAPES):
        (d0, s0), (d1, s1) = ranks[0]["allreduce"][j], ranks[1]["allreduce"][j]
        assert torch.equal(d0, d1) and torch.equal(s0, s1), "ranks disagree"
        assert torch.equal(d0, simulated[j][0].view(torch.uint8)) and torch.equal(s0, simulated[j][1])
        out = d0.view(torch.float8_e4m3fn).double() / s0.double()
        ref = (grads_hp[0][j].double() + grads_hp[1][j].double()) / WORLD
        assert out.shape == ref.shape
        assert (out - ref).abs().le(_bound(out, s0, [g[j].double() for g in grads_hp], ref, mu)).all()
        if ref.numel() >= 100:
            assert sqnr_db(ref, out) >= 25.0, f"tensor {j} {shape}: {sqnr_db(ref, out):.1f} dB"


def test_fp8_traffic_at_most_55_percent_of_bf16(ranks):
    t = ranks[0]["allreduce_telemetry"]
    numel = sum(math.prod(s) for s in SHAPES)
    assert t["numel"] == numel and t["bf16_bytes"] == 2 * numel  # BF16 ring all-reduce, 2 ranks: 2 bytes each
    assert t["bytes_sent"] <= 0.55 * t["bf16_bytes"], t
    d = ranks[0]["train"]["distributed"]
    assert d["fp8_grad_bytes_vs_bf16"] <= 0.55, d["fp8_grad_bytes_vs_bf16"]
    assert d["steps_synced"] == 24 and len(d["steps"]) == 24


# ---------------------------------------------------------------- GradSync
def _local_grads(level: str) -> list[list]:
    """What each rank's backward gives before any synchronization (recomputed here, on one thread as there)."""
    out, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # BF16 reductions split over threads round differently
    for rank in range(WORLD):
        model = small_model()
        model, _ = fp8lm.initialize(model, None, level=level, min_features=16, verbose=False)
        small_step(model, rank)
        out.append([p.grad for p in model.parameters()])
    torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("level", ["O1", "O0"])
def test_grad_sync_gives_every_rank_the_mean(ranks, level):
    local = _local_grads(level)
    synced0, synced1 = ranks[0][f"sync_{level}"]["grads"], ranks[1][f"sync_{level}"]["grads"]
    fp8_local = [[g for g in gs if isinstance(g, ScaledTensor)] for gs in local]
    expected_fp8 = iter(simulate_all_reduce(fp8_local, FP8AllReduce(world=WORLD)) if fp8_local[0] else [])
    kinds = set()
    for j, (a, b) in enumerate(zip(synced0, synced1)):
        if isinstance(a, tuple):  # FP8: the same bits on both ranks, those of the simulated algorithm
            kinds.add("fp8")
            data, scale = next(expected_fp8)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert torch.equal(a[0], data.view(torch.uint8).reshape(a[0].shape)) and torch.equal(a[1], scale)
        else:  # FP32 all-reduce: the mean, identical on both ranks
            kinds.add("fp32")
            assert torch.equal(a, b)
            torch.testing.assert_close(a, (local[0][j] + local[1][j]) / 2, rtol=1e-6, atol=0)
    assert kinds == ({"fp8", "fp32"} if level == "O1" else {"fp32"})
    for pa, pb in zip(ranks[0][f"params_{level}"], ranks[1][f"params_{level}"]):  # after optimizer.step
        assert all(torch.equal(x, y) for x, y in zip(pa, pb)) if isinstance(pa, tuple) else torch.equal(pa, pb)


def test_grad_sync_history_counts_bytes(ranks):
    (step,) = ranks[0]["sync_O1"]["history"]
    assert step["fp8_numel"] == 40 * 24 + 24 * 19 and step["hp_numel"] == 24 + 19 + 2 * 24
    assert step["hp_bytes"] == 4 * step["hp_numel"]  # FP32 ring all-reduce on 2 ranks: 2 * 1/2 * 4 bytes
    assert step["bytes_sent"] == step["fp8_bytes"] + step["hp_bytes"]


def test_no_sync_accumulates_then_syncs_the_sum(ranks):
    a, b = ranks[0]["accumulated"], ranks[1]["accumulated"]
    assert len(a["history"]) == 1  # one sync, after the second backward
    for ga, gb in zip(a["grads"], b["grads"]):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb)) if isinstance(ga, tuple) else torch.equal(ga, gb)
    local = []
    for rank in range(WORLD):  # the accumulated FP32 sums each rank held before the sync
        model, _ = fp8lm.initialize(small_model(), None, level="O1", min_features=16, verbose=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        small_step(model, rank)
        small_step(model, rank + 2)
        torch.set_num_threads(threads)
        local.append([p.grad for p in model.parameters() if isinstance(p.grad, ScaledTensor)])
    expected = simulate_all_reduce(local, FP8AllReduce(world=WORLD))
    got = [g for g in a["grads"] if isinstance(g, tuple)]
    assert len(got) == len(expected) == 2
    for (data, scale), (exp_data, exp_scale) in zip(got, expected):
        assert torch.equal(data, exp_data.view(torch.uint8).reshape(data.shape)) and torch.equal(scale, exp_scale)


# ---------------------------------------------------------------- training parity
def test_two_process_o1_matches_one_process(ranks, single):
    two = ranks[0]["train"]
    assert two["loss_history"] == ranks[1]["train"]["loss_history"]  # every rank reports the global mean
    final_1, final_2 = single["final_train_loss"], two["final_train_loss"]
    assert abs(final_2 - final_1) / final_1 <= 0.02, (final_1, final_2)
    rel = [abs(a - b) / b for a, b in zip(two["loss_history"], single["loss_history"])]
    assert len(rel) == 24 and max(rel) <= 0.05 and sum(rel) / len(rel) <= 0.01, rel
    for (s1, v1), (s2, v2) in zip(single["val_history"], two["val_history"]):
        assert s1 == s2 and abs(v1 - v2) / v1 <= 0.02
    print(f"final train loss: 1 process {final_1:.4f}, 2 processes {final_2:.4f}; step deviation max "
          f"{max(rel):.2%}, mean {sum(rel) / len(rel):.2%}")


def test_cli_nproc_launches_torchrun_and_its_checkpoint_resumes_in_one_process(text_file, tmp_path):
    """`fp8lm train --nproc 2 --dp ddp`: torchrun, one summary from rank 0, bytes in the metrics JSON;
    a checkpoint it wrote at world size 2 resumes at world size 1 and continues the same run."""
    import json
    import subprocess
    import sys
    out, run_dir = tmp_path / "m.json", tmp_path / "run"
    args = ["train", "--level", "O2", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
            "--eval-every", "4", "--device", "cpu", "--data", text_file, "--no-progress", "--out", str(run_dir),
            "--save-every", "2"]
    cmd = [sys.executable, "-m", "fp8lm", *args, "--nproc", "2", "--dp", "ddp", "--metrics-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("fp8lm tiny O2") == 1 and proc.stdout.count("fp8lm ddp x2") == 1, proc.stdout
    two = json.loads(out.read_text())
    d = two["distributed"]
    assert d["world_size"] == 2 and d["fp8_grad_bytes_vs_bf16"] <= 0.55 and len(d["steps"]) == 4
    one_out = tmp_path / "one.json"
    assert cli.main([*args[:-4], "--out", str(tmp_path / "resumed"), "--resume", str(run_dir / "step-000002"),
                     "--metrics-out", str(one_out)]) == 0
    one = json.loads(one_out.read_text())
    assert one["loss_history"][:2] == two["loss_history"][:2]  # restored from the checkpoint
    for l1, l2 in zip(one["loss_history"][2:], two["loss_history"][2:]):  # the same batches, 1 process
        assert abs(l1 - l2) / l2 <= 0.02, (one["loss_history"], two["loss_history"])


# ---------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("argv, message", [
    (["train", "--nproc", "2"], "needs --dp ddp"),
    (["train", "--nproc", "2", "--dp", "fsdp"], "runs at levels O0, O3"),
    (["train", "--nproc", "3", "--dp", "ddp", "--batch-size", "4"], "not divisible by 3"),
])
def test_cli_refuses_bad_launches(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--steps", "1", "--device", "cpu", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_initialize_refuses_bad_dp():
    with pytest.raises(ValueError, match="runs at levels O0, O3"):
        fp8lm.initialize(small_model(), level="O1", dp="fsdp", verbose=False)
    with pytest.raises(ValueError, match="unknown dp"):
        fp8lm.initialize(small_model(), level="O1", dp="zero", verbose=False)
    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        fp8lm.initialize(small_model(), level="O1", dp="ddp", verbose=False)
