"""A structured request's grammar is prepared off the step: the other sequences go on decoding meanwhile.

A grammar can take seconds to compile (`"pattern": "a{10000}"` takes ~9 s); the engine core compiles it
on a thread of its own (runner.prepare_grammar) and takes the request into the scheduler once it is
ready. These tests stand a gate in for the compile, so what they check does not depend on timing.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

import server.engine.core as core_module
from server.engine.core import EngineConfig, EngineCore
from server.engine.engine import AsyncEngine, SupervisorConfig
from server.engine.messages import CoreRequest
from server.engine.request import Request, SamplingParams, StructuredSpec
from server.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.fake_runner import FakeRunner, reference_tokens

VOCAB = 1000
pytestmark = pytest.mark.timeout(30)
SPEC = StructuredSpec("regex", "a{10000}")


class GatedRunner(FakeRunner):
    """FakeRunner whose grammar preparation waits for `gate` (or raises `fail`)."""

    def __init__(self, fail: Exception | None = None) -> None:
        super().__init__(128, 4, VOCAB)
        self.gate = threading.Event()
        self.started = threading.Event()  # a preparation has begun
        self.fail = fail
        self.prepared: list[str] = []

    def prepare_grammar(self, request: Request) -> None:
        self.started.set()
        assert self.gate.wait(20), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail
        self.prepared.append(request.request_id)


def make_core(runner: GatedRunner) -> EngineCore:
    sched = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=4, num_blocks=128
    )
    return EngineCore(runner, Scheduler(sched), EngineConfig(sched))


def request(rid: str, structured: bool, max_tokens: int = 6) -> CoreRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, structured=SPEC if structured else None)
    return CoreRequest(rid, [1, 2, 3], params, arrival_time=0.0)


def test_other_sequences_decode_while_a_grammar_is_prepared() -> None:
    runner = GatedRunner()
    core = make_core(runner)
    assert core.add(request("slow", structured=True)) is None
    assert core.add(request("plain", structured=False)) is None
    assert core.stats().num_waiting == 2  # both count against the queue bound
    tokens: dict[str, list[int]] = {"slow": [], "plain": []}
    while core.scheduler.has_unfinished():  # the plain request runs to its end; the gate stays shut
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
    assert tokens["plain"] == reference_tokens([1, 2, 3], request("p", False).params, VOCAB)
    assert tokens["slow"] == [] and core.has_unfinished() and not core.has_work()
    assert core.stats().num_waiting == 1
    runner.gate.set()
    while core.has_unfinished():
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
    assert runner.prepared == ["slow"]
    assert tokens["slow"] == reference_tokens([1, 2, 3], request("s", True).params, VOCAB)


def test_aborting_a_request_whose_grammar_is_in_the_making() -> None:
    runner = GatedRunner()
    core = make_core(runner)
    core.add(request("slow", structured=True))
    core.add(request("queued", structured=True))  # waits behind "slow" for the one grammar thread
    assert runner.started.wait(5)
    core.abort(["slow", "queued"])
    assert not core.has_unfinished() and core.stats().num_finished == {"abort": 2}
    runner.gate.set()
    assert core.step() == []  # nothing comes of them
    assert core._grammar_thread is not None
    core._grammar_thread.shutdown(wait=True)
    assert runner.prepared == ["slow"]  # the one under way ran out; the queued one never started


def test_a_grammar_that_fails_in_the_engine_fails_its_request_only() -> None:
    runner = GatedRunner(fail=RuntimeError("out of memory"))
    core = make_core(runner)
    core.add(request("bad", structured=True))
    core.add(request("plain", structured=False))
    runner.gate.set()
    outs = []
    while core.has_unfinished():
        outs += core.step()
    bad = [o for o in outs if o.request_id == "bad"]
    assert len(bad) == 1 and bad[0].finish_reason == "error" and "out of memory" in (bad[0].error or "")
    assert [o for o in outs if o.request_id == "plain"][-1].finish_reason == "length"


def test_duplicate_id_of_a_request_in_the_making_is_an_error_output() -> None:
    runner = GatedRunner()
    core = make_core(runner)
    assert core.add(request("x", structured=True)) is None
    out = core.add(request("x", structured=False))
    assert out is not None and out.finish_reason == "error"
    runner.gate.set()


async def test_the_loop_wakes_when_a_grammar_is_ready_and_streams_go_on_meanwhile() -> None:
    """Through the core loop (on a thread, as --engine-process false): with only a grammar in the making the
    loop waits on its inbox, not in a busy loop, and wakes when the grammar is ready."""
    runner = GatedRunner()
    engine = AsyncEngine.in_thread(lambda: make_core(runner))
    await engine.start()
    try:
        slow = asyncio.ensure_future(_tokens(engine, "slow", True))
        plain = await asyncio.wait_for(_tokens(engine, "plain", False, max_tokens=20), 10)
        assert len(plain) == 20 and not slow.done()
        runner.gate.set()
        assert len(await asyncio.wait_for(slow, 10)) == 6
    finally:
        runner.gate.set()
        await engine.shutdown()


async def _tokens(engine: AsyncEngine, rid: str, structured: bool, max_tokens: int = 6) -> list[int]:
    params = request(rid, structured, max_tokens).params
    out: list[int] = []
    async for o in engine.generate(rid, [1, 2, 3], params):
        out += [t for c in o.outputs for t in c.new_token_ids]
    return out


async def test_a_long_compile_is_not_taken_for_a_hung_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's watchdog restarts a core that finishes no step for --step-timeout while it has work;
    a core waiting only on a grammar says it is alive meanwhile (every HEARTBEAT_S, 1 s; 0.05 s here)."""
    monkeypatch.setattr(core_module, "HEARTBEAT_S", 0.05)
    runner = GatedRunner()
    fatal: list[str] = []
    engine = AsyncEngine.in_thread(
        lambda: make_core(runner), config=SupervisorConfig(step_timeout=0.3), on_fatal=fatal.append
    )
    await engine.start()
    try:
        slow = asyncio.ensure_future(_tokens(engine, "slow", True))
        await asyncio.sleep(1.0)  # several step timeouts, with nothing but the grammar to wait for
        assert not fatal and engine.is_healthy
        runner.gate.set()
        assert len(await asyncio.wait_for(slow, 10)) == 6
        assert not fatal and engine.stats().num_engine_restarts == 0
    finally:
        runner.gate.set()
        await engine.shutdown()
