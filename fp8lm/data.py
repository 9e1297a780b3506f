"""Corpora, tokenizers and batches for fp8lm. Works offline, with no downloads.

Corpora
    ``python-stdlib`` (the default) is every ``.py`` file of the running
    Python's standard library (``sysconfig.get_paths()["stdlib"]``).
    ``python-all`` adds every ``.py`` file of every site-packages /
    dist-packages folder on ``sys.path``. Both skip folders named
    ``site-packages`` (in the stdlib), ``test``, ``tests`` and ``idle_test``.
    Users can pass ``data=PATH`` instead: a text file, a folder of text files
    (read recursively, skipping hidden entries and binary files, meaning files
    that contain NUL bytes), or a nanoGPT folder with ``train.bin`` and
    ``val.bin`` (uint16 token ids, memory-mapped).

    Files are sorted by relative path (POSIX form), so every machine reads
    them in the same order. They are decoded as UTF-8 with ``errors="replace"``
    and joined with ``SEPARATOR``.

Split rule (deterministic, with no RNG)
    For a folder or a named corpus, a file goes to validation iff
    ``int(sha1(relative_path).hexdigest(), 16) % 20 == 0`` (about 5%).
    If that leaves validation empty, the last file in sorted order moves to
    validation. If it leaves train empty, every file but the last goes back
    to train. A folder that holds a single file is split like a single text
    file: by position, the last 5% (at least one token) is validation. With
    the byte tokenizer that is exactly the last 5% of tokens. With BPE the
    text is cut at 95% of its characters before tokenizing, so that the
    tokenizer is trained on the train part only.

Fingerprint
    ``{"source", "files", "bytes", "sha256", "tokenizer"}``. The sha256 is
    taken over ``relative_path + NUL + raw content`` of every file, in order,
    so two machines can check that they train on the same data.

Tokenizers
    ``byte`` (default): UTF-8 bytes, vocab 256, uint8 token tensors.
    ``bpe``: a byte-level BPE trained on the train split with the optional
    ``tokenizers`` package (default vocab 4096). The tokenizer JSON and the
    encoded ids (.npy) are cached under ``cache_dir``, which defaults to
    ``$FP8LM_CACHE`` and then ``~/.cache/fp8lm``. The cache is keyed by the
    corpus fingerprint and the vocab size. Token tensors are int32.
    Pre-tokenized ``.bin`` data has no tokenizer (``Corpus.tokenizer is None``)
    and its tensors are zero-copy uint16 views of the files.

Batches
    ``BatchSampler`` draws random (B, T) windows with its own
    ``torch.Generator``. Its ``state_dict`` makes resume exact.
    ``fixed_batches`` builds the same validation batches on every call and
    never touches a global RNG.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import torch

CORPORA = ("python-stdlib", "python-all")
TOKENIZERS = ("byte", "bpe")
SEPARATOR = "\n\n"
SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})
DEFAULT_BPE_VOCAB = 4096
VAL_MODULUS = 20  # 1 in 20 files (about 5%) goes to validation

File = tuple[str, bytes]  # (relative POSIX path, raw content)


# ----------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256). Decoding replaces invalid bytes."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """Return the UTF-8 bytes of ``text`` as a list of ints."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Turn byte ids back into text (invalid UTF-8 becomes U+FFFD)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE trained locally with the ``tokenizers`` package."""

    def __init__(self, tokenizer, requested_vocab: int):
        self._tok = tokenizer
        self.name = f"bpe-{requested_vocab}"
        self.vocab_size: int = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, progress: bool = False) -> "BPETokenizer":
        """Train a byte-level BPE on ``texts``. Needs ``tokenizers``."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, vocab_size)

    @classmethod
    def load(cls, path: str | Path, requested_vocab: int) -> "BPETokenizer":
        """Load a tokenizer JSON saved by :meth:`save`."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), requested_vocab)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as JSON."""
        self._tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        """Encode one string to token ids."""
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many strings at once (the work runs in parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        """Turn token ids back into text."""
        return self._tok.decode([int(i) for i in ids])


Tokenizer = Union[ByteTokenizer, BPETokenizer]


@dataclass
class Corpus:
    """A tokenized corpus, split into train and validation token streams."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    tokenizer: Tokenizer | None
    fingerprint: dict


# ------------------------------------------------------------- reading files
def _walk(root: Path, keep, skip_dirs: frozenset = SKIP_DIRS, skip_hidden: bool = False) -> list[Path]:
    """Files under ``root`` accepted by ``keep(name)``, pruning ``skip_dirs``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs
                       and not (skip_hidden and d.startswith("."))]
        found += [Path(dirpath, f) for f in filenames
                  if keep(f) and not (skip_hidden and f.startswith("."))]
    return found


