"""AsyncEngine: concurrent streams, early exit, queue limit, engine death, shutdown."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

import pytest

from server.engine.client import ThreadCore
from server.engine.core import EngineCore
from server.engine.engine import (
    AsyncEngine,
    EngineConfig,
    EngineDeadError,
    QueueFullError,
    SupervisorConfig,
    merge_outputs,
)
from server.engine.messages import CoreDead
from server.engine.request import CompletionOutput, RequestOutput, SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.fake_runner import FakeRunner, reference_tokens

VOCAB = 1000
pytestmark = pytest.mark.timeout(30)


def fake_core(
    step_delay: float = 0.0, fail_at_step: int | None = None, max_waiting: int = 256, **sched: object
) -> EngineCore:
    fields: dict = dict(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=4, num_blocks=128
    )
    fields.update(sched)
    config = EngineConfig(SchedulerConfig(**fields), max_waiting=max_waiting)
    runner = FakeRunner(
        config.scheduler.num_blocks, config.scheduler.block_size, VOCAB, step_delay, fail_at_step
    )
    return EngineCore(runner, Scheduler(config.scheduler), config)


async def make_async(
    step_delay: float = 0.0,
    fail_at_step: int | None = None,
    max_waiting: int = 256,
    supervisor: SupervisorConfig | None = None,
    on_fatal: Callable[[str], None] | None = None,
    **sched: object,
) -> AsyncEngine:
    """An AsyncEngine whose core (fake runner) runs on a thread; a restart builds a fresh one."""
    build = functools.partial(fake_core, step_delay, fail_at_step, max_waiting, **sched)
    engine = AsyncEngine.in_thread(build, config=supervisor, on_fatal=on_fatal)
    await engine.start()
    return engine


def core_of(engine: AsyncEngine) -> EngineCore:
    handle = engine._core
    assert isinstance(handle, ThreadCore)
    return handle.core


async def collect(
    engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams
) -> list[RequestOutput]:
    return [out async for out in engine.generate(rid, prompt, params)]


def tokens_of(outputs: list[RequestOutput], index: int = 0) -> list[int]:
    return [t for out in outputs for c in out.outputs if c.index == index for t in c.new_token_ids]


async def wait_until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def idle(engine: AsyncEngine) -> bool:
    core = core_of(engine)
    return not core.has_unfinished() and core.scheduler.allocator.usage == 0.0


async def test_many_concurrent_streams_get_their_own_tokens() -> None:
    engine = await make_async()
    prompts = {f"r{i}": [i + 1, 2 * i + 3, 7] * (1 + i % 4) for i in range(40)}
    params = SamplingParams(max_tokens=12)
    results = await asyncio.gather(*(collect(engine, rid, p, params) for rid, p in prompts.items()))
    for (_rid, prompt), outputs in zip(prompts.items(), results, strict=True):
        assert tokens_of(outputs) == reference_tokens(prompt, params, VOCAB)
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
        assert all(not out.finished for out in outputs[:-1])
    stats = engine.stats()
    assert stats.num_finished == {"length": 40} and stats.num_generation_tokens == 40 * 12
    core_of(engine).scheduler.allocator.check_integrity()
    await engine.shutdown()


async def test_n_choices_stream_under_one_id() -> None:
    engine = await make_async()
    outputs = await collect(engine, "multi", [4, 5, 6, 7, 8, 9], SamplingParams(n=3, max_tokens=5))
    expected = reference_tokens([4, 5, 6, 7, 8, 9], SamplingParams(max_tokens=5), VOCAB)
    assert all(out.request_id == "multi" for out in outputs)
    assert [tokens_of(outputs, i) for i in range(3)] == [expected] * 3
    assert outputs[-1].finished
    await engine.shutdown()


async def test_slow_consumer_gets_merged_deltas() -> None:
    engine = await make_async(step_delay=0.002)
    params = SamplingParams(max_tokens=30, logprobs=0)
    seen = []
    async for out in engine.generate("slow", [1, 2, 3], params):
        seen.append(out)
        if len(seen) == 1:
            await asyncio.sleep(0.2)  # the engine runs ahead meanwhile
    assert len(seen) < 30
    assert tokens_of(seen) == reference_tokens([1, 2, 3], params, VOCAB)
    merged_logprobs = [lp.token_id for out in seen for c in out.outputs for lp in c.logprobs or []]
    assert merged_logprobs == tokens_of(seen)
    await engine.shutdown()


async def test_consumer_leaving_early_aborts_the_request() -> None:
    engine = await make_async(step_delay=0.002)
    async for out in engine.generate(
        "quitter", [1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True)
    ):
        assert not out.finished
        break
    await wait_until(lambda: idle(engine))  # aborted and its blocks freed, far before 10k tokens
    assert engine.stats().num_finished == {"abort": 1}
    await engine.shutdown()


async def test_cancelled_consumer_aborts_the_request() -> None:
    engine = await make_async(step_delay=0.002)
    task = asyncio.create_task(collect(engine, "cancelled", [1, 2], SamplingParams(max_tokens=10_000)))
    await wait_until(lambda: core_of(engine).scheduler.num_running == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: idle(engine))
    assert engine.stats().num_finished == {"abort": 1}
    await engine.shutdown()


async def test_dropping_a_finished_stream_does_not_abort_a_reused_id() -> None:
    engine = await make_async()
    stream = engine.generate("same", [1, 2], SamplingParams(max_tokens=3))
    # Finished in the engine and its final output sent; the consumer never read it.
    await wait_until(lambda: idle(engine) and "same" not in engine._streams)
    params = SamplingParams(max_tokens=5)
    second = engine.generate("same", [1, 2], params)
    del stream  # its finalizer runs now, after the id was reused
    outputs = [out async for out in second]
    assert outputs[-1].outputs[0].finish_reason == "length"
    assert tokens_of(outputs) == reference_tokens([1, 2], params, VOCAB)
    await engine.shutdown()


async def test_abort_ends_the_stream_with_abort() -> None:
    engine = await make_async(step_delay=0.002)
    stream = engine.generate("a", [1, 2], SamplingParams(max_tokens=10_000))
    first = await stream.__anext__()
    engine.abort("a")
    rest = [out async for out in stream]
    assert rest[-1].finished and rest[-1].outputs[-1].finish_reason == "abort"
    assert not first.finished
    await wait_until(lambda: idle(engine))
    await engine.shutdown()


async def test_queue_full_is_raised_before_queueing() -> None:
    engine = await make_async(step_delay=0.01, max_waiting=2, max_num_seqs=1)
    params = SamplingParams(max_tokens=200)
    running = engine.generate("running", [1], params)
    await running.__anext__()  # admitted: the queue is empty again
    waiting = [engine.generate(f"w{i}", [1], params) for i in range(2)]
    with pytest.raises(QueueFullError):
        engine.generate("one-too-many", [1], params)
    assert engine.stats().num_waiting == 2
    await engine.shutdown(graceful=False)
    for stream in [running, *waiting]:
        outs = [out async for out in stream]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"


async def test_a_burst_at_an_idle_engine_fills_the_batch_and_the_queue() -> None:
    """--max-waiting bounds the requests that wait: a burst takes the batch's free places too."""
    engine = await make_async(step_delay=0.01, max_waiting=2, max_num_seqs=3)
    params = SamplingParams(max_tokens=200)
    streams = [engine.generate(f"r{i}", [1], params) for i in range(5)]  # 3 start at once, 2 wait
    with pytest.raises(QueueFullError):
        engine.generate("one-too-many", [1], params)
    await engine.shutdown(graceful=False)
    for stream in streams:
        assert [out async for out in stream][-1].finished


