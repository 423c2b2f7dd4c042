"""ModelRunner: the only part of the engine that touches tensors.

`execute(plan)` turns the scheduler's plan (request -> number of tokens this step) into one flat batch,
runs the model over the paged KV cache, computes logits only for the rows that need a token, and samples.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from model import paged_kernel
from model.attention import (
    AttentionMetadata,
    PrefillSeq,
    allocate_kv_cache,
    build_decode_mask,
    kv_cache_bytes_per_block,
    populate_kv_cache,
    step_metadata,
)
from model.kernels import Kernels
from model.modeling import SmolLM2ForCausalLM
from model.sampling import SamplingBatch, make_generator, prompt_logprobs, sample
from model.sampling_params import banned_before_min_tokens
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.request import Request, SampleResult, TokenLogprob
from server.engine.scheduler import ScheduledSeq, SchedulerOutput

if TYPE_CHECKING:  # xgrammar is imported only where structured output is on
    from server.engine.structured import StructuredOutputs

log = logging.getLogger(__name__)

# While idle, the CPU pool's pages are given ahead to this many slots past the highest block used (~45 MB
# of the default model's KV), a chunk of this many at a time (warm_kv_ahead).
KV_WARM_AHEAD_TOKENS = 2048
KV_WARM_CHUNK_TOKENS = 256


@dataclass(slots=True)
class _Row:
    """One scheduled sequence in this step's flat batch."""

    request: Request
    start: int  # first position computed this step
    num_tokens: int
    query_start: int  # its first row in the flat batch
    samples: bool  # this chunk reaches the end of its known tokens, so a new token is drawn
    drafts: list[int]  # draft tokens after the last known one: a token is drawn at each of 1 + k rows

    @property
    def num_samples(self) -> int:
        return 1 + len(self.drafts)


@dataclass(slots=True)
class _StepInputs:
    tokens: list[int]
    positions: list[int]
    slots: list[int]
    decode_tables: list[list[int]]
    decode_lens: list[int]
    prefills: list[PrefillSeq]


