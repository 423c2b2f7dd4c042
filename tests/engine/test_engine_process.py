"""The engine loop in its own process (EngineProcess behind AsyncEngine): same outputs as in-process,
aborts, queue limit, a failing or killed engine process, and no engine process outliving the server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.engine.engine import AsyncEngine, EngineConfig, EngineDeadError, LLMEngine, QueueFullError
from server.engine.process import EngineProcess, EngineProcessError
from server.engine.request import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.fake_runner import FakeRunner, reference_tokens
from tests.engine.test_engine_async import collect, tokens_of

VOCAB = 1000
MAX_LEN = 256
pytestmark = pytest.mark.timeout(60)


def build_fake(
    step_delay: float = 0.0, fail_at_step: int | None = None, max_waiting: int = 256
) -> tuple[LLMEngine, int]:
    """Runs in the engine process (spawned: it must be importable)."""
    sched = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=MAX_LEN, block_size=4, num_blocks=128
    )
    config = EngineConfig(sched, max_waiting=max_waiting)
    runner = FakeRunner(sched.num_blocks, sched.block_size, VOCAB, step_delay, fail_at_step)
    return LLMEngine(runner, Scheduler(sched), config), MAX_LEN


def build_broken() -> tuple[LLMEngine, int]:
    raise FileNotFoundError("no such model: /nowhere.gguf")


def start(*args: object) -> AsyncEngine:
    engine = AsyncEngine(EngineProcess(build_fake, *args))
    engine.start()
    return engine


async def wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_outputs_equal_the_reference_and_the_process_stops() -> None:
    engine = start()
    proxy = engine.engine
    assert isinstance(proxy, EngineProcess) and proxy.alive()
    prompts = {f"r{i}": [i + 1, 2 * i + 3, 7] * (i + 1) for i in range(12)}
    params = {rid: SamplingParams(max_tokens=5 + i, temperature=0) for i, rid in enumerate(prompts)}
    results = await asyncio.gather(*(collect(engine, rid, prompts[rid], params[rid]) for rid in prompts))
    for rid, outputs in zip(prompts, results, strict=True):
        assert tokens_of(outputs) == reference_tokens(prompts[rid], params[rid], VOCAB)
        assert outputs[-1].finished and outputs[-1].outputs[-1].finish_reason == "length"
    stats = engine.stats()
    assert stats.num_finished == {"length": 12} and stats.num_running == 0 and stats.kv_cache_usage == 0.0
    assert stats.num_generation_tokens == sum(p.max_tokens for p in params.values())  # type: ignore[misc]
    await engine.shutdown()
    assert not proxy.alive() and not engine.is_healthy


async def test_a_bad_request_is_refused_in_the_server_process() -> None:
    engine = start()
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
    engine = start(0.01)
    try:
        stream = engine.generate("long", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
        first = await stream.__anext__()
        assert first.outputs[0].new_token_ids
        await stream.aclose()  # the client left
        await wait_until(lambda: not engine.engine.has_unfinished())
        await wait_until(lambda: engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0.0)
        assert engine.stats().num_finished.get("abort") == 1
    finally:
        await engine.shutdown()


async def test_queue_limit_counts_requests_sent_to_the_process() -> None:
    engine = AsyncEngine(EngineProcess(build_fake, 0.05, None, 4))
    engine.start()
    try:
        streams = [engine.generate(f"r{i}", [1, 2], SamplingParams(max_tokens=50)) for i in range(4)]
        with pytest.raises(QueueFullError):
            for i in range(4, 20):  # at most 8 run; the rest wait, and 4 may wait
                streams.append(engine.generate(f"r{i}", [1, 2], SamplingParams(max_tokens=50)))
        for stream in streams:
            await stream.aclose()
    finally:
        await engine.shutdown(graceful=False)


async def test_a_failing_step_ends_every_stream_with_an_error() -> None:
    engine = start(0.002, 5)
    results = await asyncio.gather(
        *(collect(engine, f"r{i}", [i + 1, 5], SamplingParams(max_tokens=50)) for i in range(3))
    )
    for outputs in results:
        assert outputs[-1].finished and "fake runner failure" in (outputs[-1].error or "")
    assert not engine.is_healthy
    with pytest.raises(EngineDeadError):
        engine.generate("after", [1], SamplingParams())
    await engine.shutdown()


async def test_a_killed_engine_process_fails_streams_at_once_and_marks_unhealthy() -> None:
    engine = start(0.01)
    stream = engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True))
    await stream.__anext__()
    os.kill(engine.engine.pid, signal.SIGKILL)
    t0 = time.monotonic()
    last = None
    async for out in stream:
        last = out
    assert last is not None and last.finished and "exited" in (last.error or "")
    assert time.monotonic() - t0 < 5
    assert not engine.is_healthy
    await engine.shutdown()


async def test_an_engine_process_killed_while_idle_reads_as_unhealthy() -> None:
    engine = start()
    assert engine.is_healthy
    os.kill(engine.engine.pid, signal.SIGKILL)
    await wait_until(lambda: not engine.is_healthy)
    await engine.shutdown()


def test_a_failed_start_says_why() -> None:
    with pytest.raises(EngineProcessError, match="no such model"):
        EngineProcess(build_broken)


def test_the_engine_process_exits_when_the_server_process_dies(tmp_path: Path) -> None:
    script = (
        "import time\n"
        "from server.engine.process import EngineProcess\n"
        "from tests.engine.test_engine_process import build_fake\n"
        "if __name__ == '__main__':\n"
        "    p = EngineProcess(build_fake)\n"
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


def _child_environ(proxy: EngineProcess) -> dict[str, str]:
    raw = Path(f"/proc/{proxy.pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc/<pid>/environ")
def test_the_engine_process_starts_with_huge_page_malloc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    proxy = EngineProcess(build_fake)
    try:
        assert _child_environ(proxy).get("GLIBC_TUNABLES") == "glibc.malloc.hugetlb=1"
        assert "GLIBC_TUNABLES" not in os.environ  # the server process's own environment is left as it was
    finally:
        proxy.close()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # a user's own setting wins
    proxy = EngineProcess(build_fake)
    try:
        assert _child_environ(proxy).get("GLIBC_TUNABLES") == "glibc.malloc.arena_max=2"
    finally:
        proxy.close()