async def test_bad_prompt_is_refused_at_once() -> None:
    engine = await make_async(max_model_len=16, num_blocks=8)
    with pytest.raises(ValueError, match="1 to 16"):
        engine.generate("long", list(range(17)), SamplingParams())
    with pytest.raises(ValueError):
        engine.generate("empty", [], SamplingParams())
    assert engine.is_healthy
    await engine.shutdown()


async def test_runner_failure_errors_every_stream_then_the_core_restarts() -> None:
    engine = await make_async(step_delay=0.002, fail_at_step=5, max_num_seqs=2)
    params = SamplingParams(max_tokens=1000)
    started = time.monotonic()
    results = await asyncio.gather(*(collect(engine, f"r{i}", [i + 1, 5], params) for i in range(4)))
    assert time.monotonic() - started < 2.0
    for outputs in results:  # running and waiting alike
        last = outputs[-1]
        assert last.finished and last.error and "fake runner failure" in last.error
        assert last.outputs[0].finish_reason == "error"
        assert last.error_status == 503  # a 503 to the client: retried, as any request during the restart
    await wait_until(lambda: engine.is_healthy)  # a fresh core, a fresh fake runner
    assert engine.stats().num_engine_restarts == 1
    short = SamplingParams(max_tokens=3)
    assert tokens_of(await collect(engine, "after", [1, 2], short)) == reference_tokens([1, 2], short, VOCAB)
    await engine.shutdown()


