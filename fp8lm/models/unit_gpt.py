"""The unit-scaled twin of the reference GPT (Unit Scaling arXiv 2303.11257, u-muP arXiv 2407.17465).

    tok_emb -> [ split/add(attn(attn_norm(x))) ; split/add(mlp(mlp_norm(x))) ] * n_layers -> norm -> head

Same architecture as `fp8lm.models.GPT` (RoPE, RMSNorm, SwiGLU, fused QKV and gate/up, untied
head, same parameter shapes and FLOPs), built from `fp8lm.unit_scaling` layers instead:

* every weight is N(0, 1) and every scale sits outside it (`UnitLinear`: out = x W^T K^-1/2;
  the readout: x W^T K^-1), so the tensors each FP8 GEMM casts (input, weight, output gradient)
  are ~unit without any amax: the static recipe (scale 1) fits it;
* the residual stream is unit-variance: add l (l = 1..2 n_layers) is
  sqrt(tau_l) branch + sqrt(1 - tau_l) skip with tau_l = a^2 / (1 + l a^2), a = `residual_mult`:
  the stream is (emb + a * sum of branch outputs) / norm, the plain `x + f(x)` stream rescaled
  with branches weighted a relative to the embedding;
* inside the residual branches the gradients are true gradients of the scaled forward (linears
  and attention with constraint "to_output_scale"), so the model's gradient is the true gradient
  up to per-tensor factors (weight leaves, the readout, the loss), which Adam ignores;
* the loss is the mean cross entropy with its gradient scaled by (B T) sqrt(V) (unit logit grads).

Choices measured on unit-tiny (300 steps, CPU, val loss, seed 1337 unless said; every run and
its command in benchmarks/RESULTS.md; the standard `tiny` gives 1.86-1.90):

* q/k gradients: true gradients (std ~0.15 of the attention's output gradient at init, because
  attention is near-uniform) beat Unit Scaling's unit-variance cut-edge rule, which amplifies
  the q/k paths 6.8x over the v path: 1.74 vs 2.46 (best lr of each).
* Attention output scale: the op's default assumes values uncorrelated across positions
  (out * sqrt(T/H_T), 4.9 at T = 128), but text is correlated (frequent bytes; after layer 0 every
  position carries the prefix average): attention outputs came out at RMS 2.4-4.8 at init and the
  stream grew to RMS 3. Assuming correlation 0.5 trained better than 0 (u-muP's assumption):
  1.77 vs 1.88 at residual_mult 1; `attn_value_corr` 0.4 (out * 1.53) is kept for margin in the
  init test (lowest layer RMS over 12 inits 0.55, vs 0.49 at 0.5).
* `residual_mult` 0.25: the SwiGLU branch has a backward gain of ~sqrt(2) (true gradients: both
  of its inputs receive the full gradient), so with equal branch weights (1) the stream gradient
  grew past 2 towards the embedding; 0.25-0.5 keep every layer in [0.5, 2] at init and trained
  alike (1.70-1.74), 1 worse (1.77).
* Learning rates (`optimizer_param_groups`, u-muP rules for Adam): hidden weights
  lr * fan_in^-1/2, the embedding lr * dim^-1/2 (u-muP's fan_out^-1/2), norm gains lr (no weight
  decay), the readout lr * `readout_lr_mult`: 4 (mean of 3 seeds 1.695, 2: 1.714, 1: 1.73 one
  seed). Base lr 0.5 (swept 0.25-1: 1.78, 1.73, 1.67, 1.69, 1.74). Weight decay 0.1 helps (0: 1.86),
  clipping at 1 changes nothing (no clipping: 1.74 vs 1.74).
* Under the static recipe the last block's `mlp.down` stays BF16 (`static_fp8_exclude`).

Presets: `unit-tiny` (shape of `tiny`) and `unit-125m` (shape of `gpt-125m`), in `UNIT_PRESETS`;
unit-125m uses unit-tiny's base lr (u-muP's claim of transfer across width; not swept).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch.nn as nn

from fp8lm.models.gpt import GPTConfig, get_config as get_gpt_config, rope_tables
from fp8lm.unit_scaling import ops
from fp8lm.unit_scaling.modules import (
    UnitEmbedding,
    UnitLinear,
    UnitMLP,
    UnitReadout,
    UnitResidualBlock,
    UnitRMSNorm,
    UnitSelfAttention,
    residual_taus,
)

__all__ = ["UnitGPT", "UnitGPTConfig", "UNIT_PRESETS", "get_unit_config"]


@dataclass(frozen=True)
class UnitGPTConfig(GPTConfig):
    """Shape of the model (as `GPTConfig`) plus the unit-scaling choices."""

    residual_mult: float = 0.25  # weight of each residual branch relative to the embedding
    attn_constraint: Optional[str] = "to_output_scale"  # grad_q/k rule of the attention op
    attn_value_corr: float = 0.4  # correlation of values across positions the attention scale assumes
    readout_lr_mult: float = 4.0  # the readout's Adam rate is readout_lr_mult * lr


# unit preset -> the standard preset whose shape it copies
UNIT_PRESETS = {"unit-tiny": "tiny", "unit-125m": "gpt-125m"}


def get_unit_config(name: str, vocab_size: int | None = None) -> UnitGPTConfig:
    """The unit preset `name`, shaped like its standard twin (vocabulary sized as `get_config` does)."""
    if name not in UNIT_PRESETS:
        raise ValueError(f"unknown unit preset {name!r}; allowed: {', '.join(UNIT_PRESETS)}")
    return UnitGPTConfig(**asdict(get_gpt_config(UNIT_PRESETS[name], vocab_size)))


class UnitBlock(UnitResidualBlock):
    """One transformer block: unit-scaled attention and SwiGLU MLP in pre-norm residual branches."""

    def __init__(self, cfg: UnitGPTConfig, tau_attn: float, tau_mlp: float):
        super().__init__(UnitSelfAttention(cfg.dim, cfg.n_heads, cfg.attn_constraint, cfg.attn_value_corr),
                         UnitMLP(cfg.dim, cfg.ffn_dim), cfg.dim, tau_attn, tau_mlp, cfg.norm_eps)


class UnitGPT(nn.Module):
    """Unit-scaled decoder-only language model; `forward(idx, targets=None)` as `GPT`."""

    unit_scaled = True  # fp8lm.initialize reads this: static FP8 scales are safe here

    def __init__(self, cfg: UnitGPTConfig):
        super().__init__()
        if not isinstance(cfg, UnitGPTConfig):
            cfg = UnitGPTConfig(**asdict(cfg))
        if cfg.dim % cfg.n_heads or cfg.head_dim % 2:
            raise ValueError(f"dim {cfg.dim} must split into {cfg.n_heads} heads of even width")
        self.config = cfg
        taus = residual_taus(2 * cfg.n_layers, cfg.residual_mult)
        self.tok_emb = UnitEmbedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(UnitBlock(cfg, taus[2 * i], taus[2 * i + 1]) for i in range(cfg.n_layers))
        self.norm = UnitRMSNorm(cfg.dim, cfg.norm_eps)
        self.head = UnitReadout(cfg.dim, cfg.vocab_size)
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (T, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (T, hd/2)

    @property
    def static_fp8_exclude(self) -> list[str]:
        """Linear layers `fp8lm.initialize(recipe="static")` keeps in BF16 by default (besides the head).

        The last block's `mlp.down`: its input (the SwiGLU output, a product of two growing
        factors) grows fastest during training, to RMS 12-16 and amax 400-650 by step 500 of
        unit-tiny (E4M3 saturates at 448; benchmarks/RESULTS.md). The head stays BF16 anyway.
        """
        return [f"layers.{self.config.n_layers - 1}.mlp.down.linear"]

    def get_output_embeddings(self) -> nn.Linear:
        """The readout's GEMM (how `fp8lm.initialize` finds the output head)."""
        return self.head.linear

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
        return logits, ops.cross_entropy(logits.float(), targets)

    def optimizer_param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups with the u-muP learning rates (see the module docstring).

        Each group has "lr" (= lr * "lr_scale") and "lr_scale", so a schedule sets
        ``group["lr"] = lr_t * group["lr_scale"]``; weight decay on 2-D weights only.
        """
        scales: dict[int, tuple[float, float, str]] = {}  # id(param) -> (lr scale, weight decay, kind)
        for m in self.modules():
            if isinstance(m, UnitLinear):
                scales[id(m.weight)] = (m.in_features**-0.5, weight_decay, "hidden")
                if m.bias is not None:
                    scales[id(m.bias)] = (1.0, 0.0, "bias")
            elif isinstance(m, UnitReadout):
                scales[id(m.weight)] = (self.config.readout_lr_mult, weight_decay, "readout")
            elif isinstance(m, UnitEmbedding):
                scales[id(m.weight)] = (m.embedding_dim**-0.5, weight_decay, "embedding")
            elif isinstance(m, UnitRMSNorm):
                scales[id(m.weight)] = (1.0, 0.0, "gain")
        groups: dict[tuple, dict] = {}
        for p in self.parameters():
            if not p.requires_grad:
                continue
            assert id(p) in scales, "every UnitGPT parameter has a learning-rate rule"
            scale, wd, kind = scales[id(p)]
            group = groups.setdefault((kind, scale, wd), {"params": [], "lr": lr * scale, "lr_scale": scale,
                                                          "weight_decay": wd, "name": f"{kind} x{scale:.4g}"})
            group["params"].append(p)
        return list(groups.values())

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of parameters; optionally without the token embedding (a lookup, not a GEMM)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, counted as `GPT.flops_per_token` (the scales are elementwise)."""
        T = seq_len or self.config.seq_len
        attn = 12 * self.config.n_layers * self.config.dim * T
        return 6 * self.num_params(exclude_embedding=True) + attn
