"""The engine loop: LLMEngine (synchronous steps) and AsyncEngine (one background thread + asyncio).

`LLMEngine.step()` is schedule -> run -> update, then turns what changed into delta RequestOutputs,
one per caller-visible request (n > 1 children are merged back under their parent id).

`AsyncEngine` owns the only thread that touches the LLMEngine. The event loop talks to it through a
lock-protected inbox (adds, aborts) drained at the start of each step, and gets deltas back through
`loop.call_soon_threadsafe` into one asyncio.Queue per request.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.engine.request import (
    CompletionOutput,
    Request,
    RequestOutput,
    SampleResult,
    SamplingParams,
    TokenLogprob,
)
from server.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the HTTP layer answers 429/503."""


class EngineDeadError(RuntimeError):
    """The engine loop failed (or shut down) and accepts no more requests."""


class Runner(Protocol):
    def execute(self, plan: SchedulerOutput) -> dict[str, SampleResult]:
        """Run one step; return a result for each scheduled sequence whose `sample` is set."""
        ...


@dataclass
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_waiting: int = 256  # requests (n>1 children count one each) queued before QueueFullError
    vocab_size: int | None = None  # None: the runner's (`runner.vocab_size` or its model's config)


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use
    num_preemptions: int  # total since start
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_prompt_tokens: int  # total, of requests that finished
    num_generation_tokens: int  # total sampled
    num_finished: dict[str, int]  # by finish reason
    num_steps: int
    healthy: bool = True


@dataclass
class _Group:
    """A caller-visible request: its n children and the prompt logprobs gathered so far."""

    request_id: str
    children: list[Request]
    prompt_logprobs: list[TokenLogprob | None] | None  # None when not asked for
    prompt_logprobs_sent: bool = False
    queue_time_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(child.is_finished for child in self.children)