def _site_dirs() -> list[Path]:
    """Every existing site-packages / dist-packages folder, without duplicates."""
    candidates = list(site.getsitepackages()) + [site.getusersitepackages()]
    candidates += [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    out, seen = [], set()
    for c in candidates:
        p = Path(c)
        if p.is_dir() and p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def _python_files(corpus: str) -> list[tuple[str, Path]]:
    """(relative path, path) of every file of a named corpus, sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    is_py = lambda name: name.endswith(".py")  # noqa: E731
    files = {p.relative_to(stdlib).as_posix(): p for p in _walk(stdlib, is_py)}
    if corpus == "python-all":
        for root in _site_dirs():
            for p in _walk(root, is_py, SKIP_DIRS - {"site-packages"}):
                files.setdefault(f"site-packages/{p.relative_to(root).as_posix()}", p)
    return sorted(files.items())


def _read(paths: list[tuple[str, Path]], desc: str, progress: bool, skip_binary: bool) -> list[File]:
    """Read raw bytes. With ``skip_binary``, drop files containing NUL bytes."""
    from tqdm.auto import tqdm

    out = []
    for rel, p in tqdm(paths, desc=f"reading {desc}", unit="file", disable=not progress):
        raw = p.read_bytes()
        if not (skip_binary and b"\0" in raw):
            out.append((rel, raw))
    return out


def _fingerprint(source: str, files: list[File], tokenizer: str) -> dict:
    """Count, size and sha256 over (path, NUL, content) of every file, in order."""
    h = hashlib.sha256()
    for rel, raw in files:
        h.update(rel.encode("utf-8") + b"\0")
        h.update(raw)
    return {"source": source, "files": len(files), "bytes": sum(len(r) for _, r in files),
            "sha256": h.hexdigest(), "tokenizer": tokenizer}


# ---------------------------------------------------------------- splitting
def is_val_file(rel_path: str) -> bool:
    """True iff this relative path belongs to the validation split."""
    return int(hashlib.sha1(rel_path.encode("utf-8")).hexdigest(), 16) % VAL_MODULUS == 0


def split_files(files: list[File]) -> tuple[list[File], list[File]]:
    """Split sorted files by path hash, so that neither side is empty (needs >= 2 files)."""
    val = [f for f in files if is_val_file(f[0])]
    train = [f for f in files if not is_val_file(f[0])]
    if not val or not train:
        train, val = files[:-1], files[-1:]
    return train, val


def _n_val(n: int) -> int:
    """Size of the positional validation tail: the last 5%, at least 1."""
    return max(1, n // VAL_MODULUS)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _byte_tensor(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a uint8 tensor (no Python loop)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


# --------------------------------------------------------------- tokenizing
def _cache_root(cache_dir: str | None) -> Path:
    """The ``cache_dir`` argument, else $FP8LM_CACHE, else ~/.cache/fp8lm."""
    root = cache_dir or os.environ.get("FP8LM_CACHE") or "~/.cache/fp8lm"
    return Path(root).expanduser()


def _save_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def _bpe_tokenize(train_docs: list[str], val_docs: list[str], fp: dict, vocab: int,
                  cache_dir: str | None, progress: bool):
    """Train a BPE on ``train_docs`` (or load it from the cache), then encode both splits."""
    key = hashlib.sha256(f"{fp['sha256']}|{fp['files']}|{fp['bytes']}|{vocab}".encode()).hexdigest()[:20]
    root = _cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    stem = root / f"bpe-{vocab}-{key}"
    tok_path, ids_path = stem.with_suffix(".json"), {s: Path(f"{stem}.{s}.npy") for s in ("train", "val")}
    if tok_path.exists():
        tok = BPETokenizer.load(tok_path, vocab)
    else:
        tok = BPETokenizer.train(train_docs, vocab, progress)
        tok.save(tok_path.with_name(tok_path.name + ".tmp"))
        os.replace(tok_path.with_name(tok_path.name + ".tmp"), tok_path)
    out = []
    for split, docs in (("train", train_docs), ("val", val_docs)):
        if ids_path[split].exists():
            ids = np.load(ids_path[split])
        else:
            ids = np.fromiter((i for doc in tok.encode_batch(docs) for i in doc), dtype=np.int32)
            _save_atomic(ids_path[split], lambda fh, ids=ids: np.save(fh, ids))
        out.append(torch.from_numpy(ids.astype(np.int32, copy=False)))
    return tok, out[0], out[1]


def _tokenize_docs(train_docs: list[str], val_docs: list[str], fp: dict, tokenizer: str,
                   vocab: int, cache_dir: str | None, progress: bool):
    """Tokenize split documents, joined with SEPARATOR -> (tokenizer, train, val)."""
    if tokenizer == "byte":
        return ByteTokenizer(), _byte_tensor(SEPARATOR.join(train_docs)), _byte_tensor(SEPARATOR.join(val_docs))
    # BPE: each document carries its trailing separator, so encodings can simply be concatenated.
    tr = [d + SEPARATOR for d in train_docs[:-1]] + train_docs[-1:]
    va = [d + SEPARATOR for d in val_docs[:-1]] + val_docs[-1:]
    return _bpe_tokenize(tr, va, fp, vocab, cache_dir, progress)


def _tokenize_single(text: str, fp: dict, tokenizer: str, vocab: int, cache_dir: str | None, progress: bool):
    """Split one document by position (last 5% is validation) and tokenize it."""
    if tokenizer == "byte":
        ids = _byte_tensor(text)
        if len(ids) < 2:
            raise ValueError(f"corpus '{fp['source']}' is too small: {len(ids)} byte(s), need at least 2")
        n = len(ids) - _n_val(len(ids))
        return ByteTokenizer(), ids[:n], ids[n:]
    cut = len(text) - _n_val(len(text))
    return _bpe_tokenize([text[:cut]], [text[cut:]], fp, vocab, cache_dir, progress)


# ------------------------------------------------------------------- loading
def _check_names(corpus: str, tokenizer: str, vocab_size: int | None) -> None:
    """Validate the corpus name, tokenizer name and vocab size sign."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus '{corpus}'; allowed: {', '.join(CORPORA)} (or pass a data path)")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer '{tokenizer}'; allowed: {', '.join(TOKENIZERS)}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size}")


