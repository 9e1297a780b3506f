"""Reference models: a Llama-style GPT and its size presets."""
from fp8lm.models.gpt import GPT, PRESETS, GPTConfig, get_config

__all__ = ["GPT", "GPTConfig", "PRESETS", "get_config"]
