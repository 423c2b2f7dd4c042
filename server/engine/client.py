"""Where the engine core runs: a thread of the server (`ThreadCore`) or a child process (`ProcessCore`).

Both take typed messages with `send()`, which never blocks (a queue put), and hand every message the
core emits to `on_message`, called from a thread of theirs. In the process, a sender thread writes the
outbox to one pipe and a receiver thread reads the other, while the child does the same on its side
(server/engine/core.py): each pipe always has a reader, so a large message in one direction can never
wait on a large message in the other, and no lock is held across a send.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

from server.engine.core import EngineCore, LoopInput, core_process_main, run_core_loop
from server.engine.messages import CoreDead, CoreInfo, CoreInput, CoreOutput, CoreReady, Shutdown

log = logging.getLogger("server.engine")
OnMessage = Callable[[CoreOutput], None]
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"


class CoreStartError(RuntimeError):
    """The engine core could not be built (bad model path, out of memory...)."""


class CoreHandle(Protocol):
    info: CoreInfo

    def send(self, message: CoreInput) -> None: ...
    def alive(self) -> bool: ...
    def kill(self) -> bool:
        """Stop the core now, whatever it is doing; False if that is impossible (a thread)."""
        ...

    def close(self, timeout: float) -> None: ...


class ThreadCore:
    """The core on a thread of this process (`--engine-process false`, tests)."""

    def __init__(self, build: Callable[[], EngineCore], on_message: OnMessage) -> None:
        try:
            core = build()
        except Exception as exc:
            raise CoreStartError(f"{type(exc).__name__}: {exc}") from exc
        self.info = core.info
        self.core = core
        self._inbox: queue.SimpleQueue[LoopInput] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=run_core_loop, args=(core, self._inbox, on_message), name="engine-loop", daemon=True
        )
        self._thread.start()

    def send(self, message: CoreInput) -> None:
        self._inbox.put(message)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def kill(self) -> bool:
        return False  # a Python thread cannot be stopped from outside

    def close(self, timeout: float) -> None:
        self._inbox.put(Shutdown())
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("engine thread did not stop within %s s", timeout)


@dataclass(frozen=True)
class SpawnedCore:
    """A core's process, started and still loading, with our ends of its two pipes."""

    process: BaseProcess
    to_child: Connection
    from_child: Connection


def spawn_core(build: Callable[..., EngineCore], args: tuple[Any, ...], log_level: str = "info",
               log_format: str = "text") -> SpawnedCore:  # fmt: skip
    """Start the child that runs `build(*args)`, without waiting for it."""
    ctx = multiprocessing.get_context("spawn")
    child_in, to_child = ctx.Pipe(duplex=False)
    from_child, child_out = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=core_process_main, args=(child_in, child_out, build, args, log_level, log_format),
        name="smollm2-engine", daemon=True,
    )  # fmt: skip
    with _huge_page_malloc():
        process.start()
    child_in.close()  # ours are closed: the child's death reads as EOF here
    child_out.close()
    return SpawnedCore(process, to_child, from_child)


