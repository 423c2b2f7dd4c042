"""SmolLM2: the spec's modules under the spec's names.

Parameter names follow Hugging Face's Llama so checkpoints load with a plain name map. Two forward paths
share the weights:
- ``forward(input_ids (B, T), ...)``: training, loss and ``generate()``, with a (B, nkv, S, hd) KV cache;
- ``forward_paged(input_ids (N,), positions (N,), meta, kv_caches)``: serving, a flat batch of tokens from
  many sequences over the paged KV cache (see ``model.attention``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import AttentionMetadata, one_kernel_call, paged_attention
from model.config import SmolLM2Config
from model.kernels import TORCH_ONLY, Kernels
from model.quant import (
    ALL_ROWS,
    INT4_LOSSLESS_ERROR,
    INT4_MODES,
    INT8_LOSSLESS_ERROR,
    Int4Weight,
    Int8Weight,
    PackedLinear,
    int4_max_rows,
    int4_supported,
    int8_head_max_rows,
    int8_supported,
)
from model.threads import WIDE_ROWS

KVCache = tuple[torch.Tensor, torch.Tensor]  # (B, nkv, S, hd) each


class SmolLM2RMSNorm(nn.Module):
    """RMS normalization (like T5LayerNorm): computed in float32, scaled by a learned weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


def _rms_norm(x: torch.Tensor, norm: SmolLM2RMSNorm, dtype: torch.dtype) -> torch.Tensor:
    """SmolLM2RMSNorm of a float32 x, returned in `dtype` (the roundings of SmolLM2RMSNorm.forward: the
    normalized x to `dtype`, then the weight's product). torch.rms_norm is one fused kernel on CUDA (3
    launches per norm instead of 7, 60 norms a step); on CPU it is the same five ops as x * rsqrt(...)."""
    return torch.rms_norm(x, (x.shape[-1],), None, norm.variance_epsilon).to(dtype).mul_(norm.weight)


def _add_norm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    norm: SmolLM2RMSNorm,
    dtype: torch.dtype,
    fused: bool,
    kernels: Kernels | None = None,
) -> torch.Tensor:
    """x += delta in place (x: the float32 residual stream (N, H)), then norm(x) in `dtype`.

    fused: one pass of the C++ op (model/csrc/fused_ops.cpp) with the same roundings, on the kernels'
    compute threads when the step is long."""
    if fused:
        ops, wide = torch.ops.smollm2, (kernels or TORCH_ONLY).wide_rows
        if delta is None:
            return wide(len(x), ops.rms_norm_cast, x, norm.weight, norm.variance_epsilon)
        return wide(len(x), ops.add_rms_norm_, x, delta, norm.weight, norm.variance_epsilon)
    if delta is not None:
        x.add_(delta)
    return _rms_norm(x, norm, dtype)


def _precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """(end, dim // 2, 2): cos and sin of position * inverse frequency."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.outer(torch.arange(end, dtype=torch.float32), inv_freq)  # (end, dim/2)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1)


# Positions the RoPE table holds when the model is built: the table grows on demand, and serving sizes it to
# the context it serves (server.core_setup), so a config's max_position_embeddings (up to 2**31) is never
# allocated up front (1e9 positions would be 512 GB).
ROPE_TABLE_POSITIONS = 8192


class SmolLM2RotaryEmbedding(nn.Module):
    """cos/sin caches in the rotate-half layout; they grow when a longer sequence arrives."""

    cos_cached: torch.Tensor  # (max_seq_len_cached, dim) buffers, registered by _build_cache
    sin_cached: torch.Tensor

    def __init__(self, dim: int, max_position_embeddings: int = 2048, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        self._build_cache(max_position_embeddings)

    def _build_cache(self, seq_len: int) -> None:
        freqs_cis = _precompute_freqs_cis(self.dim, seq_len, self.base)
        cos, sin = freqs_cis[..., 0], freqs_cis[..., 1]  # (seq_len, dim/2)
        self.register_buffer("cos_cached", torch.cat([cos, cos], dim=-1), persistent=False)
        self.register_buffer("sin_cached", torch.cat([sin, sin], dim=-1), persistent=False)
        self.max_seq_len_cached = seq_len

    def _grow(self, seq_len: int) -> None:
        if seq_len > self.max_seq_len_cached:
            device = self.cos_cached.device
            self._build_cache(max(seq_len, 2 * self.max_seq_len_cached))
            self.to(device)

    def resize(self, seq_len: int) -> None:
        """Hold exactly positions 0..seq_len-1 (the context served): smaller or larger than now."""
        if seq_len != self.max_seq_len_cached:
            device = self.cos_cached.device
            self._build_cache(seq_len)
            self.to(device)

    def forward(self, x: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq_len, dim) cos and sin in x's dtype."""
        self._grow(seq_len)
        return self.cos_cached[:seq_len].to(x.dtype), self.sin_cached[:seq_len].to(x.dtype)

    def at_positions(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, dim) cos and sin for arbitrary positions (the serving path)."""
        capturing = positions.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing:  # a CUDA graph capture must not sync; its owner grows the cache beforehand
            self._grow(int(positions.max()) + 1 if positions.numel() else 0)
        return self.cos_cached[positions].to(dtype), self.sin_cached[positions].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (B, nh, T, hd); cos/sin: (S, hd) indexed by position_ids (B, T), or already (B, T, hd)."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]  # (B, T, hd)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, L, hd) -> (B, nkv * n_rep, L, hd)."""
    if n_rep == 1:
        return hidden_states
    B, nkv, L, hd = hidden_states.shape
    return hidden_states[:, :, None].expand(B, nkv, n_rep, L, hd).reshape(B, nkv * n_rep, L, hd)


