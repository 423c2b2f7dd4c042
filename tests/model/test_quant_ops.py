"""The int8 LM head and the row argmax (model/csrc/quant_ops.cpp): the kernel against a float32 matmul of
the dequantized weight, the lossless detector, prepare_for_serving's modes, the real Q8_0 head against its
bf16 path, and argmax_rows against torch.max(dim).indices, ties and NaN included."""

from __future__ import annotations

import pytest
import torch

from model import SmolLM2ForCausalLM, paged_kernel
from model.kernels import Kernels
from model.quant import (
    INT8_BLOCK,
    INT8_HEAD_MAX_ROWS,
    INT8_LOSSLESS_ERROR,
    Int4Weight,
    Int8Weight,
    PackedLinear,
    int8_head_max_rows,
    int8_reconstruction_error,
    pack_bf16_tiles,
    quantize_int8,
    tiles_supported,
)
from model.sampling import _argmax
from tests.tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("kernels", "kernel_mode_reset")


def q8_weight(n: int, k: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(n, k) weights as GGUF's Q8_0 stores them: d * q per block of 32, d = amax / 127, q in -127..127."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k // INT8_BLOCK, INT8_BLOCK, generator=g) * 0.05
    d = x.abs().amax(-1, keepdim=True) / 127
    d = d.half().float()  # Q8_0 keeps d in float16
    return ((x / d).round().clamp(-127, 127) * d).view(n, k).to(dtype)


@pytest.mark.parametrize("shape", [(100, 64), (1000, 576)])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32])
def test_int8_linear_equals_float32_matmul_of_the_dequantized_weight(
    shape: tuple[int, int], xdtype: torch.dtype
) -> None:
    n, k = shape
    w = q8_weight(n, k)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (n, k // INT8_BLOCK)
    deq = (q.view(n, -1, INT8_BLOCK).float() * scales[..., None]).view(n, k)
    for m in (1, 2, 3, 8, 9, 17):  # every row count of the kernel, and more than one pass of 8 rows
        x = torch.randn(m, k).to(xdtype)
        got = torch.ops.smollm2.int8_linear(x, q, scales)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        torch.testing.assert_close(got, x.float() @ deq.t(), rtol=1e-5, atol=1e-5)  # fp32 sums, any order


def test_int8_linear_rejects_bad_arguments() -> None:
    q, s = quantize_int8(q8_weight(64, 64))
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.smollm2.int8_linear(torch.randn(2, 48), q[:, :48].contiguous(), s)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.smollm2.int8_linear(x, q.float(), s)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.smollm2.int8_linear(x, q, s[:, :1].contiguous())


def test_lossless_detector() -> None:
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        w = q8_weight(512, 576, dtype=dtype)
        lossless = int8_reconstruction_error(w, *quantize_int8(w))
        assert lossless <= INT8_LOSSLESS_ERROR, (dtype, lossless)
    assert Int8Weight.from_weight(q8_weight(64, 64, dtype=torch.float32)).error < 1e-5  # no rounding to hide
    lossy = Int8Weight.from_weight(torch.randn(512, 576).to(torch.bfloat16)).error
    assert lossy > 0.5  # arbitrary weights lose a block's smallest elements outright
    assert Int8Weight.from_weight(torch.zeros(4, 64)).error == 0.0


@pytest.mark.parametrize("shape", [(48, 64), (320, 96), (4096, 576)])
def test_our_vnni_int8_kernel_matches_the_plain_one(shape: tuple[int, int]) -> None:
    """Int8Weight.tiles (model/csrc/int4_gemm.cpp: bf16 rows as int8 plus remainder, weights stored + 128)
    against the plain kernel that widens every weight to float32, over its row blocks and tile remainders,
    with an outlier channel in the activations and an all-zero row."""
    kernels = Kernels.detect(torch.device("cpu"))
    n, k = shape
    w = q8_weight(n, k)
    if not tiles_supported(w, kernels):
        pytest.skip(
            "the VNNI kernels need the C++ library on a CPU with AVX512-VNNI and AVX512-BF16, or AVX2"
        )
    ours, plain = Int8Weight.from_weight(w, kernels), Int8Weight.from_weight(w)
    assert ours.tiles and not plain.tiles and ours.error == plain.error
    g = torch.Generator().manual_seed(3)
    for m in (1, 2, 3, 4, 5, 8, 9, 17, 33):
        x = torch.randn(m, k, generator=g)
        x[:, 3] *= 300
        x[-1] = 0
        x = x.to(torch.bfloat16)
        got, want = ours(x), plain(x)  # plain: float32 products of the exact inputs
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert torch.equal(got[-1], torch.zeros(n))
        # x within max|x| / (127 * 508) of itself per group: ~1e-5 of the output's scale, float32 sums aside
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), m


