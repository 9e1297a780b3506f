"""Error of fp8lm.optim.AdamW's FP8/FP16 state against a float64 AdamW, per encoding choice.

    .venv/bin/python benchmarks/optim_numerics.py [--steps 200] [--seeds 3] [--device cuda]

Open loop: every optimizer gets the same stream of gradients (independent of the weights),
so the only difference from the float64 reference (``torch.optim.AdamW(foreach=False)`` on
float64 parameters) is how m and v are stored. Metric: the relative error of the distance
travelled, ``|dw - dw_64| / |dw_64|`` with ``dw = w_T - w_0`` (FP32 weights), and the
fraction of elements that moved less than half as far as in the reference ("stalled").
Constant gradient: the decoded m and v against their float64 values (round-to-nearest's dead band).
Closed loop: a least-squares regression problem against float64 Adam (loss ratio, weight error).

Gradient problems (shapes 97x131, 257, 33x65; Student-t(4) noise on a per-element mean):
  wide:  per-element magnitudes log-uniform in [1e-8, 1e2] (10 decades inside a tensor)
  rows:  per-row magnitudes log-uniform in [1e-8, 1e2] (structure a block scale can follow)
  llm:   log-normal magnitudes around 1e-4 with one decade of spread (a typical weight gradient)
"""
from __future__ import annotations

import argparse
import statistics

import torch

from fp8lm.optim import AdamW

SHAPES = [(97, 131), (257,), (33, 65)]
VARIANTS = [("fp32", None, None, None)] + [
    ("fp8", m, v, r) for m in ("normalized", "tensor", "block") for v in ("sqrt", "square")
    for r in ("stochastic", "nearest")
]


def _randn(shape, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64, device=gen.device)


def _rand(shape, gen):
    return torch.rand(shape, generator=gen, dtype=torch.float64, device=gen.device)


def _magnitudes(kind: str, shape, gen) -> torch.Tensor:
    """Per-element gradient magnitude profile for one tensor."""
    if kind == "wide":
        return 10.0 ** (_rand(shape, gen) * 10 - 8)
    if kind == "rows":
        rows = shape[0]
        mag = 10.0 ** (_rand(rows, gen) * 10 - 8)
        return mag.view(rows, *([1] * (len(shape) - 1))).expand(shape).clone()
    if kind == "llm":
        return 1e-4 * 10.0 ** _randn(shape, gen)
    raise ValueError(kind)


def _student_t(shape, gen) -> torch.Tensor:
    """Student-t(4) samples from a seeded generator (normal / sqrt(chi2_4 / 4))."""
    chi2 = (_randn((4, *shape), gen) ** 2).sum(0)
    return _randn(shape, gen) / (chi2 / 4).sqrt()


def gradient_stream(kind: str, steps: int, seed: int, device="cpu"):
    """Yields, per step, a list (per tensor) of float64 gradients."""
    gen = torch.Generator(device=device).manual_seed(seed)
    mags = [_magnitudes(kind, s, gen) for s in SHAPES]
    means = [_randn(s, gen) * 0.5 for s in SHAPES]
    for _ in range(steps):
        yield [mag * (mu + _student_t(mu.shape, gen)) for mag, mu in zip(mags, means)]


def _make(variant, params, betas, lr, wd, seed):
    state, m, v, r = variant
    if state == "fp32":
        return AdamW(params, lr=lr, betas=betas, weight_decay=wd, state="fp32")
    return AdamW(params, lr=lr, betas=betas, weight_decay=wd, state="fp8", m_scaling=m, v_storage=v,
                 rounding=r, generator_seed=seed)


def open_loop(variant, kind, betas, steps, seed, device="cpu", lr=1e-3, wd=0.1):
    """(relative displacement error, stalled fraction) of one variant on one problem."""
    grads = gradient_stream(kind, steps, seed, device)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    w0 = [_randn(s, gen) for s in SHAPES]
    ref = [w.clone().requires_grad_() for w in w0]
    out = [w.float().requires_grad_() for w in w0]
    opt_ref = torch.optim.AdamW(ref, lr=lr, betas=betas, weight_decay=wd, foreach=False)
    opt = _make(variant, out, betas, lr, wd, seed)
    for g_step in grads:
        for p, g in zip(ref, g_step):
            p.grad = g
        for p, g in zip(out, g_step):
            p.grad = g.float()
        opt_ref.step()
        opt.step()
    d_ref = torch.cat([(p.detach() - w).flatten() for p, w in zip(ref, w0)])
    d_out = torch.cat([(p.detach().double() - w).flatten() for p, w in zip(out, w0)])
    rel = float((d_out - d_ref).norm() / d_ref.norm())
    stalled = float(((d_out.abs() < 0.5 * d_ref.abs()) & (d_ref.abs() > 1e-9)).double().mean())
    return rel, stalled


