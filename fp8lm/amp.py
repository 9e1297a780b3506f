"""``fp8lm.initialize``: one call that puts a model (and its optimizer) at a precision level.

Levels (see README.md for the full table):

* ``O0``: the BF16 baseline. Nothing is converted; the model's forward runs under BF16 autocast.
* ``O1``: every eligible ``nn.Linear`` runs its three GEMMs in FP8 (``fp8lm.nn.Float8Linear``);
  everything else (norms, attention, embeddings, the output head) runs under BF16 autocast.
  The FP8 layers' weights become FP16 master weights with a per-tensor scale
  (``fp8lm.tensor.ScaledTensor``, 2 bytes per parameter, no FP32 copy) and their gradients are
  stored in FP8 with a scale (1 byte per parameter; a float32 buffer while micro-batches
  accumulate). The optimizer becomes ``fp8lm.optim.AdamW`` with FP32 m and v (``state="fp32"``),
  which writes the FP16 masters with stochastic rounding.
* ``O2``: O1 with FP8/FP16 optimizer state: ``fp8lm.optim.AdamW(state="fp8")`` keeps Adam's m in
  FP8 (E4M3) and v in FP16, each with a scale. Linear weights then hold 2 (weight) + 1 (gradient)
  + 1 (m) + 2 (v) = 6 bytes per parameter plus scales, against 16 for O0's FP32 + AdamW.
* ``O3`` (only with ``dp="fsdp"``, under ``torch.distributed``): O2 sharded by FSDP2; each rank keeps its
  rows of the FP16 masters and of the FP8 m / FP16 v, and weights are all-gathered in FP8
  (``fp8lm.distributed.fsdp``). ``dp="fsdp"`` at O0 is plain BF16 FSDP2 (the baseline).

What "eligible" means, and the reasons reported for the layers that stay in high precision:

* only modules whose type is exactly ``nn.Linear`` (a subclass may be read by code that bypasses
  its forward, e.g. ``nn.MultiheadAttention``'s ``out_proj``): "not a plain nn.Linear";
* both dimensions at least ``min_features`` (16): "too small";
* not matched by ``exclude`` (``fnmatch`` patterns on module names, or a callable): "excluded";
* not the output head (the layer producing vocabulary logits), unless ``fp8_head=True``:
  "output head". The head is found by ``model.get_output_embeddings()`` where a model has it
  (Hugging Face), else by the name ``lm_head``/``head``/``output``, else as the last linear
  whose width equals an embedding's vocabulary.

Linear layers that stay in high precision become ``fp8lm.nn.HighPrecisionLinear``: plain
``F.linear`` on GPUs, and on CPUs a float32 GEMM on BF16-rounded operands that computes what the
(software, several times slower) BF16 GEMM computes.

Conversion is in place: the same module objects and the same ``state_dict`` keys, so a BF16/FP32
checkpoint loads into a converted model (``load_state_dict`` re-quantizes into the FP16 masters).
At O0 every ``Parameter`` object stays and the optimizer is returned as given. At O1/O2 each FP8
layer's weight is a new ``Parameter`` (the FP16 master), so the optimizer is rebuilt from the one
given: it must be a ``torch.optim.Adam`` or ``AdamW`` that has not stepped yet (groups and
hyper-parameters carry over, see ``fp8lm.optim.AdamW.from_optimizer``); use the optimizer that
``initialize`` returns. A module reachable under two names is converted once; a weight shared
by two modules (tied embeddings with ``fp8_head=True``) is never copied: its layer runs in FP8 but
keeps its FP32 weight (the report says so). The level's autocast is applied
by forward hooks on the model itself: no global state, no patched torch functions, so models
at different levels live side by side in one process.
"""
from __future__ import annotations

import fnmatch
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from fp8lm.nn.bf16 import HighPrecisionLinear
from fp8lm.nn.linear import Float8Linear
from fp8lm.scaling import Recipe, get_recipe

__all__ = ["LEVELS", "LEVEL_DESCRIPTIONS", "initialize", "ConversionReport", "LayerDecision", "conversion_report"]

