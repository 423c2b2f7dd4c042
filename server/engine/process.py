"""The engine loop in its own process, so that model steps and the HTTP event loop do not share a GIL.

In one process, the engine thread's per-op Python dispatch and the event loop's per-token work
(detokenizing, JSON, SSE) take turns on one interpreter lock: the server held ~100% of a 2-core CPU
while vLLM, whose engine core is a separate process, held ~190% (bench/NOTES.md). Here the child
process owns the model, the KV cache and an `LLMEngine`; the server process keeps `AsyncEngine` (streams,
aborts, queue limits) and drives an `EngineProcess` proxy in place of the `LLMEngine`:

- parent -> child, over one `multiprocessing` pipe: ("add", id, prompt, params), ("abort", id, index),
  ("abort_all",), ("stop",);
- child -> parent, after every loop turn that did anything: ("out", [RequestOutput], EngineStats), or
  ("dead", reason) when a step raised; the child then exits.

The child starts with spawn (safe with CUDA and with the parent's threads), builds the engine, reports
("ready", info) or ("failed", reason), ignores SIGINT (the parent decides when it stops: a Ctrl-C in a
terminal reaches the whole process group, and the parent drains first) and exits when the pipe closes,
so it never outlives the server. If it dies, the proxy's `step()` raises and `AsyncEngine` ends every
open stream with an error and reports itself unhealthy; `alive()` catches a death while idle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from server.engine.engine import EngineStats, LLMEngine, RequestChecker
from server.engine.request import CompletionOutput, RequestOutput, SamplingParams

log = logging.getLogger("server.engine")

POLL_SECONDS = 0.05  # how long the parent waits for the child before re-reading its own inbox


HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"


@contextlib.contextmanager
def _huge_page_malloc() -> Iterator[None]:
    """Start the child with glibc's malloc asking for transparent huge pages (madvise) on its large blocks:
    the weights (~100-270 MB) and the KV cache stream through memory every step, and with 2 MB pages the
    decode step at 32 streams took 41 ms against 43-49 ms (bench/NOTES.md). glibc reads GLIBC_TUNABLES
    when a process starts, so it goes into the environment the spawned child inherits, then comes back
    out. A value the user set is kept as it is; the setting is inert where THP is off or glibc is older."""
    old = os.environ.get("GLIBC_TUNABLES")
    if old is not None:
        yield
        return
    os.environ["GLIBC_TUNABLES"] = HUGE_PAGE_TUNABLE
    try:
        yield
    finally:
        os.environ.pop("GLIBC_TUNABLES", None)


class EngineProcessError(RuntimeError):
    """The engine process failed to start, failed in a step, or went away."""


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What the server process needs to know about the engine, sent once when it is ready."""

    checker: RequestChecker
    max_model_len: int
    num_blocks: int


