"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest
import torch

from model import SmolLM2Config, SmolLM2ForCausalLM

TINY_VOCAB = 512


@pytest.fixture(scope="module")
def tiny_model() -> SmolLM2ForCausalLM:
    torch.manual_seed(0)
    # a wide init keeps greedy outputs varied (a 0.04 init gives one repeated token)
    cfg = SmolLM2Config(
        vocab_size=TINY_VOCAB,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        eos_token_id=None,
    )
    return SmolLM2ForCausalLM(cfg).eval()
