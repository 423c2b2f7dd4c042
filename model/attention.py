"""Attention over the paged KV cache, for the serving path.

The KV cache of one layer is a pair of tensors shaped ``(num_kv_heads, num_blocks * block_size, head_dim)``:
a slot ``s = block_id * block_size + offset`` holds one token's key (or value) for every KV head. The
kv-head-major layout means a gather of whole blocks (``cache.view(nkv, nblocks, bs, hd)[:, table]``)
yields ``(nkv, B, L, hd)`` that is contiguous and feeds ``bmm`` without another copy (PERF-NOTES: strided
KV views made bmm copy them, 40% of a prototype's step).

A step's flat batch is ordered decodes first (one query token each), then prefill chunks. Decodes are
attended together with two batched matmuls, the query heads of each KV head grouped (no repeat_kv copy);
prefill chunks, which are few and large, go one by one through scaled_dot_product_attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillSeq:
    query_start: int  # index of its first token in the flat batch
    query_len: int
    context_len: int  # tokens in the cache after this step, this chunk included
    block_table: torch.Tensor  # (num_blocks_for_context,) int64


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs for one step; built once per step by the model runner."""

    slot_mapping: torch.Tensor  # (N,) int64: cache slot of each new token
    num_decode_tokens: int  # the first D tokens are single-token decodes
    decode_block_tables: torch.Tensor | None  # (D, max_blocks) int64, padded with block 0
    decode_mask: torch.Tensor | None  # (1, D, 1, max_blocks * block_size) additive, 0 or -inf
    prefills: list[PrefillSeq]
    block_size: int = 16


def allocate_kv_cache(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_kv_heads, num_blocks * block_size, head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]


def kv_cache_bytes_per_block(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * block_size * torch.empty((), dtype=dtype).element_size()


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    # k, v: (N, nkv, hd) -> cache (nkv, slots, hd)
    k_cache.index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.index_copy_(1, slot_mapping, v.transpose(0, 1))


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """(nkv, slots, hd) gathered by a (B, nb) block table -> (nkv, B, nb * block_size, hd), contiguous."""
    nkv, _, hd = cache.shape
    B, nb = block_table.shape
    blocks = cache.view(nkv, -1, block_size, hd)[:, block_table.reshape(-1)]  # (nkv, B*nb, bs, hd)
    return blocks.view(nkv, B, nb * block_size, hd)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: (D, nh, hd) -> (D, nh * hd), one query token per sequence."""
    assert meta.decode_block_tables is not None and meta.decode_mask is not None
    D, nh, hd = q.shape
    nkv = k_cache.shape[0]
    g = nh // nkv
    keys = gather_blocks(k_cache, meta.decode_block_tables, meta.block_size)  # (nkv, D, L, hd)
    values = gather_blocks(v_cache, meta.decode_block_tables, meta.block_size)
    L = keys.shape[2]
    qg = (q * scale).view(D, nkv, g, hd).transpose(0, 1).reshape(nkv * D, g, hd)  # (nkv*D, g, hd)
    scores = torch.bmm(qg, keys.view(nkv * D, L, hd).transpose(1, 2)).view(nkv, D, g, L)
    scores = scores.float() + meta.decode_mask  # mask: (1, D, 1, L)
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(nkv * D, g, L)
    out = torch.bmm(probs, values.view(nkv * D, L, hd)).view(nkv, D, g, hd)
    return out.permute(1, 0, 2, 3).reshape(D, nh * hd)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq: PrefillSeq,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q: (T, nh, hd) for one chunk -> (T, nh * hd); causal over the cached context."""
    T, nh, hd = q.shape
    nkv = k_cache.shape[0]
    S = seq.context_len
    keys = gather_blocks(k_cache, seq.block_table.view(1, -1), block_size)[:, 0, :S]  # (nkv, S, hd)
    values = gather_blocks(v_cache, seq.block_table.view(1, -1), block_size)[:, 0, :S]
    if nkv != nh:
        keys = keys.repeat_interleave(nh // nkv, dim=0)
        values = values.repeat_interleave(nh // nkv, dim=0)
    qh = q.transpose(0, 1)  # (nh, T, hd)
    if S == T:
        out = F.scaled_dot_product_attention(qh, keys, values, is_causal=True, scale=scale)
    else:
        # query i sits at position S - T + i and sees keys 0 .. S - T + i
        q_pos = torch.arange(S - T, S, device=q.device).view(T, 1)
        mask = torch.arange(S, device=q.device).view(1, S) <= q_pos
        out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).reshape(T, nh * hd)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: (N, nh, hd), k/v: (N, nkv, hd) for the step's new tokens -> (N, nh * hd)."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    D = meta.num_decode_tokens
    parts = []
    if D:
        parts.append(decode_attention(q[:D], k_cache, v_cache, meta, scale))
    for seq in meta.prefills:
        qs = q[seq.query_start : seq.query_start + seq.query_len]
        parts.append(prefill_attention(qs, k_cache, v_cache, seq, meta.block_size, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
