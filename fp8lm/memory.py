"""Memory report: the bytes that weights, gradients and optimizer state actually occupy.

    report = fp8lm.memory_report(model, optimizer)   # e.g. right after backward, before step
    print(report.summary()); json.dump(report.to_dict(), fh)

Nothing here is computed from a formula: every number is the size of a storage that exists.

* A plain tensor counts the bytes of its whole storage (``untyped_storage().nbytes()``), so a
  view counts what was allocated, not what it shows.
* A tensor subclass that stores its value in inner tensors (a ``ScaledTensor`` of
  ``fp8lm.tensor``: ``_data`` + ``_scale``, and an accumulation buffer if it holds one) counts
  those inner tensors, found through ``__tensor_flatten__`` and through any tensor attribute
  the object carries. Its own wrapper has no storage.
* Every storage is counted once (deduplicated by device and address), in the first place it is
  met, in this order: weights, gradients, optimizer state, per-module state. Tied weights and
  views therefore never count twice.

Parameter classes: ``fp8_linear`` is the weight of every FP8 linear layer (a ``Float8Linear``
module's ``weight``, or any parameter stored as a scaled tensor); ``other`` is every other
parameter (embeddings, norms, biases, high-precision linears such as the output head). The
state that FP8 layers keep beside their weights (scaling-state buffers such as
``fp8_amax_history`` / ``fp8_last_scale``, any cached FP8 copy of the weight held as a module
attribute) is the ``fp8 state`` column of the ``fp8_linear`` class. Buffers of other modules
(rotary tables, ...) are reported on their own line and are not bytes per parameter.

Bytes per parameter of a class = (weights + gradients + optimizer state + fp8 state) / number
of parameters of that class. With ``torch.optim.AdamW`` on FP32 parameters that is 16 (4 each
for weight, gradient, m and v) plus the 4-byte ``step`` tensor per parameter tensor; FP8-LM's
O2 target for linear weights is 6 (FP16 weight 2, FP8 gradient 1, FP8 m 1, FP16 v 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fp8lm.nn.linear import Float8Linear

__all__ = ["MemoryReport", "memory_report", "tensor_storages"]

CLASSES = ("fp8_linear", "other")
COLUMNS = ("weights", "grads", "optimizer", "fp8_state")
_LABELS = {"fp8_linear": "FP8 linear weights", "other": "other parameters"}


def tensor_storages(t: torch.Tensor):
    """Yield ``(key, nbytes, dtype)`` for each storage behind ``t`` (inner tensors of subclasses).

    ``key`` identifies the storage (device, address), so callers can count each one once.
    """
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        inner = [getattr(t, n) for n in names]
        inner += [v for v in vars(t).values() if isinstance(v, torch.Tensor)]
        for x in inner:
            if isinstance(x, torch.Tensor) and x is not t:  # (a DTensor also names its mesh)
                yield from tensor_storages(x)
        return
    if t.device.type == "meta":
        return
    storage = t.untyped_storage()
    key = (str(t.device), storage.data_ptr()) if storage.nbytes() else ("empty", id(storage))
    yield key, storage.nbytes(), t.dtype


@dataclass
class ClassBytes:
    """Bytes of one parameter class, by column, and its parameter count."""

    params: int = 0
    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    fp8_state: int = 0
    dtypes: dict = field(default_factory=dict)  # column -> {dtype name: bytes}

    @property
    def total(self) -> int:
        """Weights + gradients + optimizer state + fp8 state, in bytes."""
        return self.weights + self.grads + self.optimizer + self.fp8_state

    @property
    def bytes_per_param(self) -> float:
        """Total bytes divided by the number of parameters (0 for an empty class)."""
        return self.total / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        """JSON-ready: every column, the total, bytes per parameter and the dtype breakdown."""
        per = (lambda b: b / self.params) if self.params else (lambda b: 0.0)
        return {"params": self.params, **{c: getattr(self, c) for c in COLUMNS}, "total": self.total,
                "bytes_per_param": self.bytes_per_param,
                "bytes_per_param_by_column": {c: per(getattr(self, c)) for c in COLUMNS},
                "dtypes": {c: dict(d) for c, d in self.dtypes.items()}}


@dataclass
class MemoryReport:
    """What ``memory_report`` measured: per-class bytes, other buffers, and the grand total."""

    classes: dict[str, ClassBytes]
    buffers: int = 0
    grads_present: bool = False

    @property
    def total(self) -> int:
        """Every counted byte: all classes plus the other buffers."""
        return sum(c.total for c in self.classes.values()) + self.buffers

    @property
    def params(self) -> int:
        """Number of parameters over all classes."""
        return sum(c.params for c in self.classes.values())

    @property
    def bytes_per_param(self) -> float:
        """Bytes per parameter over all classes (other buffers excluded)."""
        return sum(c.total for c in self.classes.values()) / max(1, self.params)

    def summary(self) -> str:
        """A small table: one row per class (bytes per parameter by column) and a total line."""
        head = f"{'memory':<20}{'params':>11}{'weights':>9}{'grads':>8}{'optim':>8}{'fp8 st':>8}{'B/param':>9}{'MiB':>9}"
        lines = [head]
        for name, c in self.classes.items():
            if not c.params:
                continue
            per = [getattr(c, col) / c.params for col in COLUMNS]
            lines.append(f"{_LABELS[name]:<20}{c.params:>11,}" + "".join(f"{v:>{w}.3f}" for v, w in
                         zip(per, (9, 8, 8, 8))) + f"{c.bytes_per_param:>9.3f}{c.total / 2**20:>9.2f}")
        grads = "" if self.grads_present else " (no gradients allocated)"
        lines.append(f"{'all parameters':<20}{self.params:>11,}{'':>33}{self.bytes_per_param:>9.3f}"
                     f"{(self.total - self.buffers) / 2**20:>9.2f}")
        lines.append(f"other buffers {self.buffers / 2**20:.2f} MiB; total {self.total / 2**20:.2f} MiB{grads}")
        return "\n".join(lines)

    def line(self) -> str:
        """One line: bytes per parameter of each class and the total MiB."""
        parts = [f"{_LABELS[n]} {c.bytes_per_param:.2f} B/param" for n, c in self.classes.items() if c.params]
        return f"memory: {', '.join(parts)}; {self.total / 2**20:.2f} MiB counted"

    def to_dict(self) -> dict:
        """JSON-ready dict of everything in the report."""
        return {"classes": {n: c.to_dict() for n, c in self.classes.items()}, "buffers": self.buffers,
                "total": self.total, "params": self.params, "bytes_per_param": self.bytes_per_param,
                "grads_present": self.grads_present}


class _Counter:
    """Adds each storage once to a (class, column) cell."""

    def __init__(self, report: MemoryReport):
        self.report, self.seen = report, set()

    def add(self, t, cls: str | None, column: str) -> int:
        counted = 0
        for key, nbytes, dtype in tensor_storages(t):
            if key in self.seen:
                continue
            self.seen.add(key)
            counted += nbytes
            if cls is None:
                self.report.buffers += nbytes
                continue
            cell = self.report.classes[cls]
            setattr(cell, column, getattr(cell, column) + nbytes)
            by_dtype = cell.dtypes.setdefault(column, {})
            name = str(dtype).removeprefix("torch.")
            by_dtype[name] = by_dtype.get(name, 0) + nbytes
        return counted


def _is_scaled(t) -> bool:
    return hasattr(t, "__tensor_flatten__")


def _classify(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> class name, each parameter once."""
    classes = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            fp8 = (isinstance(module, Float8Linear) and name == "weight") or _is_scaled(p)
            if fp8 or id(p) not in classes:
                classes[id(p)] = "fp8_linear" if fp8 else "other"
    return classes


