"""``fp8lm.inspection`` (``fp8lm.inspect``): the numbers an FP8 cast would see, per linear layer, for one training step.

One forward + backward of ``model`` on one batch, with hooks that read (never change) six
tensors of every linear-like layer (every ``nn.Linear`` subclass: plain, ``Float8Linear``,
``HighPrecisionLinear``)::

    forward   input (x), weight (w), output           grad_out (dL/d output)   backward
              grad_input (this layer's dL/dx)          grad_weight (dL/dw)

Numerics reported per tensor ``t`` (float32 reductions on ``t``'s device; the comparisons
below are made as ``|t| > bound / s``, which only differs from ``|t*s| > bound`` within one
float32 rounding of the bound, and keeps the temporaries boolean):

* ``rms = sqrt(mean(t**2))`` and ``amax = max|t|``;
* for E4M3 and for E5M2, the scale ``s`` the active recipe would give ``t`` and two fractions
  of all elements:

  - saturated: ``|t*s|`` beyond the rounding range of the largest finite value, i.e. above
    ``max + ulp(max)/2`` (464 for E4M3, 61440 for E5M2). A round-to-nearest cast would overflow
    these; fp8lm's saturating cast clamps them to ``max``. Values between ``max`` and that
    bound round to ``max`` anyway, so current scaling (amax lands on ``max``) reports 0.
  - flushed: nonzero ``t`` with ``|t*s| <= min_subnormal / 2`` (2**-10 for E4M3, 2**-17 for
    E5M2): round-to-nearest-even makes them exactly 0. The information is lost, not rounded.

The scale ``s`` per layer: ``recipe=None`` uses each layer's own recipe (``Float8Linear.recipe``),
and layers without one (O0, the BF16 head) get scale 1: their unscaled figures, i.e. what the
``static`` recipe would do to them. ``recipe="current"|"delayed"|"static"`` (or a ``Recipe``)
applies that recipe to every layer instead (a "what if"). Per recipe:

* current: ``s = fmt.max / amax(t)`` (with the recipe's margin / power-of-two rounding), so
  nothing saturates and the flushed fraction measures the tensor's dynamic range;
* delayed: ``s`` from the layer's amax history as it stood before this step (input, weight
  and grad_out have histories); tensors without one, and layers whose history is empty,
  fall back to current, exactly as ``Float8Linear`` does;
* static: ``s = 1``.

What is left as it was: the step runs with ``torch.autograd.grad`` on the parameters, so no
``.grad`` is written and no gradient-accumulation hook (DDP, optimizer hooks) fires; every
buffer (delayed amax histories, last scales, norm statistics) and the delayed-scaling flag
``fp8_history_ready`` are restored afterwards; the RNG
is forked; every hook is removed, also on errors. The hooks only read tensors: the input tap
is an identity autograd function, so the step's numbers are those of a training step.
Grad-weight is the parameter's total gradient (summed over calls if a weight is shared).
A layer called several times per step gets one entry per call (``name``, ``name#2``, ...); a
forward that activation checkpointing recomputes inside backward is not a new call (no entry).
Other modules' tensor outputs (norms, blocks = the residual stream) get a cheap rms/amax.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from fp8lm.amp import initialize
from fp8lm.formats import E4M3, E5M2, Format
from fp8lm.nn.linear import _in_backward
from fp8lm.scaling import Recipe, compute_scale, get_recipe
from fp8lm.tensor import is_scaled

__all__ = ["inspect", "InspectReport", "LayerStats", "TensorStats", "FormatStats", "ModuleStats",
           "TENSORS", "FORWARD_TENSORS", "BACKWARD_TENSORS", "saturation_bound", "flush_bound",
           "tensor_stats", "inspect_preset"]

FORWARD_TENSORS = ("input", "weight", "output")
BACKWARD_TENSORS = ("grad_out", "grad_input", "grad_weight")
TENSORS = FORWARD_TENSORS + BACKWARD_TENSORS
_FORMATS = (E4M3, E5M2)
_HISTORY_ROW = {"input": 0, "weight": 1, "grad_out": 2}  # rows of Float8Linear.fp8_amax_history


def saturation_bound(fmt: Format) -> float:
    """Scaled magnitudes above this overflow a round-to-nearest cast: ``max + ulp(max) / 2``."""
    ulp = 2.0 ** (math.floor(math.log2(fmt.max)) - fmt.mantissa_bits)
    return fmt.max + ulp / 2


def flush_bound(fmt: Format) -> float:
    """Nonzero scaled magnitudes at or below this round to 0: half the smallest subnormal."""
    return fmt.min_subnormal / 2


# ------------------------------------------------------------------ the report
@dataclass
class FormatStats:
    """One tensor in one FP8 format: the scale the recipe gives it and what the cast would lose."""

    scale: float
    saturated: float  # fraction of all elements
    flushed: float  # fraction of all elements


@dataclass
class TensorStats:
    """RMS, amax and per-format cast figures of one tensor."""

    shape: tuple[int, ...]
    dtype: str
    rms: float
    amax: float
    nonfinite: float  # fraction of inf/NaN elements
    formats: dict[str, FormatStats]  # "e4m3", "e5m2"

    def to_dict(self, compact: bool = False) -> dict:
        """Plain numbers (non-finite ones as None); ``compact`` drops shape, dtype and scales."""
        out = {"rms": _num(self.rms), "amax": _num(self.amax)}
        for name, f in self.formats.items():
            out[f"{name}_saturated"] = _num(f.saturated)
            out[f"{name}_flushed"] = _num(f.flushed)
        if compact:
            return out
        out.update({f"{name}_scale": _num(f.scale) for name, f in self.formats.items()})
        return {"shape": list(self.shape), "dtype": self.dtype, "nonfinite": _num(self.nonfinite), **out}


@dataclass
class LayerStats:
    """One call of one linear-like layer: its scaling and its tensors (absent ones left out)."""

    name: str
    type: str
    scaling: str  # "current", "delayed", "static" or "unscaled" (a layer without a recipe)
    tensors: dict[str, TensorStats] = field(default_factory=dict)


@dataclass
class ModuleStats:
    """The tensor output of a module that is not linear-like (a norm, a block): coarse figures."""

    name: str
    type: str
    rms: float
    amax: float


@dataclass
class InspectReport:
    """What ``fp8lm.inspect`` saw: per-layer tensor figures, other modules' outputs, the loss."""

    loss: float
    recipe: str | None  # the recipe forced on every layer, or None for each layer's own
    layers: list[LayerStats]
    modules: list[ModuleStats]

    def layer(self, name: str) -> LayerStats:
        """The entry of layer ``name`` (its first call); ValueError names the known layers."""
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise ValueError(f"no linear layer {name!r} in this report; layers: {', '.join(self.layer_names())}")

    def layer_names(self) -> list[str]:
        """Layer entries in forward order."""
        return [entry.name for entry in self.layers]

    def to_dict(self, compact: bool = False) -> dict:
        """JSON-ready dict; ``compact`` (for training logs) keeps rms/amax/saturated/flushed per tensor."""
        layers = {e.name: {t: s.to_dict(compact) for t, s in e.tensors.items()} for e in self.layers}
        if compact:
            return {"loss": _num(self.loss), "layers": layers}
        return {
            "loss": _num(self.loss),
            "recipe": self.recipe,
            "formats": {f.name: {"max": f.max, "saturation_bound": saturation_bound(f),
                                 "flush_bound": flush_bound(f)} for f in _FORMATS},
            "layers": [{"name": e.name, "type": e.type, "scaling": e.scaling,
                        "tensors": layers[e.name]} for e in self.layers],
            "modules": [{"name": m.name, "type": m.type, "rms": _num(m.rms), "amax": _num(m.amax)}
                        for m in self.modules],
        }

    def to_json(self, path: str) -> None:
        """Write ``to_dict()`` as indented standard JSON (non-finite numbers as null)."""
        _makedirs_for(path)
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    def table(self) -> str:
        """A terminal table: layer, tensor, rms, amax, E4M3 and E5M2 saturated/flushed in percent."""
        width = max([len("layer")] + [len(f"{e.name} [{e.scaling}]") for e in self.layers])
        head = (f"{'layer':<{width}} {'tensor':<11} {'rms':>9} {'amax':>9}  "
                f"{'E4M3 sat%':>9} {'flush%':>8}  {'E5M2 sat%':>9} {'flush%':>8}")
        lines = [f"loss {self.loss:.4f}; scales: {self.recipe or 'each layer its own recipe (none: scale 1)'}",
                 head, "-" * len(head)]
        for entry in self.layers:
            label = f"{entry.name} [{entry.scaling}]"
            for tensor in TENSORS:
                s = entry.tensors.get(tensor)
                if s is None:
                    continue
                e4, e5 = s.formats["e4m3"], s.formats["e5m2"]
                lines.append(f"{label:<{width}} {tensor:<11} {s.rms:>9.3g} {s.amax:>9.3g}  "
                             f"{_pct(e4.saturated):>9} {_pct(e4.flushed):>8}  "
                             f"{_pct(e5.saturated):>9} {_pct(e5.flushed):>8}")
                label = ""
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """PNG: log-scale RMS per layer (forward order), forward tensors above, backward below."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = self.layer_names()
        xs = range(len(names))
        fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.35 * len(names) + 3), 8), sharex=True)
        panels = [(axes[0], FORWARD_TENSORS, E4M3, "forward"), (axes[1], BACKWARD_TENSORS, E5M2, "backward")]
        for ax, tensors, fmt, title in panels:
            for tensor in tensors:
                ys = [_rms_or_nan(e, tensor) for e in self.layers]
                ax.plot(xs, ys, marker="o", markersize=3, label=tensor)
            ax.axhline(1.0, color="gray", lw=0.8, ls=":", label="unit scale")
            ax.axhline(fmt.min_subnormal, color="red", lw=0.8, ls="--",
                       label=f"{fmt.name.upper()} smallest subnormal (scale 1)")
            ax.set_yscale("log")
            ax.set_ylabel("RMS")
            ax.set_title(f"{title} tensors")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        axes[1].set_xticks(list(xs))
        axes[1].set_xticklabels(names, rotation=90, fontsize=7)
        fig.tight_layout()
        _makedirs_for(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _pct(fraction: float) -> str:
    if not math.isfinite(fraction):
        return "nan"
    if fraction == 0:
        return "0"
    return "<0.001" if fraction < 1e-5 else f"{100 * fraction:.3f}"


def _rms_or_nan(entry: LayerStats, tensor: str) -> float:
    s = entry.tensors.get(tensor)
    return s.rms if s is not None and s.rms > 0 else float("nan")


def _makedirs_for(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


# ------------------------------------------------------------------ the figures
def _plain(t: torch.Tensor) -> torch.Tensor:
    """A high-precision view of ``t``: FP8 ScaledTensors are dequantized."""
    return t.dequantize() if is_scaled(t) else t


def _scale(t_amax: torch.Tensor, fmt: Format, recipe: Recipe | None, history: torch.Tensor | None):
    """The scale ``recipe`` gives a tensor of amax ``t_amax`` in ``fmt`` (1 without a recipe)."""
    if recipe is None or recipe.scaling == "static":
        return torch.ones((), dtype=torch.float32, device=t_amax.device)
    return compute_scale(t_amax, history if recipe.scaling == "delayed" else None, fmt, recipe)


def _rms_amax(mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS and amax of float32 magnitudes; the squares are taken relative to amax (no overflow)."""
    if mag.numel() == 0:
        zero = torch.zeros((), device=mag.device)
        return zero, zero
    t_amax = mag.amax()
    unit = torch.where(t_amax > 0, t_amax, torch.ones_like(t_amax))
    return unit * (mag / unit).square().mean().sqrt(), t_amax