async def test_a_dead_core_leaves_the_gauges_at_once() -> None:
    engine = await make_async(step_delay=0.01)
    params = SamplingParams(max_tokens=10_000)
    tasks = [asyncio.create_task(collect(engine, f"r{i}", [i + 1, 9], params)) for i in range(3)]
    await wait_until(lambda: engine.stats().num_running == 3)
    engine._handle(CoreDead("killed"))
    stats = engine.stats()  # before the restart's new core reports
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    for task in tasks:
        assert (await task)[-1].error
    await engine.shutdown()


async def test_too_many_core_failures_give_up_and_call_on_fatal() -> None:
    fatal: list[str] = []
    supervisor = SupervisorConfig(max_restarts=1, restart_window=60.0)
    engine = await make_async(fail_at_step=1, supervisor=supervisor, on_fatal=fatal.append)
    params = SamplingParams(max_tokens=50)
    first = await collect(engine, "a", [1, 2], params)
    assert first[-1].error
    await wait_until(lambda: engine.is_healthy)
    second = await collect(engine, "b", [1, 2], params)
    assert second[-1].error
    await wait_until(lambda: bool(fatal))
    assert "2 engine failures" in fatal[0] and not engine.is_healthy
    with pytest.raises(EngineDeadError):
        engine.generate("late", [1], params)
    await engine.shutdown()


async def test_a_hung_step_on_a_thread_is_fatal() -> None:
    fatal: list[str] = []
    supervisor = SupervisorConfig(step_timeout=0.3)
    engine = await make_async(step_delay=5.0, supervisor=supervisor, on_fatal=fatal.append)
    stream = engine.generate("slow", [1, 2], SamplingParams(max_tokens=2))
    outputs = [out async for out in stream]
    assert outputs[-1].error and "step-timeout" in outputs[-1].error
    assert fatal and not engine.is_healthy  # a thread cannot be stopped: the server must exit


async def test_graceful_shutdown_finishes_in_flight_requests() -> None:
    engine = await make_async(step_delay=0.002)
    params = SamplingParams(max_tokens=20)
    prompts = {f"r{i}": [i + 1, 9] for i in range(5)}
    tasks = [asyncio.create_task(collect(engine, rid, p, params)) for rid, p in prompts.items()]
    await wait_until(lambda: core_of(engine).scheduler.num_running == 5)
    core = core_of(engine)
    await engine.shutdown(graceful=True)
    with pytest.raises(EngineDeadError, match="shut down"):
        engine.generate("late", [1], params)
    for (_rid, prompt), task in zip(prompts.items(), tasks, strict=True):
        outputs = await task
        assert tokens_of(outputs) == reference_tokens(prompt, params, VOCAB)
        assert outputs[-1].outputs[0].finish_reason == "length"
    assert not core.has_unfinished() and core.scheduler.allocator.usage == 0.0
    assert not engine.is_healthy and not engine.stats().healthy  # stopped: /health answers 503