def test_packed_linear_takes_int8_only_up_to_its_rows() -> None:
    w = q8_weight(300, 96)
    lin = PackedLinear(w)
    bf16 = lin(torch.ones(INT8_HEAD_MAX_ROWS, 96).to(torch.bfloat16))
    lin.int8, lin.int8_max_rows = Int8Weight.from_weight(w), INT8_HEAD_MAX_ROWS
    x = torch.randn(INT8_HEAD_MAX_ROWS + 1, 96).to(torch.bfloat16)
    assert lin(x).dtype == torch.bfloat16  # above the threshold: the bf16 GEMM
    small = lin(x[:INT8_HEAD_MAX_ROWS])
    assert small.dtype == torch.float32 and torch.equal(small, lin.int8(x[:INT8_HEAD_MAX_ROWS]))
    assert bf16.dtype == torch.bfloat16


def head_grid_model(init: str, dtype: torch.dtype = torch.bfloat16) -> SmolLM2ForCausalLM:
    """The tiny model (vocabulary 320); init "q8": its LM head on a Q8_0-like grid."""
    model = make_tiny_model(dtype=dtype, vocab_size=320)
    if init == "q8":
        with torch.no_grad():
            model.lm_head.weight.copy_(q8_weight(*model.lm_head.weight.shape))
    return model


def test_prepare_for_serving_int8_modes() -> None:
    lossy = head_grid_model("normal")
    lossy.prepare_for_serving()
    head = lossy.lm_head_linear
    assert head is not None and head.int8 is None and not lossy.int8_head_active  # the default builds nothing
    lossy.prepare_for_serving(int8_lm_head="auto")
    assert not lossy.int8_head_active and head.int8 is None
    assert lossy.int8_head_error is not None and lossy.int8_head_error > INT8_LOSSLESS_ERROR
    lossy.prepare_for_serving(int8_lm_head="on")
    assert lossy.int8_head_active and head.int8 is not None
    assert head.int8_max_rows == int8_head_max_rows(head.int8.tiles, lossy.kernels)
    lossy.prepare_for_serving(int8_lm_head="off")
    assert not lossy.int8_head_active and head.int8_max_rows == 0

    exact = head_grid_model("q8")
    exact.prepare_for_serving(int8_lm_head="auto")
    assert exact.int8_head_active and exact.int8_head_error is not None
    assert exact.int8_head_error <= INT8_LOSSLESS_ERROR
    hidden = torch.randn(2, 96).to(torch.bfloat16)
    logits = exact.compute_logits(hidden)
    assert logits.dtype == torch.float32
    ref = hidden.float() @ exact.lm_head.weight.float().t()
    assert (logits - ref).abs().max().item() <= 2**-7 * ref.abs().max().item()  # within bf16 rounding

    paged_kernel.set_attention_kernel("torch")  # the pure-torch mode uses no C++: the head stays bf16
    plain = head_grid_model("q8")
    plain.prepare_for_serving(int8_lm_head="on")
    assert not plain.int8_head_active
    fp32 = head_grid_model("q8", torch.float32)
    fp32.prepare_for_serving(int8_lm_head="on")  # bf16 serving only: ignored without an error
    assert not fp32.int8_head_active
    with pytest.raises(ValueError, match="int8_lm_head"):
        fp32.prepare_for_serving(int8_lm_head="yes")