def tensor_stats(t: torch.Tensor, recipe: Recipe | None = None, history: torch.Tensor | None = None) -> TensorStats:
    """RMS, amax and the E4M3/E5M2 saturated and flushed fractions of ``t`` under ``recipe``.

    ``history`` is the tensor's delayed-scaling amax history (used only by a delayed recipe).
    """
    t = _plain(t).detach()
    with torch.no_grad(), torch.autocast(t.device.type, enabled=False):
        mag = t.float().abs()  # float32 magnitudes: the only full-size float temporary
        n = max(1, mag.numel())
        finite = torch.isfinite(mag)
        rms, t_amax = _rms_amax(mag)
        figures = [rms, t_amax, (~finite).sum() / n]
        for fmt in _FORMATS:
            scale = _scale(t_amax, fmt, recipe, history)
            # bounds moved to the unscaled side: boolean temporaries only
            saturated = (mag > saturation_bound(fmt) / scale) & finite
            flushed = (mag <= flush_bound(fmt) / scale) & (mag > 0)
            figures += [scale, saturated.sum() / n, flushed.sum() / n]
        values = torch.stack([f.float() for f in figures]).tolist()  # one host sync per tensor
    formats = {fmt.name: FormatStats(*values[3 + 3 * i: 6 + 3 * i]) for i, fmt in enumerate(_FORMATS)}
    return TensorStats(tuple(t.shape), str(t.dtype).replace("torch.", ""), values[0], values[1], values[2], formats)


