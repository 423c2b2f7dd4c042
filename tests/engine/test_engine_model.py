"""The engine over the real ModelRunner: batched, chunked, preempted and prefix-cached runs give the
same greedy tokens as each request run alone and as SmolLM2ForCausalLM.generate."""

from __future__ import annotations

import pytest
import torch

from model import SmolLM2ForCausalLM
from server.engine.engine import LLMEngine
from server.engine.request import RequestOutput, SamplingParams
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerConfig
from tests.conftest import TINY_VOCAB as VOCAB


def make_engine(model: SmolLM2ForCausalLM, **sched: object) -> LLMEngine:
    fields: dict = dict(
        max_num_seqs=16, max_num_batched_tokens=256, max_model_len=512, block_size=16, num_blocks=256
    )
    fields.update(sched)
    config = SchedulerConfig(**fields)
    runner = ModelRunner(model, config.num_blocks, config.block_size)
    return LLMEngine(runner, Scheduler(config))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        outs: list[RequestOutput] = engine.step()
        for out in outs:
            for c in out.outputs:
                tokens[out.request_id].extend(c.new_token_ids)
        engine.scheduler.allocator.check_integrity()
    assert not engine.has_unfinished()
    assert engine.scheduler.allocator.usage == 0.0, "finished requests must leave no block in use"
    return tokens


def workload(n: int = 16, seed: int = 1) -> dict[str, tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        plen = int(torch.randint(1, 70, (1,), generator=g))
        prompt = torch.randint(0, VOCAB, (plen,), generator=g).tolist()
        out[f"r{i}"] = (prompt, SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, ignore_eos=True))
    return out


def reference(
    model: SmolLM2ForCausalLM, reqs: dict[str, tuple[list[int], SamplingParams]]
) -> dict[str, list[int]]:
    ref = {}
    for rid, (prompt, params) in reqs.items():
        assert params.max_tokens is not None
        out = model.generate(torch.tensor([prompt]), params.max_tokens, temperature=0.0)
        ref[rid] = out[0, len(prompt) :].tolist()
    return ref


@pytest.fixture(scope="module")
def reqs() -> dict[str, tuple[list[int], SamplingParams]]:
    return workload()


@pytest.fixture(scope="module")
def expected(tiny_model: SmolLM2ForCausalLM, reqs) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    ref = reference(tiny_model, reqs)
    assert len({tuple(v[:4]) for v in ref.values()}) > 8, "reference outputs should be varied"
    return ref


def test_batched_equals_alone_and_generate(tiny_model, reqs, expected) -> None:  # type: ignore[no-untyped-def]
    together = run(make_engine(tiny_model), reqs)
    assert together == expected
    for rid in ("r0", "r7", "r15"):
        alone = run(make_engine(tiny_model), {rid: reqs[rid]})
        assert alone[rid] == expected[rid]


def test_chunked_prefill_forced_small(tiny_model, reqs, expected) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(tiny_model, max_num_batched_tokens=8)
    assert run(engine, reqs) == expected


def test_preemption_keeps_outputs(tiny_model, reqs, expected) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(tiny_model, num_blocks=12, max_num_batched_tokens=64, max_model_len=192)
    assert run(engine, reqs) == expected
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to be small enough to preempt"


def test_prefix_caching_shares_and_keeps_outputs(tiny_model) -> None:  # type: ignore[no-untyped-def]
    system = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(7)).tolist()
    reqs = {
        f"p{i}": (system + [i + 1, i + 2], SamplingParams(max_tokens=6, temperature=0.0)) for i in range(6)
    }
    expected = reference(tiny_model, reqs)
    engine = make_engine(tiny_model)
    first = run(engine, {"p0": reqs["p0"]})
    rest = run(engine, {k: v for k, v in reqs.items() if k != "p0"})
    assert {**first, **rest} == expected
    assert engine.scheduler.allocator.prefix_hits >= 5 * 32, "later requests must reuse the system prompt"
    off = make_engine(tiny_model, enable_prefix_caching=False)
    assert run(off, reqs) == expected
    assert off.scheduler.allocator.prefix_hits == 0


