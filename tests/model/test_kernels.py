"""Kernels: decided once per model by prepare_for_serving, from the switch and the build."""

from __future__ import annotations

import pytest
import torch

from model import paged_kernel
from model.kernels import TORCH_ONLY, Kernels
from tests.tiny import make_tiny_model


def test_detect_follows_the_switch_and_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paged_kernel.ENV_VAR, "torch")
    assert Kernels.detect(torch.device("cpu")) == TORCH_ONLY
    monkeypatch.setenv(paged_kernel.ENV_VAR, "auto")
    assert Kernels.detect(torch.device("cuda")) == TORCH_ONLY  # CUDA takes the torch path
    cpu = Kernels.detect(torch.device("cpu"))
    assert cpu.cpp == paged_kernel.load() and (cpu.cpp or not cpu.bf16_gemm)


def test_a_model_keeps_the_kernels_it_was_first_prepared_with() -> None:
    model = make_tiny_model()
    assert model.kernels is None
    model.prepare_for_serving(kernels=TORCH_ONLY)
    assert model.kernels == TORCH_ONLY
    model.prepare_for_serving()  # a plain later call (the runner's) keeps them
    model.prepare_for_serving(kernels=TORCH_ONLY)
    assert model.kernels == TORCH_ONLY
    with pytest.raises(ValueError, match="kernels"):
        model.prepare_for_serving(kernels=Kernels(cpp=True))
    attn = model.model.decoder_layers[0].self_attn
    assert attn.qkv_linear is not None and attn.qkv_linear.tiles is None  # packed without our GEMM
