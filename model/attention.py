"""Attention over the paged KV cache, for the serving path.

The KV cache of one layer is one tensor shaped ``(2 * num_kv_heads, num_blocks * block_size, head_dim)``
(K heads then V heads): a slot ``s = block_id * block_size + offset`` holds one token's keys and values
for every KV head, so one index_copy writes a step's K and V and one gather reads them. The
head-major layout means a gather of whole blocks (``cache.view(nkv, nblocks, bs, hd)[:, table]``)
yields ``(nkv, B, L, hd)`` that is contiguous and feeds ``bmm`` without another copy (strided KV views
made bmm copy them, which took a large share of a prototype's step).

A step's flat batch is ordered decodes first (one query token each), then prefill chunks. Decodes are
attended together with two batched matmuls, the query heads of each KV head grouped (no repeat_kv copy);
prefill chunks, which are few and large, go one by one through scaled_dot_product_attention. On CPU with the
C++ kernel, a step whose whole prompts are at most KERNEL_PROMPT_MAX tokens is one kernel call over all its
rows (step_rows). Where the CPU has AVX512-BF16 or AMX tiles (bf16), a step with a prompt or chunk of
KERNEL_PROMPT_MIN tokens or more sends each of its prompts and chunks through model/csrc/prefill_attention.cpp
instead (one call per sequence; 32 queries share each key block), and its decodes through the kernel in one call.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model import paged_kernel
from model.threads import run_on


@dataclass(slots=True)
class PrefillSeq:
    query_start: int  # index of its first token in the flat batch
    query_len: int
    context_len: int  # tokens in the cache after this step, this chunk included
    block_table: torch.Tensor  # (num_blocks_for_context,) int64


@dataclass(slots=True)
class PrefillRun:
    """Adjacent prefill rows attended together: whole prompts with nothing cached before them (`fresh`: one
    batched causal SDPA over their fresh K/V), or one chunk over its cached context."""

    fresh: bool
    seqs: list[PrefillSeq]
    # fresh prompts of different lengths: (G * T,) row of the run for each padded slot, and (sum of
    # lengths,) padded slot of each real row (fresh_prefill_attention); None when no padding is needed
    padding: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs for one step, built once per step by the model runner
    (`step_metadata`); the layers only read it."""

    slot_mapping: torch.Tensor  # (N,) int64: cache slot of each new token
    num_decode_tokens: int  # the first D tokens are single-token decodes
    decode_block_tables: torch.Tensor | None  # (D, max_blocks) int64, padded with block 0
    decode_mask: torch.Tensor | None  # (nkv * D, 1, max_blocks * block_size) additive 0 / -inf, model dtype
    prefills: list[PrefillSeq]
    block_size: int = 16
    decode_context_lens: torch.Tensor | None = None  # (D,) int64; the C++ kernel reads it instead of the mask
    use_kernel: bool | None = None  # the C++ kernel or not (the runner's Kernels); None: ask paged_kernel
    compute_threads: int | None = None  # threads of the attention calls (Kernels.compute_threads)
    # every row's block table (N, W) and context length (N,) for one kernel call over the whole step
    # (step_rows); None: the step goes part by part (decodes, then prefill_runs)
    row_tables: torch.Tensor | None = None
    row_lens: torch.Tensor | None = None
    prefill_runs: list[PrefillRun] = field(default_factory=list)  # prefills grouped, when row_tables is None
    # prompts and chunks (bf16, hd 64) through the prompt kernel, one call per sequence, instead of SDPA
    prefill_kernel: bool = False