def num_blocks_for_memory(
    model: SmolLM2ForCausalLM, memory_bytes: int, block_size: int, dtype: torch.dtype
) -> int:
    cfg = model.config
    per_block = kv_cache_bytes_per_block(
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, block_size, dtype
    )
    return max(1, memory_bytes // per_block)


class ModelRunner:
    def __init__(
        self,
        model: SmolLM2ForCausalLM,
        num_blocks: int,
        block_size: int = 16,
        eos_token_id: int | None = None,
        cuda_graphs: bool = True,
        max_num_seqs: int = 64,
        max_model_len: int = 8192,
        capture_graphs_now: bool = False,
        structured: Callable[[], StructuredOutputs] | None = None,
    ) -> None:
        """capture_graphs_now: on CUDA, capture the common decode graphs here (the server does, so the
        first requests do not wait on captures); otherwise each is captured when first needed.
        structured: makes the grammar matchers of constrained requests, at the first one (importing
        xgrammar and tabling the vocabulary cost ~0.7 s and ~40 MB that a server with no constrained
        request never needs). The server always passes it; a runner built without it, as in model-only
        tests, samples such requests unconstrained."""
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.vocab_size = model.config.vocab_size
        self.eos_token_id = eos_token_id if eos_token_id is not None else model.config.eos_token_id
        self._make_structured = structured
        self.structured: StructuredOutputs | None = None
        self._structured_lock = threading.Lock()
        model.prepare_for_serving()  # builds the CPU kernels now (Kernels.detect), not in the first step
        cfg = model.config
        # prompt chunks through the prompt kernel where this CPU has AVX512-BF16 (bf16, head dim 64, 16-token groups)
        self.prefill_kernel = (
            self.kernels.cpp
            and self.dtype == torch.bfloat16
            and cfg.head_dim == 64
            and block_size % 16 == 0
            and paged_kernel.prefill_kernel_available()
        )
        use_graphs = cuda_graphs and self.device.type == "cuda"
        # with CUDA graphs, one extra block past the allocator's range takes the padding rows' writes
        self.kv_caches = allocate_kv_cache(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim,
            num_blocks + int(use_graphs),
            block_size,
            self.dtype,
            self.device,
        )
        # CPU pool: the slots from the highest block a step has used up to KV_WARM_AHEAD_TOKENS past it get
        # their pages while the engine is idle (warm_kv_ahead), not from the first write of a prompt
        self._kv_frontier = 0  # one past the highest block a step has used
        self._kv_warm = 0  # blocks below this had their pages given ahead (or by use)
        self._kv_can_warm = self.device.type == "cpu"
        self._generators: dict[str, torch.Generator] = {}  # seeded requests', until they finish
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            max_blocks = (max_model_len + block_size - 1) // block_size
            self.graphs = DecodeGraphs(
                model, self.kv_caches, block_size, num_blocks, max_num_seqs, max_blocks
            )
            if capture_graphs_now:
                t0 = time.perf_counter()
                n = self.graphs.capture_common()
                log.info("captured %d CUDA graphs for decode in %.1f s", n, time.perf_counter() - t0)

    @property
    def kernels(self) -> Kernels:
        """The model's (read at each use: SmolLM2ForCausalLM.use_compute_threads may replace it)."""
        assert self.model.kernels is not None
        return self.model.kernels

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv_caches)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> dict[str, SampleResult]:
        for request_id in plan.finished_ids:
            self._generators.pop(request_id, None)
        rows = self._layout(plan.scheduled)
        if not rows:
            return {}
        top = max((r.request.block_ids[-1] for r in rows if r.request.block_ids), default=-1)
        self._kv_frontier = max(self._kv_frontier, top + 1)
        results: dict[str, SampleResult] = {}
        sampling = [r for r in rows if r.samples]
        logits = self._graph_decode(rows, sampling)
        if logits is None:
            inputs = self._collect(rows)
            hidden = self.model.forward_paged(*self._tensors(inputs), self.kv_caches)
            self._prompt_logprobs(rows, hidden, results)
            if sampling:
                # a draft row's last 1 + k rows all need logits: row i verifies draft i
                end = [r.query_start + r.num_tokens for r in sampling]
                picks = [p for r, e in zip(sampling, end, strict=True) for p in range(e - r.num_samples, e)]
                logits = self.model.compute_logits(  # left in the head's dtype: sample() widens if it must
                    hidden.index_select(0, torch.tensor(picks, device=self.device)), float32=False
                )
        if sampling:
            assert logits is not None
            # one sampler row per drawn token: a draft row's request repeats (only greedy rows draft)
            repeated = [r for r in sampling for _ in range(r.num_samples)]
            # (R, V) passes (top-k, top-p sorts, softmax) gain from every core (bench/NOTES.md)
            out = self.kernels.wide(sample, logits, self._sampling_batch(repeated))
            i = 0
            for r in sampling:
                j = i + r.num_samples
                lps = out.logprobs[i:j] if out.logprobs is not None else None
                self._store(r, out.token_ids[i:j], lps, results)
                i = j
        return results

    @staticmethod
    def _store(
        r: _Row, token_ids: list[int], lps: list[TokenLogprob | None] | None, results: dict[str, SampleResult]
    ) -> None:
        """token_ids: the tokens drawn at the row's 1 + k sampled positions; lps their logprobs."""
        res = results.setdefault(r.request.request_id, SampleResult(None))
        res.token_id, res.logprobs = token_ids[0], lps[0] if lps is not None else None
        if r.drafts:
            res.spec_token_ids, res.spec_logprobs = token_ids, lps

    # ---- building the flat batch ---------------------------------------------------------------------
    def _layout(self, scheduled: list[ScheduledSeq]) -> list[_Row]:
        """Decodes (one token) first, then prefill chunks; among those, chunks that start a prompt come
        first, by length, so attention can batch equal-length whole prompts (a burst) in one call. A
        decode with drafts is a continuation chunk of 1 + k tokens."""
        seqs = sorted(scheduled, key=lambda s: (s.num_tokens != 1, s.start != 0, s.num_tokens))
        rows, offset = [], 0
        for s in seqs:
            rows.append(_Row(s.request, s.start, s.num_tokens, offset, s.sample, s.draft_token_ids))
            offset += s.num_tokens
        return rows

    def _collect(self, rows: list[_Row]) -> _StepInputs:
        bs = self.block_size
        x = _StepInputs([], [], [], [], [], [])
        for r in rows:
            req, end = r.request, r.start + r.num_tokens
            blocks = req.block_ids
            if r.num_tokens == 1:
                n_prompt = req.num_prompt_tokens
                x.tokens.append(
                    req.prompt_token_ids[r.start]
                    if r.start < n_prompt
                    else req.output_token_ids[r.start - n_prompt]
                )
                x.positions.append(r.start)
                x.slots.append(blocks[r.start // bs] * bs + r.start % bs)
                x.decode_tables.append(blocks[: (end + bs - 1) // bs])
                x.decode_lens.append(end)
            else:
                x.tokens.extend(req.all_token_ids[r.start : end])
                x.tokens.extend(r.drafts)  # past the known tokens, so the slice above stops before them
                x.positions.extend(range(r.start, end))
                x.slots.extend(blocks[p // bs] * bs + p % bs for p in range(r.start, end))
                table = torch.tensor(blocks[: (end + bs - 1) // bs], dtype=torch.long, device=self.device)
                x.prefills.append(PrefillSeq(r.query_start, r.num_tokens, end, table))
        return x

    def _tensors(self, x: _StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        tables: torch.Tensor | None = None
        lens: torch.Tensor | None = None
        mask: torch.Tensor | None = None
        if x.decode_lens:
            tables, mask, lens = self._decode_tables(x.decode_tables, x.decode_lens)
        slots = torch.tensor(x.slots, dtype=torch.long, device=dev)
        meta = step_metadata(
            slots,
            x.prefills,
            self.block_size,
            self.kernels.cpp,
            tables,
            lens,
            mask,
            self.kernels.batch_invariant,
            self.kernels.compute_threads,
            self.prefill_kernel,
        )
        return (
            torch.tensor(x.tokens, dtype=torch.long, device=dev),
            torch.tensor(x.positions, dtype=torch.long, device=dev),
            meta,
        )

    def _graph_decode(self, rows: list[_Row], sampling: list[_Row]) -> torch.Tensor | None:
        """Logits of the sampling rows from a replayed CUDA graph, when every row is a plain decode."""
        if self.graphs is None or not sampling or len(sampling) != len(rows):
            return None
        if any(r.num_tokens != 1 or r.request.params.prompt_logprobs is not None for r in rows):
            return None
        x = self._collect(rows)
        return self.graphs.run(x.tokens, x.positions, x.slots, x.decode_tables, x.decode_lens)

    def _decode_tables(
        self, tables: list[list[int]], lens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(D, width) block table padded with block 0, the torch path's additive mask (None when the C++
        kernel runs), (D,) lengths."""
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        table = torch.tensor(padded, dtype=torch.long, device=self.device)  # (D, width)
        lens_t = torch.tensor(lens, dtype=torch.long, device=self.device)
        nkv = self.model.config.num_key_value_heads
        if self.kernels.cpp:  # the C++ kernel reads the lengths; no mask to build
            return table, None, lens_t
        return table, build_decode_mask(lens_t, width * self.block_size, nkv, self.dtype), lens_t

    def warm_kv_ahead(self) -> bool:
        """Called while the engine is idle: give the next chunk of KV blocks past the highest one used so far
        their pages (model.attention.populate_kv_cache), up to KV_WARM_AHEAD_TOKENS past it, so that the
        next prompts do not spend ~10 ms per 1,500 tokens faulting their blocks in (bench/NOTES.md).
        Returns whether more remains; a chunk takes ~1-3 ms, so a request that arrives meanwhile waits at
        most that."""
        if not self._kv_can_warm:
            return False
        bs = self.block_size
        start = max(self._kv_warm, self._kv_frontier)
        target = min(self.num_blocks, self._kv_frontier + -(-KV_WARM_AHEAD_TOKENS // bs))
        if start >= target:
            return False
        end = min(target, start + -(-KV_WARM_CHUNK_TOKENS // bs))
        if not populate_kv_cache(self.kv_caches, start * bs, end * bs):
            self._kv_can_warm = False  # the OS cannot: the pages come with the first writes
            return False
        self._kv_warm = end
        return end < target

    # ---- structured output ---------------------------------------------------------------------------
    def _structured_outputs(self) -> StructuredOutputs:
        assert self._make_structured is not None
        with self._structured_lock:  # the step's thread and the core's grammar thread both get here
            if self.structured is None:
                self.structured = self._make_structured()
            return self.structured

    def prepare_grammar(self, request: Request) -> None:
        """Build `request`'s grammar matcher (compiling its grammar) before its first step. The engine core
        calls this on a thread of its own: a grammar can take seconds to compile (a schema's
        `"pattern": "a{10000}"` takes ~9 s), which inside a step would hold up every running sequence."""
        if self._make_structured is not None and request.params.structured is not None:
            self._structured_outputs().matcher(request)

    # ---- sampling ----------------------------------------------------------------------------------
    def _sampling_batch(self, rows: list[_Row]) -> SamplingBatch:
        reqs = [r.request for r in rows]
        params = [q.params for q in reqs]
        use_penalties = any(
            p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
        )
        empty: list[int] = []
        grammar = None
        if self._make_structured is not None and any(p.structured is not None for p in params):
            grammar = self._structured_outputs().grammar_bias(reqs, self.device)
        return SamplingBatch.build(
            params,
            [q.output_token_ids for q in reqs] if use_penalties else [empty] * len(reqs),
            [q.prompt_token_ids for q in reqs] if use_penalties else [empty] * len(reqs),
            [self._generator(q) for q in reqs],
            self.device,
            banned_token_ids=[self._banned(q) for q in reqs],
            kernels=self.kernels,
            grammar_bias=None if grammar is None else (grammar.rows, grammar.bias),
        )

    def _generator(self, req: Request) -> torch.Generator | None:
        if req.params.seed is None:
            return None
        generator = self._generators.get(req.request_id)
        if generator is None:
            generator = make_generator(req.params.seed, self.device)  # n>1 children carry seed + i
            self._generators[req.request_id] = generator
        return generator

    def _banned(self, req: Request) -> list[int]:
        """While min_tokens are not reached, EOS and the stop token ids may not be drawn. A grammar
        decides for itself when EOS may come (banning it could leave a complete grammar no token)."""
        if req.params.structured is not None:
            return []
        return sorted(banned_before_min_tokens(req.params, self.eos_token_id, req.num_output_tokens))

    def _prompt_logprobs(
        self, rows: list[_Row], hidden: torch.Tensor, results: dict[str, SampleResult]
    ) -> None:
        """For requests that asked: log-probabilities of the prompt tokens this chunk's logits predict."""
        for r in rows:
            req = r.request
            n = req.params.prompt_logprobs
            if n is None or r.start + 1 >= req.num_prompt_tokens:
                continue
            end = min(r.start + r.num_tokens + 1, req.num_prompt_tokens)
            # position p's logits predict token p + 1, for p in [start, end - 1)
            h = hidden[r.query_start : r.query_start + (end - 1 - r.start)]
            targets = torch.tensor(req.prompt_token_ids[r.start + 1 : end], device=self.device)
            lps = prompt_logprobs(self.model.compute_logits(h), targets, n)
            results[req.request_id] = SampleResult(None, None, lps)