@dataclass(frozen=True)
class RequestChecker:
    """What a request must satisfy before it may enter a step; needs only the engine's configuration,
    so the HTTP side can check requests without the engine (which may live in another process)."""

    max_model_len: int
    max_waiting: int
    vocab_size: int | None
    eos_token_id: int | None

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Raise ValueError for any input that could fail inside a step; return the params to run.

        A step runs every request together, so one bad request must never reach it: an exception there
        kills the loop for all. AsyncEngine calls this on the caller's thread, so the caller hears at once.
        """
        max_len = self.max_model_len
        if not 0 < len(prompt_token_ids) <= max_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; it must have 1 to {max_len}")
        if params.n > self.max_waiting:
            raise ValueError(f"n={params.n} is more than the engine can queue ({self.max_waiting})")
        if self.vocab_size is None:
            return params
        params.validate(self.vocab_size)
        low, high = min(prompt_token_ids), max(prompt_token_ids)
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"the prompt holds token id {bad}, outside the vocabulary [0, {self.vocab_size})"
            )
        if params.min_tokens > 0 and len(self.banned_until_min_tokens(params)) >= self.vocab_size:
            raise ValueError(
                "stop_token_ids (with EOS) hold every token: none could be drawn before min_tokens"
            )
        if params.top_k >= self.vocab_size:  # keeps every token: the same as off (and torch.topk cannot)
            params = dataclasses.replace(params, top_k=-1)
        return params

    def banned_until_min_tokens(self, params: SamplingParams) -> set[int]:
        banned = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            banned.add(self.eos_token_id)
        return banned


class LLMEngine:
    def __init__(self, runner: Runner, scheduler: Scheduler, config: EngineConfig | None = None) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.config = config or EngineConfig(scheduler=scheduler.config)
        self._groups: dict[str, _Group] = {}
        self.num_steps = 0
        self.num_generation_tokens = 0
        self.num_prompt_tokens = 0
        self.num_finished: dict[str, int] = collections.Counter()
        self.vocab_size = self.config.vocab_size or _runner_vocab_size(runner)

    @classmethod
    def from_config(cls, runner: Runner, config: EngineConfig) -> LLMEngine:
        return cls(runner, Scheduler(config.scheduler), config)

    # ---- requests ------------------------------------------------------------------------------
    @property
    def checker(self) -> RequestChecker:
        return RequestChecker(
            max_model_len=self.scheduler.config.max_model_len,
            max_waiting=self.config.max_waiting,
            vocab_size=self.vocab_size,
            eos_token_id=self.scheduler.config.eos_token_id,
        )

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Raise ValueError for any input that could fail inside a step; return the params to run."""
        return self.checker.check(prompt_token_ids, params)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already running")
        params = self.check_request(prompt_token_ids, params)
        children = _fan_out(request_id, list(prompt_token_ids), params)
        for child in children:
            if child.request_id in self.scheduler.requests:
                raise ValueError(f"request id {child.request_id!r} is already running")
        for child in children:
            self.scheduler.add(child)  # cannot fail: check_request covered what it checks
        prompt_logprobs: list[TokenLogprob | None] | None = None if params.prompt_logprobs is None else [None]
        self._groups[request_id] = _Group(request_id, children, prompt_logprobs)

    def abort_request(self, request_id: str, index: int | None = None) -> RequestOutput | None:
        """Abort every child, or only choice `index` (the others go on); return the output that ends
        them (finish_reason "abort"), or None if the request or choice is unknown or already done."""
        group = self._groups.get(request_id)
        if group is None:
            return None
        children = group.children if index is None else [c for c in group.children if c.index == index]
        completions = [self._abort_child(child) for child in children if not child.is_finished]
        if not completions:
            return None
        return self._request_output(group, completions)

    def abort_all(self) -> list[RequestOutput]:
        outputs = [self.abort_request(rid) for rid in list(self._groups)]
        return [out for out in outputs if out is not None]

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    @property
    def num_requests(self) -> int:
        return len(self._groups)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        sampled = self.runner.execute(plan) if plan.scheduled else {}
        finished = self.scheduler.update(plan, sampled)
        return self._make_outputs(plan, sampled, finished)

    def _make_outputs(
        self, plan: SchedulerOutput, sampled: dict[str, SampleResult], finished: list[Request]
    ) -> list[RequestOutput]:
        self.num_steps += 1
        for request in plan.preempted:
            self._reset_prompt_logprobs(request)
        deltas: dict[str, list[CompletionOutput]] = {}
        for seq in plan.scheduled:
            request, result = seq.request, sampled.get(seq.request.request_id)
            group = self._groups[request.output_id]
            if result is not None and request.index == 0:
                self._gather_prompt_logprobs(group, result)
            if seq.sample and result is not None:
                deltas.setdefault(group.request_id, []).append(_completion(request, result))
                self.num_generation_tokens += 1
        for request in finished:
            self.num_finished[request.status.finish_reason or "?"] += 1
            self.num_prompt_tokens += request.num_prompt_tokens
        return [self._request_output(self._groups[rid], completions) for rid, completions in deltas.items()]

    def _request_output(self, group: _Group, completions: list[CompletionOutput]) -> RequestOutput:
        leader = group.children[0]
        prompt_logprobs = None
        if group.prompt_logprobs is not None and not group.prompt_logprobs_sent and leader.num_output_tokens:
            prompt_logprobs, group.prompt_logprobs_sent = group.prompt_logprobs, True
        queue_time = None
        if not group.queue_time_sent and leader.first_scheduled_time is not None:
            queue_time, group.queue_time_sent = leader.first_scheduled_time - leader.arrival_time, True
        finished = group.finished
        if finished:
            del self._groups[group.request_id]
        return RequestOutput(
            request_id=group.request_id,
            outputs=completions,
            finished=finished,
            num_prompt_tokens=leader.num_prompt_tokens,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=leader.num_cached_tokens,
            queue_time=queue_time,
        )

    def _gather_prompt_logprobs(self, group: _Group, result: SampleResult) -> None:
        if group.prompt_logprobs is None or group.prompt_logprobs_sent or not result.prompt_logprobs:
            return
        room = group.children[0].num_prompt_tokens - len(group.prompt_logprobs)
        group.prompt_logprobs.extend(result.prompt_logprobs[:room])

    def _reset_prompt_logprobs(self, request: Request) -> None:
        group = self._groups.get(request.output_id)
        if (
            group is not None
            and request.index == 0
            and group.prompt_logprobs
            and not group.prompt_logprobs_sent
        ):
            group.prompt_logprobs = [None]  # the prompt is recomputed from position 0

    def _abort_child(self, child: Request) -> CompletionOutput:
        self.scheduler.abort(child.request_id)
        self.num_finished["abort"] += 1
        return CompletionOutput(child.index, [], finish_reason="abort")

    def stats(self) -> EngineStats:
        allocator = self.scheduler.allocator
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=allocator.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=allocator.prefix_queries,
            prefix_cache_hits=allocator.prefix_hits,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_finished=dict(self.num_finished),
            num_steps=self.num_steps,
        )


