"""The engine on CUDA: decode steps replayed from CUDA graphs give the same tokens as generate().

Runs only where CUDA is present (`pytest -m gpu`, bench/gpu_check.sh); CPU CI skips it. The model is the
one in SMOLLM2_MODEL, else the default GGUF, else seeded random weights in the real model's shapes (a GPU
machine that cannot fetch the GGUF still checks every path; float32 greedy ties are then still rare:
the smallest top-2 logit gap over 24 random-weight tokens was 6e-3, against ~1e-5 of float32 noise).
"""

from __future__ import annotations

import os

import pytest
import torch

from server.engine.engine import LLMEngine
from server.engine.request import SamplingParams
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run bench/gpu_check.sh on a GPU)"),
]


def _model(dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from model.config import SmolLM2Config
    from model.defaults import default_model_path
    from model.modeling import SmolLM2ForCausalLM
    from model.weights import load_model

    source = os.environ.get("SMOLLM2_MODEL") or (
        default_model_path() if default_model_path().is_file() else None
    )
    if source:
        return load_model(source, dtype=dtype, device="cuda")
    torch.manual_seed(0)
    return SmolLM2ForCausalLM(SmolLM2Config()).to("cuda", dtype).eval()


def _engine(model, cuda_graphs: bool, max_num_seqs: int = 16, capture_now: bool = False) -> LLMEngine:  # type: ignore[no-untyped-def]
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=512,
        max_model_len=1024,
        block_size=16,
        num_blocks=512,
    )
    runner = ModelRunner(
        model,
        cfg.num_blocks,
        cfg.block_size,
        cuda_graphs=cuda_graphs,
        max_num_seqs=max_num_seqs,
        max_model_len=cfg.max_model_len,
        capture_graphs_now=capture_now,
    )
    return LLMEngine(runner, Scheduler(cfg))


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(100, 49152, (int(torch.randint(3, 60, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def _drain(engine: LLMEngine, out: dict[str, list[int]], steps: int | None = None) -> None:
    done = 0
    while engine.has_unfinished() and (steps is None or done < steps):
        for o in engine.step():
            for c in o.outputs:
                out.setdefault(o.request_id, []).extend(c.new_token_ids)
        done += 1


def _run(
    engine: LLMEngine, prompts: list[list[int]], max_tokens: int, stagger: int = 0, **params
) -> dict[str, list[int]]:
    """Greedy by default; with `stagger`, the second half of the prompts arrives `stagger` steps later,
    so steps mix prefills (eager) with decodes, and the graphs' batch bucket changes mid-run."""
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **({"temperature": 0.0} | params))
    out: dict[str, list[int]] = {}
    half = len(prompts) // 2 if stagger else len(prompts)
    for i, p in enumerate(prompts[:half]):
        engine.add_request(f"g{i}", p, sp)
    if stagger:
        _drain(engine, out, stagger)
        for i, p in enumerate(prompts[half:], start=half):
            engine.add_request(f"g{i}", p, sp)
    _drain(engine, out)
    engine.scheduler.allocator.check_integrity()
    assert engine.scheduler.allocator.usage == 0.0, "finished requests must leave no block in use"
    return out


@pytest.mark.parametrize(("n", "stagger"), [(1, 0), (8, 0), (5, 0), (12, 6)])
def test_cuda_graph_decode_equals_generate(n: int, stagger: int) -> None:
    model = _model(torch.float32)
    prompts = _prompts(n, seed=n)
    want = {
        f"g{i}": model.generate(torch.tensor([p], device="cuda"), 24, temperature=0.0)[0, len(p) :].tolist()
        for i, p in enumerate(prompts)
    }
    engine = _engine(model, cuda_graphs=True)
    assert _run(engine, prompts, 24, stagger=stagger) == want
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.graphs and not graphs.disabled, "decode should replay graphs"
    # prompts of 3..59 tokens + 24 new ones span 1..6 blocks: the width buckets 4 and 8 both appear
    assert {w for _, w in graphs.graphs} <= {4, 8}


def test_cuda_bf16_graph_logits_match_eager_step() -> None:
    """Every replayed decode step, recomputed eagerly on the same inputs, gives the same logits within
    bfloat16 rounding (batch 5 is padded to the bucket of 8: padding rows must not leak into real ones)."""
    model = _model(torch.bfloat16)
    engine = _engine(model, cuda_graphs=True)
    runner = engine.runner
    replay = runner._graph_decode
    diffs: list[tuple[float, float]] = []

    def replay_and_compare(rows, sampling):  # type: ignore[no-untyped-def]
        logits = replay(rows, sampling)
        if logits is not None:
            logits = logits.clone()
            hidden = model.forward_paged(*runner._tensors(runner._collect(rows)), runner.kv_caches)
            eager = model.compute_logits(hidden)
            diffs.append(((logits - eager).abs().max().item(), eager.std().item()))
        return logits

    runner._graph_decode = replay_and_compare  # type: ignore[method-assign]
    _run(engine, _prompts(5, seed=11), 16)
    assert len(diffs) >= 14, f"only {len(diffs)} steps replayed a graph"
    worst = max(d / s for d, s in diffs)
    assert worst < 0.25, f"graph vs eager logits differ by up to {worst:.3f} of their spread"


def test_cuda_seeded_sampling_repeats_and_seeds_differ() -> None:
    """A seeded request draws from its own CUDA generator: the same seed in the same traffic gives the same
    tokens (graph replays included), another seed other tokens. (Across different batch compositions the
    logits differ by float rounding, ~3e-5 in float32, which can move an inverse-CDF draw over a token
    boundary: bench/NOTES.md.)"""
    model = _model(torch.float32)
    prompts = _prompts(5, seed=3)

    def run(seed: int) -> dict[str, list[int]]:
        return _run(_engine(model, cuda_graphs=True), prompts, 20, stagger=3, temperature=0.9, seed=seed)

    first = run(1234)
    assert run(1234) == first
    assert run(99) != first


def test_cuda_abort_frees_blocks_and_later_requests_still_replay() -> None:
    model = _model(torch.bfloat16)
    engine = _engine(model, cuda_graphs=True)
    sp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(_prompts(4, seed=5)):
        engine.add_request(f"a{i}", p, sp)
    _drain(engine, {}, steps=5)
    for i in range(4):
        engine.abort_request(f"a{i}")
    _drain(engine, {})
    engine.scheduler.allocator.check_integrity()
    assert engine.scheduler.allocator.usage == 0.0
    out = _run(engine, _prompts(3, seed=6), 8)
    assert sorted(len(v) for v in out.values()) == [8, 8, 8]


def test_cuda_graphs_captured_at_start_cover_a_run() -> None:
    """As the server builds it: every batch bucket up to max_num_seqs (12 -> 16) x widths 4..64 blocks
    captured up front; a run inside those sizes captures nothing more and still equals generate()."""
    model = _model(torch.float32)
    engine = _engine(model, cuda_graphs=True, max_num_seqs=12, capture_now=True)
    graphs = engine.runner.graphs
    assert graphs is not None and not graphs.disabled
    assert set(graphs.graphs) == {(b, w) for b in (1, 2, 4, 8, 16) for w in (4, 8, 16, 32, 64)}
    prompts = _prompts(12, seed=9)
    want = {
        f"g{i}": model.generate(torch.tensor([p], device="cuda"), 24, temperature=0.0)[0, len(p) :].tolist()
        for i, p in enumerate(prompts)
    }
    assert _run(engine, prompts, 24, stagger=5) == want
    assert len(graphs.graphs) == 25