# ------------------------------------------------------------------ the hooks
class _Tap(torch.autograd.Function):
    """Identity whose backward hands the gradient to a callback (this call's dL/d input)."""

    @staticmethod
    def forward(ctx, x, callback):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback(grad)
        return grad, None


class _Recorder:
    """Forward/backward hooks on every linear-like layer (and coarse ones on other modules)."""

    def __init__(self, model: nn.Module, recipe: Recipe | None):
        self.recipe = recipe
        self.layers: list[LayerStats] = []
        self.modules: list[ModuleStats] = []
        self.calls: dict[str, int] = {}
        self.open: dict[int, list] = {}  # id(module) -> stack of (entry, rule) awaiting the output
        self.leaf_inputs: dict[int, torch.Tensor] = {}  # layer inputs that are autograd leaves
        self.first_entry: dict[int, tuple[LayerStats, tuple]] = {}  # id(weight) -> (entry, layer rule)
        self.histories = {id(m): m.fp8_amax_history.detach().clone()
                          for m in model.modules() if _delayed_history(m) is not None}
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                self.handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
                self.handles.append(module.register_forward_hook(self._post_hook(name)))
            elif module is not model:
                self.handles.append(module.register_forward_hook(self._module_hook(name)))

    def remove(self) -> None:
        """Remove every hook this recorder installed."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _rule(self, module: nn.Module) -> tuple[str, Recipe | None, torch.Tensor | None]:
        """(scaling label, recipe, amax history before the step) for one layer."""
        own = getattr(module, "recipe", None)
        own = own if isinstance(own, Recipe) else None
        recipe = self.recipe or own
        if recipe is None:
            return "unscaled", None, None
        history = self.histories.get(id(module)) if recipe.scaling == "delayed" else None
        return recipe.scaling, recipe, history

    def _stats(self, t, rule, tensor: str) -> TensorStats:
        _, recipe, history = rule
        row = _HISTORY_ROW.get(tensor)
        return tensor_stats(t, recipe, None if history is None or row is None else history[row])

    def _pre_hook(self, name: str):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor) or _in_backward():
                return None  # (a forward recomputed by activation checkpointing is not a new call)
            k = self.calls[name] = self.calls.get(name, 0) + 1
            rule = self._rule(module)
            label = name or "<model>"
            entry = LayerStats(label if k == 1 else f"{label}#{k}", type(module).__name__, rule[0])
            self.layers.append(entry)
            self.open.setdefault(id(module), []).append((entry, rule))
            x = args[0]
            entry.tensors["input"] = self._stats(x, rule, "input")
            entry.tensors["weight"] = self._stats(module.weight, rule, "weight")
            self.first_entry.setdefault(id(module.weight), (entry, rule))
            if not (torch.is_grad_enabled() and x.requires_grad):
                return None
            if x.grad_fn is None:  # a leaf (e.g. the batch): autograd.grad must be asked for it
                self.leaf_inputs[id(x)] = x
            tap = _Tap.apply(x, lambda g: entry.tensors.__setitem__("grad_input", self._stats(g, rule, "grad_input")))
            return (tap, *args[1:])
        return hook

    def _post_hook(self, name: str):
        def hook(module, args, output):
            stack = self.open.get(id(module))
            if not stack:
                return None
            entry, rule = stack.pop()
            if not isinstance(output, torch.Tensor):
                return None
            entry.tensors["output"] = self._stats(output, rule, "output")
            if torch.is_grad_enabled() and output.requires_grad:
                output.register_hook(
                    lambda g: entry.tensors.__setitem__("grad_out", self._stats(g, rule, "grad_out")))
            return None
        return hook

    def _module_hook(self, name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point() and not _in_backward():
                with torch.no_grad(), torch.autocast(output.device.type, enabled=False):
                    rms, t_amax = _rms_amax(_plain(output).detach().float().abs())
                    rms, t_amax = torch.stack([rms, t_amax]).tolist()
                self.modules.append(ModuleStats(name, type(module).__name__, rms, t_amax))
        return hook

    def record_weight_grads(self, params: list[torch.Tensor], grads) -> None:
        """Attach each layer weight's gradient to the layer's first entry."""
        for p, g in zip(params, grads):
            found = self.first_entry.get(id(p))
            if found is not None and g is not None:
                entry, rule = found
                entry.tensors["grad_weight"] = self._stats(g, rule, "grad_weight")


def _delayed_history(module: nn.Module) -> torch.Tensor | None:
    recipe = getattr(module, "recipe", None)
    history = getattr(module, "fp8_amax_history", None)
    if isinstance(recipe, Recipe) and recipe.scaling == "delayed" and isinstance(history, torch.Tensor):
        return history
    return None


def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    """``model(*batch)`` (or ``model(batch)``); the loss is output[1] of a (logits, loss) pair."""
    out = model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    return out[1] if isinstance(out, (tuple, list)) and len(out) == 2 else out


# ------------------------------------------------------------------ the entry point
def inspect(model: nn.Module, batch, *, recipe: str | Recipe | None = None,
            loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None) -> InspectReport:
    """One forward + backward of ``model`` on ``batch``; per-layer FP8 figures, model state untouched.

    Args:
        model: any ``nn.Module`` (plain, or put at a level by ``fp8lm.initialize``); it runs in
            its current mode (``train()`` shows a training step).
        batch: the model's arguments: a tuple/list is unpacked (``model(x, y)``), else ``model(batch)``.
        recipe: None (each layer's own recipe; scale 1 where it has none) or a recipe name /
            ``fp8lm.Recipe`` applied to every layer.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` running the forward itself; by
            default the model's output, or ``output[1]`` of a ``(logits, loss)`` pair.

    Returns:
        An ``InspectReport`` (``.table()``, ``.to_json(path)``, ``.plot(path)``).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    forced = None if recipe is None else get_recipe(recipe)
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError("the model has no nn.Linear layer (or subclass) to inspect")
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    ready_flags = [(m, m.fp8_history_ready) for m in model.modules() if hasattr(m, "fp8_history_ready")]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    recorder = _Recorder(model, forced)
    try:
        with torch.random.fork_rng(devices=devices):
            loss = (loss_fn or _default_loss)(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("inspect needs a scalar loss: a model returning (logits, loss) or a scalar, "
                                 "or loss_fn=(model, batch) -> scalar tensor")
            param_ids = {id(p) for p in params}
            targets = params + [t for i, t in recorder.leaf_inputs.items() if i not in param_ids]
            if targets and loss.requires_grad:
                grads = torch.autograd.grad(loss, targets, allow_unused=True)
                recorder.record_weight_grads(params, grads[:len(params)])
    finally:
        recorder.remove()
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        for module, ready in ready_flags:  # delayed scaling's "history filled" flag (Float8Linear)
            module.fp8_history_ready = ready
    return InspectReport(float(loss.detach().float()), None if forced is None else forced.scaling,
                         recorder.layers, recorder.modules)


def inspect_preset(cfg, json_out: str | None = None, png_out: str | None = None) -> InspectReport:
    """The ``fp8lm inspect`` command: build ``cfg``'s model as ``fp8lm train`` does, inspect its first batch.

    ``cfg`` is a ``fp8lm.train.TrainConfig`` (preset, level, recipe, device, seed, batch size, data);
    the report is printed as a table and written to ``json_out`` / ``png_out`` when given.
    """
    from fp8lm.train import build_model, resolve_config
    from fp8lm.data import BatchSampler, load_corpus

    cfg = resolve_config(cfg)
    corpus = load_corpus(cfg.corpus, data=cfg.data, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                         progress=cfg.progress and cfg.tokenizer == "bpe")
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, device=cfg.device)
    model = build_model(cfg, corpus.vocab_size)
    model, _ = initialize(model, None, level=cfg.level, recipe=cfg.recipe, verbose=cfg.progress)
    report = inspect(model, sampler.next())
    print(f"fp8lm inspect {cfg.preset} {cfg.level} ({cfg.recipe}) on {cfg.device}, "
          f"batch {cfg.batch_size} x {cfg.seq_len}")
    print(report.table())
    if json_out:
        report.to_json(json_out)
        print(f"wrote {json_out}")
    if png_out:
        report.plot(png_out)
        print(f"wrote {png_out}")
    return report
