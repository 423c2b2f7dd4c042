"""Kernels: decided once per model by prepare_for_serving, from the switch and the build."""

from __future__ import annotations

import pytest
import torch

from model import paged_kernel
from model.kernels import TORCH_ONLY, Kernels, has_bf16_gemm
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


def _bf16_gemm() -> bool:
    return has_bf16_gemm()


def test_batch_invariant_is_refused_without_its_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paged_kernel.ENV_VAR, "torch")
    with pytest.raises(ValueError, match="batch-invariant"):
        Kernels.detect(torch.device("cpu"), batch_invariant=True)
    monkeypatch.setenv(paged_kernel.ENV_VAR, "auto")
    with pytest.raises(ValueError, match="batch-invariant"):
        Kernels.detect(torch.device("cuda"), batch_invariant=True)


@pytest.mark.skipif(not _bf16_gemm(), reason="needs the C++ kernels with AVX512-BF16")
def test_batch_invariant_model_has_one_gemm_for_every_batch_size() -> None:
    """Every linear on the bf16 tiles, no int4 or int8 copy even when asked for; float32 is refused; a
    row's output does not depend on how many rows come with it."""
    kernels = Kernels.detect(torch.device("cpu"), batch_invariant=True)
    assert kernels == Kernels(cpp=True, bf16_gemm=True, batch_invariant=True)
    with pytest.raises(ValueError, match="bfloat16"):
        make_tiny_model().prepare_for_serving(kernels=kernels)
    model = make_tiny_model(dtype=torch.bfloat16)
    model.prepare_for_serving(int4_small_batch="on", int8_lm_head="on", kernels=kernels)
    assert not model.int4_active and not model.int8_head_active
    head = model.lm_head_linear
    assert head is not None and head.int8 is None and head.tiles is not None
    for lin in model._layer_linears():
        assert lin.tiles is not None and lin.int4 is None and lin.int4_max_rows == 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, model.config.hidden_size, generator=g).to(torch.bfloat16)
    qkv = model.model.decoder_layers[0].self_attn.qkv_linear
    assert qkv is not None
    for lin in (qkv, head):
        full = lin(x)
        for m in (1, 3, 4, 5, 17):
            assert torch.equal(lin(x[:m]), full[:m])