async def test_a_drain_ends_what_still_runs_at_its_deadline_and_restarts_nothing() -> None:
    engine = await make_async(step_delay=0.01)
    params = SamplingParams(max_tokens=10_000)
    tasks = [asyncio.create_task(collect(engine, f"r{i}", [i + 1, 9], params)) for i in range(3)]
    await wait_until(lambda: core_of(engine).scheduler.num_running == 3)
    core = core_of(engine)
    engine.drain(0.2)
    # one the server accepted before the signal and was still preparing: taken until the deadline
    tasks.append(asyncio.create_task(collect(engine, "prepared", [7, 9], params)))
    for task in tasks:
        last = (await task)[-1]
        assert last.finished and last.error_status == 503 and "shutting down" in (last.error or "")
    with pytest.raises(EngineDeadError, match="shutting down"):  # none after it
        engine.generate("late", [1], params)
    await wait_until(lambda: not core.has_unfinished() and core.scheduler.allocator.usage == 0.0)
    # a core that dies during the drain is not restarted: the server is going down
    engine._handle(CoreDead("killed"))
    await asyncio.sleep(0.05)
    assert engine.stats().num_engine_restarts == 0 and engine.state == "dead"
    assert engine.died_draining == "killed"  # the server exits 1 for it
    await engine.shutdown()


async def test_a_shutdown_during_a_restart_closes_the_core_being_built() -> None:
    built: list[ThreadCore] = []
    engine = await make_async()
    factory = engine._factory

    def slow_factory(on_message):  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        core = factory(on_message)
        built.append(core)
        return core

    engine._factory = slow_factory
    engine._handle(CoreDead("killed"))  # a restart begins
    await asyncio.sleep(0.05)
    await engine.shutdown()
    assert len(built) == 1 and not built[0].alive()  # built after the shutdown began, and closed


async def test_idle_engine_thread_waits_without_spinning() -> None:
    engine = await make_async()
    await collect(engine, "one", [1, 2], SamplingParams(max_tokens=2))
    steps = engine.stats().num_steps
    await asyncio.sleep(0.2)
    assert engine.stats().num_steps == steps  # no steps while idle
    await collect(engine, "two", [1, 2], SamplingParams(max_tokens=2))  # wakes up again
    await engine.shutdown()


def test_merge_outputs_concatenates_deltas() -> None:
    a = RequestOutput("x", [CompletionOutput(0, [1, 2]), CompletionOutput(1, [7])], False, 3)
    b = RequestOutput("x", [CompletionOutput(1, [8], finish_reason="stop", stop_token_id=8)], False, 3)
    c = RequestOutput("x", [CompletionOutput(0, [3], finish_reason="length")], True, 3)
    merged = merge_outputs(merge_outputs(a, b), c)
    assert [(o.index, o.new_token_ids, o.finish_reason) for o in merged.outputs] == [
        (0, [1, 2, 3], "length"),
        (1, [7, 8], "stop"),
    ]
    assert merged.finished and merged.outputs[1].stop_token_id == 8
    assert a.outputs[0].new_token_ids == [1, 2]  # inputs untouched


async def test_queue_time_comes_once_on_the_first_output() -> None:
    engine = await make_async(step_delay=0.005, max_num_seqs=1)
    params = SamplingParams(max_tokens=10)
    first, second = await asyncio.gather(
        collect(engine, "first", [1, 2], params), collect(engine, "second", [3, 4], params)
    )
    for outputs in (first, second):
        times = [out.queue_time for out in outputs if out.queue_time is not None]
        assert len(times) == 1 and outputs[0].queue_time == times[0] >= 0.0
    # One sequence at a time: the second waited for the first's ten steps.
    assert second[0].queue_time is not None and first[0].queue_time is not None
    assert second[0].queue_time >= first[0].queue_time + 9 * 0.005
    merged = merge_outputs(first[0], first[1])
    assert merged.queue_time == first[0].queue_time
    await engine.shutdown()


