"""Fewer compute threads while other processes take the engine's CPUs.

The engine's OpenMP threads spin while they wait for each other, a few hundred times a step: that is
what keeps a step's small GEMM calls cheap on CPUs of its own. When another busy process shares those
CPUs, the kernel takes one of the threads off its core for a time slice and the others spin until it
comes back, at every one of those waits: steps take tens of times as long (a second server on the
same two cores made ours 1-20 tokens/s, against ~230 on one thread). One thread waits for no one.

`CPUShare` watches how much CPU the engine process gets while it steps: the process's CPU time over
the steps' wall time, per compute thread. Threads that spin or compute get ~1; well below means the
threads were off their cores. Then it runs the steps on one thread, and now and then tries all of them
again, waiting longer after each try that finds the CPUs still taken.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("server.engine")

WINDOW_S = 0.25  # steps' wall time judged at once: ~80 one-stream steps, ~15 of 32 streams
SHARED_BELOW = 0.6  # of the compute threads' CPU time: less, and they were kept off their cores
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 120.0


class CPUShare:
    """Call `begin()` before each step and `end()` after it; `set_threads(n)` is called between steps."""

    def __init__(
        self,
        set_threads: Callable[[int], None],
        threads: int,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        self._set_threads = set_threads
        self.full = threads
        self.threads = threads
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._wall = 0.0  # the current window's steps
        self._cpu = 0.0
        self._start: tuple[float, float] | None = None
        self._retry_after = RETRY_FIRST_S
        self._retry_at: float | None = None  # on one thread: when to try them all again
        self._trying = False  # all the threads, on a try: one window decides
        self.shared_episodes = 0

    def begin(self) -> None:
        """Before a step."""
        now = self._clock()
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self._trying = True
            self._use(self.full)
            self._wall = self._cpu = 0.0
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
        share = self._cpu / (self._wall * self.threads)
        log.debug(
            "CPU share of the engine's %d threads over %.2f s of steps: %.2f", self.threads, self._wall, share
        )
        self._wall = self._cpu = 0.0
        if self.threads == 1:
            return  # one thread waits for no one: the retry timer decides when to try the others
        if share >= SHARED_BELOW:
            if self._trying:
                self._trying = False
                self._retry_after = RETRY_FIRST_S
                log.info("the engine's CPUs are free again: stepping on %d threads", self.threads)
            return
        if self._trying:
            self._trying = False
            self._retry_after = min(RETRY_MAX_S, self._retry_after * 2)
        else:
            self.shared_episodes += 1
            log.warning(
                "the engine's CPUs are busy with other processes (its %d threads ran %.0f%% of the time "
                "they stepped): stepping on 1 thread, trying %d again after %g s, then less often",
                self.threads, 100 * share, self.full, self._retry_after,
            )  # fmt: skip
        self._use(1)
        self._retry_at = self._clock() + self._retry_after

    def _use(self, threads: int) -> None:
        if threads != self.threads:
            self._set_threads(threads)
            self.threads = threads
