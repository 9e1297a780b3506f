"""Reference models and the preset registry: a Llama-style GPT and its unit-scaled twin.

    from fp8lm.models import build_model
    model = build_model("unit-tiny", vocab_size=256)          # a UnitGPT shaped like `tiny`
    model = build_model("tiny", vocab_size=256, seq_len=64)  # config fields can be overridden

`PRESETS` maps every preset name to its config (`GPTConfig`, or `UnitGPTConfig` for the unit
presets); the config's type picks the model class (`model_class`).
"""
from dataclasses import fields, replace

from fp8lm.models.gpt import GPT, GPTConfig
from fp8lm.models.gpt import PRESETS as GPT_PRESETS
from fp8lm.models.gpt import get_config as get_gpt_config
from fp8lm.models.unit_gpt import UNIT_PRESETS, UnitGPT, UnitGPTConfig, get_unit_config

__all__ = ["GPT", "GPTConfig", "UnitGPT", "UnitGPTConfig", "PRESETS", "get_config", "model_class", "build_model"]

PRESETS = {**GPT_PRESETS, **{name: get_unit_config(name) for name in UNIT_PRESETS}}


def get_config(name: str, vocab_size: int | None = None) -> GPTConfig:
    """The preset `name` with its vocabulary sized for a tokenizer of `vocab_size` ids (see `gpt.get_config`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    if name in UNIT_PRESETS:
        return get_unit_config(name, vocab_size)
    return get_gpt_config(name, vocab_size)


def model_class(cfg: GPTConfig) -> type:
    """`UnitGPT` for a `UnitGPTConfig`, else `GPT`."""
    return UnitGPT if isinstance(cfg, UnitGPTConfig) else GPT


def build_model(preset: str, vocab_size: int | None = None, **overrides):
    """A fresh model of preset `preset` (on the CPU, default init), config fields replaced by `overrides`."""
    cfg = get_config(preset, vocab_size)
    allowed = [f.name for f in fields(cfg)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)} for preset {preset!r}; "
                         f"allowed: {', '.join(allowed)}")
    cfg = replace(cfg, **overrides)
    return model_class(cfg)(cfg)
