"""Quantized and packed copies of the serving path's weights (gpt-fast keeps its quantize.py apart too).

- int4 (groups of 32 along K, torch's CPU int4 kernels) for the layer linears of small batches;
- int8 (blocks of 32 along K, a float32 scale each; model/csrc/quant_ops.cpp) for the LM head;
- bf16 tiles for our AVX512-BF16 GEMM (model/csrc/bf16_gemm.cpp);
- PackedLinear, which holds a weight and those copies and picks one per call by the number of rows.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch

from model.kernels import Kernels

INT4_GROUP = 32  # weights per (scale, zero) pair along the input dim, as in GGUF's Q4_0/Q4_1 blocks
# Up to this many rows torch's int4 GEMV is faster than the bf16 GEMM: it streams a quarter of the bytes,
# but its cost steps up every 4 rows while the GEMM's barely moves below 8 (`python -m bench.int4_bench`
# measures the crossover; bench/NOTES.md, "Figures behind the code's constants").
INT4_MAX_ROWS = 4
# Against oneDNN's GEMM (CPUs without ours, or with AMX, where rows are padded to at least 8) torch's int4
# GEMV stays ahead up to 8 rows.
INT4_MAX_ROWS_ONEDNN = 8
# Our int4 GEMM (model/csrc/int4_gemm.cpp, AVX512-VNNI) spends a few instructions per 128 weights where
# torch's widens each to float32. Against oneDNN's bf16 GEMM it stays ahead to 24 rows and more; against
# our AVX512-BF16 GEMM on a Zen 5, where vdpbf16ps issues as fast as vpdpbusd, the two are level at 12-13
# rows (bench/NOTES.md), so 12 there; CPUs with a slower vdpbf16ps (Zen 4, Intel) only move it up.
INT4_MAX_ROWS_TILES = 16
INT4_MAX_ROWS_TILES_OURS = 12
# Past this many rows our int4 GEMM runs on the AMX tile unit where there is one (kVnniRows in
# model/csrc/int4_gemm.cpp).
INT4_VNNI_ROWS = 8
# Where the CPU has AMX, our int4 GEMM takes steps of more rows to the tile unit (each weight tile
# dequantized to bf16 in cache): level with the bf16 GEMM there from 32 rows, ahead of it below and for
# prefill chunks (bench/NOTES.md), so the int4 copies take every step: a row limit no step reaches.
ALL_ROWS = 1 << 62
# Largest int4_reconstruction_error still called lossless: weights that already sit on a 4-bit groupwise
# grid come back within bf16 rounding of their step and low: 0.0086 at worst over the Q4_1 GGUF's layers
# in our layout, 0.0059 in torch's (0 in float32). Rounding arbitrary weights to 16 levels is off by up to
# half a step: 0.069 for normal ones.
INT4_LOSSLESS_ERROR = 0.02
INT4_MODES = ("off", "auto", "on")


def int4_max_rows(kernels: Kernels, tiles: bool = False) -> int:
    """Up to how many rows a linear with an int4 copy takes it, given that copy's kernel (tiles: ours, see
    Int4Weight) and the bf16 GEMM it would use instead."""
    if tiles:
        if torch.ops.smollm2.int4_gemm_amx() or not bf16_gemm_fast(kernels):
            return ALL_ROWS
        return INT4_MAX_ROWS_TILES_OURS if kernels.bf16_gemm else INT4_MAX_ROWS_TILES
    return INT4_MAX_ROWS if kernels.bf16_gemm else INT4_MAX_ROWS_ONEDNN


def bf16_gemm_fast(kernels: Kernels) -> bool:
    """This CPU multiplies bf16 in hardware for the linears: our AVX512-BF16 GEMM or oneDNN's bf16 path
    (AVX512 or AVX-NE-CONVERT). Elsewhere (AVX2-only CPUs) a bf16 matmul falls back to a generic loop about
    a tenth of the float32 rate, and our int8-product kernels (int4 layers, int8 head) take every row count."""
    return kernels.bf16_gemm or _onednn_bf16()


@functools.cache
def _onednn_bf16() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        _onednn_pack(torch.zeros(16, 32, dtype=torch.bfloat16))
    except (RuntimeError, AttributeError):
        return False
    return True


def int4_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """The int4 kernels exist for this build and serve this device and weight dtype (CPU, bfloat16)."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
    )


