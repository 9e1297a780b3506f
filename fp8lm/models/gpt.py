"""A Llama-style GPT, small enough to read top to bottom.

    tok_emb -> [ x + attn(attn_norm(x)) ; x + mlp(mlp_norm(x)) ] * n_layers -> norm -> head

Pieces: RMSNorm (computed in float32), rotary position embeddings (RoPE), causal
multi-head attention through `F.scaled_dot_product_attention` with a fused QKV
projection, a SwiGLU MLP with a fused gate/up projection, and an untied output head.
Norm, SwiGLU and attention go through `fp8lm.nn.activations`, which saves less for backward
(and, when `fp8lm.initialize` sets `fp8_saved_activations` at O2, saves it in FP8). The loss is
`fp8lm.ops.cross_entropy`: float32 math on the logits without a float32 copy of them (Triton on GPUs).

Every matrix multiply lives in an `nn.Linear` without bias (`attn.qkv`, `attn.proj`,
`mlp.gate_up`, `mlp.down`, `head`), so `fp8lm.initialize` can swap them for FP8
layers. The model itself knows nothing about precision: under BF16 autocast the
Linear outputs are BF16 while the residual stream, the norms and the loss stay in
float32.

Presets (`PRESETS`, `get_config`):
    tiny         dim 128,  4 layers,  4 heads, ffn 384,  seq 128,  vocab from the tokenizer
    gpt-125m     dim 768, 12 layers, 12 heads, ffn 2048, seq 1024, vocab from the tokenizer
    llama-0.75b  dim 2048, 12 layers, 16 heads, ffn 5632, seq 2048, vocab fixed at 32000
The llama-0.75b preset exists for benchmarking at real LLM GEMM shapes
(2048->6144, 2048->2048, 2048->11264, 5632->2048); its vocabulary is fixed at 32000
whatever the tokenizer, and a benchmark simply feeds it random token ids.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from fp8lm.nn.activations import causal_attention, linear_swiglu, rms_norm
from fp8lm.ops.cross_entropy import cross_entropy


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model; training settings live in `fp8lm.train`."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    seq_len: int  # longest sequence the rotary tables cover
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads


# vocab_size here is the default; presets not in FIXED_VOCAB take the tokenizer's.
PRESETS = {
    "tiny": GPTConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, ffn_dim=384, seq_len=128),
    "gpt-125m": GPTConfig(vocab_size=256, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, seq_len=1024),
    "llama-0.75b": GPTConfig(vocab_size=32000, dim=2048, n_layers=12, n_heads=16, ffn_dim=5632, seq_len=2048),
}
FIXED_VOCAB = frozenset({"llama-0.75b"})
VOCAB_MULTIPLE = 64  # tokenizer vocabularies are padded up to this (GEMM-friendly sizes)


def get_config(name: str, vocab_size: int | None = None) -> GPTConfig:
    """Return the preset `name`, with its vocabulary sized for a tokenizer of `vocab_size` ids.

    Presets whose vocabulary comes from the tokenizer round `vocab_size` up to a multiple
    of 64. Presets with a fixed vocabulary (llama-0.75b: 32000) keep it and only check
    that the tokenizer's ids fit.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    if vocab_size is None:
        return cfg
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if name in FIXED_VOCAB:
        if vocab_size > cfg.vocab_size:
            raise ValueError(f"preset {name!r} has a fixed vocabulary of {cfg.vocab_size}; "
                             f"the tokenizer needs {vocab_size}")
        return cfg
    padded = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return replace(cfg, vocab_size=padded)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32 (`fp8lm.nn.activations.rms_norm`).

    `fp8_saved_activations` (set by `fp8lm.initialize` at O2) saves the input for backward in BF16.
    """

    fp8_saved_activations = False

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """x / rms(x) * weight, in float32, returned in x's dtype."""
        return rms_norm(x, self.weight, self.eps, torch.bfloat16 if self.fp8_saved_activations else None)


def rope_tables(seq_len: int, head_dim: int, theta: float):
    """cos and sin of the rotary angles, each (seq_len, head_dim // 2), in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (first half, second half) of each head of x (B, nh, T, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, nh, T, hd)
    return out.type_as(x)


class Attention(nn.Module):
    """Causal multi-head self-attention with a fused QKV projection and RoPE.

    `fp8_saved_activations` (set by `fp8lm.initialize` at O2) saves q, k, v for backward in FP8.
    """

    fp8_saved_activations = False

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        """x (B, T, C) -> attention output (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # (B, T, C) each
        q = q.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, nh, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = causal_attention(q, k, v, save_fp8=self.fp8_saved_activations)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused in one GEMM.

    `fp8_saved_activations` (set by `fp8lm.initialize` at O2) saves [gate, up] for backward in FP8.
    """

    fp8_saved_activations = False

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        """x (B, T, C) -> (B, T, C)."""
        h = linear_swiglu(self.gate_up, x, save_fp8=self.fp8_saved_activations)  # (B, T, F): silu(gate) * up
        return self.down(h)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        """x (B, T, C) -> (B, T, C)."""
        x = x + self.attn(self.attn_norm(x), cos, sin)  # (B, T, C)
        x = x + self.mlp(self.mlp_norm(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    """Decoder-only language model; `forward(idx, targets=None)`."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads or cfg.head_dim % 2:
            raise ValueError(f"dim {cfg.dim} must split into {cfg.n_heads} heads of even width")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (T, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (T, hd/2)
        self.reset_parameters()

    def reset_parameters(self):
        """Normal(0, 0.02) weights; residual output projections scaled by 1/sqrt(2 * n_layers)."""
        out_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=out_std)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        """Logits (B, T, V) for token ids idx (B, T); with targets also the mean cross entropy."""
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.config.seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hd/2)
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.layers:
            x = block(x, cos, sin)  # (B, T, C)
        logits = self.head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits
        loss = cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))  # float32 math, no float32 copy
        return logits, loss

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of parameters; optionally without the token embedding (a lookup, not a GEMM)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 * (GEMM parameters) + 12 * n_layers * dim * seq_len.

        The attention term counts QK^T and AV over the full (not causally halved) context,
        as in the PaLM paper's MFU accounting; forward + backward = 3x forward.
        """
        T = seq_len or self.config.seq_len
        attn = 12 * self.config.n_layers * self.config.dim * T
        return 6 * self.num_params(exclude_embedding=True) + attn