def step_metadata(
    slot_mapping: torch.Tensor,
    prefills: list[PrefillSeq],
    block_size: int,
    use_kernel: bool,
    decode_block_tables: torch.Tensor | None = None,
    decode_context_lens: torch.Tensor | None = None,
    decode_mask: torch.Tensor | None = None,
    batch_invariant: bool = False,
    compute_threads: int | None = None,
    prefill_kernel: bool = False,
) -> AttentionMetadata:
    """The whole AttentionMetadata of a step: how its rows are attended (one kernel call, or decodes and
    prefill runs) is decided here, once, not by the layers.

    batch_invariant (Kernels.batch_invariant): every row goes through the C++ kernel whatever the prompt
    lengths, since SDPA's reduction over keys depends on how many queries share the call. prefill_kernel
    (paged_kernel.prefill_kernel_available, bf16 with head dim 64): once a prompt or chunk has at least
    KERNEL_PROMPT_MIN tokens, every prompt and chunk of the step goes through the prompt kernel, one call per
    sequence, and the decodes through the paged kernel; not with batch_invariant."""
    if batch_invariant and not use_kernel:
        raise ValueError("batch-invariant attention needs the C++ paged kernel")
    D = 0 if decode_block_tables is None else decode_block_tables.shape[0]
    meta = AttentionMetadata(
        slot_mapping,
        D,
        decode_block_tables,
        decode_mask,
        prefills,
        block_size,
        decode_context_lens,
        use_kernel,
        compute_threads,
        prefill_kernel=prefill_kernel and use_kernel and not batch_invariant,
    )
    if use_kernel and prefills and (decode_context_lens is not None or not D):
        limit = (
            None if batch_invariant else KERNEL_PROMPT_MIN - 1 if meta.prefill_kernel else KERNEL_PROMPT_MAX
        )
        rows = step_rows(meta, slot_mapping.shape[0], limit)
        if rows is not None:
            meta.row_tables, meta.row_lens = rows
    if prefills and meta.row_tables is None:
        if meta.prefill_kernel:  # one kernel call per sequence, fresh or not: no padded runs to build
            meta.prefill_runs = [PrefillRun(False, [s]) for s in prefills]
        else:
            meta.prefill_runs = prefill_runs(prefills, slot_mapping.device)
    return meta


def _kernel(meta: AttentionMetadata, device: torch.device) -> bool:
    return paged_kernel.use_kernel(device) if meta.use_kernel is None else meta.use_kernel


def allocate_kv_cache(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """One (2 * nkv, num_blocks * block_size, hd) tensor per layer: K heads, then V heads.

    On the CPU each tensor is an anonymous memory map: zeros, as torch.zeros gives, but its pages take
    memory only once a block in them is first written, so a pool sized for a busy server costs an idle
    one nothing."""
    shape = (2 * num_kv_heads, num_blocks * block_size, head_dim)
    if torch.device(device).type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return [torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape) for _ in range(num_layers)]


MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault pages in as a write would, without changing their data
_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def populate_kv_cache(kv_caches: list[torch.Tensor], start: int, end: int) -> bool:
    """Give slots [start, end) of every layer and head of a CPU pool from allocate_kv_cache their pages
    now, as their first write would, leaving what they hold unchanged (so it is safe on slots in use).
    False where the OS cannot (not Linux, a kernel before 5.14): the pages then come with the writes."""
    if _libc is None or end <= start:
        return _libc is not None
    for cache in kv_caches:
        heads, slots, hd = cache.shape
        row = hd * cache.element_size()
        for h in range(heads):
            lo = cache.data_ptr() + (h * slots + start) * row
            hi = cache.data_ptr() + (h * slots + end) * row
            lo -= lo % _PAGE
            hi += -hi % _PAGE
            if _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_POPULATE_WRITE) != 0:
                return False
    return True


