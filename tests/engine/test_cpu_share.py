"""The engine steps on one thread while other processes take its CPUs, and tries all of them again later."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from model.tokenizer import Tokenizer
from server.engine import cpu_share
from server.engine.cpu_share import CPUShare, runqueue_wait_ns


class Clocks:
    """Wall and CPU time a test moves by hand: `step(wall, share, waiting)` is one step of `wall` seconds during
    which the process got `share` of its threads' time and `waiting` of its threads waited for a CPU. Without
    `schedstat`, the run-queue waits are not known (as where Linux keeps none)."""

    def __init__(self, threads: int = 2, schedstat: bool = False) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        self.wait_ns = 0
        self.calls: list[int] = []
        waits = (lambda: {7: self.wait_ns}) if schedstat else (lambda: None)
        self.share = CPUShare(
            self.calls.append, threads, clock=lambda: self.wall, cpu_clock=lambda: self.cpu, waits=waits
        )

    def step(self, wall: float, share: float = 1.0, waiting: float = 0.0) -> None:
        self.share.begin()
        self.wall += wall
        self.cpu += wall * share * self.share.threads
        self.wait_ns += int(wall * waiting * 1e9)
        self.share.end()

    def idle(self, seconds: float) -> None:
        self.wall += seconds  # no step: neither judged nor counted


def test_threads_that_get_their_cpus_stay(caplog: pytest.LogCaptureFixture) -> None:
    c = Clocks()
    for _ in range(200):
        c.step(0.017, 0.9)  # a 32-stream step beside the HTTP process
    assert c.share.threads == 2 and c.calls == [] and c.share.shared_episodes == 0


def test_a_window_short_of_cpu_drops_to_one_thread_then_tries_again(caplog: pytest.LogCaptureFixture) -> None:
    c = Clocks()
    caplog.set_level(logging.INFO, logger="server.engine")
    for _ in range(10):
        c.step(0.003, 0.95)
    for _ in range(3):
        c.step(0.1, 0.5)  # one thread spins at each wait while the other waits for a CPU
    assert c.calls == [], "one window is not enough"
    for _ in range(3):
        c.step(0.1, 0.5)
    assert c.calls == [1] and c.share.threads == 1
    assert "busy with other processes" in caplog.text and c.share.shared_episodes == 1
    # on one thread nothing is learnt about the others, whatever the windows say
    for _ in range(50):
        c.step(0.05, 1.0)
    assert c.share.threads == 1
    c.idle(cpu_share.RETRY_FIRST_S)
    c.step(0.01, 0.5)  # the retry: all the threads, judged over one window
    assert c.calls == [1, 2]
    for _ in range(60):
        c.step(0.01, 0.5)
    assert c.calls == [1, 2, 1]  # still taken: back to one, no second warning
    assert caplog.text.count("busy with other processes") == 1 and c.share.shared_episodes == 1
    c.idle(cpu_share.RETRY_FIRST_S)
    c.step(0.01, 0.9)
    assert c.calls == [1, 2, 1], "the wait doubles after a try that finds the CPUs taken"
    c.idle(cpu_share.RETRY_FIRST_S)
    for _ in range(30):
        c.step(0.01, 0.9)
    assert c.calls == [1, 2, 1, 2] and c.share.threads == 2
    assert "free again" in caplog.text
    for _ in range(100):
        c.step(0.01, 0.9)
    assert c.share.threads == 2


def test_the_wait_between_tries_is_bounded() -> None:
    c = Clocks()
    c.step(0.3, 0.3)
    waits = []
    for _ in range(12):
        before = c.wall
        while c.share.threads == 1:
            c.idle(0.5)
            c.step(0.01, 0.3)
        waits.append(c.wall - before)
        c.step(0.3, 0.3)  # the try fails
    assert waits[0] < cpu_share.RETRY_FIRST_S + 1
    assert max(waits) <= cpu_share.RETRY_MAX_S + 1 and waits[-1] > cpu_share.RETRY_MAX_S / 2


def test_short_steps_are_judged_together_not_one_by_one() -> None:
    c = Clocks()
    c.step(0.003, 0.3)  # one slow-looking step (a page fault, the HTTP process) is not a window
    for _ in range(200):
        c.step(0.003, 0.95)
    assert c.calls == []


@pytest.mark.parametrize("threads", [1, 2])
def test_the_served_core_watches_its_cpus_only_on_several_threads(
    tokenizer: Tokenizer, tmp_path: Path, threads: int, request: pytest.FixtureRequest
) -> None:
    from server.core_setup import load_core
    from server.settings import Settings
    from tests.server.test_sigterm import tiny_model_folder

    threads_before = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads_before))  # load_core sets this process's
    model = tiny_model_folder(tokenizer, tmp_path / "tiny")
    settings = Settings.from_args(
        ["--model", str(model), "--threads", str(threads), "--device", "cpu"], env={}
    )
    core = load_core(settings)
    if threads == 1:
        assert core.cpu_share is None and core.stats().compute_threads == 1
        return
    assert core.cpu_share is not None and core.cpu_share.full == 2
    kernels = core.runner.model.kernels  # type: ignore[attr-defined]
    assert kernels.compute_threads == 2
    assert core.info.compute_threads == 2 and core.stats().compute_threads == 2  # the metric's gauge
    core.cpu_share._use(1)  # what a window short of CPU does, between two steps
    assert core.runner.model.kernels.compute_threads == 1  # type: ignore[attr-defined]
    assert torch.get_num_threads() == 1
    assert core.stats().compute_threads == 1


def test_as_many_threads_are_dropped_as_waited_for_a_cpu() -> None:
    c = Clocks(threads=8, schedstat=True)
    w = cpu_share.WINDOW_S
    for _ in range(20):
        c.step(w, waiting=0.3)  # the HTTP process's turns now and then: not a neighbour
    c.step(w, waiting=0.9)  # one window past the mark: a burst, not yet a neighbour
    c.step(w, waiting=0.3)
    assert c.calls == []
    c.step(w, share=0.95, waiting=2.5)  # a CPU time share that alone would not tell
    c.step(w, share=0.95, waiting=2.5)
    assert c.calls == [5]
    c.step(w, waiting=1.0)  # still one too many for the CPUs left
    c.step(w, waiting=1.0)
    assert c.calls == [5, 4] and c.share.shared_episodes == 1
    c.step(w, waiting=0.1)
    assert c.calls == [5, 4]  # fewer threads are not tried more of until the retry
    c.idle(cpu_share.RETRY_FIRST_S)
    c.step(w, waiting=0.1)
    assert c.calls == [5, 4, 8] and c.share.threads == 8


def test_where_linux_keeps_no_run_queue_waits_the_cpu_time_share_decides(tmp_path: Path) -> None:
    assert runqueue_wait_ns(str(tmp_path / "none")) is None
    waits = runqueue_wait_ns()
    if waits is not None:  # this kernel keeps them: every thread of this process has its own
        assert os.getpid() in waits and all(ns >= 0 for ns in waits.values())


def test_only_the_stepping_threads_waits_count() -> None:
    """The calling thread and the threads Python did not start (OpenMP's) are measured; the process's other
    Python threads (pipes, compiles, an HTTP server's own) are not."""
    import threading

    from server.engine.cpu_share import compute_thread_waits

    if runqueue_wait_ns() is None:
        pytest.skip("this kernel keeps no run-queue waits")
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="pipe-reader")
    other.start()
    try:
        waits = compute_thread_waits()
        assert waits is not None
        assert threading.get_native_id() in waits and other.native_id not in waits
    finally:
        stop.set()
        other.join()