LEVELS = ("O0", "O1", "O2", "O3")
LEVEL_DESCRIPTIONS = {
    "O0": "BF16 autocast everywhere (the baseline)",
    "O1": "FP8 GEMMs, FP16 master weights + FP8 weight gradients, FP32 Adam m/v",
    "O2": "FP8 GEMMs, FP16 master weights + FP8 weight gradients, FP8 Adam m / FP16 v",
    "O3": "O2 sharded with FSDP2 (dp='fsdp'): FP16 master and FP8 m / FP16 v shards, 1-byte FP8 weight all-gathers",
}
_OPTIMIZER_STATE = {"O1": "fp32", "O2": "fp8", "O3": "fp8"}
_ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)
_HEAD_NAMES = ("lm_head", "head", "output")
logger = logging.getLogger("fp8lm")


@dataclass
class LayerDecision:
    """Where one linear layer's GEMMs run, and why."""

    name: str
    in_features: int
    out_features: int
    fp8: bool
    reason: str
    master: str = ""  # FP8 layers: "fp16" (ScaledTensor master) or "fp32" (a weight shared with another module)


@dataclass
class ConversionReport:
    """What ``initialize`` did to a model: one ``LayerDecision`` per linear-like module."""

    level: str
    recipe: Recipe | None
    layers: list[LayerDecision] = field(default_factory=list)
    fp8_activations: list[str] = field(default_factory=list)  # modules saving FP8 activations for backward

    @property
    def fp8_layers(self) -> list[str]:
        return [d.name for d in self.layers if d.fp8]

    @property
    def high_precision_layers(self) -> dict[str, str]:
        return {d.name: d.reason for d in self.layers if not d.fp8}

    def summary(self) -> str:
        """A short human-readable account (the line ``initialize`` logs)."""
        head = f"fp8lm {self.level}: {len(self.fp8_layers)} of {len(self.layers)} linear layers run in FP8"
        if self.recipe is not None and self.level != "O0":
            head += f" (recipe {self.recipe.scaling}, {self.recipe.fwd_format}/{self.recipe.grad_format})"
        lines = [head, f"  level {self.level}: {LEVEL_DESCRIPTIONS[self.level]}"]
        for d in self.layers:
            if not d.fp8:
                lines.append(f"  high precision: {d.name} ({d.in_features}->{d.out_features}): {d.reason}")
            elif d.master == "fp32" and self.level != "O0":
                lines.append(f"  FP32 weight kept: {d.name} ({d.in_features}->{d.out_features}): "
                             "its weight is shared with another module")
        if self.fp8_activations:
            lines.append(f"  FP8 saved activations: {len(self.fp8_activations)} modules (norm inputs BF16; "
                         "SwiGLU and attention inputs E4M3 per row)")
        return "\n".join(lines)


def conversion_report(model: nn.Module) -> ConversionReport:
    """The ``ConversionReport`` of a model returned by ``fp8lm.initialize``."""
    report = getattr(model, "_fp8lm_report", None)
    if report is None:
        raise ValueError("this model was not initialized by fp8lm.initialize")
    return report


def initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    level: str = "O1",
    recipe: str | Recipe = "current",
    exclude: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
    fp8_head: bool = False,
    min_features: int = 16,
    verbose: bool = True,
    fp8_activations: bool | None = None,
    optimizer_options: dict | None = None,
    dp: str | None = None,
):
    """Put ``model`` at precision ``level`` in place and return ``(model, optimizer)``.

    Args:
        model: any ``nn.Module``; converted in place and returned (the same object).
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, or None. At O1/O2 it
            must be a ``torch.optim.Adam``/``AdamW`` that has not stepped; it is replaced.
        level: "O0" (BF16 autocast baseline), "O1" (FP8 GEMMs, FP16 master weights, FP8 weight
            gradients, FP32 Adam state) or "O2" (O1 with FP8 m / FP16 v Adam state).
        recipe: "current", "delayed", "static" or an ``fp8lm.Recipe``. "static" (scale 1, no amax)
            warns unless the model is unit-scaled (``unit_scaled = True``).
        exclude: module-name patterns (fnmatch, e.g. ``"layers.0.*"``) or a callable
            ``(name, module) -> bool`` naming linear layers to keep in high precision. With the
            static recipe, None means the unit-scaled model's ``static_fp8_exclude``.
        fp8_head: also run the output head in FP8 (default: it stays in BF16).
        min_features: linear layers with a dimension below this stay in high precision.
        verbose: log the conversion summary (logger "fp8lm", level INFO).
        fp8_activations: store activations saved for backward in FP8 where the model offers it
            (modules with an ``fp8_saved_activations`` attribute, e.g. the GPT's SwiGLU, attention
            and norms: ``fp8lm.nn.activations``). None means True at O2/O3, False at O0/O1.
        optimizer_options: keyword options for the ``fp8lm.optim.AdamW`` built at O1/O2 (e.g.
            ``{"master_rounding": "nearest"}``, ``{"m_scaling": "tensor"}``).
        dp: "ddp" makes the model data parallel over the initialized ``torch.distributed`` group
            (``fp8lm.distributed``): rank 0's weights are broadcast and gradients are averaged at
            the end of each backward (FP8 weight gradients travel in FP8). "fsdp" (levels O0 and
            O3 only) shards it with FSDP2 per block and at the root, then rebuilds the optimizer on
            the shards (``fp8lm.distributed.fsdp``). None: one process (refused at O3).

    Returns:
        ``(model, optimizer)``: at O1/O2 the optimizer is a new ``fp8lm.optim.AdamW`` over the
        converted parameters (None if none was given); ``fp8lm.conversion_report(model)`` tells
        what ran where.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; allowed: {', '.join(LEVELS)}")
    recipe = get_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if getattr(model, "_fp8lm_report", None) is not None:
        raise ValueError("model is already initialized by fp8lm (at level "
                         f"{model._fp8lm_report.level}); initialize a fresh model instead")
    if optimizer is not None and level != "O0":
        _check_adam(optimizer, level)
    if dp is not None or level == "O3":
        from fp8lm.distributed import check_dp
        check_dp(dp, level)  # before anything is converted
    if level != "O0" and recipe.scaling == "static":
        exclude = _static_exclude(model, exclude)
    exclude_fn = _exclude_fn(exclude, _linear_names(model))
    report = ConversionReport(level, recipe)
    decisions = _decide(model, exclude_fn, fp8_head, min_features)
    shared = _shared_params(model)
    param_map = {}
    for _, module, decision in decisions:
        if decision.fp8 and level != "O0":
            old = module.weight
            decision.master = "fp32" if id(old) in shared else "fp16"
            Float8Linear.from_linear(module, recipe, master=decision.master)
            if module.weight is not old:
                param_map[old] = module.weight
        else:
            decision.fp8 = False
            decision.reason = decision.reason or "level O0"
            if type(module) is nn.Linear:
                HighPrecisionLinear.from_linear(module)
        report.layers.append(decision)
    report.fp8_activations = _set_fp8_activations(model, level, fp8_activations)
    _install_autocast(model)
    model._fp8lm_report = report
    if dp == "fsdp":
        from fp8lm.distributed.fsdp import shard  # shards, then rebuilds the optimizer on the shards
        optimizer = shard(model, optimizer, level, param_map, optimizer_options)
    elif optimizer is not None and level != "O0":
        from fp8lm.optim import AdamW  # optim builds on nn and tensor: imported here, at use
        optimizer = AdamW.from_optimizer(optimizer, state=_OPTIMIZER_STATE[level], param_map=param_map,
                                         **(optimizer_options or {}))
    if dp == "ddp":
        from fp8lm.distributed import wrap  # distributed builds on nn, optim and tensor
        wrap(model, optimizer, level, dp)
    if verbose:
        logger.info(report.summary())
    return model, optimizer


def _set_fp8_activations(model: nn.Module, level: str, flag: bool | None) -> list[str]:
    """Set ``fp8_saved_activations`` on the modules that have it; return their names (empty if off)."""
    if flag is None:
        flag = level in ("O2", "O3")
    if flag and level == "O0":
        raise ValueError("fp8_activations=True needs an FP8 level (O1, O2 or O3); O0 is the BF16 baseline")
    names = []
    for name, module in model.named_modules():
        if hasattr(module, "fp8_saved_activations"):
            module.fp8_saved_activations = bool(flag)
            names += [name] if flag else []
    return names


def _check_adam(optimizer: torch.optim.Optimizer, level: str) -> None:
    """O1/O2 rebuild the optimizer: only a fresh torch Adam/AdamW can be carried over."""
    if type(optimizer) not in _ADAM_TYPES:
        raise ValueError(f"level {level} needs a torch.optim.Adam or torch.optim.AdamW optimizer (it is rebuilt "
                         f"as fp8lm.optim.AdamW), got {type(optimizer).__name__}; allowed: Adam, AdamW")
    if any(len(s) for s in optimizer.state.values()):
        raise ValueError(f"level {level} needs an optimizer that has not taken a step yet (its state "
                         "cannot be carried over); build it fresh, or load its state after initialize")


def _shared_params(model: nn.Module) -> set[int]:
    """ids of parameters held directly by more than one module (tied weights)."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in set(m._parameters.values()) - {None}:
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {pid for pid, n in owners.items() if n > 1}