def kv_cache_bytes_per_block(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * block_size * torch.empty((), dtype=dtype).element_size()


def build_decode_mask(
    context_lens: torch.Tensor, width: int, num_kv_heads: int, dtype: torch.dtype
) -> torch.Tensor:
    """(nkv * D, 1, width) additive mask: 0 for positions < the sequence's length, -inf after."""
    span = torch.arange(width, device=context_lens.device)
    mask = torch.zeros(context_lens.shape[0], 1, width, dtype=dtype, device=context_lens.device)
    mask.masked_fill_(span[None, None, :] >= context_lens[:, None, None], -math.inf)
    return mask.repeat(num_kv_heads, 1, 1)  # rows ordered (kv head, sequence), as decode_attention groups


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """(heads, slots, hd) gathered by a (B, nb) block table -> (heads, B, nb * block_size, hd), contiguous."""
    heads, _, hd = cache.shape
    B, nb = block_table.shape
    # index_select on (heads, blocks, bs*hd) is ~3x faster here than advanced indexing of the 4-D view
    blocks = torch.index_select(cache.view(heads, -1, block_size * hd), 1, block_table.reshape(-1))
    return blocks.view(heads, B, nb * block_size, hd)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q: (D, nh, hd), already scaled -> (D, nh * hd); one query token per sequence.

    On CPU the fused kernel (model/paged_kernel.py) reads K/V straight from the blocks; otherwise the
    torch path below gathers them, and the g query heads of a KV head are grouped into one
    (g, hd) @ (hd, L) product, so K/V are never repeated; the padding mask rides in baddbmm's bias.
    """
    assert meta.decode_block_tables is not None
    if meta.decode_context_lens is not None and _kernel(meta, q.device):
        return paged_kernel.paged_decode_attention(
            q,
            kv_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            meta.block_size,
            meta.compute_threads,
        )
    assert meta.decode_mask is not None
    D, nh, hd = q.shape
    nkv = kv_cache.shape[0] // 2
    g = nh // nkv
    kv = gather_blocks(kv_cache, meta.decode_block_tables, meta.block_size)  # (2nkv, D, L, hd)
    L = kv.shape[2]
    keys, values = kv[:nkv].view(nkv * D, L, hd), kv[nkv:].view(nkv * D, L, hd)
    qg = q.view(D, nkv, g, hd).transpose(0, 1).reshape(nkv * D, g, hd)
    scores = torch.baddbmm(meta.decode_mask, qg, keys.transpose(1, 2))  # (nkv*D, g, L)
    probs = torch.softmax(scores, dim=-1)  # reduced-precision inputs are accumulated in float32
    out = torch.bmm(probs, values).view(nkv, D, g, hd)
    return out.transpose(0, 1).reshape(D, nh * hd)


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    seq: PrefillSeq,
    block_size: int,
    use_kernel: bool | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """q: (T, nh, hd) for one chunk, already scaled -> (T, nh * hd); causal over the cached context.

    On CPU the chunk goes through the decode kernel as T rows sharing one block table (stride 0, no
    copy), row i seeing the first S - T + i + 1 tokens: faster here than SDPA with a mask at every size
    measured (bench/attention_bench.py). use_kernel: the step's choice (None: ask paged_kernel); threads:
    Kernels.compute_threads.
    """
    T, nh, hd = q.shape
    nkv = kv_cache.shape[0] // 2
    S = seq.context_len
    if q.device.type == "cpu" and T > KERNEL_PROMPT_MAX:
        return run_on(threads, _chunk_sdpa, q, kv_cache, seq, block_size)
    if paged_kernel.use_kernel(q.device) if use_kernel is None else use_kernel:
        lens = torch.arange(S - T + 1, S + 1, device=q.device)
        table = seq.block_table.view(1, -1).expand(T, -1)
        return paged_kernel.paged_decode_attention(q, kv_cache, table, lens, block_size, threads)
    kv = gather_blocks(kv_cache, seq.block_table.view(1, -1), block_size)[:, 0, :S]  # (2nkv, S, hd)
    keys, values = kv[:nkv], kv[nkv:]
    if nkv != nh:
        keys = keys.repeat_interleave(nh // nkv, dim=0)
        values = values.repeat_interleave(nh // nkv, dim=0)
    qh = q.transpose(0, 1)  # (nh, T, hd)
    if S == T:
        out = F.scaled_dot_product_attention(qh, keys, values, is_causal=True, scale=1.0)
    else:
        # query i sits at position S - T + i and sees keys 0 .. S - T + i
        q_pos = torch.arange(S - T, S, device=q.device).view(T, 1)
        mask = torch.arange(S, device=q.device).view(1, S) <= q_pos
        out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask, scale=1.0)
    return out.transpose(0, 1).reshape(T, nh * hd)


def _chunk_sdpa(q: torch.Tensor, kv_cache: torch.Tensor, seq: PrefillSeq, block_size: int) -> torch.Tensor:
    """A long chunk after cached context, as two flash-attention calls merged by their log-sum-exps: the
    chunk's queries over the P cached keys (no mask) and over its own T keys (causal). The kernel's
    per-row loop reads the whole context once per query row, and SDPA with an explicit (T, S) mask takes
    its slow path; both are several times slower at T in the hundreds."""
    T, nh, hd = q.shape
    nkv = kv_cache.shape[0] // 2
    S = seq.context_len
    P = S - T
    kv = gather_blocks(kv_cache, seq.block_table.view(1, -1), block_size)[:, 0]  # (2 nkv, >= S, hd)
    kv = kv.repeat_interleave(nh // nkv, dim=0)  # (2 nh, ...): the flash op has no grouped heads
    keys, values = kv[None, :nh], kv[None, nh:]
    qh = q.transpose(0, 1)[None]  # (1, nh, T, hd)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    new, new_lse = flash(qh, keys[:, :, P:S], values[:, :, P:S], 0.0, True, scale=1.0)
    if P == 0:
        return new[0].transpose(0, 1).reshape(T, nh * hd)
    old, old_lse = flash(qh, keys[:, :, :P], values[:, :, :P], 0.0, False, scale=1.0)
    top = torch.maximum(old_lse, new_lse)
    w_old, w_new = (old_lse - top).exp_()[..., None], (new_lse - top).exp_()[..., None]
    out = (old.float() * w_old + new.float() * w_new) / (w_old + w_new)
    return out.to(q.dtype)[0].transpose(0, 1).reshape(T, nh * hd)


def fresh_prefill_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    seqs: list[PrefillSeq],
    padding: tuple[torch.Tensor, torch.Tensor] | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Whole prompts with nothing cached before them, as one batched causal SDPA over the fresh K/V.

    q: (n, nh, hd), kv: (n, 2 nkv, hd): the rows of `seqs`, which are adjacent in the flat batch, so the
    cache is not read back. Prompts of one length T view as (G, T, ...) with no copy. Prompts of different
    lengths are padded at their ends to the longest (each padded row repeats the prompt's last row): with a
    causal mask a real query never sees a padded key, so one SDPA serves them all and the padded rows are
    dropped after. `padding` holds the gather/scatter indices, built once per step (PrefillRun.padding; None:
    built here). On a GPU that replaces ~6 launches per prompt and layer with 4 per layer.
    """
    G, T = len(seqs), max(s.query_len for s in seqs)
    nh, hd = q.shape[1], q.shape[2]
    nkv = kv.shape[1] // 2
    if padding is None and any(s.query_len != T for s in seqs):
        padding = padding_index(seqs, q.device)
    if padding is not None:
        q, kv = q.index_select(0, padding[0]), kv.index_select(0, padding[0])
    qb = q.view(G, T, nh, hd).transpose(1, 2)  # (G, nh, T, hd)
    kvb = kv.view(G, T, 2 * nkv, hd).transpose(1, 2)  # (G, 2nkv, T, hd)
    out = run_on(threads, _causal_sdpa, qb, kvb[:, :nkv], kvb[:, nkv:], nkv != nh)  # on the GEMM threads
    out = out.transpose(1, 2).reshape(G * T, nh * hd)
    return out if padding is None else out.index_select(0, padding[1])


def padding_index(seqs: list[PrefillSeq], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(G * T,) row of the run for each padded slot, and (sum of lengths,) padded slot of each real row."""
    T = max(s.query_len for s in seqs)
    first = seqs[0].query_start
    gather: list[int] = []
    keep: list[int] = []
    for g, s in enumerate(seqs):
        off = s.query_start - first
        gather += [off + min(t, s.query_len - 1) for t in range(T)]
        keep += range(g * T, g * T + s.query_len)
    return torch.tensor(gather, device=device), torch.tensor(keep, device=device)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=gqa)


# Whole prompts of different lengths share one padded SDPA while the padded work stays under this multiple
# of the unpadded (G * T_max^2 against the sum of T_i^2).
PAD_WASTE_MAX = 2.0


def _fresh_runs(prefills: list[PrefillSeq]) -> list[tuple[bool, list[PrefillSeq]]]:
    """Split prefills into runs: (True, adjacent whole prompts that pad together cheaply) or (False, [one
    chunk])."""
    runs: list[tuple[bool, list[PrefillSeq]]] = []
    for seq in prefills:
        fresh = seq.context_len == seq.query_len
        if fresh and runs and runs[-1][0]:
            run = runs[-1][1]
            last = run[-1]
            lens = [s.query_len for s in run] + [seq.query_len]
            cheap = len(lens) * max(lens) ** 2 <= PAD_WASTE_MAX * sum(n * n for n in lens)
            if cheap and last.query_start + last.query_len == seq.query_start:
                run.append(seq)
                continue
        runs.append((fresh, [seq]))
    return runs


def prefill_runs(prefills: list[PrefillSeq], device: torch.device) -> list[PrefillRun]:
    """_fresh_runs with the padding indices of the fresh runs whose prompts differ in length."""
    runs: list[PrefillRun] = []
    for fresh, seqs in _fresh_runs(prefills):
        uneven = fresh and any(s.query_len != seqs[0].query_len for s in seqs)
        runs.append(PrefillRun(fresh, seqs, padding_index(seqs, device) if uneven else None))
    return runs


# Whole prompts up to this long go through the C++ kernel with the step's other rows; longer ones through
# SDPA, whose batched GEMMs overtake the kernel's per-row loop somewhere between 256 and 1,024 tokens on
# the 2-core CPU (bench/NOTES.md, "Figures behind the code's constants").
KERNEL_PROMPT_MAX = 256

# A step with a prompt or chunk of this many tokens takes the prompt kernel where it may (on AMX and on
# AVX512-BF16 alone, ~1.5-2x the per-row kernel at 16-32 tokens, 4-6x at 256, bench/NOTES.md); a step of shorter ones only (a draft's
# verification rows) stays one per-row call over all its rows.
KERNEL_PROMPT_MIN = 16


def step_rows(
    meta: AttentionMetadata, n_rows: int, prompt_max: int | None = KERNEL_PROMPT_MAX
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(n_rows, W) block tables and (n_rows,) context lengths with which one kernel call attends every row
    of the step: decode rows with their tables, and row i of a prefill chunk with its sequence's table and
    context_len - query_len + i + 1 tokens. None when a prompt or chunk is longer than prompt_max (SDPA is
    faster there; None: no limit)."""
    if prompt_max is not None and any(s.query_len > prompt_max for s in meta.prefills):
        return None
    D = meta.num_decode_tokens
    dec = meta.decode_block_tables if D else None
    width = max([len(s.block_table) for s in meta.prefills] + ([dec.shape[1]] if dec is not None else []))
    tables = torch.zeros(n_rows, width, dtype=torch.long)
    lens = torch.empty(n_rows, dtype=torch.long)
    if dec is not None:
        assert meta.decode_context_lens is not None
        tables[:D, : dec.shape[1]] = dec
        lens[:D] = meta.decode_context_lens
    for s in meta.prefills:
        a, b = s.query_start, s.query_start + s.query_len
        tables[a:b, : len(s.block_table)] = s.block_table
        torch.arange(s.context_len - s.query_len + 1, s.context_len + 1, out=lens[a:b])
    return tables, lens


def one_kernel_call(
    meta: AttentionMetadata, n_rows: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(block tables, context lengths) of the step's n_rows rows where paged_attention attends them all in
    one call of the C++ kernel (a step of decodes only, or one step_rows call), else None."""
    if not _kernel(meta, device):
        return None
    if meta.row_tables is not None:
        assert meta.row_lens is not None
        return meta.row_tables, meta.row_lens
    if meta.prefills or meta.num_decode_tokens != n_rows:
        return None
    if meta.decode_block_tables is None or meta.decode_context_lens is None:
        return None
    return meta.decode_block_tables, meta.decode_context_lens


def paged_attention(
    q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """q: (N, nh, hd) scaled queries, kv: (N, 2 * nkv, hd) the step's new keys and values -> (N, nh * hd)."""
    use_kernel = _kernel(meta, kv_cache.device)  # CPU only
    if use_kernel:
        torch.ops.smollm2.write_kv_(kv_cache, kv, meta.slot_mapping)  # row copies: index_copy_ was ~35 us
        if meta.row_tables is not None:  # the whole step in one call, the work split by tokens read
            assert meta.row_lens is not None
            return paged_kernel.paged_decode_attention(
                q, kv_cache, meta.row_tables, meta.row_lens, meta.block_size, meta.compute_threads
            )
    else:
        kv_cache.index_copy_(1, meta.slot_mapping, kv.transpose(0, 1))
    D = meta.num_decode_tokens
    parts = []
    if D:
        parts.append(decode_attention(q[:D], kv_cache, meta))
    # metadata made outside the runner (tests) may leave the runs to be found here
    runs = meta.prefill_runs or prefill_runs(meta.prefills, q.device)
    for run in runs:
        start = run.seqs[0].query_start
        end = run.seqs[-1].query_start + run.seqs[-1].query_len
        if meta.prefill_kernel and use_kernel:  # the cache holds the run's keys and values already
            for seq in run.seqs:
                a, b = seq.query_start, seq.query_start + seq.query_len
                parts.append(
                    paged_kernel.prefill_attention_kernel(
                        q[a:b],
                        kv_cache,
                        seq.block_table,
                        seq.context_len,
                        meta.block_size,
                        meta.compute_threads,
                    )
                )
        elif run.fresh:
            parts.append(
                fresh_prefill_attention(
                    q[start:end], kv[start:end], run.seqs, run.padding, meta.compute_threads
                )
            )
        else:
            chunk = prefill_attention(
                q[start:end], kv_cache, run.seqs[0], meta.block_size, use_kernel, meta.compute_threads
            )
            parts.append(chunk)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
