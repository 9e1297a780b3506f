"""Tests for fp8lm.data: corpora, split rule, fingerprint, tokenizers, batches."""
import json
import pickle

import numpy as np
import pytest
import torch

from fp8lm.data import (CORPORA, BatchSampler, BPETokenizer, ByteTokenizer, Corpus, fixed_batches,
                        is_val_file, load_corpus)


def _make_folder(root, n=200, prefix="doc"):
    """A folder of n small text files with distinct contents."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{prefix}{i:04d}.txt").write_text(f"file {i}: def f{i}(x):\n    return x * {i}\n")
    return root


@pytest.fixture(scope="module")
def stdlib():
    return load_corpus()


# ----------------------------------------------------------------- corpora
def test_default_corpus(stdlib):
    assert isinstance(stdlib, Corpus)
    assert stdlib.name == "python-stdlib" and "python-stdlib" in CORPORA
    fp = stdlib.fingerprint
    assert fp["files"] > 100 and fp["bytes"] > 1_000_000
    assert fp["tokenizer"] == "byte" and len(fp["sha256"]) == 64
    assert stdlib.vocab_size == 256 and isinstance(stdlib.tokenizer, ByteTokenizer)
    assert stdlib.train.dtype == torch.uint8 and stdlib.train.dim() == 1
    frac = len(stdlib.val) / (len(stdlib.train) + len(stdlib.val))
    assert 0.01 < frac < 0.15
    assert "def " in stdlib.tokenizer.decode(stdlib.train[:20000].tolist())


def test_default_corpus_fingerprint_stable(stdlib):
    again = load_corpus()
    assert again.fingerprint == stdlib.fingerprint
    assert torch.equal(again.train, stdlib.train) and torch.equal(again.val, stdlib.val)


def test_fingerprint_changes_with_content(tmp_path):
    folder = _make_folder(tmp_path / "d", n=30)
    a, b = load_corpus(data=str(folder)), load_corpus(data=str(folder))
    assert a.fingerprint == b.fingerprint and a.fingerprint["files"] == 30
    (folder / "doc0007.txt").write_text("changed\n")
    c = load_corpus(data=str(folder))
    assert c.fingerprint["sha256"] != a.fingerprint["sha256"]
    (folder / "doc0007.txt").rename(folder / "renamed.txt")  # same content, new path
    d = load_corpus(data=str(folder))
    assert d.fingerprint["sha256"] != c.fingerprint["sha256"]


def test_folder_split_by_file_hash(tmp_path):
    folder = _make_folder(tmp_path / "d", n=400)
    c = load_corpus(data=str(folder))
    names = sorted(p.name for p in folder.iterdir())
    val_names = [n for n in names if is_val_file(n)]
    assert 0.02 < len(val_names) / len(names) < 0.09
    val_text = c.tokenizer.decode(c.val.tolist())
    train_text = c.tokenizer.decode(c.train.tolist())
    for n in names:
        marker = f"file {int(n[3:7])}:"
        assert (marker in val_text) == (n in val_names)
        assert (marker in train_text) == (n not in val_names)


def test_folder_split_never_empty(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha " * 10)
    (folder / "b.txt").write_text("beta " * 10)
    c = load_corpus(data=str(folder))
    assert len(c.train) > 0 and len(c.val) > 0


def test_folder_skips_hidden_and_binary(tmp_path):
    folder = _make_folder(tmp_path / "d", n=10)
    (folder / ".hidden.txt").write_text("secret")
    (folder / ".git").mkdir()
    (folder / ".git" / "x.txt").write_text("secret")
    (folder / "blob.bin").write_bytes(b"ab\0cd")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.txt").write_text("deep text")
    c = load_corpus(data=str(folder))
    assert c.fingerprint["files"] == 11
    text = c.tokenizer.decode(torch.cat([c.train, c.val]).tolist())
    assert "deep text" in text and "secret" not in text and "\0" not in text


def test_single_file_split_by_position(tmp_path):
    f = tmp_path / "input.txt"
    f.write_text("".join(chr(97 + i % 26) for i in range(10_000)))
    c = load_corpus(data=str(f))
    ids = torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8)
    assert len(c.val) == 500
    assert torch.equal(c.val, ids[-500:]) and torch.equal(c.train, ids[:-500])
    assert c.fingerprint["files"] == 1


def test_invalid_utf8_is_replaced(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"ok \xff\xfe ok" * 100)
    c = load_corpus(data=str(f))
    assert "\ufffd" in c.tokenizer.decode(c.train.tolist())


def test_byte_vocab_size_override(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 100)
    assert load_corpus(data=str(f), vocab_size=512).vocab_size == 512


# -------------------------------------------------------------- tokenizers
def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo wörld — 日本語 🙂"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode([0xFF]) == "\ufffd"


def test_bpe_train_round_trip_and_cache(tmp_path):
    pytest.importorskip("tokenizers")
    folder = _make_folder(tmp_path / "d", n=60)
    cache = tmp_path / "cache"
    a = load_corpus(data=str(folder), tokenizer="bpe", vocab_size=300, cache_dir=str(cache))
    assert isinstance(a.tokenizer, BPETokenizer)
    assert a.vocab_size == 300 and 256 < a.tokenizer.vocab_size <= 300
    assert a.fingerprint["tokenizer"] == "bpe-300"
    assert a.train.dtype == torch.int32 and int(a.train.max()) < a.tokenizer.vocab_size
    assert len(a.train) < a.fingerprint["bytes"]  # merges compress
    text = "def f42(x):\n    return x * 42 — ünïcode 🙂\n"
    assert a.tokenizer.decode(a.tokenizer.encode(text)) == text
    assert len(list(cache.glob("bpe-300-*.json"))) == 1
    assert len(list(cache.glob("bpe-300-*.npy"))) == 2
    b = load_corpus(data=str(folder), tokenizer="bpe", vocab_size=300, cache_dir=str(cache))
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert b.tokenizer.encode(text) == a.tokenizer.encode(text)
    assert len(list(cache.iterdir())) == 3  # nothing new written
    assert not list(cache.glob("*.tmp*"))


def test_bpe_cache_from_env(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    monkeypatch.setenv("FP8LM_CACHE", str(tmp_path / "envcache"))
    f = tmp_path / "one.txt"
    f.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    c = load_corpus(data=str(f), tokenizer="bpe", vocab_size=280)
    assert list((tmp_path / "envcache").glob("bpe-280-*.json"))
    assert len(c.val) > 0 and len(c.train) > len(c.val)


# ---------------------------------------------------------------- .bin data
def _bin_folder(root, vocab, meta=None):
    root.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, 5000, dtype=np.uint16).tofile(root / "train.bin")
    rng.integers(0, vocab, 500, dtype=np.uint16).tofile(root / "val.bin")
    if meta == "json":
        (root / "meta.json").write_text(json.dumps({"vocab_size": vocab}))
    elif meta == "pkl":
        with open(root / "meta.pkl", "wb") as fh:
            pickle.dump({"vocab_size": vocab, "itos": {}}, fh)
    return root


@pytest.mark.parametrize("meta", ["json", "pkl"])
def test_bin_folder_with_meta(tmp_path, meta):
    folder = _bin_folder(tmp_path / "bin", 65, meta)
    c = load_corpus(data=str(folder))
    assert c.vocab_size == 65 and c.tokenizer is None
    assert len(c.train) == 5000 and len(c.val) == 500
    expected = np.fromfile(folder / "train.bin", dtype=np.uint16).astype(np.int64)
    assert torch.equal(c.train.to(torch.int64), torch.from_numpy(expected))
    assert c.fingerprint["files"] == 2 and c.fingerprint["tokenizer"] == "pretokenized"
    x, y = BatchSampler(c.train, 4, 16, seed=0).next()
    assert x.dtype == torch.int64 and int(x.max()) < 65


def test_bin_folder_vocab_arg(tmp_path):
    folder = _bin_folder(tmp_path / "bin", 1000)
    assert load_corpus(data=str(folder), vocab_size=1024).vocab_size == 1024
    with pytest.raises(ValueError, match="--vocab-size"):
        load_corpus(data=str(folder))
    with pytest.raises(ValueError, match="token id"):
        load_corpus(data=str(folder), vocab_size=100)
    (folder / "val.bin").unlink()
    with pytest.raises(ValueError, match="no val.bin"):
        load_corpus(data=str(folder), vocab_size=1024)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, match", [
    ({"corpus": "wikipedia"}, "python-stdlib"),
    ({"tokenizer": "sentencepiece"}, "byte, bpe"),
    ({"data": "/no/such/path/anywhere"}, "does not exist"),
    ({"vocab_size": 100}, "byte tokenizer"),
    ({"vocab_size": 0}, "positive"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_corpus(**kwargs)


def test_empty_data_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text"):
        load_corpus(data=str(tmp_path / "empty"))
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "x.bin").write_bytes(b"\0\1\2")
    with pytest.raises(ValueError, match="no text"):
        load_corpus(data=str(tmp_path / "bins"))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        load_corpus(data=str(tmp_path / "e.txt"))


def test_bpe_without_tokenizers_package(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ValueError, match="pip install tokenizers"):
        load_corpus(tokenizer="bpe", cache_dir=str(tmp_path))


def test_errors_are_one_line(tmp_path):
    for kwargs in ({"corpus": "nope"}, {"tokenizer": "nope"}, {"data": str(tmp_path / "missing")}):
        with pytest.raises(ValueError) as err:
            load_corpus(**kwargs)
        assert "\n" not in str(err.value)


def test_too_short_stream():
    tokens = torch.arange(10, dtype=torch.int32)
    with pytest.raises(ValueError, match="10 tokens.*seq_len=16"):
        BatchSampler(tokens, 2, 16, seed=0)
    with pytest.raises(ValueError, match="10 tokens"):
        fixed_batches(tokens, 2, 16, n_batches=1)


# ----------------------------------------------------------------- batches
TOKENS = torch.arange(5000, dtype=torch.int32)


def test_sampler_shapes_and_shift():
    x, y = BatchSampler(TOKENS, 8, 32, seed=1).next()
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y, x + 1)  # arange tokens: y is x shifted by one
    assert int(y.max()) < len(TOKENS)


def test_sampler_deterministic_and_seed_dependent():
    a, b, c = (BatchSampler(TOKENS, 4, 16, seed=s) for s in (7, 7, 8))
    torch.manual_seed(123)
    xa = [a.next()[0] for _ in range(5)]
    torch.manual_seed(456)
    xb = [b.next()[0] for _ in range(5)]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    assert not torch.equal(xa[0], c.next()[0])


def test_sampler_state_dict_resume(tmp_path):
    s = BatchSampler(TOKENS, 4, 16, seed=3)
    for _ in range(3):
        s.next()
    torch.save(s.state_dict(), tmp_path / "state.pt")
    expected = [s.next() for _ in range(4)]
    r = BatchSampler(TOKENS, 4, 16, seed=999)
    r.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert r.batches == 3
    got = [r.next() for _ in range(4)]
    assert all(torch.equal(e[0], g[0]) and torch.equal(e[1], g[1]) for e, g in zip(expected, got))
    assert r.batches == s.batches == 7
    with pytest.raises(ValueError, match="seq_len"):
        BatchSampler(TOKENS, 4, 8, seed=0).load_state_dict(s.state_dict())


def test_fixed_batches_deterministic_and_isolated():
    torch.manual_seed(0)
    a = fixed_batches(TOKENS, 4, 16, n_batches=3, seed=5)
    torch.manual_seed(12345)
    b = fixed_batches(TOKENS, 4, 16, n_batches=3, seed=5)
    assert len(a) == 3 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert torch.equal(a[0][1][:, :-1], a[0][0][:, 1:])
    torch.manual_seed(0)
    seeded = torch.get_rng_state()
    fixed_batches(TOKENS, 4, 16, n_batches=3, seed=5)
    assert torch.equal(torch.get_rng_state(), seeded)  # global RNG untouched
    assert not torch.equal(a[0][0], fixed_batches(TOKENS, 4, 16, n_batches=1, seed=6)[0][0])


def test_fixed_batches_independent_of_sampler():
    s = BatchSampler(TOKENS, 4, 16, seed=0)
    before = s.state_dict()["generator"].clone()
    fixed_batches(TOKENS, 4, 16, n_batches=2, seed=0)
    assert torch.equal(s.gen.get_state(), before)


def test_sampler_on_default_corpus(stdlib):
    x, y = BatchSampler(stdlib.train, 2, 64, seed=0).next()
    assert x.dtype == torch.int64 and int(x.max()) < 256
    vx = fixed_batches(stdlib.val, 2, 64, n_batches=2)
    assert len(vx) == 2 and vx[0][0].shape == (2, 64)