def int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) weight -> q (N, K) int32 in 0..15, step (N, K / 32) and low (N, K / 32) float32: w ~ q * step + low.

    Asymmetric min/max per group of 32 along K, as GGUF's Q4_1 blocks."""
    N, K = weight.shape
    assert K % INT4_GROUP == 0, f"K={K} is not a multiple of {INT4_GROUP}"
    w = weight.detach().float().view(N, K // INT4_GROUP, INT4_GROUP)  # (N, G, 32)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = (hi - lo) / 15  # (N, G, 1)
    q = ((w - lo) / step.where(step > 0, 1.0)).round_().clamp_(0, 15).to(torch.int32).view(N, K)
    return q, step.squeeze(-1), lo.squeeze(-1)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> q (N, K) int32 in 0..15 and scales_and_zeros (K / 32, N, 2) in weight's dtype.

    int4_groups in the layout of torch's int4 kernels, which compute w = (q - 8) * scale + zero: so
    zero = min + 8 * scale.
    """
    q, step, lo = int4_groups(weight)
    sz = torch.stack([step, lo + 8 * step], dim=-1).transpose(0, 1).to(weight.dtype).contiguous()  # (G, N, 2)
    return q, sz


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_int4 as the kernel sees it (scale and zero rounded to their dtype): (N, K) float32."""
    N, K = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # (N, G, 2)
    w = (q.view(N, K // INT4_GROUP, INT4_GROUP).float() - 8) * sz[..., :1] + sz[..., 1:]
    return w.view(N, K)


def _dequantize_groups(q: torch.Tensor, step: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(N, K) float32 from q (N, K) and step, low (N, K / 32)."""
    N, K = q.shape
    w = q.view(N, K // INT4_GROUP, INT4_GROUP).float() * step.unsqueeze(-1) + low.unsqueeze(-1)
    return w.view(N, K)


def _relative_group_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """max over groups of 32 of max |approx - w| / max |w| in that group."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // INT4_GROUP, INT4_GROUP)
    err = (approx.view_as(w) - w).abs().amax(-1)  # (N, G)
    mag = w.abs().amax(-1)
    rel = torch.where(mag > 0, err / mag.clamp(min=torch.finfo(torch.float32).tiny), err)
    return float(rel.max()) if rel.numel() else 0.0


def int4_reconstruction_error(
    weight: torch.Tensor, q: torch.Tensor | None = None, sz: torch.Tensor | None = None
) -> float:
    """max over groups of max |dequantize_int4(quantize_int4(w)) - w| / max |w| in that group.

    About 2^-8 (bf16 rounding) when the weight already lies on a 4-bit groupwise grid, e.g. dequantized
    from Q4_1; a few percent for arbitrary weights. Compare with INT4_LOSSLESS_ERROR.
    """
    if q is None or sz is None:
        q, sz = quantize_int4(weight)
    return _relative_group_error(weight, dequantize_int4(q, sz))


# The LM head (tied to the embedding; Q8_0 in the GGUF) as symmetric int8 in blocks of 32 along K with a
# float32 scale per block (model/csrc/quant_ops.cpp). It streams 30 MB instead of 57 MB, which wins while
# the product is memory-bound (up to 4 rows); from 8 rows on it is compute-bound and the bf16 GEMM is level
# or ahead (bench/NOTES.md, "Figures behind the code's constants").
INT8_BLOCK = 32
INT8_HEAD_MAX_ROWS = 4
# Our VNNI int8 kernel (Int8Weight.tiles) multiplies 64 weights per instruction where the plain one widens
# each to float32, so it stays ahead of the bf16 GEMM for more rows (bench/NOTES.md): to ~10 rows beside
# oneDNN's on AMX, to 12-13 beside our AVX512-BF16 GEMM on a Zen 5.
INT8_HEAD_MAX_ROWS_TILES = 8
INT8_HEAD_MAX_ROWS_TILES_OURS = 12


def int8_head_max_rows(tiles: bool, kernels: Kernels | None = None) -> int:
    """Up to how many rows the LM head takes its int8 copy, given that copy's kernel (Int8Weight.tiles) and
    the kernels the bf16 GEMM would take instead (None: a fast one)."""
    if not tiles:
        return INT8_HEAD_MAX_ROWS
    if kernels is not None and not bf16_gemm_fast(kernels):
        return ALL_ROWS
    return (
        INT8_HEAD_MAX_ROWS_TILES_OURS
        if kernels is not None and kernels.bf16_gemm
        else INT8_HEAD_MAX_ROWS_TILES
    )


# Largest int8_reconstruction_error still called lossless. It is relative to each element, not to its
# block: weights on an 8-bit grid (dequantized from Q8_0) come back within bf16 rounding (2^-8, two
# roundings), while int8 on arbitrary weights loses the small elements of a block entirely (error ~1).
INT8_LOSSLESS_ERROR = 0.01


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> q (N, K) int8 in -127..127 and scales (N, K / 32) float32: w ~ q * scale."""
    N, K = weight.shape
    assert K % INT8_BLOCK == 0, f"K={K} is not a multiple of {INT8_BLOCK}"
    w = weight.detach().float().view(N, K // INT8_BLOCK, INT8_BLOCK)
    scale = w.abs().amax(-1) / 127  # (N, G)
    q = (w / scale.where(scale > 0, 1.0).unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q.view(N, K), scale.contiguous()


def int8_reconstruction_error(weight: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> float:
    """max over the nonzero elements of |q * scale - w| / |w| (zeros come back exactly)."""
    N, K = weight.shape
    worst = 0.0
    for r0 in range(0, N, 4096):  # in slices: the 49152-row LM head would take ~0.5 GB at once in float32
        w = weight[r0 : r0 + 4096].detach().float()
        deq = (
            q[r0 : r0 + 4096].view(-1, K // INT8_BLOCK, INT8_BLOCK).float() * scales[r0 : r0 + 4096, :, None]
        )
        err = (deq.view_as(w) - w).abs()
        mag = w.abs()
        rel = torch.where(mag > 0, err / mag.clamp(min=torch.finfo(torch.float32).tiny), err)
        worst = max(worst, float(rel.max()) if rel.numel() else 0.0)
    return worst


def int8_supported(device: torch.device, dtype: torch.dtype, kernels: Kernels) -> bool:
    """The int8 LM head kernel serves this device and weight dtype (CPU in bfloat16, C++ kernels built)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and kernels.cpp


def pack_int8_tiles(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8's (q, scales) -> the layout of smollm2::int8_tiles_linear (model/csrc/int4_gemm.cpp):
    (N / 16, K / 32, 8, 64) uint8 holding q + 128 (byte 4 o + b of chunk c: output 16 t + o at input
    32 g + 4 c + b) and scales (N / 16, K / 32, 16) float32."""
    N, K = q.shape
    T, G = N // 16, K // INT8_BLOCK
    lanes = q.view(T, 16, G, 8, 4).permute(0, 2, 3, 1, 4).reshape(T, G, 8, 64)
    packed = (lanes.to(torch.int16) + 128).to(torch.uint8).contiguous()
    return packed, scales.view(T, 16, G).transpose(1, 2).contiguous()


@dataclass(frozen=True, slots=True)
class Int8Weight:
    """A weight as int8 blocks of 32 along K with a float32 scale each: y = x @ (q * scale)^T, in float32.

    tiles: in the layout of our VNNI kernel (pack_int8_tiles), which takes bf16 rows as int8 with their
    remainder (model/csrc/int4_gemm.cpp); else rows plain (quant_ops.cpp widens each weight to float32).
    """

    qweight: torch.Tensor  # (N, K) int8, or pack_int8_tiles' layout
    scales: torch.Tensor  # (N, K / 32) float32, or pack_int8_tiles' layout
    error: float  # int8_reconstruction_error of the weight it was made from
    tiles: bool = False

    @classmethod
    def from_weight(cls, weight: torch.Tensor, kernels: Kernels | None = None) -> Int8Weight:
        """kernels: where tiles_supported, our VNNI layout (None: plain rows)."""
        q, scales = quantize_int8(weight)
        error = int8_reconstruction_error(weight, q, scales)
        if kernels is not None and tiles_supported(weight, kernels):
            return cls(*pack_int8_tiles(q, scales), error, tiles=True)
        return cls(q, scales, error)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiles:
            return torch.ops.smollm2.int8_tiles_linear(x, self.qweight, self.scales)
        return torch.ops.smollm2.int8_linear(x, self.qweight, self.scales)


def pack_int4_tiles(
    q: torch.Tensor, step: torch.Tensor, low: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """int4_groups' (q, step, low) -> the layout of smollm2::int4_linear (model/csrc/int4_gemm.cpp):
    nibbles (N / 16, K / 32, 4, 64) uint8 and scales (N / 16, K / 32, 2, 16) bfloat16 (step, then low).

    Byte 4 o + b of chunk c of (tile t, group g) holds output 16 t + o at input 32 g + 4 c + b in its low
    nibble and at 32 g + 4 (c + 4) + b in its high one."""
    N, K = q.shape
    T, G = N // 16, K // INT4_GROUP
    lanes = q.view(T, 16, G, 8, 4).permute(0, 2, 3, 1, 4).reshape(T, G, 8, 64)  # (t, g, k-quad, 4 o + b)
    packed = (lanes[:, :, :4] | (lanes[:, :, 4:] << 4)).to(torch.uint8).contiguous()
    scales = torch.stack([step.view(T, 16, G), low.view(T, 16, G)], dim=2).permute(0, 3, 2, 1)
    return packed, scales.to(torch.bfloat16).contiguous()


def tiles_supported(weight: torch.Tensor, kernels: Kernels) -> bool:
    """smollm2::int4_linear and int8_tiles_linear serve this weight: CPU, bfloat16, N a multiple of 16, K
    of 32, kernels built with AVX512-VNNI and AVX512-BF16, or with AVX2 and FMA."""
    n, k = weight.shape
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and n % 16 == 0
        and k % INT4_GROUP == 0
        and kernels.cpp
        and bool(torch.ops.smollm2.int4_gemm_available())
    )


@dataclass(frozen=True, slots=True)
class Int4Weight:
    """A weight as 4-bit groups of 32 along K: y = x @ W^T with W = q * step + low per group.

    tiles: in the layout of our int4 GEMM (pack_int4_tiles), which streams the nibbles at the memory's
    rate; else in torch's CPU int4 layout (w = (q - 8) * scale + zero, scales_and_zeros (K / 32, N, 2)).
    amx: tiles, and past INT4_VNNI_ROWS rows our GEMM runs on the AMX tile unit (int4_linear_swiglu too).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    error: float  # int4_reconstruction_error of the weight it was made from
    tiles: bool
    amx: bool = False

    @classmethod
    def from_weight(cls, weight: torch.Tensor, kernels: Kernels | None = None) -> Int4Weight:
        """kernels: where tiles_supported, our layout (None: torch's)."""
        if kernels is not None and tiles_supported(weight, kernels):
            q, step, low = int4_groups(weight)
            packed, scales = pack_int4_tiles(q, step, low)
            t = scales.float()
            deq_step = t[:, :, 0].permute(0, 2, 1).reshape(weight.shape[0], -1)
            deq_low = t[:, :, 1].permute(0, 2, 1).reshape(weight.shape[0], -1)
            error = _relative_group_error(weight, _dequantize_groups(q, deq_step, deq_low))
            return cls(packed, scales, error, tiles=True, amx=bool(torch.ops.smollm2.int4_gemm_amx()))
        q, sz = quantize_int4(weight)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return cls(packed, sz, int4_reconstruction_error(weight, q, sz), tiles=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiles:
            return torch.ops.smollm2.int4_linear(x, self.packed, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.contiguous(), self.packed, INT4_GROUP, self.scales
        )


def pack_bf16_tiles(weight: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
    """(N, K) bf16 -> (N / 16, K / 2, 16, 2): the layout of the C++ bf16 GEMM (model/csrc/bf16_gemm.cpp).

    swiglu: weight is [gate; up] (2 I, K); their tiles are interleaved (gate 0, up 0, gate 1, ...) for
    bf16_linear_swiglu, which needs I a multiple of 16."""
    n, k = weight.shape
    w = weight.detach()
    if swiglu:
        w = w.reshape(2, n // 32, 16, k).transpose(0, 1)
    return w.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def bf16_tiles_supported(weight: torch.Tensor, kernels: Kernels, swiglu: bool = False) -> bool:
    """The C++ bf16 GEMM serves this weight: CPU, bfloat16, N a multiple of 16 (of 32 for [gate; up] with
    swiglu), K even, kernels built."""
    n, k = weight.shape
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and n % (32 if swiglu else 16) == 0
        and k % 2 == 0
        and kernels.bf16_gemm
    )


# oneDNN builds (JIT-compiles) and caches a primitive per input shape, each holding its own code and
# scratchpad (~1.5 MB with AMX): serving's row counts vary every step, and an unbucketed engine grew by
# hundreds of MB under varied traffic. Rows are padded up to one of these sizes (a few dozen primitives
# per weight in all); the padding is cheap where a GEMM is bound by reading its weight (a few rows), and
# at most half as many rows again above that.
ONEDNN_ROWS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def onednn_rows(m: int) -> int:
    """The row count a GEMM of m rows runs at on oneDNN's path."""
    i = bisect.bisect_left(ONEDNN_ROWS, m)
    return ONEDNN_ROWS[i] if i < len(ONEDNN_ROWS) else -(-m // 512) * 512


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) bf16 -> oneDNN's blocked layout for _linear_pointwise, checked by one call."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
    probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype)
    torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    return packed


# The linear modes of smollm2::decode_layers (model/csrc/decode_layers.cpp, enum Mode)
CPP_INT4, CPP_TILES, CPP_INT4_SWIGLU_AMX, CPP_INT4_THEN_SILU, CPP_TILES_SWIGLU = range(5)


class PackedLinear:
    """y = x @ W^T for the serving path. On CPU in bfloat16 the weight is packed once: into the tiles of our
    C++ GEMM (model/csrc/bf16_gemm.cpp) when the kernels are built and the CPU has AVX512-BF16, which
    streams the weights from memory faster than oneDNN (bench/NOTES.md); else into oneDNN's blocked
    layout (a plain bf16 GEMM reorders the weight on every call). Elsewhere it is a plain mm on the
    transposed view.

    With an int4 copy (``int4``, set by prepare_for_serving), inputs of at most int4_max_rows rows take the
    int4 GEMV instead: at one stream the step streams a quarter of the weight bytes. Likewise an int8 copy
    (``int8``, the LM head's) for at most int8_max_rows rows, with a float32 result. More rows go to the
    bf16 GEMM, which wins there.

    swiglu: the weight is an MLP's [gate; up] and swiglu(x) gives silu(x @ gate^T) * (x @ up^T); with the
    C++ GEMM its tiles are interleaved and the SwiGLU is the GEMM's epilogue (bit-identical to the GEMM then
    smollm2::silu_mul, without writing the (M, 2 I) product).
    """

    def __init__(self, weight: torch.Tensor, swiglu: bool = False, kernels: Kernels | None = None) -> None:
        """kernels: what the model decided to use (None: Kernels.detect for the weight's device)."""
        if kernels is None:
            kernels = Kernels.detect(weight.device)
        self.kernels = kernels  # its compute threads run the GEMM
        self.weight = weight
        self.swiglu_tiles = False  # tiles interleave gate and up
        self.packed: torch.Tensor | None = None
        self.int4: Int4Weight | None = None
        self.int4_max_rows = 0
        self.int8: Int8Weight | None = None
        self.int8_max_rows = 0
        self.tiles: torch.Tensor | None = None
        if bf16_tiles_supported(weight, kernels, swiglu):
            self.tiles = pack_bf16_tiles(weight, swiglu)
            self.swiglu_tiles = swiglu
        elif (
            weight.device.type == "cpu"
            and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
        ):
            try:
                self.packed = _onednn_pack(weight.detach())
            except (RuntimeError, AttributeError):  # a torch build without these ops: plain mm
                self.packed = None

    # oneDNN's packed weight is an opaque tensor that torch.save cannot write: pickle its plain form (the
    # plain weight itself may have been dropped) and pack it again when read back.
    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        if self.packed is not None:
            state["packed"] = self.packed.to_dense()
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        if self.packed is not None:
            self.packed = _onednn_pack(self.packed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.wide(self._matmul, x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None and x.shape[0] <= self.int8_max_rows:
            return self.int8(x)
        if self.int4 is not None and x.shape[0] <= self.int4_max_rows:
            return self.int4(x)
        if self.tiles is not None:
            y = torch.ops.smollm2.bf16_linear(x, self.tiles)
            if self.swiglu_tiles:  # back to [gate | up] columns
                y = y.view(len(x), -1, 2, 16).transpose(1, 2).reshape(len(x), -1)
            return y
        if self.packed is not None:
            m = len(x)
            rows = onednn_rows(m)
            if rows != m:
                x = torch.nn.functional.pad(x, (0, 0, 0, rows - m))
            y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")
            return y if rows == m else y[:m]
        return torch.mm(x, self.weight.t())

    def cpp_plan(self, rows: int, swiglu: bool = False) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """How smollm2::decode_layers runs this linear at `rows` rows, as __call__ (swiglu: as swiglu) would:
        (mode, a, b) with the modes of model/csrc/decode_layers.cpp, or None where the call would take a
        path the C++ layer loop does not have (oneDNN, torch's int4 kernel, an int8 copy, a plain mm)."""
        if self.int8 is not None and rows <= self.int8_max_rows:
            return None
        int4 = self.int4 if self.int4 is not None and rows <= self.int4_max_rows else None
        if int4 is not None and not int4.tiles:
            return None
        if swiglu:
            if int4 is not None:
                amx = int4.amx and rows > INT4_VNNI_ROWS
                return (CPP_INT4_SWIGLU_AMX if amx else CPP_INT4_THEN_SILU, int4.packed, int4.scales)
            if self.swiglu_tiles and self.tiles is not None:
                return CPP_TILES_SWIGLU, self.tiles, self.tiles
            return None
        if int4 is not None:
            return CPP_INT4, int4.packed, int4.scales
        if self.tiles is not None and not self.swiglu_tiles:
            return CPP_TILES, self.tiles, self.tiles
        return None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """weight[ids] (len(ids), K), gathered from the tiles (tiles[n // 16, :, n % 16, :] is row n)."""
        assert self.tiles is not None and not self.swiglu_tiles
        return self.tiles[ids // 16, :, ids % 16, :].reshape(len(ids), -1)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the [gate; up] weight, as smollm2::silu_mul(self(x)) rounds (C++ kernels only)."""
        int4 = self.int4 if self.int4 is not None and x.shape[0] <= self.int4_max_rows else None
        if int4 is not None and int4.amx and x.shape[0] > INT4_VNNI_ROWS:
            # on the tile unit the SwiGLU is the epilogue of the int4 GEMM too
            return self.kernels.wide(torch.ops.smollm2.int4_linear_swiglu, x, int4.packed, int4.scales)
        if self.swiglu_tiles and int4 is None:
            assert self.tiles is not None
            return self.kernels.wide(torch.ops.smollm2.bf16_linear_swiglu, x, self.tiles)
        return self.kernels.wide_rows(len(x), torch.ops.smollm2.silu_mul, self(x))
