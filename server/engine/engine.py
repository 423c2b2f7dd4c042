"""The server's side of the engine boundary: `AsyncEngine`, one asyncio client of one engine core.

`AsyncEngine.generate()` validates a request once (the core's `RequestChecker`), checks the queue has
room, fans n > 1 out into core sequences (`OutputProcessor`) and sends them as one typed message; it
returns a `RequestStream` of delta `RequestOutput`s. Everything here runs on the event loop: the core's
messages arrive from its own thread (or its process's receiver thread) through
`loop.call_soon_threadsafe`, and sends are queue puts that never block.

It also supervises the core. A core that dies (a step raised, its process was killed) ends every open
stream with an error and is started again (`/health` is 503 meanwhile); after `max_restarts` deaths
within `restart_window` seconds it gives up and calls `on_fatal`, so the server exits and its
orchestrator restarts it. A watchdog treats a step that takes longer than `step_timeout` as a death.

`LLMEngine` is the same core and output processor driven synchronously, for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import functools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from server.engine.client import CoreHandle, CoreStartError, OnMessage, ProcessCore, SpawnedCore, ThreadCore
from server.engine.core import EngineConfig, EngineCore, Runner
from server.engine.messages import (
    AbortRequests,
    AddRequests,
    CoreDead,
    CoreInfo,
    CoreOutput,
    EngineStats,
    RequestChecker,
    StepOutputs,
)
from server.engine.output import OutputProcessor, merge_outputs
from server.engine.request import RequestOutput, SamplingParams
from server.engine.scheduler import Scheduler

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineDeadError",
    "EngineStats",
    "LLMEngine",
    "QueueFullError",
    "RequestStream",
    "SupervisorConfig",
    "merge_outputs",
]
log = logging.getLogger("server.engine")
CoreFactory = Callable[[OnMessage], CoreHandle]


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the HTTP layer answers 429."""


class EngineDeadError(RuntimeError):
    """The engine is not taking requests (starting, restarting, shutting down or given up)."""


class _State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    DEAD = "dead"


@dataclass(frozen=True)
class SupervisorConfig:
    max_restarts: int = 3  # core deaths tolerated within restart_window; one more is fatal
    restart_window: float = 600.0  # seconds
    step_timeout: float | None = None  # seconds a busy core may go without finishing a step; None: off
    close_timeout: float = 10.0  # seconds a core gets to stop before it is killed


class _Stream:
    """Where the deltas of one caller request go."""

    def __init__(self, request_id: str, n: int) -> None:
        self.request_id = request_id
        self.n = n
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()


class RequestStream(AsyncIterator[RequestOutput]):
    """Deltas of one request. Leaving early (break, cancel, aclose, garbage) aborts the request."""

    def __init__(self, engine: AsyncEngine, stream: _Stream) -> None:
        self._stream = stream
        self._done = False
        # Runs when the iterator is dropped unfinished (e.g. `break` out of `async for`), on any thread.
        self._finalizer = weakref.finalize(self, engine._abort_stream_threadsafe, stream)
        self._finalizer.atexit = False
        self._engine = engine

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            output = await self._stream.queue.get()
        except BaseException:  # CancelledError: the consumer went away mid-wait
            await self.aclose()
            raise
        queue = self._stream.queue
        while not queue.empty() and not output.finished:
            output = merge_outputs(output, queue.get_nowait())
        if output.finished:
            self._done = True
            self._finalizer.detach()
        return output

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._finalizer.detach()
            self._engine._abort_stream(self._stream)


