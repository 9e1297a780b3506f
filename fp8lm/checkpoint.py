"""Exact checkpoints: save, load (with checks), find the latest, export plain BF16 weights.

    fp8lm.save_checkpoint("runs/a/step-000100", model, optimizer, 100, sampler=sampler, extra={...})
    info = fp8lm.load_checkpoint("runs/a", model, optimizer, sampler=sampler)   # the latest step
    fp8lm.export_weights("runs/a/step-000100", "model.safetensors")             # BF16, original names

What makes a resumed run bit-identical to one that never stopped: every bit that the next step
reads is stored as it is, never re-rounded.

* ``model.safetensors``: every parameter and every buffer, persistent or not (FP8 scaling state
  such as ``fp8_amax_history`` / ``fp8_last_scale`` is a non-persistent buffer; a buffer that only
  saves time, ``fp8lm.nn.linear.HINT_BUFFERS``, may be absent from an older checkpoint), in its stored
  dtype. A tensor subclass that keeps its value in inner tensors (``fp8lm.tensor.ScaledTensor``:
  FP16 ``_data`` + FP32 ``_scale``) is stored as those inner tensors, under ``NAME::INNER``, and
  loaded by copying them back into the model's own inner tensors (no dequantize/requantize).
* ``optimizer.pt``: ``optimizer.state_dict()`` as the optimizer returns it (FP8/FP16 moments with
  their scales, step counts, a stochastic-rounding generator state), loaded with
  ``torch.load(weights_only=True)``: tensors and plain containers only, no arbitrary pickle.
* ``train_state.pt``: RNG states (torch CPU, every CUDA device when CUDA is in use, Python
  ``random``, NumPy), the data sampler's and the LR scheduler's ``state_dict``, the step, and
  ``extra`` (the caller's loop state, e.g. loss history), also ``weights_only``.
* ``meta.json``: format version, step, level, recipe, model class and shape (its config), the
  manifest of every stored tensor (shape, dtype, kind), the optimizer class, ``extra`` in
  JSON-safe form (NaN -> null), and the size and SHA-256 of every file above.

Atomic writes: everything goes into a fresh temporary folder next to the target
(``.NAME.tmp-XXXX``), each file is fsync'ed, ``meta.json`` is written last, the folder is
fsync'ed and renamed onto the target in one ``os.rename``, then the parent is fsync'ed. A crash
at any point leaves either the old state or the complete new checkpoint; a leftover temporary
folder is never mistaken for a checkpoint (its name starts with a dot and ``latest_checkpoint``
only reads ``step-*`` folders that hold ``meta.json``). Re-saving onto an existing checkpoint
moves the old one aside first and deletes it only after the new one is in place.

Checks on load, each a one-line ``ValueError`` naming what differs: missing files, files whose
size or SHA-256 differ from ``meta.json`` (truncation, corruption), another level or recipe,
another model class or shape (config fields), missing/unexpected tensors, other shapes or
dtypes, another optimizer class.

Export: ``export_weights`` writes the ``state_dict`` entries (the original, pre-conversion
names: conversion keeps them) as BF16 safetensors; scaled tensors are dequantized
(``_data.float() / _scale``) first. Non-persistent buffers (scaling state, rotary tables) are
left out, so ``build_model(preset).load_state_dict(load_file(out))`` works without fp8lm (GPT or UnitGPT).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import secrets
import shutil
import stat
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fp8lm.nn.linear import HINT_BUFFERS

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_info", "latest_checkpoint",
           "resolve_checkpoint", "checkpoint_dir", "export_weights", "FORMAT_VERSION"]

FORMAT_VERSION = 1
MODEL_FILE, OPTIM_FILE, STATE_FILE, META_FILE = "model.safetensors", "optimizer.pt", "train_state.pt", "meta.json"
INNER_SEP = "::"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------ naming
def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> str:
    """The folder of step ``step`` in ``run_dir``: ``run_dir/step-000100`` (6 digits, more if needed)."""
    return os.path.join(os.fspath(run_dir), f"step-{step:06d}")


def latest_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The complete ``step-*`` checkpoint with the highest step in ``run_dir``, or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [(int(m.group(1)), d) for d in run_dir.iterdir()
             if (m := _STEP_DIR.match(d.name)) and (d / META_FILE).is_file()]
    return str(max(found)[1]) if found else None


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """``path`` itself if it is a checkpoint, else its latest ``step-*`` checkpoint; ValueError if none."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise ValueError(f"checkpoint path '{path}' does not exist")
    if (p / META_FILE).is_file():
        return str(p)
    latest = latest_checkpoint(p)
    if latest is None:
        raise ValueError(f"'{path}' is neither a checkpoint (no {META_FILE}) nor a run folder with step-* checkpoints")
    return latest