class SmolLM2MLP(nn.Module):
    def __init__(self, config: SmolLM2Config) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        # Set by prepare_for_serving(): the fused [gate; up] weight and the serving path's linears.
        self.gate_up_weight: torch.Tensor | None = None
        self.gate_up_linear: PackedLinear | None = None
        self.down_linear: PackedLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = F.linear(x, self.gate_up_weight).split(self.intermediate_size, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_flat(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """Serving path (no autograd; after prepare_for_serving): SiLU and the product run in place.
        fused: both in one C++ pass (model/csrc/fused_ops.cpp), same roundings."""
        assert self.gate_up_linear is not None and self.down_linear is not None, "prepare_for_serving() first"
        if fused:
            return self.down_linear(self.gate_up_linear.swiglu(x))
        gate_up = self.gate_up_linear(x)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_linear(F.silu(gate, inplace=True).mul_(up))


class SmolLM2Attention(nn.Module):
    """Grouped-query attention (9 query heads over 3 KV heads) with rotary embeddings."""

    def __init__(self, config: SmolLM2Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_kv_groups
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        h, hd = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, self.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, self.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=False)
        # Set by prepare_for_serving(): the fused [q; k; v] weight and the serving path's linears.
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_linear: PackedLinear | None = None
        self.o_linear: PackedLinear | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_value: KVCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """hidden_states (B, T, H); cos/sin (B, T, hd); attention_mask (B, 1, T, S) bool or None (causal)."""
        B, T, _ = hidden_states.shape
        q = (
            self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        )  # (B, nh, T, hd)
        k = self.k_proj(hidden_states).view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)  # (B, nkv, S, hd)
            v = torch.cat([past_key_value[1], v], dim=2)
        present = (k, v) if use_cache else None
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        if attention_mask is None and T == k.shape[2]:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
        elif attention_mask is None and T == 1:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        else:
            if attention_mask is None:  # chunk of T queries after S - T cached keys
                attention_mask = _causal_mask(T, k.shape[2], q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scaling)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out), present

    def forward_paged(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
        fused: bool = False,
        kernels: Kernels | None = None,
    ) -> torch.Tensor:
        """x (N, H) -> (N, H). rope: (cos, sin) tables (N, nh + 2 nkv, hd) from SmolLM2Model.rope_tables.
        fused: RoPE in one C++ pass (model/csrc/fused_ops.cpp), same rounding; kernels: whose compute
        threads run it on a long step."""
        N = x.shape[0]
        nh, nkv, hd = self.num_heads, self.num_key_value_heads, self.head_dim
        assert self.qkv_linear is not None and self.o_linear is not None, "prepare_for_serving() first"
        qkv = self.qkv_linear(x).view(N, nh + 2 * nkv, hd)
        # rotate_half(x) * sin == roll(x, hd/2) * sign-folded sin. The tables leave V heads unchanged
        # (cos 1, sin 0) and carry the 1/sqrt(hd) query scale (a power of two, so exact).
        cos, sin = rope
        if fused:
            qkv = (kernels or TORCH_ONLY).wide_rows(N, torch.ops.smollm2.rope, qkv, cos, sin)
        else:
            qkv = torch.addcmul(qkv * cos, qkv.roll(hd // 2, dims=-1), sin)
        out = paged_attention(qkv[:, :nh], qkv[:, nh:], kv_cache, meta)
        return self.o_linear(out)


def _causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool: query i (at position S - T + i) sees keys 0 .. S - T + i."""
    return torch.arange(S, device=device).view(1, S) <= torch.arange(S - T, S, device=device).view(T, 1)


class SmolLM2DecoderLayer(nn.Module):
    def __init__(self, config: SmolLM2Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.self_attn = SmolLM2Attention(config, layer_idx)
        self.mlp = SmolLM2MLP(config)
        self.input_layernorm = SmolLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = SmolLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_value: KVCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KVCache | None]:
        attn_out, present = self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, attention_mask, past_key_value, use_cache
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, present


class SmolLM2Model(nn.Module):
    def __init__(self, config: SmolLM2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SmolLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = SmolLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = SmolLM2RotaryEmbedding(
            config.head_dim, min(config.max_position_embeddings, ROPE_TABLE_POSITIONS), config.rope_theta
        )
        # serving: steps whose attention is one C++ kernel call run their layer loop in C++ (decode_layers)
        self.cpp_layers = True
        self._layer_plans: dict[tuple[int, ...], tuple[list[torch.Tensor], list[int]] | None] = {}

    @property
    def decoder_layers(self) -> Sequence[SmolLM2DecoderLayer]:
        """self.layers, typed (nn.ModuleList yields plain Modules to a type checker)."""
        return cast(Sequence[SmolLM2DecoderLayer], self.layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: list[KVCache] | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KVCache] | None]:
        """input_ids (B, T); attention_mask (B, S) with 1 for real tokens, S = past + T."""
        B, T = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        S = past_len + T
        h = self.embed_tokens(input_ids)  # (B, T, H)
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            else:
                position_ids = torch.arange(past_len, S, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary_emb(h, int(position_ids.max()) + 1)
        cos, sin = cos[position_ids], sin[position_ids]  # (B, T, hd)
        mask = None
        if attention_mask is not None:  # (B, S) padding -> (B, 1, T, S) bool, with causality
            mask = attention_mask.bool()[:, None, None, :] & _causal_mask(T, S, h.device)[None, None]
        presents: list[KVCache] | None = [] if use_cache else None
        for i, layer in enumerate(self.decoder_layers):
            past = past_key_values[i] if past_key_values else None
            h, present = layer(h, cos, sin, mask, past, use_cache)
            if presents is not None and present is not None:
                presents.append(present)
        return self.norm(h), presents

    def forward_paged(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
        kernels: Kernels,
    ) -> torch.Tensor:
        """Flat batch: x the tokens' embeddings (N, H) in float32 (updated in place), positions (N,) ->
        final hidden states (N, H) in the model's dtype.

        The residual stream x is kept in float32 whatever the weights' dtype: in bfloat16 its norm grows to
        ~25k by the middle layers, where a bf16 step is 128, and the rounding flipped greedy answers
        (bench/NOTES.md). Norm outputs are cast back to the weights' dtype, so every GEMM stays in it.
        Each residual add is folded into the next norm (_add_norm), which the C++ ops do in one pass.
        """
        dtype = self.norm.weight.dtype
        rope = self.rope_tables(positions, dtype)
        fused = kernels.cpp and dtype in (torch.float32, torch.bfloat16)
        if fused and self.cpp_layers and x.device.type == "cpu":
            calls = one_kernel_call(meta, len(x), x.device)
            plan = self._layer_plan(len(x)) if calls is not None else None
            if calls is not None and plan is not None:  # the same ops as the loop below, called from C++
                cfg = self.config
                return torch.ops.smollm2.decode_layers(
                    x, plan[0], plan[1], rope[0], rope[1], kv_caches, meta.slot_mapping, calls[0], calls[1],
                    meta.block_size, cfg.num_attention_heads, cfg.num_key_value_heads, self.norm.variance_epsilon,
                    kernels.compute_threads or 0, WIDE_ROWS,
                )  # fmt: skip
        delta: torch.Tensor | None = None  # what the last block adds to x
        for layer, kv_cache in zip(self.decoder_layers, kv_caches, strict=True):
            h = _add_norm(x, delta, layer.input_layernorm, dtype, fused, kernels)
            attn = layer.self_attn.forward_paged(h, rope, meta, kv_cache, fused, kernels)
            h = _add_norm(x, attn, layer.post_attention_layernorm, dtype, fused, kernels)
            delta = layer.mlp.forward_flat(h, fused)
        return _add_norm(x, delta, self.norm, dtype, fused, kernels)

    def _layer_plan(self, rows: int) -> tuple[list[torch.Tensor], list[int]] | None:
        """The weights and linear modes (qkv, o, gate/up, down) with which smollm2::decode_layers runs every
        layer at `rows` rows, as the Python loop would (PackedLinear.cpp_plan), or None where a linear takes
        a path the C++ loop does not have. Cached by the modes: the row count changes them only through the
        int4 and int8 row limits. reset_layer_plans() drops the cache when the linears change."""
        Plan = tuple[int, torch.Tensor, torch.Tensor]

        def plans(layer: SmolLM2DecoderLayer) -> list[Plan] | None:
            attn, mlp = layer.self_attn, layer.mlp
            got: list[Plan] = []
            for i, lin in enumerate((attn.qkv_linear, attn.o_linear, mlp.gate_up_linear, mlp.down_linear)):
                p = None if lin is None else lin.cpp_plan(rows, swiglu=i == 2)
                if p is None:
                    return None
                got.append(p)
            return got

        layers = self.decoder_layers
        first = plans(layers[0])
        if first is None:
            return None
        key = tuple(p[0] for p in first)
        if key in self._layer_plans:
            return self._layer_plans[key]
        eps = self.norm.variance_epsilon
        weights: list[torch.Tensor] = []
        plan: tuple[list[torch.Tensor], list[int]] | None = (weights, list(key))
        for layer in layers:
            got = plans(layer)
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if (
                got is None
                or tuple(p[0] for p in got) != key
                or any(n.variance_epsilon != eps for n in norms)
            ):
                plan = None
                break
            qkv, o, gate_up, down = got
            weights += [norms[0].weight, *qkv[1:], *o[1:], norms[1].weight, *gate_up[1:], *down[1:]]
        weights.append(self.norm.weight)
        self._layer_plans[key] = plan
        return plan

    def reset_layer_plans(self) -> None:
        self._layer_plans.clear()

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, nh + 2 nkv, hd) cos and sign-folded sin for the fused q/k/v heads, built once per step.

        Query heads carry the attention scale 1/sqrt(hd); value heads get cos 1 and sin 0.
        """
        cfg = self.config
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        N = positions.shape[0]
        cos, sin = self.rotary_emb.at_positions(positions, dtype)  # (N, hd)
        sin = torch.cat([-sin[:, : hd // 2], sin[:, hd // 2 :]], dim=-1)
        scale = hd**-0.5
        heads = [nh, nkv, nkv]
        cos_parts = [cos * scale, cos, torch.ones_like(cos)]
        sin_parts = [sin * scale, sin, torch.zeros_like(sin)]
        cos_t = torch.cat([c[:, None].expand(N, n, hd) for c, n in zip(cos_parts, heads, strict=True)], dim=1)
        sin_t = torch.cat([c[:, None].expand(N, n, hd) for c, n in zip(sin_parts, heads, strict=True)], dim=1)
        return cos_t, sin_t


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    past_key_values: list[KVCache] | None = None


class SmolLM2ForCausalLM(nn.Module):
    def __init__(self, config: SmolLM2Config) -> None:
        super().__init__()
        self.config = config
        self.model = SmolLM2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.prepared_for_serving = False
        self.serving_only = False  # drop_unpacked_weights() ran: the training path is gone
        self.kernels: Kernels | None = None  # decided by prepare_for_serving, once
        self.lm_head_linear: PackedLinear | None = None
        self.int4_active = False  # the layer linears take the int4 GEMV for small batches
        self.int4_error: float | None = None  # worst int4_reconstruction_error, once measured
        self.int4_rows = 0  # steps of at most this many rows take the int4 copies (0: none)
        self.int8_head_active = False  # the LM head takes the int8 kernel for small batches
        self.int8_head_error: float | None = None  # its int8_reconstruction_error, once measured
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding) and module.weight.device.type != "meta":
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # kept by drop_unpacked_weights, unlike the embedding

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: list[KVCache] | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        if self.serving_only:
            raise RuntimeError(
                "this model kept only its serving weights (drop_unpacked_weights): no forward()"
            )
        _check_ids(input_ids, self.config.vocab_size)
        hidden, presents = self.model(input_ids, attention_mask, past_key_values, use_cache, position_ids)
        logits = self.lm_head(hidden).float()  # (B, T, V)
        loss = None
        if labels is not None:  # predict token t+1 from position t; -100 is ignored
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutput(loss, logits, presents)

    # ---- serving path --------------------------------------------------------------------------
    def forward_paged(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        if self.kernels is None:
            self.prepare_for_serving()
        assert self.kernels is not None
        return self.model.forward_paged(self._embed(input_ids), positions, meta, kv_caches, self.kernels)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, H) float32 embedding rows, a fresh tensor; read from the LM head's GEMM tiles (the same
        values) once drop_unpacked_weights has dropped the embedding."""
        if self.model.embed_tokens.weight.is_meta:
            assert self.lm_head_linear is not None
            return self.lm_head_linear.rows(input_ids).float()
        return self.model.embed_tokens(input_ids).float()

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """(M, H) -> (M, V) float32; called only on the rows that need a token. float32=False: in the dtype
        the head's GEMM gives (bf16 from the tile GEMM), for a sampler that widens them only if it must."""
        if self.lm_head_linear is None:
            logits = torch.mm(hidden, self.lm_head.weight.t())
        else:
            logits = self.lm_head_linear(hidden)
        return logits.float() if float32 else logits

    @torch.no_grad()
    def prepare_for_serving(
        self,
        int4_small_batch: str | None = None,
        int8_lm_head: str | None = None,
        kernels: Kernels | None = None,
    ) -> None:
        """Fuse q/k/v and gate/up weights into one matrix each (3 and 2 GEMMs become 1), once.

        The separate projections become views into the fused tensors, so memory is not doubled and
        the training path and state_dict() keep working.

        int4_small_batch sets whether the layer linears keep an int4 copy (groups of 32 along K) for
        batches of at most quant.int4_max_rows(kernels) rows: "off"; "auto", only if every one reconstructs losslessly
        (weights already 4-bit groupwise, e.g. a Q4_1 GGUF); "on", even when lossy. None keeps the current
        setting (off at first), so a later plain call, e.g. ModelRunner's, does not undo an earlier one.
        Only CPU in bfloat16 has the kernels; elsewhere the setting is accepted and ignored. The result is
        in int4_active and int4_error.

        int8_lm_head does the same for the LM head with an int8 copy (blocks of 32 along K, a scale each:
        GGUF's Q8_0, which is how the default model stores it) for at most INT8_HEAD_MAX_ROWS rows; "auto"
        keeps it only when int8_reconstruction_error <= INT8_LOSSLESS_ERROR. Needs the C++ kernels. The
        result is in int8_head_active and int8_head_error.

        kernels: which compiled kernels to use, fixed by the first call (None: Kernels.detect for the
        model's device, which builds the C++ library on CPU); kept in self.kernels. Batch-invariant kernels
        (Kernels.batch_invariant) need bfloat16 on CPU with every linear on the bf16 tile GEMM, and keep
        int4 and int8 off whatever is asked: those copies serve only some batch sizes.
        """
        for name, mode in (("int4_small_batch", int4_small_batch), ("int8_lm_head", int8_lm_head)):
            if mode is not None and mode not in INT4_MODES:
                raise ValueError(f"{name} must be one of {INT4_MODES}, not {mode!r}")
            if mode is not None and self.serving_only:
                raise ValueError(f"{name} cannot change once drop_unpacked_weights() has run")
        if self.kernels is not None and kernels is not None and kernels != self.kernels:
            raise ValueError(f"prepared for {self.kernels}; a model keeps its first kernels, not {kernels}")
        if not self.prepared_for_serving:
            self._pack(kernels if kernels is not None else Kernels.detect(self.device))
        assert self.kernels is not None
        if self.kernels.batch_invariant:
            int4_small_batch = None if int4_small_batch is None else "off"
            int8_lm_head = None if int8_lm_head is None else "off"
        self.model.reset_layer_plans()
        if int4_small_batch is not None:
            self._set_int4(int4_small_batch)
        if int8_lm_head is not None:
            self._set_int8_head(int8_lm_head)

    def _pack(self, kernels: Kernels) -> None:
        """Fuse q/k/v and gate/up, and pack every serving linear for `kernels`."""
        if kernels.batch_invariant and (self.device.type != "cpu" or self.dtype != torch.bfloat16):
            raise ValueError(
                f"batch-invariant serving needs bfloat16 weights on CPU, not {self.dtype} on {self.device}"
            )
        for layer in self.model.decoder_layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_weight = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
            mlp.gate_up_weight = _fuse(mlp.gate_proj, mlp.up_proj)
            attn.qkv_linear = PackedLinear(attn.qkv_weight, kernels=kernels)
            attn.o_linear = PackedLinear(attn.o_proj.weight, kernels=kernels)
            mlp.gate_up_linear = PackedLinear(mlp.gate_up_weight, swiglu=True, kernels=kernels)
            mlp.down_linear = PackedLinear(mlp.down_proj.weight, kernels=kernels)
        self.lm_head_linear = PackedLinear(self.lm_head.weight, kernels=kernels)
        if kernels.batch_invariant and any(
            lin.tiles is None for lin in [*self._layer_linears(), self.lm_head_linear]
        ):
            raise ValueError("batch-invariant serving needs every linear's shape to fit the bf16 tile GEMM")
        self.kernels = kernels
        self.prepared_for_serving = True

    def use_compute_threads(self, threads: int | None) -> None:
        """Run the GEMMs, attention and the element-wise ops of long steps on `threads` OpenMP threads,
        whatever torch.get_num_threads() is for the small ops (None: no switching). A property of the
        process that serves, so it is set after loading, not kept with the prepared weights."""
        assert self.kernels is not None, "prepare_for_serving() first"
        self.kernels = self.kernels.with_threads(threads)
        for lin in [*self._layer_linears(), self.lm_head_linear]:
            if lin is not None:
                lin.kernels = self.kernels

    def drop_unpacked_weights(self) -> int:
        """Free the layer weights that serving never reads, once prepared: a linear packed for our GEMM
        (or oneDNN's) multiplies by its packed copy at every batch size, and by its int4 copy below
        quant.int4_max_rows rows, never by the plain weight (and where the int4 copy takes every row count,
        as on CPUs with AMX, not by the packed one either); the embedding (the LM head's weight) is read from the LM
        head's tiles then. Returns the bytes freed. Afterwards only the serving path works: forward(), generate(), a new int4 or
        int8 setting and state_dict()'s layer weights are gone. The weights become meta tensors, so
        their shapes remain."""
        assert self.prepared_for_serving, "prepare_for_serving() first"
        self.model.reset_layer_plans()  # they hold the weights this drops
        freed = 0
        for layer in self.model.decoder_layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups = [
                (attn.qkv_linear, [attn.q_proj, attn.k_proj, attn.v_proj]),
                (attn.o_linear, [attn.o_proj]),
                (mlp.gate_up_linear, [mlp.gate_proj, mlp.up_proj]),
                (mlp.down_linear, [mlp.down_proj]),
            ]
            for lin, projections in groups:
                if lin is None:
                    continue
                if lin.int4 is not None and lin.int4_max_rows >= ALL_ROWS:
                    # its int4 copy takes every step: the bf16 packings are never read either
                    for packed in (lin.tiles, lin.packed):
                        if packed is not None:
                            freed += packed.numel() * packed.element_size()
                    lin.tiles = lin.packed = None
                    lin.swiglu_tiles = False
                elif lin.tiles is None and lin.packed is None:
                    continue  # a plain mm reads the weight itself
                freed += lin.weight.numel() * lin.weight.element_size()
                lin.weight = lin.weight.to("meta")
                for proj in projections:
                    proj.weight = nn.Parameter(proj.weight.to("meta"), requires_grad=False)
            if attn.qkv_linear is not None and attn.qkv_linear.weight.is_meta:
                attn.qkv_weight = None
            if mlp.gate_up_linear is not None and mlp.gate_up_linear.weight.is_meta:
                mlp.gate_up_weight = None
        head = self.lm_head_linear
        if self.config.tie_word_embeddings and head is not None and head.tiles is not None:
            # the embedding is the LM head's weight, whose rows the tiles hold too (_embed reads them)
            freed += head.weight.numel() * head.weight.element_size()
            self.model.embed_tokens.weight = nn.Parameter(head.weight.to("meta"), requires_grad=False)
            self.lm_head.weight = self.model.embed_tokens.weight
            head.weight = self.lm_head.weight
        self.serving_only = freed > 0
        return freed

    def _set_int8_head(self, mode: str) -> None:
        lin = self.lm_head_linear
        assert lin is not None
        known_lossy = self.int8_head_error is not None and self.int8_head_error > INT8_LOSSLESS_ERROR
        assert self.kernels is not None
        use = (mode == "on" or (mode == "auto" and not known_lossy)) and int8_supported(
            self.device, self.dtype, self.kernels
        )
        if use:
            if lin.int8 is None:
                lin.int8 = Int8Weight.from_weight(lin.weight, self.kernels)
            self.int8_head_error = lin.int8.error
            use = mode == "on" or self.int8_head_error <= INT8_LOSSLESS_ERROR
        self.int8_head_active = use
        if mode == "auto" and not use:
            lin.int8 = None
        lin.int8_max_rows = (
            int8_head_max_rows(lin.int8.tiles, self.kernels) if use and lin.int8 is not None else 0
        )

    def _layer_linears(self) -> list[PackedLinear]:
        out: list[PackedLinear] = []
        for layer in self.model.decoder_layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = [attn.qkv_linear, attn.o_linear, mlp.gate_up_linear, mlp.down_linear]
            out += [lin for lin in linears if lin is not None]
        return out

    def _set_int4(self, mode: str) -> None:
        kernels = self.kernels
        assert kernels is not None
        linears = self._layer_linears()
        known_lossy = self.int4_error is not None and self.int4_error > INT4_LOSSLESS_ERROR
        use = (mode == "on" or (mode == "auto" and not known_lossy)) and int4_supported(
            self.device, self.dtype
        )
        if use:
            for lin in linears:  # built once; later calls only switch them on or off
                if lin.int4 is None:
                    lin.int4 = Int4Weight.from_weight(lin.weight, kernels)
            self.int4_error = max(lin.int4.error for lin in linears if lin.int4 is not None)
            use = mode == "on" or self.int4_error <= INT4_LOSSLESS_ERROR
        self.int4_active = use
        self.int4_rows = 0
        for lin in linears:
            if mode == "auto" and not use:
                lin.int4 = None  # lossy: no use keeping the copies (int4_error remembers why)
            lin.int4_max_rows = int4_max_rows(kernels, lin.int4.tiles) if use and lin.int4 is not None else 0
            self.int4_rows = max(self.int4_rows, lin.int4_max_rows)

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample max_new_tokens tokens after input_ids (B, T) with a KV cache; returns (B, T + new).

        temperature 0 is greedy. The context is truncated to config.block_size as the spec says: once
        it would exceed block_size, the cache restarts from the last block_size tokens. With
        eos_token_id, generation stops when every row has produced it (later tokens are eos).
        """
        idx = input_ids
        past: list[KVCache] | None = None
        block = self.config.block_size
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if past is None or past[0][0].shape[2] + 1 > block:
                past = None
                out = self(idx[:, -block:], past_key_values=None, use_cache=True)
            else:
                out = self(idx[:, -1:], past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_id = _sample_next(out.logits[:, -1, :], temperature, top_k, generator)
            if eos_token_id is not None:
                next_id = torch.where(done, torch.full_like(next_id, eos_token_id), next_id)
                done |= next_id == eos_token_id
            idx = torch.cat([idx, next_id[:, None]], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        return idx


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0]
        raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {vocab_size})")


def _fuse(*linears: nn.Linear) -> torch.Tensor:
    fused = torch.cat([lin.weight.data for lin in linears], dim=0).contiguous()
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start : start + rows], requires_grad=lin.weight.requires_grad)
        start += rows
    return fused


def _sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