def _text_vocab(tokenizer: str, vocab_size: int | None) -> int:
    """The vocab size for text data: checked against the tokenizer, defaulted."""
    if tokenizer == "byte":
        if vocab_size is not None and vocab_size < 256:
            raise ValueError(f"vocab_size {vocab_size} is too small for the byte tokenizer; it needs >= 256")
        return vocab_size or 256
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise ValueError("tokenizer 'bpe' needs the tokenizers package: pip install tokenizers") from None
    if vocab_size is not None and vocab_size <= 256:
        raise ValueError(f"vocab_size {vocab_size} is too small for the bpe tokenizer; it needs > 256")
    return vocab_size or DEFAULT_BPE_VOCAB


def _bin_vocab(folder: Path, vocab_size: int | None) -> int:
    """The vocab size of a .bin folder: the argument, else meta.json, else meta.pkl."""
    if vocab_size is not None:
        return vocab_size
    if (folder / "meta.json").exists():
        meta = json.loads((folder / "meta.json").read_text())
    elif (folder / "meta.pkl").exists():
        with open(folder / "meta.pkl", "rb") as fh:
            meta = pickle.load(fh)  # nanoGPT's format; only load folders you trust
    else:
        meta = {}
    if not isinstance(meta, dict) or "vocab_size" not in meta:
        raise ValueError(f"cannot tell the vocab size of '{folder}' (no meta.json or meta.pkl with "
                         "vocab_size); pass --vocab-size")
    return int(meta["vocab_size"])


def _load_bin(folder: Path, tokenizer: str, vocab_size: int | None) -> Corpus:
    """Load a nanoGPT folder: train.bin and val.bin of uint16 ids (memory-mapped)."""
    if tokenizer != "byte":
        raise ValueError(f"'{folder}' holds pre-tokenized train.bin/val.bin; drop --tokenizer {tokenizer}")
    paths = [folder / "train.bin", folder / "val.bin"]
    for p in paths:
        if not p.is_file():
            raise ValueError(f"'{folder}' has no {p.name}; a .bin folder needs both train.bin and val.bin")
    vocab = _bin_vocab(folder, vocab_size)
    splits = []
    for p in paths:
        arr = np.memmap(p, dtype=np.uint16, mode="c") if p.stat().st_size else np.zeros(0, np.uint16)
        if arr.size == 0:
            raise ValueError(f"'{p}' is empty; it needs uint16 token ids")
        if int(arr.max()) >= vocab:
            raise ValueError(f"'{p}' holds token id {int(arr.max())} >= vocab_size {vocab}; "
                             "pass a larger --vocab-size")
        splits.append(torch.from_numpy(arr))
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    fp = {"source": str(folder), "files": 2, "bytes": sum(p.stat().st_size for p in paths),
          "sha256": h.hexdigest(), "tokenizer": "pretokenized"}
    return Corpus(str(folder), splits[0], splits[1], vocab, None, fp)


def _user_files(path: Path, progress: bool) -> list[File]:
    """Read a user text file, or every text file under a user folder."""
    if path.is_file():
        files = _read([(path.name, path)], path.name, progress, skip_binary=True)
        if not files:
            raise ValueError(f"'{path}' is not a text file (it contains NUL bytes)")
    else:
        found = _walk(path, lambda name: True, frozenset(), skip_hidden=True)
        paths = sorted((p.relative_to(path).as_posix(), p) for p in found)
        files = _read(paths, path.name, progress, skip_binary=True)
    if sum(len(raw) for _, raw in files) == 0:
        raise ValueError(f"'{path}' holds no text (empty, or only hidden or binary files)")
    return files


