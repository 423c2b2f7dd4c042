"""Fixtures shared by the model tests: the C++ kernels built, the kernel mode reset after each test, and the
real model in bfloat16 (one copy per test module, since tests switch its serving options)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import paged_kernel


@pytest.fixture(scope="module")
def kernels() -> None:
    assert paged_kernel.load(), "the C++ kernels did not build (needs a C++ compiler and ninja)"


@pytest.fixture
def kernel_mode_reset():  # type: ignore[no-untyped-def]
    yield
    paged_kernel.set_attention_kernel(None)


@pytest.fixture(scope="module")
def real_bf16():  # type: ignore[no-untyped-def]
    """(SmolLM2ForCausalLM in bfloat16, Tokenizer) of the default model; skips when it is not there."""
    from model import Tokenizer
    from model.defaults import DefaultModelMissing, require_default_model
    from model.weights import load_model

    try:
        path: Path = require_default_model()
    except DefaultModelMissing as e:
        pytest.skip(str(e))
    return load_model(path, dtype=torch.bfloat16).eval(), Tokenizer.from_file(path)