async def test_aborting_one_choice_lets_the_others_finish() -> None:
    engine = await make_async(step_delay=0.002)
    params = SamplingParams(n=3, max_tokens=40)
    stream = engine.generate("multi", [4, 5, 6], params)
    outputs = [await stream.__anext__()]
    engine.abort("multi", index=1)
    outputs += [out async for out in stream]
    finals = {c.index: c.finish_reason for out in outputs for c in out.outputs if c.finish_reason}
    assert finals == {0: "length", 1: "abort", 2: "length"}
    expected = reference_tokens([4, 5, 6], SamplingParams(max_tokens=40), VOCAB)
    assert tokens_of(outputs, 0) == tokens_of(outputs, 2) == expected
    assert len(tokens_of(outputs, 1)) < 10  # stopped within a step or two, not run to the end
    assert engine.stats().num_finished == {"abort": 1, "length": 2}
    await wait_until(lambda: idle(engine))
    core_of(engine).scheduler.allocator.check_integrity()
    engine.abort("multi", index=0)  # finished: ignored
    await engine.shutdown()


@pytest.mark.parametrize(
    ("prompt", "params", "words"),
    [
        ([1, VOCAB], SamplingParams(), "vocabulary"),
        ([-1, 2], SamplingParams(), "vocabulary"),
        ([1], SamplingParams(temperature=float("nan")), "temperature"),
        ([1], SamplingParams(top_k=-5), "top_k"),
        ([1], SamplingParams(logit_bias={VOCAB: 1.0}), "logit_bias"),
        ([1], SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
        ([1], SamplingParams(seed=2**63), "seed"),
        ([1], SamplingParams(n=1000), "n="),
    ],
)
async def test_bad_params_are_refused_before_the_loop(
    prompt: list[int], params: SamplingParams, words: str
) -> None:
    engine = await make_async()
    with pytest.raises(ValueError, match=words):
        engine.generate("bad", prompt, params)
    assert engine.is_healthy and not core_of(engine).has_unfinished()
    await engine.shutdown()


# ---- the real runner on a tiny model: no user input may crash the loop -------------------------------

TINY_VOCAB, TINY_LEN = 256, 32
EXTREME_PARAMS = [
    SamplingParams(n=8, max_tokens=1),
    SamplingParams(max_tokens=None, min_tokens=TINY_LEN, ignore_eos=True),  # runs to the context limit
    SamplingParams(max_tokens=10**9, temperature=2.0),
    SamplingParams(temperature=1e-9, top_p=1e-9, min_p=1.0),
    SamplingParams(temperature=0.0, logprobs=20, prompt_logprobs=20),
    SamplingParams(logprobs=0, prompt_logprobs=0, n=2),
    SamplingParams(top_k=0), SamplingParams(top_k=1), SamplingParams(top_k=TINY_VOCAB - 1),
    SamplingParams(top_k=TINY_VOCAB), SamplingParams(top_k=10**12),
    SamplingParams(repetition_penalty=0.01, presence_penalty=2.0, frequency_penalty=-2.0),
    SamplingParams(repetition_penalty=2.0, presence_penalty=-2.0, frequency_penalty=2.0),
    SamplingParams(logit_bias={0: 100.0, TINY_VOCAB - 1: -100.0}),
    SamplingParams(logit_bias={t: -100.0 for t in range(TINY_VOCAB)}),
    SamplingParams(seed=2**63 - 1, n=3), SamplingParams(seed=-(2**63), n=3), SamplingParams(seed=0),
    SamplingParams(stop_token_ids=list(range(TINY_VOCAB)), min_tokens=0),
    SamplingParams(stop_token_ids=list(range(2, TINY_VOCAB)), min_tokens=3),  # only 0 is left
    SamplingParams(stop_token_ids=[0, TINY_VOCAB - 1], ignore_eos=True, min_tokens=16, max_tokens=16),
]  # fmt: skip
EXTREME_PROMPTS = [[TINY_VOCAB - 1] * TINY_LEN, [0], list(range(TINY_VOCAB))[: TINY_LEN - 1]]


@pytest.fixture(scope="module")
def tiny_runner_core() -> EngineCore:
    import torch

    from model.config import SmolLM2Config
    from model.modeling import SmolLM2ForCausalLM
    from server.engine.runner import ModelRunner

    torch.manual_seed(0)
    config = SmolLM2Config(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=TINY_LEN, eos_token_id=1,
    )  # fmt: skip
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=128, max_model_len=TINY_LEN,
                            block_size=8, num_blocks=24, eos_token_id=1)  # fmt: skip
    runner = ModelRunner(
        SmolLM2ForCausalLM(config).eval(), sched.num_blocks, sched.block_size, eos_token_id=1
    )
    return EngineCore(runner, Scheduler(sched), EngineConfig(sched))


