"""CUDA graphs for decode-only steps.

A decode step of a 135M model on a GPU is a few hundred tiny kernels; launching them costs more than
running them. Capturing the step once per shape and replaying it removes that cost. Shapes are bucketed:
the batch is padded up to the next size in BATCH_BUCKETS and the block table up to the next power of two,
so a handful of graphs cover a serving run. The server captures the common buckets at start-up (batch
buckets up to max_num_seqs x block-table widths up to STARTUP_WIDTH_BLOCKS), as vLLM does, so no request
waits on a capture; rarer ones (longer contexts) are captured lazily, the first time they are needed.

Padding rows write their (ignored) K/V into a scratch block that the block allocator never hands out, and
attend to that block only; their outputs are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model.attention import build_decode_mask, step_metadata
from model.modeling import SmolLM2ForCausalLM

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_WIDTH_BLOCKS = 4
STARTUP_WIDTH_BLOCKS = 64  # block tables up to 64 x 16 = 1,024 tokens are captured at start-up


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None only until captured
    input_ids: torch.Tensor  # (B,)
    positions: torch.Tensor  # (B,)
    slots: torch.Tensor  # (B,)
    tables: torch.Tensor  # (B, W)
    lens: torch.Tensor  # (B,)
    logits: torch.Tensor  # (B, V) output


def batch_bucket(n: int) -> int | None:
    return next((b for b in BATCH_BUCKETS if b >= n), None)


def width_bucket(blocks: int) -> int:
    w = MIN_WIDTH_BLOCKS
    while w < blocks:
        w *= 2
    return w


class DecodeGraphs:
    def __init__(
        self,
        model: SmolLM2ForCausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        scratch_block: int,
        max_batch: int,
        max_blocks: int,
        max_graphs: int = 128,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.max_graphs = max_graphs
        self.device = model.device
        self.pool: torch.cuda._POOL_HANDLE | None = (
            None  # the graphs' shared memory pool, made at the first capture
        )
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.disabled = False
        # the graphs must never grow the RoPE cache while capturing (a host sync)
        model.model.rotary_emb._grow(max_blocks * block_size + 1)

    def capture_common(self, max_width_blocks: int = STARTUP_WIDTH_BLOCKS) -> int:
        """Capture every batch bucket up to max_batch for every width up to max_width_blocks, largest
        batch first (the later, smaller graphs reuse its memory pool). Returns the number captured."""
        widths = []
        w = MIN_WIDTH_BLOCKS
        while w <= min(max_width_blocks, self.max_blocks):
            widths.append(w)
            w *= 2
        batches = [b for b in BATCH_BUCKETS if b <= self.max_batch]
        if self.max_batch not in batches and (top := batch_bucket(self.max_batch)) is not None:
            batches.append(top)  # max_num_seqs 20 pads to the bucket of 24
        count = 0
        for B in sorted(batches, reverse=True):
            for width in widths:
                if (B, width) in self.graphs:
                    continue
                if self._get(B, width) is None:  # capture off, failed, or the graph limit reached
                    return count
                count += 1
        return count

    def _get(self, B: int, width: int) -> _Graph | None:
        """The graph of (B, width), captured now if it is new; None when capture is off or failed."""
        g = self.graphs.get((B, width))
        if g is None:
            if self.disabled or len(self.graphs) >= self.max_graphs:
                return None
            try:
                g = self._capture(B, width)
            except RuntimeError as e:  # a failed capture must not take the server down: run eagerly
                log.warning("CUDA graph capture failed (%s); decode runs eagerly", e)
                self.disabled = True
                return None
            self.graphs[(B, width)] = g
        return g

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        lens: list[int],
    ) -> torch.Tensor | None:
        """Logits (D, V) for a decode-only step, or None when no graph applies (the caller runs eagerly)."""
        D = len(input_ids)
        B = batch_bucket(D)
        width = width_bucket(max(len(t) for t in tables))
        if self.disabled or B is None or D > self.max_batch or width > self.max_blocks:
            return None
        g = self._get(B, width)
        if g is None:
            return None
        pad = B - D
        scratch_slot = self.scratch_block * self.block_size
        g.input_ids.copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        g.positions.copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        g.slots.copy_(torch.tensor(slots + [scratch_slot] * pad), non_blocking=True)
        rows = [t + [self.scratch_block] * (width - len(t)) for t in tables]
        rows += [[self.scratch_block] * width] * pad
        g.tables.copy_(torch.tensor(rows), non_blocking=True)
        g.lens.copy_(torch.tensor(lens + [1] * pad), non_blocking=True)
        assert g.graph is not None
        g.graph.replay()
        return g.logits[:D]

    def _forward(self, g: _Graph) -> torch.Tensor:
        nkv = self.model.config.num_key_value_heads
        width_tokens = g.tables.shape[1] * self.block_size
        mask = build_decode_mask(g.lens, width_tokens, nkv, self.model.dtype)
        meta = step_metadata(g.slots, [], self.block_size, False, g.tables, decode_mask=mask)
        hidden = self.model.forward_paged(g.input_ids, g.positions, meta, self.kv_caches)
        return self.model.compute_logits(hidden)

    def _buffers(self, B: int, width: int) -> _Graph:
        """A graph's static inputs, set to a harmless step: every row on the scratch block."""
        dev = self.device
        scratch = self.scratch_block
        return _Graph(
            graph=None,
            input_ids=torch.zeros(B, dtype=torch.long, device=dev),
            positions=torch.zeros(B, dtype=torch.long, device=dev),
            slots=torch.full((B,), scratch * self.block_size, dtype=torch.long, device=dev),
            tables=torch.full((B, width), scratch, dtype=torch.long, device=dev),
            lens=torch.ones(B, dtype=torch.long, device=dev),
            logits=torch.empty(0, device=dev),
        )

    @torch.inference_mode()
    def _capture(self, B: int, width: int) -> _Graph:
        log.debug("capturing a CUDA graph for decode batch %d, %d blocks", B, width)
        g = self._buffers(B, width)
        g.graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (cuBLAS handles, allocator)
            for _ in range(2):
                self._forward(g)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(g.graph, pool=self.pool):
            g.logits = self._forward(g)
        torch.cuda.synchronize()
        return g
