"""Scheduler + LLMEngine with the fake runner: chunking, limits, preemption, n>1 sharing, aborts, stops."""

from __future__ import annotations

import random

import pytest

from server.engine.engine import LLMEngine
from server.engine.request import RequestStatus, SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.fake_runner import FakeRunner, next_token, reference_tokens

VOCAB = 1000


def make_engine(**overrides: object) -> tuple[LLMEngine, FakeRunner]:
    fields: dict = dict(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128, block_size=4, num_blocks=64
    )
    fields.update(overrides)
    config = SchedulerConfig(**fields)
    runner = FakeRunner(config.num_blocks, config.block_size, VOCAB)
    return LLMEngine(runner, Scheduler(config)), runner


def run_to_end(engine: LLMEngine, max_steps: int = 2000) -> dict[str, dict[int, list[int]]]:
    """Step until idle, checking allocator integrity each step; return tokens per request and choice."""
    tokens: dict[str, dict[int, list[int]]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return tokens
        for out in engine.step():
            for completion in out.outputs:
                tokens.setdefault(out.request_id, {}).setdefault(completion.index, []).extend(
                    completion.new_token_ids
                )
        engine.scheduler.allocator.check_integrity()
    raise AssertionError("engine did not finish")


def random_prompts(count: int, seed: int, max_len: int = 40) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {f"r{i}": [rng.randrange(VOCAB) for _ in range(rng.randrange(1, max_len))] for i in range(count)}


def test_outputs_match_the_reference_model() -> None:
    engine, _ = make_engine()
    prompts = random_prompts(12, seed=1)
    params = SamplingParams(max_tokens=10)
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params)
    got = run_to_end(engine)
    for rid, prompt in prompts.items():
        assert got[rid][0] == reference_tokens(prompt, params, VOCAB)
    assert engine.scheduler.allocator.usage == 0.0


def test_chunked_prefill_keeps_decodes_flowing() -> None:
    engine, runner = make_engine(max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=12)
    engine.add_request("short", [5, 6, 7], params)
    engine.step()  # "short" prefilled, now decoding
    engine.add_request("long", list(range(1, 41)), params)
    short, long = engine.scheduler.requests["short"], engine.scheduler.requests["long"]
    plans = []
    while engine.scheduler.requests["long"].num_output_tokens == 0:
        plan = engine.scheduler.schedule()
        plans.append({s.request.request_id: s.num_tokens for s in plan.scheduled})
        engine.scheduler.update(plan, runner.execute(plan))
    # the decode row does not eat into the prompt's budget: 40 tokens in chunks of 8
    assert [plan["long"] for plan in plans] == [8, 8, 8, 8, 8]
    for plan in plans:
        assert plan.get("short") == 1  # one decode token every step, never starved
    run_to_end(engine)
    assert short.output_token_ids == reference_tokens([5, 6, 7], params, VOCAB)
    assert long.output_token_ids == reference_tokens(list(range(1, 41)), params, VOCAB)


def test_every_decoding_stream_runs_each_step_whatever_the_budget() -> None:
    """The budget bounds prompt tokens; each decoding stream adds its one row, so a budget smaller than the
    number of streams starves none of them, and a prompt still gets its chunk beside them."""
    engine, runner = make_engine(max_num_batched_tokens=4)
    params = SamplingParams(max_tokens=10)
    for i in range(6):
        engine.add_request(f"s{i}", [5 + i, 6, 7], params)
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()
    engine.add_request("prompt", list(range(1, 13)), params)
    requests = dict(engine.scheduler.requests)
    plan = engine.scheduler.schedule()
    got = {s.request.request_id: s.num_tokens for s in plan.scheduled}
    assert got == {**{f"s{i}": 1 for i in range(6)}, "prompt": 4}
    engine.scheduler.update(plan, runner.execute(plan))
    run_to_end(engine)
    for i in range(6):
        assert requests[f"s{i}"].output_token_ids == reference_tokens([5 + i, 6, 7], params, VOCAB)
    assert requests["prompt"].output_token_ids == reference_tokens(list(range(1, 13)), params, VOCAB)
    assert engine.scheduler.allocator.usage == 0.0


def test_a_prompt_alone_takes_the_idle_budget_but_not_while_a_stream_decodes() -> None:
    """With nothing generating, a long prompt is prefilled in steps of the idle budget (its first token
    sooner); once a stream is decoding, steps are back to max_num_batched_tokens (its stalls bounded)."""
    engine, runner = make_engine(max_num_batched_tokens=8, idle_batched_tokens=32)
    params = SamplingParams(max_tokens=12)
    engine.add_request("first", list(range(1, 41)), params)
    sizes = []
    while engine.scheduler.requests["first"].num_output_tokens == 0:
        plan = engine.scheduler.schedule()
        sizes.append(sum(s.num_tokens for s in plan.scheduled))
        engine.scheduler.update(plan, runner.execute(plan))
    assert sizes == [32, 8]
    engine.add_request("second", list(range(50, 90)), params)
    while engine.scheduler.requests["second"].num_output_tokens == 0:
        plan = engine.scheduler.schedule()
        # "first" is streaming: its one row, and at most the budget of prompt tokens
        assert sum(s.num_tokens for s in plan.scheduled if s.request.request_id != "first") <= 8
        engine.scheduler.update(plan, runner.execute(plan))
    first, second = engine.scheduler.requests["first"], engine.scheduler.requests["second"]
    run_to_end(engine)
    assert first.output_token_ids == reference_tokens(list(range(1, 41)), params, VOCAB)
    assert second.output_token_ids == reference_tokens(list(range(50, 90)), params, VOCAB)