# ----------------------------------------------------------- model tensors
def _is_scaled(t) -> bool:
    return hasattr(t, "__tensor_flatten__")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent too) by its first qualified name."""
    entries = dict(model.named_parameters())
    entries.update(model.named_buffers())
    return entries


def _inner(t: torch.Tensor) -> dict[str, torch.Tensor]:
    names, _ = t.__tensor_flatten__()
    return {n: getattr(t, n) for n in names}


def _manifest_entry(t: torch.Tensor, persistent: bool) -> dict:
    entry = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "persistent": persistent}
    if _is_scaled(t):
        entry["kind"] = f"{type(t).__module__}.{type(t).__qualname__}"
        entry["inner"] = {n: {"shape": list(x.shape), "dtype": _dtype_name(x.dtype)} for n, x in _inner(t).items()}
    else:
        entry["kind"] = "plain"
    return entry


def _state_dict_names(model: nn.Module) -> dict[str, str]:
    """state_dict key -> the name its tensor is stored under (tied weights have several keys)."""
    first: dict[int, str] = {}
    for name, t in _model_entries(model).items():
        first.setdefault(id(t), name)
    return {key: first[id(t)] for key, t in model.state_dict(keep_vars=True).items()
            if isinstance(t, torch.Tensor) and id(t) in first}


def _flat_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(safetensors dict, manifest) of the model; inner tensors of subclasses under NAME::INNER."""
    persistent = set(_state_dict_names(model).values())
    tensors, manifest, seen = {}, {}, set()
    for name, t in _model_entries(model).items():
        manifest[name] = _manifest_entry(t, name in persistent)
        parts = {f"{name}{INNER_SEP}{n}": x for n, x in _inner(t).items()} if _is_scaled(t) else {name: t}
        for key, x in parts.items():
            x = x.detach()
            ptr = (str(x.device), x.untyped_storage().data_ptr())
            shared = ptr in seen and x.numel() > 0
            seen.add(ptr)
            tensors[key] = x.clone() if shared else x.contiguous()  # safetensors refuses shared storage
    return tensors, manifest