class AsyncEngine:
    def __init__(
        self,
        factory: CoreFactory,
        config: SupervisorConfig | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self._factory = factory
        self.config = config or SupervisorConfig()
        self._on_fatal = on_fatal
        self._state = _State.STARTING
        self._loop: asyncio.AbstractEventLoop | None = None
        self._core: CoreHandle | None = None
        self._gen = 0  # which core generation's messages count
        self._launch_death: str | None = None  # a death reported before its launch returned
        self._kill_reason: str | None = None
        self.checker: RequestChecker | None = None
        self.max_model_len: int | None = None
        self._processor = OutputProcessor()
        self._streams: dict[str, _Stream] = {}
        self._stats = EngineStats()
        self._unseen_adds: collections.deque[tuple[int, int]] = collections.deque()  # (seq, sequences)
        self._add_seq = 0
        self._last_progress = time.monotonic()
        self._deaths: collections.deque[float] = collections.deque()
        self._num_restarts = 0
        self._dead_reason: str | None = None
        self._idle = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._restarting: asyncio.Task[None] | None = None
        self._draining = False  # the server is going down: no restarts
        self.died_draining: str | None = None  # why the core died during the drain, if it did
        self._drain_ended = False  # ... and its deadline passed: no new requests either
        self._drain_timer: asyncio.TimerHandle | None = None

    @classmethod
    def in_thread(cls, build: Callable[[], EngineCore], **kwargs: Any) -> AsyncEngine:
        """The core on a thread of this process; `build` makes a fresh core (again after a death)."""
        return cls(functools.partial(ThreadCore, build), **kwargs)

    @classmethod
    def in_process(
        cls, build: Callable[..., EngineCore], *args: Any, log_level: str = "info", log_format: str = "text",
        start_timeout: float | None = None, first: SpawnedCore | None = None, **kwargs: Any,
    ) -> AsyncEngine:  # fmt: skip
        """The core in a child process running `build(*args)` (picklable, importable). first: that process,
        already started by `spawn_core(build, args, ...)`, for the first start (later ones spawn anew)."""
        pending = [first] if first is not None else []

        def factory(on_message: OnMessage) -> CoreHandle:
            spawned = pending.pop() if pending else None
            return ProcessCore(build, args, on_message, log_level, log_format, start_timeout, spawned)

        return cls(factory, **kwargs)

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the core (raises CoreStartError if it cannot be built) and the watchdog."""
        self._loop = asyncio.get_running_loop()
        self._idle.set()
        await self._launch()
        self._spawn(self._watch())

    async def _launch(self) -> None:
        self._gen += 1
        gen, self._launch_death = self._gen, None
        on_message = functools.partial(self._from_core_thread, gen)
        core = await asyncio.to_thread(self._factory, on_message)
        self._core = core
        self.checker = core.info.checker
        self.max_model_len = core.info.max_model_len
        self._stats = EngineStats(compute_threads=core.info.compute_threads)
        self._unseen_adds.clear()
        if self._state in (_State.STOPPING, _State.DEAD):
            await asyncio.to_thread(core.close, self.config.close_timeout)
            return
        self._state = _State.RUNNING
        if self._launch_death is not None:
            self._core_died(self._launch_death)

    @property
    def started(self) -> bool:
        return self._loop is not None

    @property
    def info(self) -> CoreInfo | None:
        """The running core's configuration (None before the first start)."""
        return None if self._core is None else self._core.info

    @property
    def is_healthy(self) -> bool:
        """True while the engine takes requests: False while it starts, restarts, stops or is dead."""
        return self._state is _State.RUNNING and self._core is not None and self._core.alive()

    @property
    def state(self) -> str:
        return self._state.value

    def drain(self, timeout: float) -> None:
        """The server is going down: restart no core that dies, and end the requests still running
        `timeout` seconds from now with a 503 each (a stream gets its error event, not a cut connection);
        requests the server accepted before the signal and is still preparing are taken until then (it
        takes no new connections), none after. Called again, the sooner deadline holds. Call on the loop."""
        self._draining = True
        assert self._loop is not None
        if self._drain_timer is not None:
            if self._drain_timer.when() <= self._loop.time() + timeout:
                return
            self._drain_timer.cancel()
        self._drain_timer = self._loop.call_later(timeout, self._stop_requests, "the server is shutting down")

    def _stop_requests(self, reason: str) -> None:
        self._drain_ended = True
        if self._streams:
            log.warning("shutdown: %d requests did not finish in time; ending them", len(self._streams))
        for request_id in list(self._streams):
            self.abort(request_id, error=reason)

    async def shutdown(self, graceful: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; let in-flight requests finish (or abort them), then stop the core."""
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self._state is _State.DEAD and self._core is None:
            return
        self._state = _State.STOPPING
        if self._restarting is not None and not self._restarting.done():
            # a core being built is closed by its launch once built (state STOPPING): cancelled mid-build,
            # its process would outlive us
            await asyncio.wait({self._restarting})
        if graceful and self._processor.has_unfinished():
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("shutdown: %d requests did not finish in time; aborting them", len(self._streams))
        for request_id in list(self._streams):
            self.abort(request_id)
        for task in list(self._tasks):
            task.cancel()
        core, self._core = self._core, None
        self._state = _State.DEAD
        self._dead_reason = self._dead_reason or "shut down"
        if core is not None:
            await asyncio.to_thread(core.close, self.config.close_timeout)

    # ---- requests ------------------------------------------------------------------------------
    def check_capacity(self, num_sequences: int) -> None:
        """Raise at once unless `num_sequences` more sequences fit in the waiting queue now."""
        self._check_accepting()
        assert self.checker is not None
        limit = self.checker.max_waiting
        if num_sequences > limit:
            raise ValueError(
                f"the request needs {num_sequences} sequences (n x prompts); the queue holds at most {limit}"
            )
        waiting = self._num_waiting
        # a burst at a batch with room counts as waiting until the core schedules it: that room is not
        # the queue's (as the core last reported it; the queue may hold that many more for a step)
        room = max(0, self.checker.max_num_seqs - self._stats.num_running)
        if waiting + num_sequences > limit + room:
            raise QueueFullError(
                f"{waiting} sequences are waiting for the batch's {room} free places and the queue's {limit}"
            )

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        group_id: str | None = None,
    ) -> RequestStream:
        """Queue the request now (raising QueueFullError / EngineDeadError / ValueError at once) and
        return its stream of deltas, for `async for out in engine.generate(...)`. Call on the loop."""
        self._check_accepting()
        assert self.checker is not None and self._core is not None
        params = self.checker.check(prompt_token_ids, params)
        self.check_capacity(params.n)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        requests = self._processor.add(request_id, list(prompt_token_ids), params, group_id)
        stream = _Stream(request_id, params.n)
        self._streams[request_id] = stream
        if self._idle.is_set():
            self._idle.clear()
            self._last_progress = time.monotonic()  # the watchdog times steps, not idle time
        self._add_seq += 1
        self._unseen_adds.append((self._add_seq, len(requests)))
        self._core.send(AddRequests(requests, self._add_seq))
        return RequestStream(self, stream)

    def abort(self, request_id: str, index: int | None = None, error: str | None = None) -> None:
        """Abort the whole request, or only its choice `index` (n > 1; the others go on). The stream
        gets an "abort" output for what was aborted, carrying `error` if given (answered 503: the server
        ended it). Unknown ids are ignored. Call on the loop."""
        core_ids, out = self._processor.abort(request_id, index)
        if core_ids and self._core is not None:
            self._core.send(AbortRequests(core_ids))
        if out is not None:
            if error is not None:
                out.error, out.error_status = error, 503
            self._deliver([out])

    def stats(self) -> EngineStats:
        waiting = self._num_waiting
        return dataclasses.replace(
            self._stats,
            num_waiting=waiting,
            num_finished=dict(self._stats.num_finished),
            healthy=self.is_healthy,
            num_engine_restarts=self._num_restarts,
        )

    @property
    def _num_waiting(self) -> int:
        """Waiting sequences as the core last reported them, plus those sent since that it had not seen."""
        return self._stats.num_waiting + sum(count for _, count in self._unseen_adds)

    def _check_accepting(self) -> None:
        if self._drain_ended:
            raise EngineDeadError("the server is shutting down")
        if self._state is _State.RUNNING:
            return
        if self._state is _State.DEAD:
            raise EngineDeadError(f"the engine is not running: {self._dead_reason}")
        raise EngineDeadError(f"the engine is {self._state.value}")

    def _abort_stream(self, stream: _Stream) -> None:
        if self._streams.get(stream.request_id) is stream:  # not a new request reusing a finished id
            self.abort(stream.request_id)

    def _abort_stream_threadsafe(self, stream: _Stream) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._abort_stream, stream)
        except RuntimeError:  # the loop closed meanwhile: nobody is listening
            pass

    # ---- messages from the core ----------------------------------------------------------------
    def _from_core_thread(self, gen: int, message: CoreOutput) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._on_message, gen, message)
        except RuntimeError:
            pass

    def _on_message(self, gen: int, message: CoreOutput) -> None:
        if gen != self._gen:
            return  # from a core that was already replaced
        try:
            self._handle(message)
        except Exception as exc:  # noqa: BLE001 - streams whose outputs were lost here would wait forever
            reason = f"the engine's outputs could not be processed ({type(exc).__name__}: {exc})"
            log.exception("%s: restarting the engine core", reason)
            if self._state is _State.RUNNING:
                self._core_died(reason)

    def _handle(self, message: CoreOutput) -> None:
        match message:
            case StepOutputs(outputs=outputs, stats=stats, last_add_seq=seq):
                self._last_progress = time.monotonic()
                self._stats = stats
                while self._unseen_adds and self._unseen_adds[0][0] <= seq:
                    self._unseen_adds.popleft()
                self._deliver(self._processor.process(outputs))
            case CoreDead(reason=reason):
                if self._state is _State.RUNNING:
                    self._core_died(self._kill_reason or reason)
                elif self._state in (_State.STARTING, _State.RESTARTING):
                    self._launch_death = reason

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.queue.put_nowait(out)
        if not self._processor.has_unfinished():
            self._idle.set()

    # ---- supervision ---------------------------------------------------------------------------
    def _core_died(self, reason: str) -> None:
        log.error("engine core died: %s", reason)
        self._kill_reason = None
        self._deliver(self._processor.fail_all(reason))
        self._unseen_adds.clear()
        # its requests are gone: the gauges say so now, not once a new core reports
        self._stats = dataclasses.replace(
            self._stats, num_running=0, num_waiting=0, kv_cache_usage=0.0, num_kv_blocks_used=0
        )
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - self.config.restart_window:
            self._deaths.popleft()
        if self._draining:  # going down anyway: the requests have their errors, nothing to restart for
            self._state, self._dead_reason = _State.DEAD, reason
            self.died_draining = reason
            return
        if len(self._deaths) > self.config.max_restarts:
            self._give_up(
                f"{reason} ({len(self._deaths)} engine failures within {self.config.restart_window:.0f} s)"
            )
            return
        self._state = _State.RESTARTING
        self._restarting = self._spawn(self._restart())

    async def _restart(self) -> None:
        old, self._core = self._core, None
        if old is not None:
            await asyncio.to_thread(old.close, self.config.close_timeout)
        try:
            await self._launch()
        except CoreStartError as exc:
            if self._state is _State.RESTARTING:  # not a shutdown meanwhile
                self._give_up(f"the engine could not be restarted: {exc}")
            return
        if self._state is _State.RUNNING:
            self._num_restarts += 1
            log.info("engine core restarted (%d restarts so far)", self._num_restarts)

    def _give_up(self, reason: str) -> None:
        log.critical("giving up on the engine: %s", reason)
        self._state = _State.DEAD
        self._dead_reason = reason
        self._deliver(self._processor.fail_all(reason))
        if self._on_fatal is not None:
            self._on_fatal(reason)

    async def _watch(self) -> None:
        timeout = self.config.step_timeout
        if not timeout or timeout <= 0:
            return
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            core = self._core
            busy = self._processor.has_unfinished()
            if self._state is not _State.RUNNING or core is None or not busy:
                continue
            if time.monotonic() - self._last_progress <= timeout:
                continue
            reason = f"no engine step finished within --step-timeout {timeout:g} s"
            log.error("%s: stopping the engine core", reason)
            self._kill_reason = reason
            if not core.kill():  # a thread cannot be stopped: this process must go
                self._give_up(reason)
                return
            self._last_progress = time.monotonic()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


# ---- synchronous driver ---------------------------------------------------------------------------


class LLMEngine:
    """An `EngineCore` and an `OutputProcessor` on the caller's thread: add requests, call `step()`."""

    def __init__(self, runner: Runner, scheduler: Scheduler, config: EngineConfig | None = None) -> None:
        self.core = EngineCore(runner, scheduler, config)
        self.processor = OutputProcessor()

    @classmethod
    def from_config(cls, runner: Runner, config: EngineConfig) -> LLMEngine:
        return cls(runner, Scheduler(config.scheduler), config)

    @property
    def runner(self) -> Runner:
        return self.core.runner

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def checker(self) -> RequestChecker:
        return self.core.info.checker

    @property
    def num_waiting(self) -> int:
        return self.core.scheduler.num_waiting

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        params = self.checker.check(prompt_token_ids, params)
        for request in self.processor.add(request_id, list(prompt_token_ids), params):
            error = self.core.add(request)
            if error is not None:
                raise ValueError(error.error)

    def abort_request(self, request_id: str, index: int | None = None) -> RequestOutput | None:
        core_ids, out = self.processor.abort(request_id, index)
        self.core.abort(core_ids)
        return out

    def has_unfinished(self) -> bool:
        return self.processor.has_unfinished()

    def step(self) -> list[RequestOutput]:
        return self.processor.process(self.core.step())

    def stats(self) -> EngineStats:
        return self.core.stats()