def test_long_prefill_threshold_caps_chunks() -> None:
    engine, _ = make_engine(max_num_batched_tokens=64, long_prefill_token_threshold=10)
    engine.add_request("a", list(range(30)), SamplingParams(max_tokens=2))
    engine.add_request("b", list(range(30, 60)), SamplingParams(max_tokens=2))
    plan = engine.scheduler.schedule()
    assert [s.num_tokens for s in plan.scheduled] == [10, 10]


def test_max_num_seqs_respected() -> None:
    engine, runner = make_engine(max_num_seqs=3)
    for rid, prompt in random_prompts(10, seed=2).items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=5))
    run_to_end(engine)
    assert max(runner.batch_sizes) == 3


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_with_small_pool_gives_same_outputs(prefix_caching: bool) -> None:
    prompts = random_prompts(10, seed=3, max_len=30)
    params = SamplingParams(max_tokens=24)
    results = {}
    for num_blocks in (256, 16):
        engine, _ = make_engine(num_blocks=num_blocks, max_model_len=64, enable_prefix_caching=prefix_caching)
        for rid, prompt in prompts.items():
            engine.add_request(rid, prompt, params)
        results[num_blocks] = run_to_end(engine)
        if num_blocks == 16:
            assert engine.scheduler.num_preemptions > 0
            assert engine.scheduler.allocator.usage == 0.0
    assert results[16] == results[256]


