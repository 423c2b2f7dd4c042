"""The engine core in its own process behind AsyncEngine: same outputs as in-process, aborts, queue
limit, large messages both ways at once, a failing, killed or hung core restarted, and no engine
process outliving the server."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.engine.client import CoreStartError, ProcessCore, spawn_core
from server.engine.core import EngineConfig, EngineCore
from server.engine.engine import AsyncEngine, EngineDeadError, QueueFullError, SupervisorConfig
from server.engine.request import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.fake_runner import FakeRunner, reference_tokens
from tests.engine.test_engine_async import collect, tokens_of

VOCAB = 1000
MAX_LEN = 256
HANG = VOCAB - 1  # a prompt holding this token hangs the fake runner's step
pytestmark = pytest.mark.timeout(120)


def build_fake(
    step_delay: float = 0.0,
    fail_at_step: int | None = None,
    max_waiting: int = 256,
    max_len: int = MAX_LEN,
    batched_tokens: int = 64,
) -> EngineCore:
    """Runs in the engine process (spawned: it must be importable)."""
    sched = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=batched_tokens, max_model_len=max_len, block_size=4,
        num_blocks=max(128, 8 * max_len // 4),
    )  # fmt: skip
    runner = FakeRunner(
        sched.num_blocks, sched.block_size, VOCAB, step_delay, fail_at_step, hang_on_token=HANG
    )
    return EngineCore(runner, Scheduler(sched), EngineConfig(sched, max_waiting=max_waiting))


def build_broken() -> EngineCore:
    raise FileNotFoundError("no such model: /nowhere.gguf")


async def start(*args: object, supervisor: SupervisorConfig | None = None, on_fatal=None) -> AsyncEngine:  # type: ignore[no-untyped-def]
    engine = AsyncEngine.in_process(build_fake, *args, config=supervisor, on_fatal=on_fatal)
    await engine.start()
    return engine


def pid_of(engine: AsyncEngine) -> int | None:
    """The engine process's pid; None while there is none (restarting)."""
    core = engine._core
    return core.pid if isinstance(core, ProcessCore) else None


def restarted(engine: AsyncEngine, old_pid: int | None) -> bool:
    pid = pid_of(engine)
    return engine.is_healthy and pid is not None and pid != old_pid


async def wait_until(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_outputs_equal_the_reference_and_the_process_stops() -> None:
    engine = await start()
    pid = pid_of(engine)
    assert pid is not None
    prompts = {f"r{i}": [i + 1, 2 * i + 3, 7] * (i + 1) for i in range(12)}
    params = {rid: SamplingParams(max_tokens=5 + i, temperature=0) for i, rid in enumerate(prompts)}
    results = await asyncio.gather(*(collect(engine, rid, prompts[rid], params[rid]) for rid in prompts))
    for rid, outputs in zip(prompts, results, strict=True):
        assert tokens_of(outputs) == reference_tokens(prompts[rid], params[rid], VOCAB)
        assert outputs[-1].finished and outputs[-1].outputs[-1].finish_reason == "length"
    await wait_until(lambda: engine.stats().num_finished == {"length": 12})
    stats = engine.stats()
    assert stats.num_running == 0 and stats.kv_cache_usage == 0.0
    assert stats.num_generation_tokens == sum(p.max_tokens for p in params.values())  # type: ignore[misc]
    await engine.shutdown()
    assert not _running(pid) and not engine.is_healthy


async def test_a_process_spawned_early_serves_the_first_start_and_a_restart_spawns_anew() -> None:
    """The server spawns its engine before importing the HTTP stack (`first`); the first start waits
    for that process, and a replacement after a death is a new one."""
    early = spawn_core(build_fake, ())
    engine = AsyncEngine.in_process(build_fake, first=early)
    await engine.start()
    try:
        assert pid_of(engine) == early.process.pid
        params = SamplingParams(max_tokens=4, temperature=0)
        outputs = await collect(engine, "a", [1, 2, 3], params)
        assert tokens_of(outputs) == reference_tokens([1, 2, 3], params, VOCAB)
        os.kill(early.process.pid, signal.SIGKILL)
        await wait_until(lambda: restarted(engine, early.process.pid))
    finally:
        await engine.shutdown()


async def test_large_messages_both_ways_at_once_do_not_deadlock() -> None:
    """A ~MB step output (prompt logprobs, top-20, of long prompts) while ~MB of adds are sent: with a
    blocking send on each side, both ends waited for the other to read, for good."""
    engine = await start(0.0, None, 256, 4096, 4096)
    try:
        long_prompt = [(7 * i) % (VOCAB - 1) for i in range(3000)]
        lp = SamplingParams(max_tokens=2, prompt_logprobs=20, temperature=0)
        first = asyncio.create_task(collect(engine, "lp", long_prompt, lp))
        await asyncio.sleep(0)
        many = [
            collect(engine, f"add{i}", [(i + k) % (VOCAB - 1) for k in range(3000)], SamplingParams(max_tokens=1))
            for i in range(40)
        ]  # fmt: skip
        results = await asyncio.wait_for(asyncio.gather(first, *many), timeout=60)
        prompt_lps = [p for out in results[0] for p in (out.prompt_logprobs or [])]
        assert len(prompt_lps) == len(long_prompt) and prompt_lps[0] is None
        assert all(len(p.top) == 20 for p in prompt_lps[1:])  # type: ignore[union-attr]
        assert all(outs[-1].finished and outs[-1].error is None for outs in results)
    finally:
        await engine.shutdown()


async def test_a_bad_request_is_refused_in_the_server_process() -> None:
    engine = await start()
    try:
        with pytest.raises(ValueError, match="vocabulary"):
            engine.generate("bad", [VOCAB + 5], SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match="tokens"):
            engine.generate("long", [1] * (MAX_LEN + 1), SamplingParams(max_tokens=2))
        out = await collect(engine, "ok", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0))
        assert len(tokens_of(out)) == 3
    finally:
        await engine.shutdown()