def test_argmax_rows_matches_torch_max_indices() -> None:
    g = torch.Generator().manual_seed(0)
    for width in (1, 15, 16, 17, 49152):
        x = torch.randn(6, width, generator=g)
        if width > 3:
            x[1, 2] = x[1, width - 1] = x[1].max() + 1  # a tie: the first index wins
            x[2] = -float("inf")  # all -inf: index 0
            x[3, width // 2] = float("inf")
            x[4, width - 1] = float("nan")  # NaN counts as the maximum, as in torch.max
            x[5, 1] = x[5, width - 2] = float("nan")
        want = x.max(dim=-1).indices
        assert torch.equal(torch.ops.smollm2.argmax_rows(x), want), width
        assert torch.equal(_argmax(x), want)
        # bf16 logits (the LM head's output for greedy batches): the argmax of their exact float32 widening
        xb = x.to(torch.bfloat16)
        want_b = xb.float().max(dim=-1).indices
        assert torch.equal(torch.ops.smollm2.argmax_rows(xb), want_b), width
        assert torch.equal(_argmax(xb), want_b)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.smollm2.argmax_rows(torch.zeros(2, 3, dtype=torch.float16))


# ---- the real model ----------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_gguf_int8_head_is_lossless_and_closer_to_float32_than_bf16(real_bf16) -> None:  # type: ignore[no-untyped-def]
    model, _ = real_bf16
    model.prepare_for_serving(int8_lm_head="auto")
    assert model.int8_head_active, (
        f"the Q8_0 head should reconstruct losslessly, error {model.int8_head_error}"
    )
    assert model.int8_head_error is not None and model.int8_head_error < 0.006  # measured 0.0041
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(INT8_HEAD_MAX_ROWS, model.config.hidden_size, generator=g) * 2).to(torch.bfloat16)
    exact = hidden.float() @ model.lm_head.weight.float().t()  # the bf16 weights, summed in float32
    int8 = model.compute_logits(hidden)
    model.prepare_for_serving(int8_lm_head="off")
    bf16 = model.compute_logits(hidden)
    # the bf16 GEMM rounds its output to bf16; int8 sums in float32, off only by the scale's rounding
    int8_err, bf16_err = (int8 - exact).abs().max().item(), (bf16 - exact).abs().max().item()
    assert int8_err <= bf16_err, (int8_err, bf16_err)
    assert torch.equal(int8.argmax(-1), exact.argmax(-1))