class ProcessCore:
    """The core in a child process started with spawn (safe with CUDA and with our threads)."""

    def __init__(
        self, build: Callable[..., EngineCore], args: tuple[Any, ...], on_message: OnMessage,
        log_level: str = "info", log_format: str = "text", start_timeout: float | None = None,
        spawned: SpawnedCore | None = None,
    ) -> None:  # fmt: skip
        """spawned: the process of `build(*args)`, started earlier (None: start it now)."""
        spawned = spawned or spawn_core(build, args, log_level, log_format)
        self._process, self._to_child, self._from_child = (
            spawned.process,
            spawned.to_child,
            spawned.from_child,
        )
        self.info = self._await_ready(start_timeout)
        self._on_message = on_message
        # Set by close(): the child's exit is then expected, and close() alone reaps it (two threads
        # joining one process race in multiprocessing: one can see it alive after it was reaped).
        self._closing = False
        self._failure: str | None = None  # why _fail() stopped the child, reported as its death
        self._outbox: queue.SimpleQueue[CoreInput | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_all, name="core-sender", daemon=True)
        self._receiver = threading.Thread(target=self._receive_all, name="core-receiver", daemon=True)
        self._sender.start()
        self._receiver.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _await_ready(self, timeout: float | None) -> CoreInfo:
        try:
            ready = self._from_child.poll(timeout)
            message = self._from_child.recv() if ready else None
        except (EOFError, OSError):
            message = CoreDead(f"the engine process exited while starting ({self._how_it_ended()})")
        if isinstance(message, CoreReady):
            return message.info
        self._stop_process(5.0)
        if message is None:
            raise CoreStartError(f"the engine process did not start within {timeout} s")
        assert isinstance(message, CoreDead), f"unexpected first message {type(message).__name__}"
        raise CoreStartError(message.reason)

    def send(self, message: CoreInput) -> None:
        self._outbox.put(message)

    def alive(self) -> bool:
        return self._process.is_alive()

    def kill(self) -> bool:
        self._process.kill()
        return True

    def close(self, timeout: float) -> None:
        """Ask the child to stop, wait for it, and kill it if it does not."""
        self._closing = True
        self._outbox.put(Shutdown())
        self._outbox.put(None)
        self._stop_process(timeout)
        self._sender.join(1.0)
        self._receiver.join(1.0)

    def _stop_process(self, timeout: float) -> None:
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("engine process %s did not stop in %s s: killing it", self._process.pid, timeout)
            self._process.kill()
            self._process.join(5.0)
        with contextlib.suppress(OSError):
            self._to_child.close()

    def _exit_code(self) -> int | None:
        self._process.join(1.0)
        return self._process.exitcode

    def _how_it_ended(self) -> str:
        """`exit code N`, or the signal that ended it; a SIGKILL nobody here sent is most often the kernel's
        out-of-memory killer (a container's memory limit), which the operator should hear first."""
        code = self._exit_code()
        if code is None or code >= 0:
            return f"exit code {code}"
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if -code == signal.SIGKILL:
            return f"killed by {name}: out of memory? (a container's memory limit, or --kv-cache-memory too large)"
        return f"killed by {name}"

    def _send_all(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._to_child.send(message)
            except OSError:  # the child is gone; the receiver reports it
                return
            except Exception as exc:  # noqa: BLE001 - the child never got this message: start it anew
                self._fail(f"a message to the engine process could not be sent ({type(exc).__name__}: {exc})")
                return

    def _receive_all(self) -> None:
        try:
            while True:
                message = self._from_child.recv()
                self._on_message(message)
                if isinstance(message, CoreDead):
                    return
        except (EOFError, OSError):
            code = "closed" if self._closing else self._how_it_ended()
            self._on_message(CoreDead(self._failure or f"the engine process exited ({code})"))
        except Exception as exc:  # noqa: BLE001 - output lost: the streams it was for would wait forever
            self._fail(f"the engine process's output could not be read ({type(exc).__name__}: {exc})")
            self._on_message(CoreDead(self._failure or "the engine process failed"))

    def _fail(self, reason: str) -> None:
        """Stop the child after a message was lost between us: the supervisor sees it die and restarts it."""
        log.exception("%s: stopping the engine process", reason)
        self._failure = self._failure or reason
        with contextlib.suppress(OSError):
            self._process.kill()


@contextlib.contextmanager
def _huge_page_malloc() -> Iterator[None]:
    """Start the child with glibc's malloc asking for transparent huge pages (madvise) on its large
    blocks: the weights and the KV cache stream through memory every step, and 2 MB pages make the
    step measurably faster (bench/NOTES.md). glibc reads GLIBC_TUNABLES when a process starts, so it
    goes into the environment the spawned child inherits, then comes back out. A value the user set is
    kept as it is; the setting is inert where THP is off or glibc is older."""
    if os.environ.get("GLIBC_TUNABLES") is not None:
        yield
        return
    os.environ["GLIBC_TUNABLES"] = HUGE_PAGE_TUNABLE
    try:
        yield
    finally:
        os.environ.pop("GLIBC_TUNABLES", None)
