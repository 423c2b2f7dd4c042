"""Fewer compute threads while other processes take the engine's CPUs.

The engine's OpenMP threads spin while they wait for each other, a few hundred times a step: that is
what keeps a step's small GEMM calls cheap on CPUs of their own. When another busy process shares those
CPUs, the kernel takes one of the threads off its core for a time slice and the others spin until it
comes back, at every one of those waits: steps take tens of times as long (a second server on the
same two cores made ours 1-20 tokens/s, against ~230 on one thread). Fewer threads wait less.

`CPUShare` judges windows of at least `WINDOW_S` of steps, two running before it acts. Its measure is how many of the process's
threads that step (the stepping thread and the OpenMP workers) were, on average, ready to run but
waiting for a CPU while it stepped (the run-queue wait the kernel keeps per thread in
/proc/self/task/*/schedstat); where that file is missing, the process's CPU
time over the steps' wall time per compute thread (spinning or computing threads get ~1; one thread
kept off its core for good makes it 1 - 1/threads). Past the mark it drops as many threads as were
waiting (at least one), and tries all of them again after `RETRY_FIRST_S`, waiting twice as long after
each try that finds the CPUs still taken, up to `RETRY_MAX_S`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("server.engine")

WINDOW_S = 0.25  # steps' wall time judged at once: ~80 one-stream steps, ~15 of 32 streams
# Threads waiting for a CPU, on average, from which some are dropped, in two windows running. The server's
# own HTTP process (and a load generator beside it) keeps ~0.2-0.4 waiting on 2 cores; one busy process
# beside them, ~0.8.
WAITING_FROM = 0.55
WINDOWS_TO_DROP = 2
SHARED_BELOW = 0.6  # without schedstat: of the compute threads' CPU time, less and some are dropped
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 120.0


def runqueue_wait_ns(tasks: str = "/proc/self/task") -> dict[int, int] | None:
    """Each thread's time spent ready to run but waiting for a CPU, in ns; None where Linux keeps none."""
    out = {}
    try:
        names = os.listdir(tasks)
    except OSError:
        return None
    for name in names:
        try:
            with open(f"{tasks}/{name}/schedstat", "rb") as f:
                out[int(name)] = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return out or None


def compute_thread_waits() -> dict[int, int] | None:
    """`runqueue_wait_ns` of the threads that step: the calling one and those Python did not start (the
    OpenMP workers). The process's other Python threads (pipes, grammar compiles, and the HTTP server's
    own when the engine runs on a thread of it) are left out: their waits are not the steps'."""
    waits = runqueue_wait_ns()
    if waits is None:
        return None
    me = threading.current_thread()
    others = {t.native_id for t in threading.enumerate() if t is not me}
    return {tid: ns for tid, ns in waits.items() if tid not in others}


class CPUShare:
    """Call `begin()` before each step and `end()` after it; `set_threads(n)` is called from them,
    between steps, on the stepping thread."""

    def __init__(
        self,
        set_threads: Callable[[int], None],
        threads: int,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
        waits: Callable[[], dict[int, int] | None] = compute_thread_waits,
    ) -> None:
        self._set_threads = set_threads
        self.full = threads
        self.threads = threads
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._waits = waits
        self._wall = 0.0  # the current window's steps
        self._cpu = 0.0
        self._window_waits: dict[int, int] | None = None
        self._window_open = False
        self._start: tuple[float, float] | None = None
        self._retry_after = RETRY_FIRST_S
        self._retry_at: float | None = None  # on fewer threads: when to try them all again
        self._trying = False  # all the threads, on a try: the next windows decide
        self._taken_windows = 0  # windows running that found the CPUs taken
        self.shared_episodes = 0

    def begin(self) -> None:
        """Before a step."""
        now = self._clock()
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self._trying = True
            self._use(self.full)
            self._window_open = False
            self._taken_windows = 0
        if not self._window_open:
            self._window_open = True
            self._wall = self._cpu = 0.0
            self._window_waits = self._waits()
            now = self._clock()
        self._start = (now, self._cpu_clock())

    def end(self) -> None:
        """After a step: judge the window once it is long enough."""
        if self._start is None:
            return
        wall0, cpu0 = self._start
        self._start = None
        self._wall += self._clock() - wall0
        self._cpu += self._cpu_clock() - cpu0
        if self._wall < WINDOW_S:
            return
        self._window_open = False
        waiting = self._waiting()
        share = self._cpu / (self._wall * self.threads)
        log.debug(
            "engine threads over %.2f s of steps on %d: %s waiting for a CPU, CPU time share %.2f",
            self._wall, self.threads, "-" if waiting is None else f"{waiting:.2f}", share,
        )  # fmt: skip
        if self.threads == 1:
            return  # one thread waits for no other: the retry timer decides when to try them again
        taken = waiting >= WAITING_FROM if waiting is not None else share < SHARED_BELOW
        if not taken:
            self._taken_windows = 0
            if self._trying:
                self._trying = False
                self._retry_after = RETRY_FIRST_S
                log.info("the engine's CPUs are free again: stepping on %d threads", self.threads)
            return
        self._taken_windows += 1
        if self._taken_windows < WINDOWS_TO_DROP:
            return
        self._taken_windows = 0
        drop = max(1, math.ceil(waiting)) if waiting is not None else self.threads - 1
        if self._trying:
            self._trying = False
            self._retry_after = min(RETRY_MAX_S, self._retry_after * 2)
        elif self.threads == self.full:
            self.shared_episodes += 1
            measure = (
                f"{waiting:.1f} of its threads waited for a CPU"
                if waiting is not None
                else f"its threads ran {100 * share:.0f}% of the time"
            )
            log.warning(
                "the engine's CPUs are busy with other processes or held back by a CPU quota (%s while it "
                "stepped): stepping on %d of %d threads, trying all again after %g s, then less often",
                measure, max(1, self.threads - drop), self.full, self._retry_after,
            )  # fmt: skip
        self._use(max(1, self.threads - drop))
        self._retry_at = self._clock() + self._retry_after

    def _waiting(self) -> float | None:
        """Threads that waited for a CPU, on average over the window's steps (None: not known)."""
        before, after = self._window_waits, self._waits()
        if before is None or after is None:
            return None
        waited = sum(ns - before[tid] for tid, ns in after.items() if tid in before)
        return max(0, waited) / 1e9 / self._wall

    def _use(self, threads: int) -> None:
        if threads != self.threads:
            self._set_threads(threads)
            self.threads = threads