def test_preempted_request_goes_back_to_the_front() -> None:
    engine, runner = make_engine(num_blocks=8, max_model_len=32, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    engine.add_request("old", list(range(1, 9)), params)  # 2 blocks each, growing to 8
    engine.add_request("new", list(range(11, 19)), params)
    preempted = []
    while not preempted:
        plan = engine.scheduler.schedule()
        preempted = plan.preempted
        engine.scheduler.update(plan, runner.execute(plan) if plan.scheduled else {})
    assert [r.request_id for r in preempted] == ["new"]
    victim = preempted[0]
    assert victim.status == RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
    assert victim.block_ids == [] and victim.num_output_tokens > 0  # outputs kept, recomputed later
    assert engine.scheduler.waiting[0] is victim
    engine.scheduler.allocator.check_integrity()


def test_n_children_share_the_prompt_blocks() -> None:
    engine, _ = make_engine()
    prompt = list(range(100, 122))  # 22 tokens: 5 full blocks of 4
    engine.add_request("p", prompt, SamplingParams(n=3, max_tokens=6))
    sched = engine.scheduler
    leader = sched.requests["p#0"]
    first = engine.step()
    assert leader.status == RequestStatus.RUNNING
    assert sched.requests["p#1"].status == RequestStatus.WAITING  # held until the prompt is cached
    second = engine.step()
    siblings = [sched.requests["p#1"], sched.requests["p#2"]]
    for sib in siblings:
        assert sib.block_ids[:5] == leader.block_ids[:5]
        assert sib.num_cached_tokens == 20
    assert all(sched.allocator._ref[b] == 3 for b in leader.block_ids[:5])
    sched.allocator.check_integrity()
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for out in first + second:
        for c in out.outputs:
            got[c.index] += c.new_token_ids
    for index, tokens in run_to_end(engine)["p"].items():
        got[index] += tokens
    expected = reference_tokens(prompt, SamplingParams(max_tokens=6), VOCAB)
    assert got == {0: expected, 1: expected, 2: expected}


def test_n_children_fan_out_ids_and_seeds() -> None:
    engine, _ = make_engine()
    engine.add_request("p", [1, 2, 3], SamplingParams(n=2, seed=7))
    children = [engine.scheduler.requests[f"p#{i}"] for i in range(2)]
    assert [(c.parent_id, c.index, c.params.seed, c.params.n) for c in children] == [
        ("p", 0, 7, 1),
        ("p", 1, 8, 1),
    ]


def test_abort_frees_blocks_at_once() -> None:
    engine, runner = make_engine()
    engine.add_request("a", list(range(20)), SamplingParams(max_tokens=50))
    engine.add_request("b", list(range(20, 30)), SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    used = engine.scheduler.allocator.num_free_blocks
    out = engine.abort_request("a")
    assert out is not None and out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.scheduler.allocator.num_free_blocks > used
    assert "a" not in engine.scheduler.requests
    engine.scheduler.allocator.check_integrity()
    engine.step()
    assert "a" in runner.finished_ids  # the runner is told so it can drop per-request state
    assert engine.abort_request("a") is None


def test_stop_on_eos_stop_token_and_min_tokens() -> None:
    prompt = [3, 1, 4, 1, 5]
    free_run = reference_tokens(prompt, SamplingParams(max_tokens=20), VOCAB)
    eos = free_run[3]
    engine, _ = make_engine(eos_token_id=eos)
    engine.add_request("eos", prompt, SamplingParams(max_tokens=20))
    engine.add_request("ignore", prompt, SamplingParams(max_tokens=20, ignore_eos=True))
    engine.add_request(
        "stop", prompt, SamplingParams(max_tokens=20, stop_token_ids=[free_run[1]], ignore_eos=True)
    )
    engine.add_request("min", prompt, SamplingParams(max_tokens=20, min_tokens=5))
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0]
    assert free_run.index(eos) == 3 and free_run.count(eos) == 1  # the scenario is what it claims
    assert finals["eos"].finish_reason == "stop" and finals["eos"].stop_token_id is None
    assert finals["ignore"].finish_reason == "length"
    assert finals["stop"].finish_reason == "stop" and finals["stop"].stop_token_id == free_run[1]
    assert finals["min"].finish_reason == "length"  # EOS came before min_tokens, so it did not stop


def test_stops_at_max_model_len() -> None:
    engine, _ = make_engine(max_model_len=12)
    engine.add_request("a", list(range(10)), SamplingParams(max_tokens=None))
    got = run_to_end(engine)
    assert len(got["a"][0]) == 2
    with pytest.raises(ValueError, match="1 to 12"):
        engine.add_request("b", list(range(13)), SamplingParams())


def test_logprobs_and_chunked_prompt_logprobs() -> None:
    engine, _ = make_engine(max_num_batched_tokens=7)
    prompt = list(range(50, 73))  # 23 tokens over 4 chunks
    engine.add_request("a", prompt, SamplingParams(max_tokens=3, logprobs=2, prompt_logprobs=1))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    first = outs[0]
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == len(prompt)
    assert first.prompt_logprobs[0] is None
    assert [lp.token_id for lp in first.prompt_logprobs[1:]] == prompt[1:]  # type: ignore[union-attr]
    assert all(out.prompt_logprobs is None for out in outs[1:])
    assert first.num_cached_tokens == 0
    tokens = [c.new_token_ids[0] for out in outs for c in out.outputs]
    lps = [c.logprobs[0] for out in outs for c in out.outputs]  # type: ignore[index]
    assert [lp.token_id for lp in lps] == tokens and all(len(lp.top) == 2 for lp in lps)


def test_prefix_cache_reports_cached_tokens() -> None:
    engine, _ = make_engine()
    prompt = list(range(200, 217))  # 17 tokens: 4 full blocks
    engine.add_request("a", prompt, SamplingParams(max_tokens=2))
    run_to_end(engine)
    engine.add_request("b", prompt, SamplingParams(max_tokens=2))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[0].num_cached_tokens == 16
    stats = engine.stats()
    assert stats.prefix_cache_hits == 16 and stats.prefix_cache_queries == 34
    assert stats.num_finished == {"length": 2}


def test_fake_model_depends_on_every_position() -> None:
    # Guards the other tests: a wrong KV slot anywhere must change the next token.
    base = [5, 9, 2, 7]
    assert all(
        next_token(base, VOCAB) != next_token(base[:i] + [base[i] + 1] + base[i + 1 :], VOCAB)
        for i in range(4)
    )


def test_config_rejects_a_pool_smaller_than_one_sequence() -> None:
    with pytest.raises(ValueError, match="smaller than max_model_len"):
        Scheduler(SchedulerConfig(max_model_len=100, block_size=4, num_blocks=10))


def test_one_request_cannot_hold_every_running_slot() -> None:
    """n = 6 with a cap of 2 slots per request: the big request runs two choices at a time, and a
    request that arrives after it is admitted at once instead of waiting behind it."""
    engine, _ = make_engine(max_num_seqs=4, max_seqs_per_request=2, enable_prefix_caching=False)
    params = SamplingParams(n=6, max_tokens=20, ignore_eos=True)
    engine.add_request("big", [1, 2, 3], params)
    engine.add_request("small", [4, 5], SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    running = [r.request_id for r in engine.scheduler.running]
    assert sum(rid.startswith("big#") for rid in running) == 2 and "small" in running
    most = 0
    while engine.has_unfinished():
        engine.step()
        most = max(most, sum(r.request_id.startswith("big#") for r in engine.scheduler.running))
    assert most == 2
    assert engine.stats().num_finished == {"length": 7}