async def test_abort_frees_the_request_in_the_engine_process() -> None:
    engine = await start(0.01)
    try:
        stream = engine.generate("long", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
        first = await stream.__anext__()
        assert first.outputs[0].new_token_ids
        await stream.aclose()  # the client left
        await wait_until(lambda: engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0.0)
        assert engine.stats().num_finished.get("abort") == 1
    finally:
        await engine.shutdown()


async def test_queue_limit_counts_requests_sent_to_the_process() -> None:
    engine = await start(0.05, None, 4)
    try:
        streams = [engine.generate(f"r{i}", [1, 2], SamplingParams(max_tokens=50)) for i in range(4)]
        with pytest.raises(QueueFullError):
            for i in range(4, 20):  # at most 8 run; the rest wait, and 4 may wait
                streams.append(engine.generate(f"r{i}", [1, 2], SamplingParams(max_tokens=50)))
        for stream in streams:
            await stream.aclose()
    finally:
        await engine.shutdown(graceful=False)


async def test_a_failing_step_ends_every_stream_with_an_error_then_the_core_restarts() -> None:
    engine = await start(0.002, 5)
    results = await asyncio.gather(
        *(collect(engine, f"r{i}", [i + 1, 5], SamplingParams(max_tokens=50)) for i in range(3))
    )
    for outputs in results:
        assert outputs[-1].finished and "fake runner failure" in (outputs[-1].error or "")
    await wait_until(lambda: engine.is_healthy)
    short = SamplingParams(max_tokens=3)
    assert tokens_of(await collect(engine, "after", [1, 2], short)) == reference_tokens([1, 2], short, VOCAB)
    await engine.shutdown()


async def test_sigkill_mid_stream_ends_it_with_an_error_and_the_next_request_succeeds() -> None:
    engine = await start(0.01)
    stream = engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True))
    await stream.__anext__()
    killed = pid_of(engine)
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    t0 = time.monotonic()
    last = None
    async for out in stream:
        last = out
    assert last is not None and last.finished and "exited" in (last.error or "")
    assert last.error_status == 503  # the server answers 503: the request may be sent again
    assert "killed by SIGKILL: out of memory?" in (last.error or "")  # what a memory limit's kill looks like
    assert time.monotonic() - t0 < 5
    with pytest.raises(EngineDeadError):  # restarting: refused at once (the server answers 503)
        engine.generate("during", [1], SamplingParams(max_tokens=2))
    await wait_until(lambda: restarted(engine, killed))
    assert engine.stats().num_engine_restarts == 1
    params = SamplingParams(max_tokens=4)
    assert tokens_of(await collect(engine, "next", [1, 2], params)) == reference_tokens([1, 2], params, VOCAB)
    await engine.shutdown()