@pytest.mark.slow
async def test_extreme_params_on_the_real_runner_keep_the_engine_healthy(
    tiny_runner_core: EngineCore,
) -> None:
    """Every SamplingParams field at the edges of what validation accepts, all in one batch (with
    preemptions, as the pool is small), plus what it refuses: the loop must survive them all."""
    engine = AsyncEngine.in_thread(lambda: tiny_runner_core)
    await engine.start()
    for bad in (SamplingParams(top_k=-2), SamplingParams(temperature=-1.0), SamplingParams(n=0)):
        with pytest.raises(ValueError):
            engine.generate("bad", [1], bad)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate("bad", [TINY_VOCAB], SamplingParams())
    every_token = list(range(2, TINY_VOCAB))  # with EOS (1) and 0 below: every token banned
    with pytest.raises(ValueError, match="every token"):
        engine.generate("bad", [1], SamplingParams(stop_token_ids=[0, *every_token], min_tokens=1))
    runs = [
        collect(engine, f"x{i}-{j}", prompt, params)
        for i, params in enumerate(EXTREME_PARAMS)
        for j, prompt in enumerate(EXTREME_PROMPTS)
    ]
    results = await asyncio.gather(*runs)
    for outputs in results:
        assert outputs[-1].finished and outputs[-1].error is None
        reasons = {c.finish_reason for out in outputs for c in out.outputs if c.finish_reason}
        assert reasons <= {"stop", "length"}, reasons
        assert all(0 <= t < TINY_VOCAB for out in outputs for c in out.outputs for t in c.new_token_ids)
    assert engine.is_healthy and engine.stats().num_engine_restarts == 0
    tiny_runner_core.scheduler.allocator.check_integrity()
    await engine.shutdown()


def test_idle_core_returns_freed_heap_once_after_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a burst the core hands its freed heap back to the OS once it has been idle a moment (so
    RSS does not stay at the burst's high-water mark), and not while requests are running."""
    import queue
    import threading

    from server.engine import core as core_module
    from server.engine.messages import AddRequests, CoreRequest, Shutdown, StepOutputs

    trims: list[bool] = []
    monkeypatch.setattr(core_module, "IDLE_TRIM_AFTER_S", 0.2)
    core = fake_core(step_delay=0.01)
    monkeypatch.setattr(core_module, "trim_heap", lambda: trims.append(core.has_unfinished()))
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    outputs: list[StepOutputs] = []
    loop = threading.Thread(target=core_module.run_core_loop, args=(core, inbox, outputs.append))
    loop.start()
    time.sleep(0.5)
    assert trims == []  # nothing was done yet: nothing to give back
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    inbox.put(AddRequests([CoreRequest("a", [1, 2, 3], params, time.monotonic())], seq=1))
    deadline = time.monotonic() + 10
    while not trims and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # still idle: no second trim
    inbox.put(Shutdown())
    loop.join(10)
    assert trims == [False]  # exactly once, and only when nothing was running
    assert sum(len(o.outputs) for o in outputs) >= 20