class EngineProcess:
    """Stands in for an `LLMEngine` inside `AsyncEngine`; the real one runs in a child process.

    `add_request` / `abort_request` / `abort_all` send commands and return at once (abort outputs come
    back through `step()`); `step()` returns the outputs of the child's next loop turn, or [] after
    POLL_SECONDS so that `AsyncEngine` can forward new commands. Requests sent and not yet seen finished
    count as unfinished.
    """

    def __init__(
        self,
        build: Any,
        *args: Any,
        log_level: str = "info",
        log_format: str = "text",
        start_timeout: float | None = None,
    ) -> None:
        """Start a child that runs `build(*args) -> (LLMEngine, max_model_len)` (picklable, importable),
        and wait until it is ready. Raises EngineProcessError with the child's reason if it fails."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(
            target=_child_main,
            args=(child_conn, build, args, log_level, log_format),
            name="smollm2-engine",
            daemon=True,
        )
        with _huge_page_malloc():
            self._process.start()
        child_conn.close()  # ours is closed: the child's death reads as EOF here
        self._unfinished: set[str] = set()
        self._sent_adds = 0  # children added since the last stats, for num_waiting
        self._closed = False
        message = self._recv(start_timeout, " while starting")
        if message is None:
            self.close()
            raise EngineProcessError(f"the engine process did not start within {start_timeout} s")
        if message[0] != "ready":
            self.close()
            raise EngineProcessError(f"the engine process failed to start: {message[1]}")
        self.info: EngineInfo = message[1]
        self.checker = self.info.checker
        self._stats = EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, {}, 0)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def alive(self) -> bool:
        return self._process.is_alive()

    # ---- the LLMEngine surface AsyncEngine uses -------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._stats.num_waiting + self._sent_adds

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._unfinished:
            raise ValueError(f"request id {request_id!r} is already running")
        self._send(("add", request_id, prompt_token_ids, params))
        self._unfinished.add(request_id)
        self._sent_adds += params.n

    def abort_request(self, request_id: str, index: int | None = None) -> RequestOutput | None:
        if request_id in self._unfinished:
            self._send(("abort", request_id, index))
        return None

    def abort_all(self) -> list[RequestOutput]:
        if self._unfinished:
            self._send(("abort_all",))
        return []

    def has_unfinished(self) -> bool:
        return bool(self._unfinished)

    def step(self) -> list[RequestOutput]:
        message = self._recv(POLL_SECONDS)
        if message is None:
            return []
        if message[0] == "dead":
            raise EngineProcessError(f"the engine process failed: {message[1]}")
        _, outputs, stats = message
        self._stats, self._sent_adds = stats, 0
        for out in outputs:
            if out.finished:
                self._unfinished.discard(out.request_id)
        return outputs

    def stats(self) -> EngineStats:
        return dataclasses.replace(self._stats, num_finished=dict(self._stats.num_finished))

    # ---- lifecycle -----------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to stop, wait for it, and kill it if it does not."""
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("engine process %s did not stop in %s s: killing it", self._process.pid, timeout)
            self._process.kill()
            self._process.join()
        self._conn.close()

    def _recv(self, timeout: float | None, when: str = "") -> tuple[Any, ...] | None:
        """The child's next message, or None after `timeout` seconds (None: wait); EngineProcessError
        once the child has gone (EOF on the pipe, or dead while nothing was sent)."""
        try:
            if self._conn.poll(timeout):
                return self._conn.recv()
            gone = not self._process.is_alive()
        except (EOFError, OSError):
            gone = True
        if not gone:
            return None
        self._process.join(1)
        raise EngineProcessError(f"the engine process exited{when} (exit code {self._process.exitcode})")

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except OSError as exc:
            raise EngineProcessError("the engine process is gone") from exc


# ---- the child -------------------------------------------------------------------------------------


def _child_main(conn: Connection, build: Any, args: tuple[Any, ...], log_level: str, log_format: str) -> None:
    from server.logs import configure_logging  # the server's line format, so both processes log alike

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(log_level, log_format)
    try:
        engine, max_model_len = build(*args)
        info = EngineInfo(engine.checker, max_model_len, engine.scheduler.config.num_blocks)
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent, then exit
        log.error("engine process failed to start:\n%s", traceback.format_exc())
        _send_quietly(conn, ("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", info))
    # Steps run on a second thread, as they did in the server process: torch.set_num_threads() (called
    # by `build` on this thread) caps ATen's element-wise loops, while oneDNN GEMMs follow the calling
    # thread's OpenMP default (every core). Two OpenMP threads on every small op of a 2-core box made a
    # one-stream token 10x slower when other processes also wanted the CPU (bench/NOTES.md).
    loop = threading.Thread(target=_serve, args=(engine, conn), name="engine-loop")
    loop.start()
    loop.join()


def _serve(engine: LLMEngine, conn: Connection) -> None:
    try:
        _loop(engine, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the server process went away: nothing is listening
    except Exception as exc:  # noqa: BLE001 - a failed step: tell the parent, which fails the streams
        log.error("engine step failed:\n%s", traceback.format_exc())
        _send_quietly(conn, ("dead", f"{type(exc).__name__}: {exc}"))


def _loop(engine: LLMEngine, conn: Connection) -> None:
    while True:
        commands = []
        if not engine.has_unfinished() or conn.poll():
            commands.append(conn.recv())  # blocks while idle
            while conn.poll():
                commands.append(conn.recv())
        outputs: list[RequestOutput] = []
        for command in commands:
            verb = command[0]
            if verb == "stop":
                return
            if verb == "add":
                _, request_id, prompt, params = command
                try:
                    engine.add_request(request_id, prompt, params)
                except ValueError as exc:  # checked in the parent already; end that request only
                    outputs.append(_error_output(request_id, params.n, str(exc)))
            elif verb == "abort":
                out = engine.abort_request(command[1], command[2])
                if out is not None:
                    outputs.append(out)
            elif verb == "abort_all":
                outputs.extend(engine.abort_all())
        if engine.has_unfinished():
            outputs.extend(engine.step())
        conn.send(("out", outputs, engine.stats()))


def _error_output(request_id: str, n: int, reason: str) -> RequestOutput:
    completions = [CompletionOutput(i, [], finish_reason="error") for i in range(n)]
    return RequestOutput(request_id, completions, finished=True, error=reason)


def _send_quietly(conn: Connection, message: tuple[Any, ...]) -> None:
    try:
        conn.send(message)
    except OSError:
        pass
