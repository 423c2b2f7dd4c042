"""The tiny SmolLM2 the tests build: one base config, and each test's deviations as keyword overrides."""

from __future__ import annotations

from typing import Any

import torch

from model import SmolLM2Config, SmolLM2ForCausalLM

TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_tiny_model(
    seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> SmolLM2ForCausalLM:
    """SmolLM2ForCausalLM of TINY_CONFIG with `overrides`, initialized under torch.manual_seed(seed), in eval
    mode and `dtype`."""
    torch.manual_seed(seed)
    return SmolLM2ForCausalLM(SmolLM2Config(**{**TINY_CONFIG, **overrides})).eval().to(dtype)
