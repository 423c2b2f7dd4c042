"""The CUDA-graph decode path's bookkeeping, on the CPU: bucketing, start-up capture, padding rows.

A CPU has no CUDA graphs, so `_capture` is replaced by one that "replays" by running the same forward
eagerly on the same static buffers. Everything else is the real code: the runner routes plain decode
steps to DecodeGraphs, which pads the batch to its bucket and the block tables to their width, sends the
padding rows' K/V to the scratch block, and returns the real rows' logits. Greedy tokens must equal
generate() — padding that leaked into a real sequence's cache or logits would change them.
(tests/engine/test_gpu.py runs the real capture on a GPU.)
"""

from __future__ import annotations

import pytest
import torch

from server.engine.cuda_graphs import BATCH_BUCKETS, DecodeGraphs, _Graph, batch_bucket, width_bucket
from server.engine.engine import LLMEngine
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.test_engine_model import reference, workload


class _EagerReplay:
    def __init__(self, graphs: DecodeGraphs, g: _Graph) -> None:
        self.graphs, self.g = graphs, g

    def replay(self) -> None:
        with torch.inference_mode():
            self.g.logits = self.graphs._forward(self.g)


class EagerGraphs(DecodeGraphs):
    """DecodeGraphs whose 'capture' records the buckets asked for and replays eagerly."""

    def _capture(self, B: int, width: int) -> _Graph:
        g = self._buffers(B, width)
        g.graph = _EagerReplay(self, g)  # type: ignore[assignment]
        return g


def graphed_engine(model, max_num_seqs: int = 12, num_blocks: int = 256) -> LLMEngine:  # type: ignore[no-untyped-def]
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=256,
        max_model_len=512,
        block_size=16,
        num_blocks=num_blocks,
    )
    # one block past the allocator's range is the scratch block, as ModelRunner lays it out on CUDA
    runner = ModelRunner(model, num_blocks + 1, 16, cuda_graphs=False)
    runner.graphs = EagerGraphs(model, runner.kv_caches, 16, num_blocks, max_num_seqs, 512 // 16)
    return LLMEngine(runner, Scheduler(cfg))


def test_buckets() -> None:
    assert [batch_bucket(n) for n in (1, 3, 5, 9, 17, 25, 33, 49, 65)] == [1, 4, 8, 16, 24, 32, 48, 64, 96]
    assert batch_bucket(BATCH_BUCKETS[-1] + 1) is None
    assert [width_bucket(b) for b in (1, 4, 5, 8, 9, 33)] == [4, 4, 8, 8, 16, 64]


def test_startup_capture_covers_every_bucket_a_run_needs(tiny_model) -> None:  # type: ignore[no-untyped-def]
    engine = graphed_engine(tiny_model, max_num_seqs=12)
    graphs = engine.runner.graphs
    assert isinstance(graphs, EagerGraphs)
    assert graphs.capture_common() == 5 * 4
    # batch buckets up to max_num_seqs 12 (padded to 16); widths 4..32 blocks (max_model_len 512)
    assert set(graphs.graphs) == {(b, w) for b in (1, 2, 4, 8, 16) for w in (4, 8, 16, 32)}
    assert graphs.capture_common() == 0  # already there
    reqs = workload(12, seed=3)
    for rid, (prompt, params) in reqs.items():
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        engine.step()
    assert len(graphs.graphs) == 20, "a run inside the captured sizes captures nothing new"


@pytest.mark.parametrize("n", [1, 5, 12])
def test_padded_graph_decode_equals_generate(tiny_model, n: int) -> None:  # type: ignore[no-untyped-def]
    engine = graphed_engine(tiny_model)
    reqs = workload(n, seed=n)
    replays = []
    run_graph = engine.runner.graphs.run  # type: ignore[union-attr]

    def counting_run(*args):  # type: ignore[no-untyped-def]
        out = run_graph(*args)
        replays.append(len(args[0]) if out is not None else 0)  # rows of each replayed step
        return out

    engine.runner.graphs.run = counting_run  # type: ignore[union-attr,method-assign]
    out: dict[str, list[int]] = {rid: [] for rid in reqs}
    for rid, (prompt, params) in reqs.items():
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        for o in engine.step():
            for c in o.outputs:
                out[o.request_id].extend(c.new_token_ids)
        engine.scheduler.allocator.check_integrity()
    assert out == reference(tiny_model, reqs)
    assert sum(r > 0 for r in replays) >= 3, "plain decode steps should go through the graphs"
    # every plain decode step replays, also 9..12 rows padded to the bucket of 16 (max_num_seqs is 12)
    assert all(replays) and (n < 12 or max(replays) == 12)
    assert engine.scheduler.allocator.usage == 0.0
