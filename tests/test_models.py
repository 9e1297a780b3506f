"""The reference GPT: preset shapes, forward shapes, initial loss, causality, gradients."""
import math

import pytest
import torch

import fp8lm
from fp8lm.models import GPT, PRESETS, GPTConfig, get_config

SMALL = GPTConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_dim=192, seq_len=32)


def meta_model(name, vocab_size=None):
    """A preset's model on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return GPT(get_config(name, vocab_size))


def test_llama_075b_projection_shapes():
    model = meta_model("llama-0.75b")
    block = model.layers[0]
    shapes = {name: (m.in_features, m.out_features) for name, m in
              [("qkv", block.attn.qkv), ("proj", block.attn.proj),
               ("gate_up", block.mlp.gate_up), ("down", block.mlp.down)]}
    assert shapes == {"qkv": (2048, 6144), "proj": (2048, 2048), "gate_up": (2048, 11264), "down": (5632, 2048)}
    assert model.config.vocab_size == 32000 and len(model.layers) == 12 and model.config.n_heads == 16
    assert model.head.out_features == 32000 and model.config.seq_len == 2048
    assert 0.7e9 < model.num_params() < 0.8e9


def test_llama_075b_vocab_is_fixed():
    assert get_config("llama-0.75b", vocab_size=256).vocab_size == 32000
    with pytest.raises(ValueError, match="fixed vocabulary"):
        get_config("llama-0.75b", vocab_size=50257)


@pytest.mark.parametrize("name, dim, layers, heads, ffn, seq", [
    ("tiny", 128, 4, 4, 384, 128),
    ("gpt-125m", 768, 12, 12, 2048, 1024),
])
def test_preset_dims(name, dim, layers, heads, ffn, seq):
    cfg = get_config(name)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.ffn_dim, cfg.seq_len) == (dim, layers, heads, ffn, seq)
    assert get_config(name, vocab_size=256).vocab_size == 256
    assert get_config(name, vocab_size=4096).vocab_size == 4096
    assert get_config(name, vocab_size=50257).vocab_size == 50304  # padded to a multiple of 64


def test_presets_are_multiples_of_16():
    for name in PRESETS:
        cfg = PRESETS[name]
        assert cfg.dim % 16 == 0 and cfg.ffn_dim % 16 == 0 and cfg.vocab_size % 16 == 0


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'; allowed: tiny"):
        get_config("huge")


def test_forward_shapes():
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx = torch.randint(0, 256, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 256)
    logits2, loss = model(idx, idx)
    assert torch.equal(logits, logits2) and loss.shape == () and loss.dtype == torch.float32


def test_initial_loss_is_log_vocab():
    torch.manual_seed(0)
    model = GPT(get_config("tiny"))
    idx = torch.randint(0, 256, (4, 64))
    _, loss = model(idx, torch.randint(0, 256, (4, 64)))
    assert abs(loss.item() - math.log(256)) < 0.3


def test_causal():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.randint(0, 256, (2, 32))
    changed = idx.clone()
    t = 20
    changed[:, t] = (changed[:, t] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_too_long_sequence():
    with pytest.raises(ValueError, match="exceeds the model's seq_len 32"):
        GPT(SMALL)(torch.zeros(1, 33, dtype=torch.long))


def test_init_stds():
    torch.manual_seed(0)
    model = GPT(get_config("tiny"))
    out_std = 0.02 / math.sqrt(2 * 4)
    assert abs(model.layers[0].attn.proj.weight.std().item() - out_std) < 0.1 * out_std
    assert abs(model.layers[0].mlp.down.weight.std().item() - out_std) < 0.1 * out_std
    assert abs(model.layers[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.norm.weight, torch.ones(128))
    assert all(p.abs().sum() > 0 for p in model.parameters())


def test_flops_per_token():
    model = GPT(SMALL)
    n = model.num_params(exclude_embedding=True)
    assert model.num_params() == n + 256 * 64
    assert model.flops_per_token() == 6 * n + 12 * 2 * 64 * 32


def test_rope_buffers_not_in_state_dict():
    assert not any("rope" in k for k in GPT(SMALL).state_dict())


@pytest.mark.parametrize("level", [None, *(lv for lv in fp8lm.LEVELS if lv != "O3")])  # O3: tests/test_fsdp.py
def test_tiny_forward_backward_finite(level):
    torch.manual_seed(0)
    model = GPT(get_config("tiny"))
    if level is not None:
        model, _ = fp8lm.initialize(model, level=level, verbose=False)
    idx = torch.randint(0, 256, (2, 32))
    _, loss = model(idx, idx.roll(-1, dims=1))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
