"""The C++ element-wise ops of the serving path (model/csrc/fused_ops.cpp: RMSNorm with the residual add,
RoPE, SwiGLU, the KV-cache write) equal the torch ops they replace, rounding included, and the model's fused
forward equals its unfused one."""

from __future__ import annotations

import copy

import pytest
import torch

from model.kernels import TORCH_ONLY, Kernels
from model.modeling import SmolLM2ForCausalLM, SmolLM2RMSNorm, _rms_norm
from tests.tiny import make_tiny_model

DTYPES = [torch.float32, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("kernels", "kernel_mode_reset")


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: summation order only. bf16: the same roundings, so at most one bf16 step apart."""
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-2)
        assert (a != b).float().mean() < 0.02  # nearly every element is bit-equal


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 7, 70])
@pytest.mark.parametrize("H", [576, 20])  # the vector loop and (20 % 16 != 0) the scalar one
def test_rms_norm_cast_and_add_rms_norm(dtype: torch.dtype, N: int, H: int) -> None:
    g = torch.Generator().manual_seed(N)
    norm = SmolLM2RMSNorm(H).to(dtype)
    norm.weight.data = (torch.rand(H, generator=g) + 0.5).to(dtype)
    x = torch.randn(N, H, generator=g) * 30
    delta = (torch.randn(N, H, generator=g) * 5).to(dtype)
    close(
        torch.ops.smollm2.rms_norm_cast(x, norm.weight, norm.variance_epsilon),
        _rms_norm(x, norm, dtype),
        dtype,
    )
    fused_x = x.clone()
    out = torch.ops.smollm2.add_rms_norm_(fused_x, delta, norm.weight, norm.variance_epsilon)
    expected_x = x + delta
    torch.testing.assert_close(fused_x, expected_x, rtol=0, atol=0)  # the residual is updated in place
    close(out, _rms_norm(expected_x, norm, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", [64, 8])  # the vector loop and the scalar one
def test_rope(dtype: torch.dtype, hd: int) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 15, hd, generator=g).to(dtype)
    cos, sin = torch.randn(2, 5, 15, hd, generator=g).to(dtype)
    expected = torch.addcmul(x * cos, x.roll(hd // 2, dims=-1), sin)
    close(torch.ops.smollm2.rope(x, cos, sin), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 33])
def test_silu_mul(dtype: torch.dtype, N: int) -> None:
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(N, 2 * 1536 + 2 * 5, generator=g) * 4).to(
        dtype
    )  # 1541 per half: a scalar tail too
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])  # exp over- and underflow, zeros
    gate, up = gate_up.clone().split(gate_up.shape[1] // 2, dim=-1)
    expected = torch.nn.functional.silu(gate, inplace=True).mul_(up)
    got = torch.ops.smollm2.silu_mul(gate_up)
    assert got.shape == expected.shape and got.dtype == dtype
    close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_equals_index_copy(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    cache = torch.randn(6, 64, 8, generator=g).to(dtype)
    qkv = torch.randn(5, 15, 8, generator=g).to(dtype)  # the step's fused q/k/v: K/V are a strided slice
    kv, slots = qkv[:, 9:], torch.tensor([3, 17, 63, 0, 40])
    expected = cache.clone().index_copy_(1, slots, kv.transpose(0, 1))
    out = torch.ops.smollm2.write_kv_(cache, kv, slots)
    assert out.data_ptr() == cache.data_ptr() and torch.equal(cache, expected)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.smollm2.write_kv_(cache, kv, torch.tensor([0, 1, 2, 3, 64]))
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.smollm2.write_kv_(cache, kv.double(), slots)


def test_bad_input_is_refused() -> None:
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.smollm2.rms_norm_cast(torch.randn(2, 4).bfloat16(), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.smollm2.rms_norm_cast(torch.randn(2, 4), torch.ones(5), 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        x = torch.randn(4, 3, 8).transpose(0, 1)
        torch.ops.smollm2.rope(x, x, x)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.smollm2.silu_mul(torch.randn(4, 6).t())
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.smollm2.silu_mul(torch.zeros(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_forward_equals_unfused(dtype: torch.dtype) -> None:
    """A whole serving step (decodes + a prefill chunk) through the C++ ops vs the torch ops."""
    from model.attention import allocate_kv_cache
    from tests.model.test_modeling import _paged_step

    base = _tiny().to(dtype)
    cfg, bs = base.config, 4
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (9, 14, 11)]
    tables = [[5, 2, 9], [7, 1, 12, 3], [30, 4, 8]]
    hidden = {}
    for mode, kernels in (("torch", TORCH_ONLY), ("cpp", Kernels(cpp=True))):  # the same GEMMs in both
        model = copy.deepcopy(base)
        model.prepare_for_serving(kernels=kernels)
        caches = allocate_kv_cache(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 32, bs, dtype, "cpu"
        )
        with torch.no_grad():
            _paged_step(model, caches, seqs, tables, [0, 0, 0], [8, 13, 6], bs, decodes=[])
            h = _paged_step(model, caches, seqs, tables, [8, 13, 6], [9, 14, 11], bs, decodes=[0, 1])
        hidden[mode] = model.compute_logits(h)
    if dtype == torch.float32:
        torch.testing.assert_close(hidden["cpp"], hidden["torch"], rtol=1e-5, atol=1e-4)
    else:  # attention differs in where it rounds (bench/NOTES.md); the answer must not
        assert (hidden["cpp"] - hidden["torch"]).abs().max() < 0.1 * hidden["torch"].abs().max()
        assert (hidden["cpp"].argmax(-1) == hidden["torch"].argmax(-1)).float().mean() >= 0.85


def _tiny() -> SmolLM2ForCausalLM:
    return make_tiny_model(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