def load_corpus(corpus: str = "python-stdlib", data: str | None = None, tokenizer: str = "byte",
                vocab_size: int | None = None, cache_dir: str | None = None,
                progress: bool = False) -> Corpus:
    """Load a named corpus (or user ``data``), split it and tokenize it.

    ``data`` wins over ``corpus``: a text file, a folder of text files, or a
    folder with nanoGPT ``train.bin``/``val.bin``. ``vocab_size`` defaults to
    256 (byte) or 4096 (bpe). For .bin data it overrides meta.json/meta.pkl.
    ``Corpus.vocab_size`` is the requested size, which may be larger than the
    tokenizer's own. Raises ValueError (one line) on bad input.
    """
    _check_names(corpus, tokenizer, vocab_size)
    if data is not None:
        path = Path(data).expanduser()
        if not path.exists():
            raise ValueError(f"data path '{data}' does not exist")
        if path.is_dir() and ((path / "train.bin").exists() or (path / "val.bin").exists()):
            return _load_bin(path, tokenizer, vocab_size)
        vocab = _text_vocab(tokenizer, vocab_size)
        name, files = str(data), _user_files(path, progress)
    else:
        vocab = _text_vocab(tokenizer, vocab_size)
        name = corpus
        files = _read(_python_files(corpus), corpus, progress, skip_binary=False)
        if not files:
            raise ValueError(f"corpus '{corpus}' is empty: no .py files found in this Python installation")
    tok_name = "byte" if tokenizer == "byte" else f"bpe-{vocab}"
    fp = _fingerprint(name, files, tok_name)
    if len(files) == 1:
        tok, train, val = _tokenize_single(_decode(files[0][1]), fp, tokenizer, vocab, cache_dir, progress)
    else:
        train_files, val_files = split_files(files)
        tok, train, val = _tokenize_docs([_decode(r) for _, r in train_files], [_decode(r) for _, r in val_files],
                                         fp, tokenizer, vocab, cache_dir, progress)
    return Corpus(name, train, val, vocab, tok, fp)


# ------------------------------------------------------------------- batches
def _check_window(tokens: torch.Tensor, batch_size: int, seq_len: int) -> None:
    """Raise ValueError unless ``tokens`` can hold one (seq_len + 1) window."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got batch_size={batch_size}, seq_len={seq_len}")
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
    if len(tokens) < seq_len + 2:
        raise ValueError(f"token stream has {len(tokens)} tokens; seq_len={seq_len} needs at least "
                         f"{seq_len + 2} (use a smaller --seq-len or more data)")


def _gather(tokens: torch.Tensor, offsets: torch.Tensor, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut (B, T+1) windows at ``offsets``; return int64 (x, y) on ``device``."""
    idx = offsets[:, None] + torch.arange(seq_len + 1)
    w = tokens[idx.to(tokens.device)].to(torch.int64)
    w = w.to(device, non_blocking=True)
    return w[:, :-1], w[:, 1:]


class BatchSampler:
    """Random (B, T) windows from a 1-D token tensor, driven by its own torch.Generator."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int,
                 device: str | torch.device = "cpu"):
        _check_window(tokens, batch_size, seq_len)
        self.tokens, self.batch_size, self.seq_len, self.device = tokens, batch_size, seq_len, device
        self.gen = torch.Generator().manual_seed(seed)
        self.batches = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the next batch: int64 x, y of shape (B, T), where y is x shifted by one."""
        offsets = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        self.batches += 1
        return _gather(self.tokens, offsets, self.seq_len, self.device)

    def state_dict(self) -> dict:
        """Generator state and the number of batches drawn so far."""
        return {"generator": self.gen.get_state(), "batches": self.batches,
                "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output, so the next batches match the saved sampler's."""
        if (state["batch_size"], state["seq_len"]) != (self.batch_size, self.seq_len):
            raise ValueError(f"sampler state is for batch_size={state['batch_size']}, seq_len={state['seq_len']}; "
                             f"this sampler has batch_size={self.batch_size}, seq_len={self.seq_len}")
        self.gen.set_state(state["generator"].cpu())
        self.batches = int(state["batches"])


def fixed_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, n_batches: int, seed: int = 0,
                  device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` deterministic (x, y) batches, e.g. for validation.

    Uses a private generator, so neither the global RNG nor any sampler is touched.
    """
    _check_window(tokens, batch_size, seq_len)
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(tokens) - seq_len - 1, (n_batches, batch_size), generator=gen)
    return [_gather(tokens, o, seq_len, device) for o in offsets]
