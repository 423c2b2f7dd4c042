"""The engine core: scheduler + runner + the step loop, one sequence per request (n = 1).

`EngineCore.step()` is schedule -> run -> update, then one `SeqOutput` per sequence that produced
something. It knows nothing of n > 1 choices, prompt-logprob assembly or streams: the client's
`OutputProcessor` does that on the other side of the boundary (server/engine/output.py).

`run_core_loop` drives a core from an inbox of typed messages and emits one `StepOutputs` per loop
turn. The same loop runs on a thread of the server (`--engine-process false`) or in a child process
(`core_process_main`), where a reader thread fills the inbox and a writer thread empties the outbox,
so that neither side ever blocks on a send while the other blocks on its own: the pipes are always
being read.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import ctypes.util
import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

from server.engine.cpu_share import CPUShare
from server.engine.messages import (
    AbortRequests,
    AddRequests,
    CoreDead,
    CoreInfo,
    CoreInput,
    CoreOutput,
    CoreReady,
    CoreRequest,
    EngineStats,
    RequestChecker,
    SeqOutput,
    Shutdown,
    StepOutputs,
)
from server.engine.request import Request, SampleResult, TokenLogprob
from server.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

log = logging.getLogger("server.engine")


class Runner(Protocol):
    def execute(self, plan: SchedulerOutput) -> dict[str, SampleResult]:
        """Run one step; return a result for each scheduled sequence whose `sample` is set (with a
        token at each of its 1 + k positions, `spec_token_ids`, when it carries k draft tokens)."""
        ...


@dataclass
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_waiting: int = 256  # sequences (n>1 choices count one each) queued before QueueFullError
    vocab_size: int | None = None  # None: the runner's (`runner.vocab_size` or its model's config)
    kv_cache_bytes: int = 0  # what the runner's KV cache takes, for the client's metrics (0: not known)


class EngineCore:
    def __init__(self, runner: Runner, scheduler: Scheduler, config: EngineConfig | None = None) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.config = config or EngineConfig(scheduler=scheduler.config)
        self.num_steps = 0
        self.num_generation_tokens = 0
        self.num_prompt_tokens = 0
        self.num_finished: collections.Counter[str] = collections.Counter()
        self.vocab_size = self.config.vocab_size or _runner_vocab_size(runner)
        # Structured requests whose grammar is being prepared (runner.prepare_grammar on its own thread),
        # in arrival order; they enter the scheduler when it is ready. on_grammar_ready is called (from
        # that thread) as each is, so that an idle loop wakes up to take it in.
        self._preparing: dict[str, tuple[concurrent.futures.Future[None], Request]] = {}
        self._grammar_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self.on_grammar_ready: Callable[[], None] | None = None
        self.cpu_share: CPUShare | None = None  # set where the model steps on several CPU threads
        self.compute_threads = 0  # CPU threads of the steps, for the metrics (0: not on CPU)

    @property
    def info(self) -> CoreInfo:
        sched = self.scheduler.config
        checker = RequestChecker(
            sched.max_model_len,
            self.config.max_waiting,
            self.vocab_size,
            sched.eos_token_id,
            sched.max_num_seqs,
        )
        return CoreInfo(
            checker, sched.max_model_len, sched.num_blocks, sched.block_size, self.config.kv_cache_bytes,
            self.compute_threads,
        )  # fmt: skip

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._preparing)

    def has_work(self) -> bool:
        """A step would do something: a sequence is scheduled, or a prepared grammar awaits taking in."""
        return self.scheduler.has_unfinished() or any(f.done() for f, _ in self._preparing.values())

    def add(self, req: CoreRequest) -> SeqOutput | None:
        """Queue one sequence; an error output (not an exception) if it cannot be: the client validated
        it already, so this only guards the step against a request that slipped through. A structured
        request's grammar is prepared first, off the step's thread (see runner.prepare_grammar)."""
        request = Request(
            req.request_id, req.prompt_token_ids, req.params, parent_id=req.parent_id, index=req.index,
            arrival_time=req.arrival_time, group_id=req.group_id,
        )  # fmt: skip
        if req.request_id in self._preparing or req.request_id in self.scheduler.requests:
            return SeqOutput(
                req.request_id, finish_reason="error", error=f"request id {req.request_id!r} is in use"
            )
        prepare = getattr(self.runner, "prepare_grammar", None)
        if req.params.structured is not None and prepare is not None:
            if self._grammar_thread is None:
                self._grammar_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")
            future = self._grammar_thread.submit(prepare, request)
            if self.on_grammar_ready is not None:
                wake = self.on_grammar_ready
                future.add_done_callback(lambda _: wake())
            self._preparing[req.request_id] = (future, request)
            return None
        return self._schedule(request)

    def _schedule(self, request: Request) -> SeqOutput | None:
        try:
            self.scheduler.add(request)
        except ValueError as exc:
            return SeqOutput(request.request_id, finish_reason="error", error=str(exc))
        return None

    def _take_prepared(self) -> list[SeqOutput]:
        """Move the structured requests whose grammar is ready (in arrival order) into the scheduler."""
        outputs = []
        for request_id, (future, request) in list(self._preparing.items()):
            if not future.done():
                continue
            del self._preparing[request_id]
            exc = future.exception()
            if exc is not None:
                outputs.append(SeqOutput(request_id, finish_reason="error", error=f"grammar: {exc}"))
            elif (out := self._schedule(request)) is not None:
                outputs.append(out)
        return outputs

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            preparing = self._preparing.pop(request_id, None)
            if preparing is not None:
                preparing[0].cancel()  # its compile, unless it has begun (then it runs out, into the cache)
                self.num_finished["abort"] += 1
            elif self.scheduler.abort(request_id) is not None:
                self.num_finished["abort"] += 1

    def step(self) -> list[SeqOutput]:
        if self._preparing and not self.has_work():  # only grammars in the making: wait for one
            concurrent.futures.wait(
                [f for f, _ in self._preparing.values()],
                timeout=0.1,
                return_when=concurrent.futures.FIRST_COMPLETED,
            )
        taken = self._take_prepared() if self._preparing else []
        plan = self.scheduler.schedule()
        sampled = self._execute(plan) if plan.scheduled else {}
        finished = self.scheduler.update(plan, sampled)
        return taken + self._outputs(plan, sampled, finished)

    def _execute(self, plan: SchedulerOutput) -> dict[str, SampleResult]:
        share = self.cpu_share
        if share is None:
            return self.runner.execute(plan)
        share.begin()
        sampled = self.runner.execute(plan)
        share.end()
        return sampled

    def _outputs(
        self, plan: SchedulerOutput, sampled: dict[str, SampleResult], finished: list[Request]
    ) -> list[SeqOutput]:
        self.num_steps += 1
        outputs = [
            SeqOutput(r.request_id, reset_prompt_logprobs=True)
            for r in plan.preempted
            if r.params.prompt_logprobs is not None
        ]
        for seq in plan.scheduled:
            request, result = seq.request, sampled.get(seq.request.request_id)
            if result is None:
                continue
            out = SeqOutput(request.request_id, prompt_logprobs=result.prompt_logprobs or None)
            if seq.new_token_ids:
                out.new_token_ids = seq.new_token_ids
                if request.params.logprobs is not None:
                    out.logprobs = _logprobs(result, len(seq.new_token_ids))
                out.finish_reason = request.status.finish_reason
                out.stop_token_id = request.stop_token_id
                self.num_generation_tokens += len(seq.new_token_ids)
            if not request.first_output_sent and request.first_scheduled_time is not None:
                request.first_output_sent = True
                self.num_prompt_tokens += request.num_prompt_tokens  # prefilled: counted now, not at the end
                out.queue_time = request.first_scheduled_time - request.arrival_time
                out.num_cached_tokens = request.num_cached_tokens
            outputs.append(out)
        for request in finished:
            self.num_finished[request.status.finish_reason or "?"] += 1
        return outputs

    def stats(self) -> EngineStats:
        allocator = self.scheduler.allocator
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + len(self._preparing),
            kv_cache_usage=allocator.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=allocator.prefix_queries,
            prefix_cache_hits=allocator.prefix_hits,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_finished=dict(self.num_finished),
            num_steps=self.num_steps,
            num_kv_blocks_used=allocator.num_blocks - allocator.num_free_blocks,
            spec_decode_num_draft_tokens=self.scheduler.num_draft_tokens,
            spec_decode_num_accepted_tokens=self.scheduler.num_accepted_tokens,
            compute_threads=self.cpu_share.threads if self.cpu_share is not None else self.compute_threads,
        )


def _logprobs(result: SampleResult, num_tokens: int) -> list[TokenLogprob] | None:
    """The logprobs of the first `num_tokens` tokens a step produced for one sequence."""
    lps = result.spec_logprobs if result.spec_logprobs is not None else [result.logprobs]
    kept = [lp for lp in lps[:num_tokens] if lp is not None]
    return kept if len(kept) == num_tokens else None


def _runner_vocab_size(runner: Runner) -> int | None:
    """ModelRunner knows it through its model; a test runner may state it."""
    size = getattr(runner, "vocab_size", None)
    model = getattr(runner, "model", None)
    if size is None and model is not None:
        size = model.config.vocab_size
    return size


# ---- the loop ---------------------------------------------------------------------------------------


def run_core_loop(
    core: EngineCore, inbox: queue.SimpleQueue[LoopInput], emit: Callable[[CoreOutput], None]
) -> None:
    """Take in every message waiting, run one step if there is work, emit its outputs; block on the
    inbox only while idle. Returns on `Shutdown`; a failing step emits `CoreDead` and returns."""
    last_add = 0
    worked = False  # since the heap was last trimmed
    core.on_grammar_ready = lambda: inbox.put(GrammarReady())
    try:
        while True:
            if core.has_work():
                messages = []
            elif core.has_unfinished():  # only grammars in the making: say we are alive now and then,
                try:  # or the server's watchdog would count a long compile as a hung step
                    messages = [inbox.get(timeout=HEARTBEAT_S)]
                except queue.Empty:
                    messages = []
            else:
                messages = [_wait_idle(inbox, worked, getattr(core.runner, "warm_kv_ahead", None))]
            worked = True
            while not inbox.empty():
                messages.append(inbox.get())
            outputs: list[SeqOutput] = []
            for message in messages:
                match message:
                    case Shutdown():
                        return
                    case AddRequests(requests=requests, seq=seq):
                        last_add = seq
                        outputs.extend(out for r in requests if (out := core.add(r)) is not None)
                    case AbortRequests(request_ids=ids):
                        core.abort(ids)
                    case GrammarReady():
                        pass  # the step below takes the request in
            if core.has_work():
                outputs.extend(core.step())
            emit(StepOutputs(outputs, core.stats(), last_add))
    except Exception as exc:  # noqa: BLE001 - a failed step: the client fails the streams and restarts us
        log.error("engine step failed:\n%s", traceback.format_exc())
        emit(CoreDead(f"{type(exc).__name__}: {exc}"))


@dataclass(slots=True)
class GrammarReady:
    """Put in the core loop's own inbox when a structured request's grammar is ready: it wakes the loop."""


LoopInput = CoreInput | GrammarReady


IDLE_TRIM_AFTER_S = 1.0
HEARTBEAT_S = 1.0  # while only grammars are being prepared, an empty StepOutputs this often


def _wait_idle(
    inbox: queue.SimpleQueue[LoopInput], worked: bool, warm: Callable[[], bool] | None = None
) -> LoopInput:
    """Block for the next message. First, while nothing arrives, `warm()` (the runner's warm_kv_ahead) one
    chunk at a time until it has nothing left; after a second idle that follows work, hand freed heap
    memory back to the OS, so a burst of long prompts does not leave the engine's RSS at its high-water
    mark."""
    while warm is not None and inbox.empty() and warm():
        pass
    if worked:
        try:
            return inbox.get(timeout=IDLE_TRIM_AFTER_S)
        except queue.Empty:
            trim_heap()
    return inbox.get()


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)  # glibc only; musl and macOS have none
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def trim_heap() -> None:
    """Return the free pages of every malloc arena to the OS (glibc's malloc_trim); a no-op elsewhere."""
    if _malloc_trim is not None:
        _malloc_trim(0)


# ---- the child process ------------------------------------------------------------------------------


def core_process_main(
    in_conn: Connection, out_conn: Connection, build: Callable[..., EngineCore], args: tuple[Any, ...],
    log_level: str, log_format: str = "text",
) -> None:  # fmt: skip
    """Entry point of the engine process: build the core, then serve it until Shutdown or EOF."""
    # The server decides when we stop: a Ctrl-C or `docker stop` reaches the whole process group, and
    # the server drains its requests first, then sends Shutdown (or closes the pipe).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    from server.logs import configure_logging, failure_reason  # the server's line format, in both

    configure_logging(log_level, log_format)
    try:
        core = build(*args)
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent, then exit
        # most often the model files or the settings: the server logs the reason, sent to it here, in one
        # line; the traceback is for debugging
        log.debug("engine process failed to start: %s\n%s", failure_reason(exc), traceback.format_exc())
        _send_quietly(out_conn, CoreDead(failure_reason(exc)))
        return
    trim_heap()  # loading leaves freed temporaries (unpickled weights before packing) in the heap
    inbox: queue.SimpleQueue[LoopInput] = queue.SimpleQueue()
    outbox: queue.SimpleQueue[CoreOutput | None] = queue.SimpleQueue()
    outbox.put(CoreReady(core.info))
    writer = threading.Thread(target=_write_all, args=(outbox, out_conn), name="core-writer", daemon=True)
    reader = threading.Thread(target=_read_all, args=(in_conn, inbox), name="core-reader", daemon=True)
    writer.start()
    reader.start()
    # Steps run on their own thread (not the main one): torch.set_num_threads(), called by `build` on
    # this thread, caps ATen's element-wise loops, while our GEMMs switch to every core around each
    # call (model/threads.py); a thread started here inherits the capped OpenMP count.
    loop = threading.Thread(target=run_core_loop, args=(core, inbox, outbox.put), name="engine-loop")
    loop.start()
    loop.join()
    outbox.put(None)
    writer.join(10)


PARENT_POLL_S = 0.5


def _exit_with_parent() -> None:
    """End this process soon after the server's: a server killed, or one that failed to start and exited,
    must not leave its engine loading a model or serving nobody (pipes only tell a process that reads
    them, and loading reads none)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    try:
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    except RuntimeError:  # a pids limit with no thread to spare: the pipes still end the loop once it runs
        pass


def _read_all(conn: Connection, inbox: queue.SimpleQueue[LoopInput]) -> None:
    try:
        while True:
            inbox.put(conn.recv())
    except (EOFError, OSError):  # the server went away: nobody is listening
        inbox.put(Shutdown())


def _write_all(outbox: queue.SimpleQueue[CoreOutput | None], conn: Connection) -> None:
    while (message := outbox.get()) is not None:
        try:
            conn.send(message)
        except OSError:
            return


def _send_quietly(conn: Connection, message: CoreOutput) -> None:
    try:
        conn.send(message)
    except OSError:
        pass