@pytest.mark.parametrize("shape", [(16, 2), (48, 34), (80, 96), (960, 576), (576, 1536)])
def test_bf16_linear_equals_a_float_matmul_rounded_to_bf16(shape: tuple[int, int]) -> None:
    """Every row block (1-4 rows, several passes) and panel width (1-4 tiles of 16 outputs, with the tails a
    thread's share leaves) of the C++ bf16 GEMM against float64 sums: within one bf16 rounding of the output
    plus float32 summation error. Where the CPU has AMX, K a multiple of 32 takes the tile unit: its tiles
    configured to 1-16 and 17-32 rows, and longer inputs padded to 16 rows."""
    if not torch.ops.smollm2.bf16_gemm_available():
        pytest.skip("this CPU has no AVX512-BF16")
    n, k = shape
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    tiles = pack_bf16_tiles(w)
    assert tiles.shape == (n // 16, k // 2, 16, 2)
    for m in (1, 2, 3, 4, 5, 7, 16, 20, 32, 33, 130):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        got = torch.ops.smollm2.bf16_linear(x, tiles)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        ref = x.double() @ w.double().t()
        err = (got.double() - ref).abs()
        assert (err <= ref.abs() * 2**-8 + 1e-4 * (k**0.5)).all(), (m, err.max().item())
        strided = torch.randn(m, 2 * k, generator=g).to(torch.bfloat16)[:, ::2]  # a non-contiguous input
        torch.testing.assert_close(
            torch.ops.smollm2.bf16_linear(strided, tiles),
            torch.ops.smollm2.bf16_linear(strided.contiguous(), tiles),
        )


def test_bf16_linear_rejects_bad_arguments() -> None:
    if not torch.ops.smollm2.bf16_gemm_available():
        pytest.skip("this CPU has no AVX512-BF16")
    tiles = pack_bf16_tiles(torch.randn(32, 64).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="K = 64"):
        torch.ops.smollm2.bf16_linear(torch.randn(2, 48).to(torch.bfloat16), tiles)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.smollm2.bf16_linear(torch.randn(2, 64), tiles)
    with pytest.raises(RuntimeError, match="tiles"):
        torch.ops.smollm2.bf16_linear(torch.randn(2, 64).to(torch.bfloat16), tiles.float())


def test_packed_linear_takes_the_cpp_gemm_when_built_and_onednn_in_torch_mode() -> None:
    w = (torch.randn(96, 64) * 0.1).to(torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    lin = PackedLinear(w)
    assert (lin.tiles is not None) == Kernels.detect(torch.device("cpu")).bf16_gemm
    paged_kernel.set_attention_kernel("torch")  # the pure-torch mode builds nothing of ours
    plain = PackedLinear(w)
    assert plain.tiles is None
    torch.testing.assert_close(lin(x), plain(x), rtol=2**-7, atol=1e-2)  # both round to bf16 once
    odd = PackedLinear((torch.randn(20, 64) * 0.1).to(torch.bfloat16))  # N not a multiple of 16
    assert odd.tiles is None and odd(x).shape == (5, 20)


@pytest.mark.parametrize("inter", [16, 48, 1536])
def test_swiglu_epilogue_is_bit_identical_to_the_gemm_then_silu_mul(inter: int) -> None:
    """The MLP's gate/up GEMM with SwiGLU as its epilogue gives exactly silu_mul of the plain GEMM's output,
    for any row count and for one or several (gate, up) tile pairs per thread; PackedLinear(swiglu=True)
    still gives [gate | up] columns when called plainly, and takes int4 then silu_mul at few rows."""
    if not torch.ops.smollm2.bf16_gemm_available():
        pytest.skip("this CPU has no AVX512-BF16")
    g = torch.Generator().manual_seed(inter)
    w = (torch.randn(2 * inter, 96, generator=g) * 0.2).to(torch.bfloat16)
    ours = Kernels(cpp=True, bf16_gemm=True)
    lin, fused = PackedLinear(w, kernels=ours), PackedLinear(w, swiglu=True, kernels=ours)
    assert fused.swiglu_tiles and not lin.swiglu_tiles
    for m in (1, 3, 4, 9, 20, 70):
        x = torch.randn(m, 96, generator=g).to(torch.bfloat16)
        want = torch.ops.smollm2.silu_mul(lin(x))
        assert torch.equal(fused.swiglu(x), want), m
        assert torch.equal(fused(x), lin(x)), m
    fused.int4, fused.int4_max_rows = Int4Weight.from_weight(w), 4
    x = torch.randn(3, 96, generator=g).to(torch.bfloat16)
    assert torch.equal(fused.swiglu(x), torch.ops.smollm2.silu_mul(fused.int4(x)))


def test_onednn_path_runs_a_few_shapes_whatever_the_rows() -> None:
    """oneDNN compiles and caches a primitive per input shape; the linears pad rows to a few sizes so that
    serving's ever-changing row counts cannot grow that cache (and the RSS) without bound, and the padded
    rows never reach the output."""
    from model.quant import ONEDNN_ROWS, onednn_rows

    assert {onednn_rows(m) for m in range(1, 2049)} == set(ONEDNN_ROWS)
    assert all(onednn_rows(m) >= m for m in range(1, 5000)) and onednn_rows(2049) == 2560
    assert all(onednn_rows(m) <= max(1.5 * m, 16) for m in range(1, 5000))
    w = (torch.randn(48, 64) * 0.1).to(torch.bfloat16)
    lin = PackedLinear(w, kernels=Kernels())  # no C++ GEMM: oneDNN's packed path where torch has it
    if lin.packed is None:
        pytest.skip("this torch build has no oneDNN linear")
    for m in (1, 5, 33, 130):
        x = torch.randn(m, 64).to(torch.bfloat16)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w), atol=2e-2, rtol=2e-2)
        assert lin(x).shape == (m, 48)
