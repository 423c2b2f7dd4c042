"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest

from model import SmolLM2ForCausalLM
from model.tokenizer import Tokenizer
from tests.tiny import make_tiny_model

TINY_VOCAB = 512


@pytest.fixture(scope="module")
def tiny_model() -> SmolLM2ForCausalLM:
    """A float32 tiny model for the engine: a wide init keeps greedy outputs varied (a 0.04 init gives one
    repeated token), and no EOS so sequences run to their length."""
    return make_tiny_model(
        vocab_size=TINY_VOCAB, max_position_embeddings=512, initializer_range=0.3, eos_token_id=None
    )


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The default model's tokenizer (the test skips where the model is not fetched)."""
    from model.defaults import DefaultModelMissing, require_default_model

    try:
        return Tokenizer.from_file(require_default_model())
    except DefaultModelMissing as e:
        pytest.skip(str(e))