# -------------------------------------------------------------- file helpers
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # platforms without directory file descriptors
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_record(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _json_safe(obj):
    """Plain JSON: non-finite floats -> None, tuples -> lists, tensors/dtypes -> strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


# ------------------------------------------------------------------- RNG
def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    cuda = state.get("torch_cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ------------------------------------------------------------------ saving
def _model_meta(model: nn.Module) -> dict:
    report = getattr(model, "_fp8lm_report", None)
    cfg = getattr(model, "config", None)
    recipe = getattr(report, "recipe", None)
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": _json_safe(dataclasses.asdict(cfg)) if dataclasses.is_dataclass(cfg) else None,
        "level": getattr(report, "level", None),
        "recipe": _json_safe(dataclasses.asdict(recipe)) if dataclasses.is_dataclass(recipe) else None,
    }


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    step: int, *, scheduler=None, sampler=None, extra: dict | None = None) -> str:
    """Write a complete checkpoint folder at ``path`` atomically; return ``path``.

    Args:
        path: the checkpoint folder, e.g. ``checkpoint_dir(run_dir, step)``; its parent is created.
        model: the (possibly ``fp8lm.initialize``'d) model; every parameter and buffer is saved.
        optimizer: saved through its own ``state_dict()``; None saves no optimizer.
        step: the number of optimizer steps taken so far.
        scheduler, sampler: anything with ``state_dict()`` / ``load_state_dict()`` (optional).
        extra: the caller's own state (plain containers, numbers, strings, tensors).
    """
    if getattr(getattr(model, "_fp8lm_dp", None), "kind", None) == "fsdp":
        raise ValueError("save_checkpoint does not support FSDP2-sharded models (dp='fsdp') yet: sharded state "
                         "cannot be saved or loaded across world sizes; allowed: single-process or dp='ddp' models")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    final = Path(os.path.expanduser(os.fspath(path)))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # with the umask's permissions (mkdtemp would make it private)
    try:
        _write_files(tmp, model, optimizer, step, scheduler, sampler, extra)
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def _write_files(folder: Path, model, optimizer, step, scheduler, sampler, extra) -> None:
    """Write the tensor files, then meta.json (last) with their sizes and hashes."""
    tensors, manifest = _flat_tensors(model)
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt", "fp8lm_checkpoint": str(FORMAT_VERSION)})
    files = [MODEL_FILE, STATE_FILE]
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / OPTIM_FILE)
        files.append(OPTIM_FILE)
    state = {"step": step, "rng": _rng_state(), "extra": extra,
             "sampler": sampler.state_dict() if sampler is not None else None,
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    torch.save(state, folder / STATE_FILE)
    os.chmod(folder / MODEL_FILE, stat.S_IMODE((folder / STATE_FILE).stat().st_mode))  # safetensors makes it private
    for name in files:
        _fsync_file(folder / name)
    meta = {"fp8lm_checkpoint": FORMAT_VERSION, "step": step, "model": _model_meta(model),
            "tensors": manifest, "state_dict": _state_dict_names(model),
            "optimizer": None if optimizer is None else f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "torch_version": torch.__version__, "extra": _json_safe(extra),
            "files": {name: _file_record(folder / name) for name in files}}
    with open(folder / META_FILE, "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``; an existing ``final`` is moved aside and deleted after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------- loading
def checkpoint_info(path: str | os.PathLike) -> dict:
    """The ``meta.json`` of a checkpoint (``path`` a checkpoint or a run folder), with its ``path``."""
    folder = Path(resolve_checkpoint(path))
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint '{folder}' is corrupt: {META_FILE} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("fp8lm_checkpoint") != FORMAT_VERSION:
        raise ValueError(f"checkpoint '{folder}' has an unknown format (expected fp8lm_checkpoint "
                         f"{FORMAT_VERSION} in {META_FILE})")
    missing = [k for k in ("step", "model", "tensors", "state_dict", "files") if k not in meta]
    if missing:
        raise ValueError(f"checkpoint '{folder}' is corrupt: {META_FILE} lacks {', '.join(missing)}")
    meta["path"] = str(folder)
    return meta


def verify_files(meta: dict) -> None:
    """Raise ValueError if a checkpoint file is missing, or its size or SHA-256 differs from meta.json."""
    folder = Path(meta["path"])
    for name, record in meta["files"].items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"checkpoint '{folder}' is incomplete: {name} is missing")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ValueError(f"checkpoint '{folder}' is corrupt: {name} has {size} bytes, "
                             f"{META_FILE} says {record['bytes']} (truncated or changed)")
        if _file_record(path)["sha256"] != record["sha256"]:
            raise ValueError(f"checkpoint '{folder}' is corrupt: {name} does not match its SHA-256 in {META_FILE}")


def _differences(saved: dict | None, here: dict | None, what: str) -> list[str]:
    if saved == here:
        return []
    if saved is None or here is None:
        return [f"{what}: checkpoint {saved}, model {here}"]
    keys = sorted(set(saved) | set(here))
    return [f"{what} {k}: checkpoint {saved.get(k)!r}, model {here.get(k)!r}" for k in keys
            if saved.get(k) != here.get(k)]


def check_compatible(meta: dict, model: nn.Module, optimizer=None) -> None:
    """Raise ValueError naming what differs between a checkpoint and ``model`` (and ``optimizer``)."""
    saved, here = meta["model"], _model_meta(model)
    diffs = []
    if saved["level"] != here["level"]:
        diffs.append(f"level: checkpoint {saved['level']}, model {here['level']}")
    if saved["class"] != here["class"]:
        diffs.append(f"model class: checkpoint {saved['class']}, model {here['class']}")
    diffs += _differences(saved["config"], here["config"], "model shape")
    if not diffs and saved["level"] not in (None, "O0"):
        diffs += _differences(saved["recipe"], here["recipe"], "recipe")
    if not diffs:
        diffs += _tensor_differences(meta["tensors"], model)
    if optimizer is not None and meta.get("optimizer") is not None:
        opt_class = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
        if opt_class != meta["optimizer"]:
            diffs.append(f"optimizer: checkpoint {meta['optimizer']}, given {opt_class}")
    if optimizer is not None and meta.get("optimizer") is None:
        diffs.append("optimizer: the checkpoint holds no optimizer state")
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ValueError(f"checkpoint '{meta['path']}' does not match: {shown}")


def _hint(name: str) -> bool:
    """Whether the model tensor ``name`` is a buffer that only saves time (``fp8lm.nn.linear.HINT_BUFFERS``):
    a checkpoint written before such a buffer existed lacks it and loads all the same."""
    return name.rpartition(".")[2] in HINT_BUFFERS


def _tensor_differences(saved: dict, model: nn.Module) -> list[str]:
    persistent = set(_state_dict_names(model).values())
    here = {n: _manifest_entry(t, n in persistent) for n, t in _model_entries(model).items()}
    diffs = [f"tensor {n} missing from the checkpoint" for n in here if n not in saved and not _hint(n)]
    diffs += [f"tensor {n} not in the model" for n in saved if n not in here]
    for name in (n for n in here if n in saved):
        for key in ("kind", "shape", "dtype", "inner"):
            if saved[name].get(key) != here[name].get(key):
                diffs.append(f"tensor {name} {key}: checkpoint {saved[name].get(key)}, model {here[name].get(key)}")
    return diffs


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"cannot read '{path}': {type(err).__name__}: {str(err).splitlines()[0]}") from None


def _load_model_tensors(folder: Path, model: nn.Module, manifest: dict) -> None:
    try:
        saved = load_file(str(folder / MODEL_FILE))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read '{folder / MODEL_FILE}': {err}") from None
    with torch.no_grad():
        for name, t in _model_entries(model).items():
            if _hint(name) and name not in saved:
                continue  # a time-saving buffer the checkpoint predates: the model keeps its own value
            targets = {f"{name}{INNER_SEP}{n}": x for n, x in _inner(t).items()} if _is_scaled(t) else {name: t}
            for key, x in targets.items():
                if key not in saved:
                    raise ValueError(f"checkpoint '{folder}' is corrupt: {MODEL_FILE} lacks {key}")
                if saved[key].dtype != x.dtype or saved[key].shape != x.shape:
                    raise ValueError(f"checkpoint '{folder}': {key} is {saved[key].dtype} {tuple(saved[key].shape)}, "
                                     f"the model has {x.dtype} {tuple(x.shape)}")
                x.copy_(saved[key])


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, scheduler=None, sampler=None, restore_rng: bool = True, verify: bool = True) -> dict:
    """Restore a checkpoint into ``model`` (and ``optimizer``, ``scheduler``, ``sampler``, the RNGs).

    ``path`` is a checkpoint folder, or a run folder (its latest ``step-*`` checkpoint is used).
    The model (and optimizer) must be built exactly as for the saved run: same class and shape,
    same ``fp8lm.initialize`` level and recipe; anything else raises a ValueError naming the
    difference before anything is changed. ``verify`` checks every file's size and SHA-256.

    Returns the checkpoint's ``meta.json`` dict with ``step``, ``path`` and ``extra`` (as saved,
    exact, from ``train_state.pt``).
    """
    meta = checkpoint_info(path)
    folder = Path(meta["path"])
    if verify:
        verify_files(meta)
    check_compatible(meta, model, optimizer)
    state = _torch_load(folder / STATE_FILE)
    optim_state = _torch_load(folder / OPTIM_FILE) if optimizer is not None else None
    for obj, key in ((sampler, "sampler"), (scheduler, "scheduler")):
        if obj is not None and state[key] is None:
            raise ValueError(f"checkpoint '{folder}' holds no {key} state, but a {key} was given")
    if optimizer is not None:  # first: torch checks the groups before it changes anything
        try:
            optimizer.load_state_dict(optim_state)
        except (ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"checkpoint '{folder}': its optimizer state does not fit this optimizer: {err}") from None
    _load_model_tensors(folder, model, meta["tensors"])
    if sampler is not None:
        sampler.load_state_dict(state["sampler"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_state(state["rng"])
    meta["extra"] = state["extra"]
    return meta


# ------------------------------------------------------------------ export
def _dequantize(inner: dict[str, torch.Tensor], name: str, kind: str) -> torch.Tensor:
    if set(inner) != {"_data", "_scale"}:
        raise ValueError(f"cannot export {name}: a {kind} with inner tensors {sorted(inner)} "
                         "(export knows _data + _scale)")
    return inner["_data"].float() / inner["_scale"].float()


def export_weights(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write the checkpoint's ``state_dict`` as plain ``dtype`` safetensors at ``out``; return a summary.

    Keys are the model's ``state_dict`` keys (the original, pre-conversion names); scaled
    tensors are dequantized, floating tensors cast to ``dtype``, others kept. The file loads
    with ``model.load_state_dict(safetensors.torch.load_file(out))`` into the same model class
    built without fp8lm.
    """
    meta = checkpoint_info(checkpoint)
    verify_files(meta)
    folder = Path(meta["path"])
    try:
        saved = load_file(str(folder / MODEL_FILE))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read '{folder / MODEL_FILE}': {err}") from None
    weights, plain = {}, {}
    for key, name in meta["state_dict"].items():
        if name not in plain:
            entry = meta["tensors"][name]
            if entry["kind"] == "plain":
                t = saved[name]
            else:
                t = _dequantize({n: saved[f"{name}{INNER_SEP}{n}"] for n in entry["inner"]}, name, entry["kind"])
            plain[name] = t.to(dtype) if t.is_floating_point() else t
        weights[key] = plain[name] if key == name else plain[name].clone()  # safetensors refuses shared storage
    out = Path(os.path.expanduser(os.fspath(out)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(weights, str(tmp), metadata={"format": "pt", "source": str(folder), "step": str(meta["step"])})
        _fsync_file(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    n_params = sum(t.numel() for t in plain.values())  # tied weights once
    return {"path": str(out), "tensors": len(weights), "params": n_params, "bytes": out.stat().st_size,
            "step": meta["step"], "model": meta["model"]}