def _runner_vocab_size(runner: Runner) -> int | None:
    """ModelRunner knows it through its model; a test runner may state it."""
    size = getattr(runner, "vocab_size", None)
    model = getattr(runner, "model", None)
    if size is None and model is not None:
        size = model.config.vocab_size
    return size


def _fan_out(request_id: str, prompt: list[int], params: SamplingParams) -> list[Request]:
    if params.n == 1:
        return [Request(request_id, prompt, params)]
    children = []
    for i in range(params.n):
        # Distinct seeds, or the n seeded choices would all be the same.
        seed = None if params.seed is None else params.seed + i
        child_params = dataclasses.replace(params, n=1, seed=seed)
        children.append(Request(f"{request_id}-{i}", prompt, child_params, parent_id=request_id, index=i))
    return children


def _completion(request: Request, result: SampleResult) -> CompletionOutput:
    assert result.token_id is not None
    want_logprobs = request.params.logprobs is not None and result.logprobs is not None
    return CompletionOutput(
        index=request.index,
        new_token_ids=[result.token_id],
        logprobs=[result.logprobs] if want_logprobs else None,  # type: ignore[list-item]
        finish_reason=request.status.finish_reason,
        stop_token_id=request.stop_token_id,
    )


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One delta equal to `first` followed by `later` (for a consumer slower than the engine)."""
    by_index = {c.index: dataclasses.replace(c, new_token_ids=list(c.new_token_ids)) for c in first.outputs}
    for c in later.outputs:
        merged = by_index.get(c.index)
        if merged is None:
            by_index[c.index] = c
            continue
        merged.new_token_ids.extend(c.new_token_ids)
        if merged.logprobs is not None or c.logprobs is not None:
            merged.logprobs = (merged.logprobs or []) + (c.logprobs or [])
        merged.finish_reason = c.finish_reason or merged.finish_reason
        merged.stop_token_id = c.stop_token_id if c.stop_token_id is not None else merged.stop_token_id
    return dataclasses.replace(
        later,
        outputs=sorted(by_index.values(), key=lambda c: c.index),
        prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None else later.prompt_logprobs,
        error=later.error or first.error,
        queue_time=first.queue_time if first.queue_time is not None else later.queue_time,
    )


# ---- async side ------------------------------------------------------------------------------------


class _Stream:
    """The engine thread's handle on one generate() call: where to send its deltas."""

    def __init__(self, request_id: str, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.n = n
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished_indices: set[int] = set()


class RequestStream(AsyncIterator[RequestOutput]):
    """Deltas of one request. Leaving early (break, cancel, aclose, garbage) aborts the request."""

    def __init__(self, engine: AsyncEngine, stream: _Stream) -> None:
        self._engine = engine
        self._stream = stream
        self._done = False
        # Runs when the iterator is dropped unfinished (e.g. `break` out of `async for`).
        self._finalizer = weakref.finalize(self, engine._abort_stream, stream)
        self._finalizer.atexit = False

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
    def __init__(self, llm_engine: LLMEngine) -> None:
        self.engine = llm_engine
        self.checker = llm_engine.checker
        self.max_waiting = self.checker.max_waiting
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, Any]] = []
        self._num_inbox_adds = 0  # children, for the queue limit
        self._abort_later: collections.deque[_Stream] = collections.deque()  # lock-free, for finalizers
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stopping = False
        self._dead_reason: str | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
                self._thread.start()

    @property
    def is_healthy(self) -> bool:
        """True while the engine takes requests: False once it died or began shutting down."""
        thread_ok = self._thread is None or self._thread.is_alive()
        alive = getattr(self.engine, "alive", None)  # an engine in another process may die while idle
        return self._dead_reason is None and not self._stopping and thread_ok and (alive is None or alive())

    async def shutdown(self, graceful: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; let in-flight requests finish (or abort them), then stop the thread."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            if not graceful:
                self._inbox.append(("abort_all", None))
        self._wakeup.set()
        if self._thread is None:
            close = getattr(self.engine, "close", None)  # never started: nothing to drain
            if close is not None:
                await asyncio.to_thread(close)
            return
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():  # graceful took too long: abort what is left
            with self._lock:
                self._inbox.append(("abort_all", None))
            self._wakeup.set()
            await asyncio.to_thread(self._thread.join)

    # ---- requests ------------------------------------------------------------------------------
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue the request now (raising QueueFullError / EngineDeadError / ValueError at once) and
        return its stream of deltas, for `async for out in engine.generate(...)`."""
        params = self.checker.check(prompt_token_ids, params)  # reads only config: thread-safe
        loop = asyncio.get_running_loop()
        stream = _Stream(request_id, params.n, loop)
        with self._lock:
            if self._dead_reason is not None:
                raise EngineDeadError(f"engine is dead: {self._dead_reason}")
            if not self._accepting:
                raise EngineDeadError("engine is shutting down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            if self.engine.num_waiting + self._num_inbox_adds + params.n > self.max_waiting:
                raise QueueFullError(f"{self.max_waiting} requests are already waiting")
            self._streams[request_id] = stream
            self._inbox.append(("add", (request_id, list(prompt_token_ids), params)))
            self._num_inbox_adds += params.n
        self.start()
        self._wakeup.set()
        return RequestStream(self, stream)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Abort from any thread: the whole request, or only its choice `index` (n > 1; the others go
        on). The stream gets an "abort" output for what was aborted. Unknown ids are ignored."""
        with self._lock:
            self._inbox.append(("abort", (request_id, index)))
        self._wakeup.set()

    def _abort_stream(self, stream: _Stream) -> None:
        """Abort on behalf of a stream its consumer left. Runs from garbage collection too, possibly
        while this thread holds _lock, so it takes no lock; the engine thread checks the stream is
        still the one registered, so a finished request's id reused by a new request is not hit."""
        self._abort_later.append(stream)
        self._wakeup.set()

    def stats(self) -> EngineStats:
        stats = self.engine.stats()  # plain ints read across threads: a snapshot, not a transaction
        stats.num_waiting += self._num_inbox_adds
        stats.healthy = self.is_healthy
        return stats

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._wakeup.clear()
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    if self._stopping:
                        return
                    self._wakeup.wait()
                    continue
                self._deliver(self.engine.step())
        except Exception as exc:  # noqa: BLE001 - any failure kills the loop; streams must hear of it
            self._die(f"{type(exc).__name__}: {exc}")
        finally:
            close = getattr(self.engine, "close", None)  # e.g. stop an engine process
            if close is not None:
                close()

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            outputs: list[RequestOutput] = []
            for verb, arg in inbox:
                outputs.extend(self._apply(verb, arg))
            self._num_inbox_adds = 0
            while self._abort_later:
                stream = self._abort_later.popleft()
                if self._streams.get(stream.request_id) is stream:
                    outputs.extend(self._apply("abort", (stream.request_id, None)))
        if outputs:
            self._deliver(outputs)

    def _apply(self, verb: str, arg: Any) -> list[RequestOutput]:
        if verb == "add":
            request_id, prompt, params = arg
            try:
                self.engine.add_request(request_id, prompt, params)
            except ValueError as exc:  # e.g. prompt too long: end that stream, not the engine
                return [_error_output(self._streams[request_id], str(exc))]
            return []
        if verb == "abort":
            out = self.engine.abort_request(*arg)
            return [out] if out is not None else []
        return self.engine.abort_all()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                stream.finished_indices.update(c.index for c in out.outputs if c.finish_reason)
                if out.finished:
                    del self._streams[out.request_id]
                batches.setdefault(stream.loop, []).append((stream, out))
        for loop, items in batches.items():
            _call_soon(loop, _put_all, items)

    def _die(self, reason: str) -> None:
        with self._lock:
            self._dead_reason = reason
            self._accepting = False
            streams, self._streams = list(self._streams.values()), {}
            self._inbox = []
            self._num_inbox_adds = 0
        for stream in streams:
            _call_soon(stream.loop, _put_all, [(stream, _error_output(stream, reason))])


def _error_output(stream: _Stream, reason: str) -> RequestOutput:
    completions = [
        CompletionOutput(i, [], finish_reason="error")
        for i in range(stream.n)
        if i not in stream.finished_indices
    ]
    return RequestOutput(stream.request_id, completions, finished=True, error=reason)


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening
        pass