def test_seeded_sampling_independent_of_batch(tiny_model, reqs) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    prompt = reqs["r3"][0]
    alone = run(make_engine(tiny_model), {"s": (prompt, params)})["s"]
    mixed = dict(reqs)
    mixed["s"] = (prompt, params)
    mixed["other"] = (prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))
    crowd = run(make_engine(tiny_model, max_num_batched_tokens=32), mixed)
    assert crowd["s"] == alone
    assert crowd["other"] != alone


def test_n_choices_share_prompt_blocks(tiny_model, reqs) -> None:  # type: ignore[no-untyped-def]
    prompt = reqs["r9"][0] + reqs["r10"][0]
    engine = make_engine(tiny_model)
    engine.add_request(
        "n", prompt, SamplingParams(n=3, max_tokens=8, temperature=0.8, seed=5, ignore_eos=True)
    )
    per_choice: dict[int, list[int]] = {0: [], 1: [], 2: []}
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs:
                per_choice[c.index].extend(c.new_token_ids)
        engine.scheduler.allocator.check_integrity()
    assert all(len(v) == 8 for v in per_choice.values())
    assert engine.scheduler.allocator.prefix_hits >= 2 * 16 * ((len(prompt) - 1) // 16)
    assert engine.scheduler.allocator.usage == 0.0


def test_abort_frees_blocks_within_one_step(tiny_model, reqs) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(tiny_model)
    for rid, (prompt, _) in list(reqs.items())[:6]:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.scheduler.allocator.usage > 0
    for rid in list(reqs)[:6]:
        engine.abort_request(rid)
    engine.step()
    engine.scheduler.allocator.check_integrity()
    assert engine.scheduler.allocator.usage == 0.0
    assert not engine.has_unfinished()


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_batched_chunked_preempted_equals_generate() -> None:
    from model.weights import load_model

    model = load_model(None, dtype=torch.float32)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,"]
    from model.defaults import require_default_model
    from model.tokenizer import Tokenizer

    tok = Tokenizer.from_file(require_default_model())
    reqs = {
        f"t{i}": (tok.encode(t), SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
        for i, t in enumerate(texts)
    }
    expected = reference(model, reqs)
    engine = make_engine(model, num_blocks=7, max_num_batched_tokens=8, max_model_len=112)
    assert run(engine, reqs) == expected
    assert engine.scheduler.num_preemptions > 0


def test_burst_of_equal_length_prompts_batched_prefill(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Whole prompts of one length are attended in one batched call; mixed with other lengths and decodes."""
    g = torch.Generator().manual_seed(3)
    lengths = [20] * 5 + [33] * 3 + [7]
    reqs = {
        f"e{i}": (
            torch.randint(0, VOCAB, (n,), generator=g).tolist(),
            SamplingParams(max_tokens=6, temperature=0.0),
        )
        for i, n in enumerate(lengths)
    }
    expected = reference(tiny_model, reqs)
    engine = make_engine(tiny_model)
    first = run(engine, {"e8": reqs["e8"]})
    assert {**first, **run(engine, {k: v for k, v in reqs.items() if k != "e8"})} == expected


def test_sampling_runs_on_the_compute_threads(tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """sample() passes over (rows, vocab) tensors (top-p sorts), which gain from both cores of the 2-core CPU
    (bench/NOTES.md): it must run on the compute threads."""
    import server.engine.runner as runner_module

    seen: list[int] = []
    real = runner_module.sample

    def spy(*args):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(runner_module, "sample", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = make_engine(tiny_model)
    engine.runner.model.use_compute_threads(2)
    try:
        out = run(engine, {"s": ([1, 2, 3], SamplingParams(max_tokens=3, top_p=0.9, seed=1))})
    finally:
        engine.runner.model.use_compute_threads(None)
        torch.set_num_threads(threads)
    assert len(out["s"]) == 3 and seen == [2, 2, 2]