def _static_exclude(model: nn.Module, exclude):
    """Static scales (scale 1, no amax) are safe only on unit-scaled models (``unit_scaled = True``).

    Warns for any other model. For a unit-scaled one, ``exclude=None`` becomes the model's own
    ``static_fp8_exclude`` (layers it measured to outgrow a fixed scale; UnitGPT: its last
    ``mlp.down``); an explicit ``exclude`` is used as given.
    """
    if not getattr(model, "unit_scaled", False):
        warnings.warn(
            f"recipe 'static' casts with scale 1 and computes no amax: it is meant for unit-scaled models "
            f"(unit_scaled = True, e.g. the unit-tiny preset), and {type(model).__name__} is not one. Its small "
            "gradients flush to zero in E5M2 (below ~1.5e-5) and small weights and activations lose precision "
            "in E4M3 (below ~1.6e-2; zero below ~1e-3); use recipe 'current' or 'delayed' for it.", UserWarning, stacklevel=3)
        return exclude
    return getattr(model, "static_fp8_exclude", None) if exclude is None else exclude


def _linear_names(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` (or subclass) by its first qualified name (shared modules once)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _exclude_fn(exclude, linears: dict[str, nn.Module]) -> Callable[[str, nn.Module], bool]:
    if exclude is None:
        return lambda name, module: False
    if callable(exclude):
        return exclude
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError("exclude must be module-name patterns (str), a callable (name, module) -> bool, or None")
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in linears):
            some = ", ".join(list(linears)[:4])
            raise ValueError(f"exclude pattern {p!r} matches no linear layer; names look like: {some}")
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _find_head(model: nn.Module, linears: dict[str, nn.Module]) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Linear):
            return head
    for name, m in linears.items():
        if name.rsplit(".", 1)[-1] in _HEAD_NAMES:
            return m
    vocab = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    last = list(linears.values())[-1] if linears else None
    return last if last is not None and last.out_features in vocab else None


def _decide(model, exclude_fn, fp8_head: bool, min_features: int):
    """Yield ``(name, module, LayerDecision)`` for every linear-like module, each module once."""
    linears = _linear_names(model)
    head = None if fp8_head else _find_head(model, linears)
    out = []
    for name, m in linears.items():
        if type(m) is not nn.Linear:
            reason = f"not a plain nn.Linear ({type(m).__name__})"
        elif m is head:
            reason = "output head"
        elif exclude_fn(name, m):
            reason = "excluded"
        elif min(m.in_features, m.out_features) < min_features:
            reason = f"too small (a dimension < {min_features})"
        else:
            reason = ""
        out.append((name, m, LayerDecision(name, m.in_features, m.out_features, not reason, reason)))
    return out


class _AutocastHooks:
    """Forward pre/post hooks that run the model's forward under BF16 autocast."""

    def __init__(self):
        self.stack = []

    def enter(self, module, args, kwargs):
        ctx = torch.autocast(_device_type(module, args, kwargs), dtype=torch.bfloat16)
        ctx.__enter__()
        self.stack.append(ctx)

    def exit(self, module, args, kwargs, output):
        self.stack.pop().__exit__(None, None, None)


def _device_type(module: nn.Module, args, kwargs) -> str:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
    p = next(module.parameters(), None)
    return p.device.type if p is not None else "cpu"


def _install_autocast(model: nn.Module) -> None:
    hooks = _AutocastHooks()
    model.register_forward_pre_hook(hooks.enter, with_kwargs=True)
    model.register_forward_hook(hooks.exit, with_kwargs=True, always_call=True)