async def test_an_engine_process_killed_while_idle_is_restarted() -> None:
    engine = await start()
    first = pid_of(engine)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await wait_until(lambda: restarted(engine, first))
    assert len(tokens_of(await collect(engine, "x", [3, 4], SamplingParams(max_tokens=2)))) == 2
    await engine.shutdown()


async def test_repeated_deaths_give_up_and_call_on_fatal() -> None:
    fatal: list[str] = []
    engine = await start(supervisor=SupervisorConfig(max_restarts=1), on_fatal=fatal.append)
    first = pid_of(engine)
    os.kill(first, signal.SIGKILL)  # type: ignore[arg-type]
    await wait_until(lambda: restarted(engine, first))
    os.kill(pid_of(engine), signal.SIGKILL)  # type: ignore[arg-type]
    await wait_until(lambda: bool(fatal))
    assert not engine.is_healthy
    with pytest.raises(EngineDeadError):
        engine.generate("late", [1], SamplingParams())
    await engine.shutdown()


async def test_a_hung_step_trips_the_watchdog_and_the_core_is_replaced() -> None:
    engine = await start(supervisor=SupervisorConfig(step_timeout=1.0))
    hung = pid_of(engine)
    outputs = await asyncio.wait_for(collect(engine, "hang", [1, HANG], SamplingParams(max_tokens=2)), 20)
    assert outputs[-1].error and "step-timeout" in outputs[-1].error
    await wait_until(lambda: restarted(engine, hung))
    assert hung is not None and not _running(hung)
    assert len(tokens_of(await collect(engine, "ok", [1, 2], SamplingParams(max_tokens=2)))) == 2
    await engine.shutdown()


async def test_the_engine_process_ignores_sigterm_until_the_server_stops_it() -> None:
    """`docker stop` signals the whole group: the core must live on while the server drains."""
    engine = await start(0.01)
    stream = engine.generate("r", [1, 2], SamplingParams(max_tokens=30))
    os.kill(pid_of(engine), signal.SIGTERM)  # type: ignore[arg-type]
    outputs = [out async for out in stream]
    assert outputs[-1].error is None and len(tokens_of(outputs)) == 30
    assert engine.is_healthy
    await engine.shutdown()


def test_a_failed_start_says_why() -> None:
    with pytest.raises(CoreStartError, match="no such model"):
        ProcessCore(build_broken, (), lambda message: None)