def regression(variant, betas, steps, seed, device="cpu", lr=3e-3):
    """Closed loop, least squares ``|X w - y|^2`` (feature scales 1e-3..1e2), against float64 Adam.

    Returns (final loss / float64 final loss, |w - w_64| / |w_64|).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    n, d = 512, 67
    col_scale = 10.0 ** (_rand(d, gen) * 5 - 3)
    x64 = _randn((n, d), gen) * col_scale
    y64 = x64 @ (_randn((d, 3), gen) / col_scale[:, None]) + 0.01 * _randn((n, 3), gen)
    w64 = torch.zeros(d, 3, dtype=torch.float64, requires_grad=True, device=device)
    w = torch.zeros(d, 3, requires_grad=True, device=device)
    runs = [(w64, x64, y64, torch.optim.Adam([w64], lr=lr, betas=betas, foreach=False)),
            (w, x64.float(), y64.float(), _make(variant, [w], betas, lr, 0.0, seed))]
    for _ in range(steps):
        for p, x, y, opt in runs:
            p.grad, = torch.autograd.grad(((x @ p - y) ** 2).mean(), [p])
            opt.step()
    loss64 = float(((x64 @ w64.detach() - y64) ** 2).mean())
    loss = float(((x64 @ w.detach().double() - y64) ** 2).mean())
    return loss / loss64, float((w.detach().double() - w64.detach()).norm() / w64.detach().norm())


def constant_gradient(variant, betas, steps, seed, device="cpu"):
    """Mean relative error of the decoded m and v after ``steps`` steps of one constant gradient.

    Magnitudes log-uniform in [1e-5, 1e1]. The float64 answers are g (1 - b1^t) and g^2 (1 - b2^t);
    this shows the dead band of round-to-nearest (an EMA that stops moving short of its target).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    g64 = _randn(4099, gen) * 10.0 ** (_rand(4099, gen) * 6 - 5)
    w = torch.zeros(4099, requires_grad=True, device=device)
    opt = _make(variant, [w], betas, 1e-3, 0.0, seed)
    for _ in range(steps):
        w.grad = g64.float()
        opt.step()
    m, v = opt.moments(w)
    m64, v64 = g64 * (1 - betas[0] ** steps), g64 ** 2 * (1 - betas[1] ** steps)
    return float(((m.double() - m64) / m64).abs().mean()), float(((v.double() - v64) / v64).abs().mean())


def _name(variant) -> str:
    state, m, v, r = variant
    return "fp32 state" if state == "fp32" else f"m {m}, v {v}, {r}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = args.device
    seeds = [1000 + i for i in range(args.seeds)]
    print(f"device {dev}, torch {torch.__version__}")
    for betas in ((0.9, 0.999), (0.9, 0.95)):
        print(f"\nbetas {betas}, {args.steps} steps, median over {len(seeds)} seeds. Open loop: relative error "
              "of w_T - w_0 vs float64 AdamW (stalled fraction). Constant gradient: mean relative error "
              f"of m and v. Regression ({3 * args.steps // 2} steps): loss / float64 loss, |w - w_64| / |w_64|.")
        print("| variant | open: wide | open: rows | open: llm | const g: m | const g: v | regression |")
        print("|---|---|---|---|---|---|---|")
        for variant in VARIANTS:
            cells = []
            for kind in ("wide", "rows", "llm"):
                res = [open_loop(variant, kind, betas, args.steps, s, dev) for s in seeds]
                rel = statistics.median(r for r, _ in res)
                stalled = statistics.median(st for _, st in res)
                cells.append(f"{rel:.2e} ({stalled:.1%})")
            const = [constant_gradient(variant, betas, args.steps, s, dev) for s in seeds]
            cells += [f"{statistics.median(c[i] for c in const):.2e}" for i in (0, 1)]
            reg = [regression(variant, betas, 3 * args.steps // 2, s, dev) for s in seeds]
            cells.append(f"{statistics.median(r[0] for r in reg):.3f}, {statistics.median(r[1] for r in reg):.2e}")
            print(f"| {_name(variant)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
