"""Speculative decoding with n-gram drafts: the proposer, acceptance, and engines whose outputs with
drafts equal those without (fake runner: stops, lengths, preemption, n > 1, logprobs; real runner over
the tiny model), with the drafted / accepted counters."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch

from model import SmolLM2ForCausalLM
from server.engine.engine import LLMEngine
from server.engine.request import SamplingParams
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.spec_decode import NgramProposer, SpecConfig, accept
from server.logs import _Totals, stats_line
from server.metrics import ServerMetrics
from tests.conftest import TINY_VOCAB
from tests.engine.fake_runner import FakeRunner, reference_tokens, repeating_token

VOCAB = 1000


# ---- the proposer -----------------------------------------------------------------------------------


def proposer(k: int = 3, lo: int = 1, hi: int = 3) -> NgramProposer:
    return NgramProposer(SpecConfig(k, lo, hi))


def test_proposes_what_followed_the_latest_longest_match() -> None:
    #          0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [7, 1, 2, 3, 9, 8, 2, 3, 4, 5, 1, 2, 3]
    # suffix [1, 2, 3] occurs at 1..3 (followed by 9, 8, 2); [2, 3] also at 6..7, but the 3-gram wins
    assert proposer().propose(tokens, 10) == [9, 8, 2]
    assert proposer(hi=2).propose(tokens, 10) == [4, 5, 1]  # the latest [2, 3]
    assert proposer().propose(tokens, 2) == [9, 8]
    assert proposer().propose(tokens, 0) == []


def test_proposes_nothing_without_a_long_enough_match() -> None:
    assert proposer().propose([1, 2, 3, 4], 5) == []
    assert proposer(lo=2).propose([5, 1, 6, 1], 5) == []  # only the 1-gram [1] recurs
    assert proposer(lo=1).propose([5, 1, 6, 1], 5) == [6, 1]
    assert proposer().propose([4], 5) == []
    assert proposer().propose([4, 4], 5) == [4]  # a draft may run into the last token


def test_proposes_from_a_match_right_before_the_end() -> None:
    assert proposer(k=4).propose([1, 1, 1, 1, 1], 10) == [1]


def test_accept_keeps_agreeing_drafts_plus_the_models_token() -> None:
    assert accept([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accept([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accept([5, 6, 7], [1, 6, 7, 8]) == [1]
    assert accept([], [4]) == [4]


def test_only_plain_greedy_requests_are_drafted_for() -> None:
    eligible = NgramProposer.eligible
    assert eligible(SamplingParams(temperature=0.0), 0)
    assert not eligible(SamplingParams(temperature=0.7), 0)
    assert not eligible(SamplingParams(temperature=0.0, repetition_penalty=1.2), 0)
    assert not eligible(SamplingParams(temperature=0.0, frequency_penalty=0.5), 0)
    assert not eligible(SamplingParams(temperature=0.0, min_tokens=3), 2)
    assert eligible(SamplingParams(temperature=0.0, min_tokens=3), 3)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="ngram_min"):
        SchedulerConfig(speculative=SpecConfig(3, 4, 2)).validate()
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpecConfig(-1).validate()


# ---- the engine with the fake runner ----------------------------------------------------------------


def fake_engine(k: int, **overrides: object) -> tuple[LLMEngine, FakeRunner]:
    fields: dict = dict(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128, block_size=4, num_blocks=128,
        speculative=SpecConfig(k, 1, 3, max_num_seqs=64),
    )  # fmt: skip
    fields.update(overrides)
    config = SchedulerConfig(**fields)
    runner = FakeRunner(config.num_blocks, config.block_size, VOCAB, model=repeating_token)
    return LLMEngine(runner, Scheduler(config)), runner


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    got: dict[str, dict[int, list]] = {}
    for _ in range(5000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            for c in out.outputs:
                entry = got.setdefault(out.request_id, {}).setdefault(c.index, [[], [], None])
                entry[0].extend(c.new_token_ids)
                entry[1].extend(c.logprobs or [])
                entry[2] = c.finish_reason if c.finish_reason is not None else entry[2]
        engine.scheduler.allocator.check_integrity()
    assert not engine.has_unfinished()
    assert engine.scheduler.allocator.usage == 0.0
    return got


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)  # type: ignore[arg-type]


def mixed_requests(seed: int = 0) -> dict[str, tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    reqs = {}
    for i in range(10):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))]
        reqs[f"r{i}"] = (prompt, greedy(max_tokens=rng.randrange(1, 60), ignore_eos=True))
    return reqs


@pytest.mark.parametrize("k", [1, 3, 6])
def test_outputs_with_drafts_equal_plain_decoding(k: int) -> None:
    reqs = mixed_requests()
    plain, plain_runner = fake_engine(0)
    spec, spec_runner = fake_engine(k)
    expected = run(plain, reqs)
    got = run(spec, reqs)
    assert got == expected
    for rid, (prompt, params) in reqs.items():
        assert got[rid][0][0] == reference_tokens(prompt, params, VOCAB, model=repeating_token)
    sched = spec.scheduler
    assert 0 < sched.num_accepted_tokens < sched.num_draft_tokens  # some drafts right, some wrong
    assert spec_runner.num_steps < plain_runner.num_steps
    stats = spec.stats()
    assert stats.spec_decode_num_draft_tokens == sched.num_draft_tokens
    assert stats.spec_decode_num_accepted_tokens == sched.num_accepted_tokens
    assert stats.num_generation_tokens == plain.stats().num_generation_tokens
    assert plain.stats().spec_decode_num_draft_tokens == 0


def test_stops_apply_token_by_token_inside_accepted_drafts() -> None:
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    free = reference_tokens(prompt, greedy(max_tokens=40), VOCAB, model=repeating_token)
    stop_at = free[17]  # deep enough that drafts are running by then
    first = free.index(stop_at)
    reqs = {
        "stop": (prompt, greedy(max_tokens=40, stop_token_ids=[stop_at])),
        "cut": (prompt, greedy(max_tokens=first + 2)),  # max_tokens lands inside a draft run
        "min": (prompt, greedy(max_tokens=40, stop_token_ids=[free[2]], min_tokens=5)),
    }
    got = run(fake_engine(4)[0], reqs)
    assert got == run(fake_engine(0)[0], reqs)
    assert got["stop"][0][0] == free[: first + 1] and got["stop"][0][2] == "stop"
    assert got["cut"][0][0] == free[: first + 2] and got["cut"][0][2] == "length"


def test_eos_inside_accepted_drafts() -> None:
    prompt = [8, 6, 7, 5, 3, 0, 9]
    free = reference_tokens(prompt, greedy(max_tokens=40), VOCAB, model=repeating_token)
    eos = free[20]
    engine, _ = fake_engine(4, eos_token_id=eos)
    got = run(engine, {"a": (prompt, greedy(max_tokens=40))})
    assert got["a"][0][0] == free[: free.index(eos) + 1] and got["a"][0][2] == "stop"


def test_stops_at_max_model_len() -> None:
    prompt = list(range(10, 20)) * 2
    reqs = {"a": (prompt, greedy(max_tokens=None))}
    got = run(fake_engine(5, max_model_len=37)[0], reqs)
    assert len(prompt) + len(got["a"][0][0]) == 37
    assert got == run(fake_engine(0, max_model_len=37)[0], reqs)


def test_preemption_keeps_outputs() -> None:
    reqs = mixed_requests(seed=4)
    expected = run(fake_engine(0)[0], reqs)
    engine, _ = fake_engine(4, num_blocks=40, max_model_len=96)
    assert run(engine, reqs) == expected
    assert engine.scheduler.num_preemptions > 0


def test_n_choices_and_logprobs() -> None:
    prompt = [2, 7, 1, 8, 2, 8, 1, 8]
    reqs = {"a": (prompt, greedy(max_tokens=30, n=3, logprobs=2))}
    got = run(fake_engine(4)[0], reqs)
    assert got == run(fake_engine(0)[0], reqs)
    for tokens, lps, _ in got["a"].values():
        assert [lp.token_id for lp in lps] == tokens


def test_sampled_requests_are_not_drafted() -> None:
    engine, _ = fake_engine(4)
    run(engine, {"a": ([1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_tokens=20, seed=1))})
    assert engine.scheduler.num_draft_tokens == 0


def test_drafts_stay_within_the_token_budget() -> None:
    """A step's draft tokens stay within the budget; each stream's own row rides on top of it."""
    engine, runner = fake_engine(6, max_num_batched_tokens=5)
    run(engine, {"a": ([4, 5, 6] * 3, greedy(max_tokens=40)), "b": ([7, 8] * 4, greedy(max_tokens=40))})
    assert max(runner.batched_tokens) <= 5 + 2 and engine.scheduler.num_draft_tokens > 0
    assert 5 + 2 in runner.batched_tokens  # both streams drafted in one step, up to the budget


def test_no_drafts_while_more_sequences_run_than_the_limit() -> None:
    reqs = {f"r{i}": ([4, 5, 6] * 3, greedy(max_tokens=30, ignore_eos=True)) for i in range(3)}
    engine, _ = fake_engine(4, speculative=SpecConfig(4, 1, 3, max_num_seqs=2))
    got = run(engine, reqs)
    assert engine.scheduler.num_draft_tokens == 0
    engine, _ = fake_engine(4, speculative=SpecConfig(4, 1, 3, max_num_seqs=3))
    assert run(engine, reqs) == got and engine.scheduler.num_draft_tokens > 0


def test_metrics_export_the_counters_and_the_rate() -> None:
    stats = {"spec_decode_num_draft_tokens": 40, "spec_decode_num_accepted_tokens": 30}
    registry = ServerMetrics(lambda: stats).registry
    labels = {"model_name": "SmolLM2-135M-Instruct"}
    assert registry.get_sample_value("smollm2:spec_decode_num_draft_tokens_total", labels) == 40
    assert registry.get_sample_value("smollm2:spec_decode_num_accepted_tokens_total", labels) == 30
    assert registry.get_sample_value("smollm2:spec_decode_acceptance_rate", labels) == 0.75


def test_stats_line_reports_the_draft_acceptance() -> None:
    before, now = _Totals(0.0, 0, 0, 0, 0, 0, 0), _Totals(1.0, 0, 10, 0, 0, 8, 6)
    line = stats_line({"num_running": 1}, before, now)
    assert line is not None and line.endswith(", draft acceptance 75.0% of 8 tokens")
    assert "draft" not in (stats_line({"num_running": 1}, now, now) or "")


# ---- the real runner over the tiny model ------------------------------------------------------------


def model_engine(model: SmolLM2ForCausalLM, k: int, **overrides: object) -> LLMEngine:
    fields: dict = dict(
        max_num_seqs=8, max_num_batched_tokens=128, max_model_len=256, block_size=16, num_blocks=64,
        speculative=SpecConfig(k, 1, 3, max_num_seqs=64),
    )  # fmt: skip
    fields.update(overrides)
    config = SchedulerConfig(**fields)
    return LLMEngine(ModelRunner(model, config.num_blocks, config.block_size), Scheduler(config))


def repetitive_requests(seed: int = 0) -> dict[str, tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(seed)
    reqs = {}
    for i in range(6):
        motif = torch.randint(0, TINY_VOCAB, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
        prompt = motif.tolist() * 4
        reqs[f"r{i}"] = (
            prompt,
            greedy(max_tokens=12 + 7 * i, ignore_eos=True, logprobs=1 if i == 2 else None),
        )
    return reqs


def test_real_runner_outputs_with_drafts_equal_plain(tiny_model: SmolLM2ForCausalLM) -> None:
    reqs = repetitive_requests()
    expected = run(model_engine(tiny_model, 0), reqs)
    engine = model_engine(tiny_model, 4)
    got = run(engine, reqs)
    assert {r: v[0][0] for r, v in got.items()} == {r: v[0][0] for r, v in expected.items()}
    assert engine.scheduler.num_draft_tokens > 0  # mostly wrong: the tiny model does not copy
    for a, b in zip(got["r2"][0][1], expected["r2"][0][1], strict=True):  # logprobs of the same tokens
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-3)


def test_real_runner_with_drafts_under_preemption(tiny_model: SmolLM2ForCausalLM) -> None:
    reqs = repetitive_requests(seed=3)
    expected = run(model_engine(tiny_model, 0), reqs)
    engine = model_engine(tiny_model, 3, num_blocks=16, max_model_len=128, max_num_batched_tokens=64)
    got = run(engine, reqs)
    assert {r: v[0][0] for r, v in got.items()} == {r: v[0][0] for r, v in expected.items()}
    assert engine.scheduler.num_preemptions > 0


def test_seeded_sampling_unchanged_next_to_draft_rows(tiny_model: SmolLM2ForCausalLM) -> None:
    reqs = repetitive_requests(seed=5)
    prompt = reqs["r0"][0]
    reqs["seeded"] = (prompt, SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=7))
    expected = run(model_engine(tiny_model, 0), reqs)
    engine = model_engine(tiny_model, 4)
    got = run(engine, reqs)
    assert got["seeded"][0][0] == expected["seeded"][0][0]
    assert engine.scheduler.num_draft_tokens > 0


class OracleProposer(NgramProposer):
    """Drafts from the known plain-decoding outputs, the last one made wrong every third position: the
    real runner's verification is then exercised with full, partial and no acceptance."""

    def __init__(self, k: int, expected: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__(SpecConfig(k, max_num_seqs=64))
        self.expected = expected

    def propose(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        for prompt, output in self.expected.items():
            if tuple(token_ids[: len(prompt)]) == prompt:
                pos = len(token_ids) - len(prompt)
                drafts = output[pos : pos + min(max_tokens, self.config.num_speculative_tokens)]
                if drafts and pos % 3 == 0:
                    drafts[-1] = (drafts[-1] + 1) % TINY_VOCAB
                return drafts
        raise AssertionError("unknown request")


def test_real_runner_verifies_right_and_wrong_drafts(tiny_model: SmolLM2ForCausalLM) -> None:
    reqs = repetitive_requests(seed=1)
    expected = run(model_engine(tiny_model, 0), reqs)
    engine = model_engine(tiny_model, 4)
    engine.scheduler.proposer = OracleProposer(
        4, {tuple(prompt): expected[rid][0][0] for rid, (prompt, _) in reqs.items()}
    )
    got = run(engine, reqs)
    assert {r: v[0][0] for r, v in got.items()} == {r: v[0][0] for r, v in expected.items()}
    sched = engine.scheduler
    assert 0.5 * sched.num_draft_tokens < sched.num_accepted_tokens < sched.num_draft_tokens