def test_the_engine_process_exits_when_the_server_process_dies(tmp_path: Path) -> None:
    script = (
        "import time\n"
        "from server.engine.client import ProcessCore\n"
        "from tests.engine.test_engine_process import build_fake\n"
        "if __name__ == '__main__':\n"
        "    p = ProcessCore(build_fake, (), lambda m: None)\n"
        "    print(p.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    path = tmp_path / "server_stand_in.py"
    path.write_text(script)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    parent = subprocess.Popen(
        [sys.executable, str(path)], stdout=subprocess.PIPE, text=True, env=env, cwd=root
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert _running(child_pid)
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait()
        deadline = time.monotonic() + 10
        while _running(child_pid):
            assert time.monotonic() < deadline, "the engine process outlived the server process"
            time.sleep(0.05)
    finally:
        parent.kill()


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _child_environ(core: ProcessCore) -> dict[str, str]:
    raw = Path(f"/proc/{core.pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc/<pid>/environ")
def test_the_engine_process_starts_with_huge_page_malloc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    core = ProcessCore(build_fake, (), lambda message: None)
    try:
        assert _child_environ(core).get("GLIBC_TUNABLES") == "glibc.malloc.hugetlb=1"
        assert "GLIBC_TUNABLES" not in os.environ  # the server process's own environment is left as it was
    finally:
        core.close(5.0)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # a user's own setting wins
    core = ProcessCore(build_fake, (), lambda message: None)
    try:
        assert _child_environ(core).get("GLIBC_TUNABLES") == "glibc.malloc.arena_max=2"
    finally:
        core.close(5.0)


class _Garbled:
    """A pipe end whose next recv (or send) fails as a corrupt or unpicklable message would."""

    def __init__(self, conn: object) -> None:
        self._conn = conn

    def recv(self) -> object:
        raise pickle.UnpicklingError("garbled output")

    def send(self, message: object) -> None:
        raise TypeError(f"cannot pickle {type(message).__name__}")

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


async def test_an_output_that_cannot_be_read_restarts_the_core_instead_of_hanging_its_streams() -> None:
    engine = await start(0.01)
    stream = engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True))
    await stream.__anext__()
    core = engine._core
    assert isinstance(core, ProcessCore)
    first = core.pid
    core._from_child = _Garbled(core._from_child)  # type: ignore[assignment]  # the receiver's next read
    last = None
    async for out in asyncio_timeout_iter(stream, 10):
        last = out
    assert last is not None and last.finished and "could not be read" in (last.error or "")
    await wait_until(lambda: restarted(engine, first))
    params = SamplingParams(max_tokens=4)
    assert tokens_of(await collect(engine, "next", [1, 2], params)) == reference_tokens([1, 2], params, VOCAB)
    await engine.shutdown()


async def test_a_message_that_cannot_be_sent_restarts_the_core_instead_of_hanging_its_request() -> None:
    engine = await start()
    core = engine._core
    assert isinstance(core, ProcessCore)
    first = core.pid
    core._to_child = _Garbled(core._to_child)  # type: ignore[assignment]
    outputs = await asyncio.wait_for(collect(engine, "lost", [1, 2], SamplingParams(max_tokens=4)), 10)
    assert outputs[-1].finished and "could not be sent" in (outputs[-1].error or "")
    await wait_until(lambda: restarted(engine, first))
    params = SamplingParams(max_tokens=4)
    assert tokens_of(await collect(engine, "next", [1, 2], params)) == reference_tokens([1, 2], params, VOCAB)
    await engine.shutdown()


async def test_a_failure_processing_outputs_restarts_the_core_instead_of_hanging_its_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = await start(0.01)
    stream = engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True))
    await stream.__anext__()
    first = pid_of(engine)

    def broken(outputs: object) -> object:
        raise KeyError("a bug")

    monkeypatch.setattr(engine._processor, "process", broken)
    last = None
    async for out in asyncio_timeout_iter(stream, 10):
        last = out
    monkeypatch.undo()
    assert last is not None and last.finished and "could not be processed" in (last.error or "")
    await wait_until(lambda: restarted(engine, first))
    params = SamplingParams(max_tokens=4)
    assert tokens_of(await collect(engine, "next", [1, 2], params)) == reference_tokens([1, 2], params, VOCAB)
    await engine.shutdown()


async def asyncio_timeout_iter(stream, seconds: float):  # type: ignore[no-untyped-def]
    """The stream's items, failing if it does not end within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            item = await asyncio.wait_for(stream.__anext__(), max(0.01, deadline - time.monotonic()))
        except StopAsyncIteration:
            return
        yield item


ENGINE_LIKE = """
import sys, time
from server.engine.core import _exit_with_parent
_exit_with_parent()
print("ready", flush=True)
time.sleep(60)  # as an engine loading a model: reading no pipe
"""

SERVER_LIKE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(60)
"""


def test_an_engine_still_starting_ends_soon_after_its_server() -> None:
    """A server killed (or exiting on a failed start) while its engine loads: the engine must not go on
    loading, compiling and writing caches for nobody."""
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_LIKE, ENGINE_LIKE], stdout=subprocess.PIPE, text=True,
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert server.stdout is not None
    engine = int(server.stdout.readline())
    server.kill()
    server.wait(10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{engine}").exists():
        state = Path(f"/proc/{engine}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        if state == "Z":  # exited, not yet reaped by its new parent
            break
        time.sleep(0.05)
    else:
        assert not Path(f"/proc/{engine}").exists(), "the engine outlived its server"