def _module_extra_tensors(module: nn.Module):
    """Tensors a module holds as plain attributes (e.g. a cached FP8 weight), not params/buffers."""
    for value in vars(module).values():
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Measure the bytes of ``model``'s weights, gradients and ``optimizer``'s state, per class.

    Call it where the numbers matter, e.g. right after backward and before ``optimizer.step()``
    (gradients exist then). Reads tensors only; changes nothing.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    classes = _classify(model)
    report = MemoryReport({name: ClassBytes() for name in CLASSES})
    count = _Counter(report)
    params = {id(p): p for p in model.parameters()}
    for pid, p in params.items():
        report.classes[classes[pid]].params += p.numel()
        count.add(p, classes[pid], "weights")
    for pid, p in params.items():
        if p.grad is not None:
            report.grads_present = True
            count.add(p.grad, classes[pid], "grads")
    if optimizer is not None:
        for p, state in optimizer.state.items():
            cls = classes.get(id(p), "other")
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    count.add(value, cls, "optimizer")
    for module in model.modules():
        fp8_module = any(classes.get(id(p)) == "fp8_linear" for p in module.parameters(recurse=False))
        owner = "fp8_linear" if fp8_module else None
        for b in module.buffers(recurse=False):
            count.add(b, owner, "fp8_state")
        for t in _module_extra_tensors(module):
            count.add(t, owner, "fp8_state")
    return report
