"""int4 groupwise weights for small decode batches (CPU, bfloat16): the kernel against a plain matmul of the
dequantized weight, the lossless detector, and the real Q4_1 model with int4 against its bf16 path."""

from __future__ import annotations

import pytest
import torch

from model import SmolLM2ForCausalLM, quant
from model.attention import AttentionMetadata, allocate_kv_cache, build_decode_mask
from model.kernels import Kernels
from model.quant import (
    ALL_ROWS,
    INT4_GROUP,
    INT4_LOSSLESS_ERROR,
    INT4_MAX_ROWS,
    Int4Weight,
    PackedLinear,
    dequantize_int4,
    int4_groups,
    int4_max_rows,
    int4_reconstruction_error,
    int4_supported,
    quantize_int4,
    tiles_supported,
)
from tests.model.test_modeling import PROMPTS  # the same prompts as the bf16 checks
from tests.tiny import make_tiny_model

pytestmark = pytest.mark.skipif(
    not int4_supported(torch.device("cpu"), torch.bfloat16), reason="this torch has no CPU int4 kernels"
)


def grid_weight(n: int, k: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(n, k) weights on a Q4_1-like grid: d * q + m per group of 32, q in 0..15 using both ends."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // INT4_GROUP, INT4_GROUP), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # as llama.cpp's Q4_1 does: the group's min and max are levels 0 and 15
    d = torch.rand(n, k // INT4_GROUP, 1, generator=g) * 0.01 + 1e-3
    m = -8 * d + torch.randn(n, k // INT4_GROUP, 1, generator=g) * 0.01
    return (d * q + m).view(n, k).to(dtype)


@pytest.mark.parametrize("shape", [(96, 64), (960, 576), (576, 1536)])
def test_int4_linear_equals_dequantized_matmul(shape: tuple[int, int]) -> None:
    n, k = shape
    w = grid_weight(n, k)
    lin = PackedLinear(w)
    lin.int4, lin.int4_max_rows = Int4Weight.from_weight(w), INT4_MAX_ROWS
    deq = dequantize_int4(*quantize_int4(w))
    assert (deq - w.float()).abs().max().item() <= 2**-7 * w.float().abs().max().item()  # bf16 rounding
    for m in (1, 2, INT4_MAX_ROWS, INT4_MAX_ROWS + 1, 16):
        x = torch.randn(m, k).to(torch.bfloat16)
        got = lin(x)
        ref = x.float() @ w.float().t()
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        # bf16 output rounding plus bf16 scale/zero rounding: well under 1% of the output's scale
        assert (got.float() - ref).abs().max().item() < 1e-2 * ref.abs().max().item(), m
    x = torch.randn(INT4_MAX_ROWS + 1, k).to(torch.bfloat16)
    lin.int4 = None  # above the threshold the bf16 path runs: same result with or without the int4 copy
    want = lin(x)
    lin.int4 = Int4Weight.from_weight(w)
    assert torch.equal(lin(x), want)
    x1 = x[:1]  # and at or below it the int4 kernel runs
    assert torch.equal(lin(x1), lin.int4(x1))


@pytest.mark.parametrize("shape", [(48, 64), (960, 576), (576, 1536)])
def test_our_int4_gemm_matches_the_dequantized_matmul(shape: tuple[int, int]) -> None:
    """Our int4 GEMM (model/csrc/int4_gemm.cpp): every row count through its row blocks and tile remainders
    (past 8 rows, on CPUs with AMX, the tile unit on dequantized tiles: 16- and 32-row blocks, padding),
    activations with an outlier channel (as the real model's hidden states have) and an all-zero row."""
    kernels = Kernels.detect(torch.device("cpu"))
    n, k = shape
    w = grid_weight(n, k, seed=1)
    if not tiles_supported(w, kernels):
        pytest.skip("our int4 GEMM needs the C++ kernels on a CPU with AVX512-VNNI and AVX512-BF16, or AVX2")
    ours, torchs = Int4Weight.from_weight(w, kernels), Int4Weight.from_weight(w)
    assert ours.tiles and not torchs.tiles and ours.error <= INT4_LOSSLESS_ERROR
    g = torch.Generator().manual_seed(2)
    for m in (1, 2, 3, 4, 5, 7, 9, 16, 17, 32, 33, 70):
        x = torch.randn(m, k, generator=g)
        x[:, 5] *= 200  # one channel far above the rest of its group
        zero = m // 2 if m > 2 else None
        if zero is not None:
            x[zero] = 0
        x = x.to(torch.bfloat16)
        ref = x.float() @ w.float().t()
        got = ours(x)
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        if zero is not None:
            assert torch.equal(got[zero], torch.zeros(n, dtype=torch.bfloat16))
        scale = ref.abs().max().item()
        # as close as torch's int4 kernel (both: bf16 output and bf16 step/low rounding); 8-bit activations
        # without their remainder are several times further off beside the outlier
        err, err_torch = (got.float() - ref).abs().max().item(), (torchs(x).float() - ref).abs().max().item()
        assert err < 1e-2 * scale and err < 2 * err_torch + 1e-3 * scale, (m, err, err_torch)


def test_without_a_hardware_bf16_gemm_our_int4_and_int8_kernels_take_every_row_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CPUs where a bf16 matmul has no hardware path (AVX2 only: neither our AVX512-BF16 GEMM nor oneDNN's
    bf16) torch falls back to a generic loop ~10x under float32, so our int8-product kernels take every
    step; with a bf16 GEMM they stop at the crossover rows."""
    kernels = Kernels(cpp=True, bf16_gemm=False)
    monkeypatch.setattr(quant, "_onednn_bf16", lambda: False)
    monkeypatch.setattr(torch.ops.smollm2, "int4_gemm_amx", lambda: False)
    assert not quant.bf16_gemm_fast(kernels)
    assert int4_max_rows(kernels, tiles=True) == ALL_ROWS
    assert quant.int8_head_max_rows(True, kernels) == ALL_ROWS
    assert int4_max_rows(kernels, tiles=False) == quant.INT4_MAX_ROWS_ONEDNN  # torch's kernel: its crossover
    monkeypatch.setattr(quant, "_onednn_bf16", lambda: True)
    assert int4_max_rows(kernels, tiles=True) == quant.INT4_MAX_ROWS_TILES
    assert quant.int8_head_max_rows(True, kernels) == quant.INT8_HEAD_MAX_ROWS_TILES
    ours = Kernels(cpp=True, bf16_gemm=True)
    assert int4_max_rows(ours, tiles=True) == quant.INT4_MAX_ROWS_TILES_OURS
    assert quant.int8_head_max_rows(True, ours) == quant.INT8_HEAD_MAX_ROWS_TILES_OURS


def test_lossless_detector() -> None:
    torch.manual_seed(0)
    lossless = int4_reconstruction_error(grid_weight(576, 576))
    lossy = int4_reconstruction_error(torch.randn(576, 576).to(torch.bfloat16))
    assert lossless <= INT4_LOSSLESS_ERROR < lossy
    assert lossless < 0.01 and lossy > 0.04
    # in float32 there is no rounding of the weight or of scale and zero to hide behind
    assert int4_reconstruction_error(grid_weight(64, 128, dtype=torch.float32)) < 1e-5
    assert int4_reconstruction_error(torch.zeros(8, 64)) == 0.0  # a constant group is exact


def grid_model(init: str) -> SmolLM2ForCausalLM:
    """The tiny model in bfloat16; init "grid": its layer weights on a Q4_1-like grid."""
    model = make_tiny_model(dtype=torch.bfloat16)
    if init == "grid":
        with torch.no_grad():
            for i, (name, p) in enumerate(model.named_parameters()):
                if p.dim() == 2 and ".layers." in name:
                    p.copy_(grid_weight(*p.shape, seed=i))
    return model


def test_prepare_for_serving_modes() -> None:
    lossy = grid_model("normal")
    lossy.prepare_for_serving()
    assert not lossy.int4_active and lossy.int4_error is None  # the default builds nothing
    lossy.prepare_for_serving(int4_small_batch="auto")
    assert not lossy.int4_active and lossy.int4_error is not None
    assert lossy.int4_error > INT4_LOSSLESS_ERROR
    assert all(lin.int4 is None for lin in lossy._layer_linears())
    lossy.prepare_for_serving(int4_small_batch="on")
    assert lossy.int4_active and all(lin.int4 is not None for lin in lossy._layer_linears())
    assert lossy.lm_head_linear is not None and lossy.lm_head_linear.int4 is None
    lossy.prepare_for_serving()  # a plain call (the runner's) keeps the setting
    assert lossy.int4_active
    lossy.prepare_for_serving(int4_small_batch="off")
    assert not lossy.int4_active and all(lin.int4_max_rows == 0 for lin in lossy._layer_linears())

    exact = grid_model("grid")
    exact.prepare_for_serving(int4_small_batch="auto")
    assert exact.int4_active and exact.int4_error is not None and exact.int4_error <= INT4_LOSSLESS_ERROR
    assert exact.kernels is not None
    for lin in exact._layer_linears():
        assert lin.int4 is not None and lin.int4_max_rows == int4_max_rows(exact.kernels, lin.int4.tiles)
    assert exact.int4_rows == max(lin.int4_max_rows for lin in exact._layer_linears())

    fp32 = grid_model("grid").float()  # no int4 kernels wanted there: ignored without an error
    fp32.prepare_for_serving(int4_small_batch="on")
    assert not fp32.int4_active and all(lin.int4 is None for lin in fp32._layer_linears())
    with pytest.raises(ValueError, match="int4_small_batch"):
        fp32.prepare_for_serving(int4_small_batch="yes")


# ---- the real model ----------------------------------------------------------------------------------


def one_token_steps(model: SmolLM2ForCausalLM, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) of a sequence fed one token per forward_paged step (M = 1 throughout)."""
    cfg, bs = model.config, 16
    blocks = (len(ids) + bs - 1) // bs
    caches = allocate_kv_cache(
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, blocks, bs, model.dtype, "cpu"
    )
    table = torch.arange(blocks)[None]  # (1, blocks)
    out = []
    with torch.inference_mode():
        for p, tok in enumerate(ids):
            mask = build_decode_mask(torch.tensor([p + 1]), blocks * bs, cfg.num_key_value_heads, model.dtype)
            meta = AttentionMetadata(torch.tensor([p]), 1, table, mask, [], bs)
            hidden = model.forward_paged(torch.tensor([tok]), torch.tensor([p]), meta, caches)
            out.append(model.compute_logits(hidden)[0])
    return torch.stack(out)


@pytest.mark.slow
@pytest.mark.real_model
def test_real_gguf_int4_auto_is_lossless_and_close_to_bf16(real_bf16) -> None:  # type: ignore[no-untyped-def]
    model, tok = real_bf16
    model.prepare_for_serving(int4_small_batch="auto")
    assert model.int4_active, f"the Q4_1 layers should reconstruct losslessly, error {model.int4_error}"
    assert (
        model.int4_error is not None and model.int4_error < 0.01
    )  # bf16 rounding: 0.0086 in our layout, 0.0059 in torch's
    for text in PROMPTS:
        ids = tok.encode(text)
        model.prepare_for_serving(int4_small_batch="auto")
        int4 = one_token_steps(model, ids)
        model.prepare_for_serving(int4_small_batch="off")
        bf16 = one_token_steps(model, ids)
        # measured max |dlogit| 0.31-1.23 over these prompts (logits reach ~37); each path is about as far
        # from float32 (int4 0.56-1.20, bf16 0.49-0.88), and top-1 agreed at every position
        assert (int4 - bf16).abs().max().item() < 2.5, text
        assert int4[-1].argmax().item() == bf16[-1].argmax().item(), text
        assert (int4.argmax(-1) == bf16.argmax(-1)).float().mean().item() >= 0.8, text


@pytest.mark.slow
@pytest.mark.real_model
def test_real_gguf_int4_serving_path_says_paris(real_bf16) -> None:  # type: ignore[no-untyped-def]
    from model.sampling_params import SamplingParams
    from server.engine.engine import LLMEngine
    from server.engine.runner import ModelRunner
    from server.engine.scheduler import Scheduler, SchedulerConfig

    model, tok = real_bf16
    model.prepare_for_serving(int4_small_batch="auto")
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256, block_size=16,
                          num_blocks=32, eos_token_id=None)  # fmt: skip
    engine = LLMEngine(ModelRunner(model, cfg.num_blocks, cfg.block_size), Scheduler(cfg))
    assert model.int4_active  # the runner's own prepare_for_serving() left it on
    engine.add_request(
        "paris", tok.encode("The capital of France is"), SamplingParams(max_tokens=16, temperature=0.0)
    )
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs:
                tokens.extend(c.new_token_ids)
    assert len(tokens) >= 1
    assert "Paris" in tok.decode(tokens), tok.decode(tokens)


def test_int4_swiglu_on_amx_is_bit_identical_to_the_gemm_then_silu_mul() -> None:
    """Past 8 rows on AMX the MLP's [gate; up] int4 GEMM takes the SwiGLU as its epilogue: exactly
    smollm2::silu_mul of the plain int4 GEMM's output, for one or several 32-row blocks and a padded tail."""
    kernels = Kernels.detect(torch.device("cpu"))
    w = grid_weight(2 * 96, 64, seed=4)
    if not (tiles_supported(w, kernels) and torch.ops.smollm2.int4_gemm_amx()):
        pytest.skip("needs our int4 GEMM on a CPU with AMX")
    lin = PackedLinear(w, swiglu=True, kernels=kernels)
    lin.int4 = Int4Weight.from_weight(w, kernels)
    lin.int4_max_rows = int4_max_rows(kernels, lin.int4.tiles)
    g = torch.Generator().manual_seed(5)
    for m in (9, 20, 32, 33, 70):
        x = torch.randn(m, 64, generator=g).to(torch.bfloat16)
        want = torch.ops.smollm2.silu_mul(lin.int4(x))
        got = torch.ops.smollm2.int4_linear_swiglu(x, lin.int4.packed, lin.int4.scales)
        assert got.shape == (m, 96) and torch.equal(got, want), m
        assert torch.equal(lin.swiglu(x), want), m


@pytest.mark.parametrize("shape", [(80, 64), (96, 64), (960, 576), (2 * 1536, 576), (576, 1536)])
def test_int4_amx_decode_rows_equal_the_same_rows_of_a_long_call(shape: tuple[int, int]) -> None:
    """On AMX, up to 64 rows take a pipelined loop (the next tiles dequantized while the tile unit multiplies)
    and longer inputs the grouped one; a row's output depends on its own inputs only, so the first m rows of a
    long call must equal an m-row call bit for bit, plain and with the SwiGLU epilogue."""
    kernels = Kernels.detect(torch.device("cpu"))
    n, k = shape
    w = grid_weight(n, k, seed=6)
    if not (tiles_supported(w, kernels) and torch.ops.smollm2.int4_gemm_amx()):
        pytest.skip("needs our int4 GEMM on a CPU with AMX")
    int4 = Int4Weight.from_weight(w, kernels)
    x = torch.randn(100, k, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    ops = [torch.ops.smollm2.int4_linear] + ([torch.ops.smollm2.int4_linear_swiglu] if n % 32 == 0 else [])
    for op in ops:  # 80 outputs: 5 tiles, the last unit has one
        long = op(x, int4.packed, int4.scales)
        for m in (9, 16, 17, 31, 32, 33, 47, 48, 63, 64):
            assert torch.equal(op(x[:m], int4.packed, int4.scales), long[:m]), (op, m)


def test_int4_amx_dequantizes_each_weight_exactly() -> None:
    """On the tile unit each int4 weight is dequantized as q * d + m with one float32 rounding (an FMA), then
    rounded to bf16: one-hot rows of x pick single weights, which must come back bit for bit."""
    kernels = Kernels.detect(torch.device("cpu"))
    w = grid_weight(96, 128, seed=8)
    if not (tiles_supported(w, kernels) and torch.ops.smollm2.int4_gemm_amx()):
        pytest.skip("needs our int4 GEMM on a CPU with AMX")
    int4 = Int4Weight.from_weight(w, kernels)
    q = int4_groups(w)[0].double()  # (N, K)
    sc = int4.scales.double()  # (N / 16, K / 32, 2, 16): d then m of 16 outputs
    d = sc[:, :, 0].permute(0, 2, 1).reshape(96, 4).repeat_interleave(32, dim=1)
    m = sc[:, :, 1].permute(0, 2, 1).reshape(96, 4).repeat_interleave(32, dim=1)
    want = (q * d + m).float().to(torch.bfloat16)  # exact in float64, then one float32 rounding
    cols = torch.arange(0, 128, 5)  # 26 rows: past the VNNI path's 8
    x = torch.zeros(len(cols), 128, dtype=torch.bfloat16)
    x[torch.arange(len(cols)), cols] = 1.0
    got = torch.ops.smollm2.int4_linear(x, int4.packed, int4.scales)
    assert torch.equal(got, want[:, cols].t())
