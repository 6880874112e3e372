"""The run loop, its heartbeat and stop signals, as the agents rely on them."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import pytest
from prometheus_client import CollectorRegistry

from agents.common.loop import Heartbeat, install_stop_signals, run_loop
from agents.common.metrics import LoopMetrics

PREFIX = "x"


class FakeClock:
    """A monotonic clock that moves only when a test sets `now`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class LoopThread:
    """run_loop in a thread, so a test can bound how long it waits for it."""

    def __init__(self, target: Callable[[], int]) -> None:
        self.failures: int | None = None
        self._target = target
        self._thread = threading.Thread(target=self._run, name="test-run-loop", daemon=True)

    def _run(self) -> None:
        self.failures = self._target()

    def start(self) -> LoopThread:
        self._thread.start()
        return self

    def join(self, timeout: float) -> bool:
        """True if the loop returned within `timeout` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> LoopMetrics:
    return LoopMetrics(registry, PREFIX, "1.2.3")


# --- iterations, failures, metrics ----------------------------------------------


@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_iterations_runs_tick_that_many_times(iterations: int) -> None:
    calls: list[float] = []
    failures = run_loop(
        lambda: calls.append(time.monotonic()),
        interval=0.001,
        stop=threading.Event(),
        iterations=iterations,
    )
    assert len(calls) == iterations
    assert failures == 0


def test_failing_tick_is_logged_counted_and_the_loop_goes_on(
    metrics: LoopMetrics, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def tick() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("mountinfo vanished")

    with caplog.at_level(logging.ERROR, logger="agents.common.loop"):
        failures = run_loop(
            tick,
            interval=0.001,
            stop=threading.Event(),
            iterations=4,
            metrics=metrics,
            wall_clock=lambda: 1_700_000_000.0,
        )
    assert calls == 4
    assert failures == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], RuntimeError)
    assert "mountinfo vanished" in caplog.text
    assert registry.get_sample_value(f"{PREFIX}_tick_failures_total") == 1.0
    assert registry.get_sample_value(f"{PREFIX}_ticks_total") == 4.0
    assert registry.get_sample_value(f"{PREFIX}_tick_duration_seconds_count") == 4.0
    assert registry.get_sample_value(f"{PREFIX}_last_success_timestamp_seconds") == 1.7e9


def test_every_tick_failing_never_sets_last_success(
    metrics: LoopMetrics, registry: CollectorRegistry
) -> None:
    def tick() -> None:
        raise OSError("fusectl gone")

    failures = run_loop(tick, interval=0.001, stop=threading.Event(), iterations=3, metrics=metrics)
    assert failures == 3
    assert registry.get_sample_value(f"{PREFIX}_tick_failures_total") == 3.0
    assert registry.get_sample_value(f"{PREFIX}_last_success_timestamp_seconds") == 0.0


def test_only_successful_ticks_beat() -> None:
    clock = FakeClock()
    heartbeat = Heartbeat(max_age=10.0, clock=clock)

    def failing() -> None:
        raise RuntimeError("boom")

    clock.now += 8.0
    run_loop(failing, interval=0.001, stop=threading.Event(), iterations=2, heartbeat=heartbeat)
    heartbeat.set_ready(True)
    assert heartbeat.ready() == (False, "no successful tick yet")

    run_loop(
        lambda: None, interval=0.001, stop=threading.Event(), iterations=1, heartbeat=heartbeat
    )
    clock.now += 8.0  # 16 s after start, 8 s after the successful tick
    assert heartbeat.healthy() == (True, "ok")
    assert heartbeat.ready() == (True, "ok")


def test_stop_set_before_the_loop_runs_no_tick() -> None:
    stop = threading.Event()
    stop.set()
    calls: list[None] = []
    assert run_loop(lambda: calls.append(None), interval=30.0, stop=stop) == 0
    assert calls == []


def test_tick_that_sets_stop_ends_the_loop() -> None:
    stop = threading.Event()
    calls: list[None] = []

    def tick() -> None:
        calls.append(None)
        stop.set()

    loop = LoopThread(lambda: run_loop(tick, interval=30.0, stop=stop)).start()
    assert loop.join(1.0)
    assert len(calls) == 1


# --- stop and wake from other threads ---------------------------------------------


def test_stop_from_another_thread_ends_the_wait_promptly() -> None:
    stop = threading.Event()
    ticked = threading.Event()
    loop = LoopThread(lambda: run_loop(ticked.set, interval=30.0, stop=stop)).start()
    assert ticked.wait(1.0)
    started = time.monotonic()
    stop.set()
    assert loop.join(1.0), "run_loop still waiting 1 s after stop was set"
    assert time.monotonic() - started < 1.0
    assert loop.failures == 0


def test_stop_from_another_thread_ends_the_wait_promptly_with_wake() -> None:
    stop, wake = threading.Event(), threading.Event()
    ticked = threading.Event()
    loop = LoopThread(lambda: run_loop(ticked.set, interval=30.0, stop=stop, wake=wake)).start()
    try:
        assert ticked.wait(1.0)
        stop.set()
        assert loop.join(1.0), "run_loop still waiting 1 s after stop was set"
    finally:
        wake.set()  # release the loop if it is still waiting
        assert loop.join(5.0)


def test_wake_starts_the_next_tick_early_but_not_before_min_gap() -> None:
    stop, wake = threading.Event(), threading.Event()
    starts: list[float] = []
    timers: list[threading.Timer] = []

    def tick() -> None:
        starts.append(time.monotonic())
        if len(starts) == 1:  # an event source wakes the loop shortly after the first tick
            timers.append(threading.Timer(0.05, wake.set))
            timers[0].start()

    loop = LoopThread(
        lambda: run_loop(tick, interval=30.0, stop=stop, wake=wake, min_gap=0.4, iterations=2)
    ).start()
    try:
        assert loop.join(3.0), "wake did not start the next tick"
    finally:
        stop.set()
        wake.set()
        for timer in timers:
            timer.join()
    assert len(starts) == 2
    assert 0.4 <= starts[1] - starts[0] < 2.0


def test_wake_during_a_tick_waits_min_gap_from_the_tick_start() -> None:
    stop, wake = threading.Event(), threading.Event()
    starts: list[float] = []

    def tick() -> None:
        starts.append(time.monotonic())
        wake.set()

    loop = LoopThread(
        lambda: run_loop(tick, interval=30.0, stop=stop, wake=wake, min_gap=0.3, iterations=3)
    ).start()
    try:
        assert loop.join(3.0)
    finally:
        stop.set()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 2
    assert all(0.3 <= gap < 1.5 for gap in gaps), gaps


def test_wake_after_min_gap_has_passed_ticks_at_once() -> None:
    stop, wake = threading.Event(), threading.Event()
    starts: list[float] = []
    woken: list[float] = []

    def set_wake() -> None:
        woken.append(time.monotonic())
        wake.set()

    timer = threading.Timer(0.8, set_wake)

    def tick() -> None:
        starts.append(time.monotonic())
        if len(starts) == 1:
            timer.start()

    loop = LoopThread(
        lambda: run_loop(tick, interval=30.0, stop=stop, wake=wake, min_gap=0.4, iterations=2)
    ).start()
    try:
        assert loop.join(3.0)
    finally:
        stop.set()
        wake.set()
        timer.join()
    assert len(starts) == 2
    assert starts[1] - woken[0] < 0.2


def test_next_due_ends_the_wait_before_the_interval() -> None:
    # A token living 4 s must not wait for a 30 s pass (issue 9).
    stop = threading.Event()
    starts: list[float] = []

    def tick() -> None:
        starts.append(time.monotonic())

    loop = LoopThread(
        lambda: run_loop(tick, interval=30.0, stop=stop, next_due=lambda: 0.3, iterations=3)
    ).start()
    try:
        assert loop.join(3.0), "next_due did not end the wait"
    finally:
        stop.set()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 2 and all(0.3 <= gap < 1.0 for gap in gaps), gaps


def test_next_due_later_than_the_interval_leaves_the_interval() -> None:
    stop = threading.Event()
    starts: list[float] = []

    def tick() -> None:
        starts.append(time.monotonic())

    loop = LoopThread(
        lambda: run_loop(
            tick, interval=0.2, jitter=0.0, stop=stop, next_due=lambda: 60.0, iterations=2
        )
    ).start()
    try:
        assert loop.join(3.0)
    finally:
        stop.set()
    assert 0.2 <= starts[1] - starts[0] < 1.0


def test_work_that_stays_due_waits_min_gap_and_a_failed_tick_the_interval() -> None:
    stop = threading.Event()
    starts: list[float] = []

    def tick() -> None:
        starts.append(time.monotonic())
        if len(starts) == 2:
            raise RuntimeError("boom")

    loop = LoopThread(
        lambda: run_loop(
            tick,
            interval=0.8,
            jitter=0.0,
            stop=stop,
            min_gap=0.2,
            next_due=lambda: -5.0,  # overdue: the agent could not do it
            iterations=3,
        )
    ).start()
    try:
        assert loop.join(3.0)
    finally:
        stop.set()
    first, second = (b - a for a, b in itertools.pairwise(starts))
    assert 0.2 <= first < 0.6, first  # min_gap, not a spin
    assert second >= 0.8, second  # after a failed tick: the interval


# --- heartbeat --------------------------------------------------------------------


def test_heartbeat_healthy_at_start_until_max_age_without_a_tick() -> None:
    clock = FakeClock()
    heartbeat = Heartbeat(max_age=10.0, clock=clock)
    assert heartbeat.healthy() == (True, "ok")
    clock.now += 10.0
    assert heartbeat.healthy() == (True, "ok")
    clock.now += 0.5
    ok, reason = heartbeat.healthy()
    assert not ok
    assert reason == "start 10.5s ago (limit 10.0s)"


def test_heartbeat_goes_stale_after_the_last_beat() -> None:
    clock = FakeClock()
    heartbeat = Heartbeat(max_age=10.0, clock=clock)
    clock.now += 8.0
    heartbeat.beat()
    clock.now += 9.0
    assert heartbeat.healthy() == (True, "ok")
    clock.now += 2.0
    ok, reason = heartbeat.healthy()
    assert not ok
    assert reason == "last successful tick 11.0s ago (limit 10.0s)"
    heartbeat.beat()
    assert heartbeat.healthy() == (True, "ok")


def test_heartbeat_not_ready_before_the_first_successful_tick() -> None:
    heartbeat = Heartbeat(max_age=10.0, clock=FakeClock())
    assert heartbeat.ready() == (False, "no successful tick yet")
    heartbeat.set_ready(True)
    assert heartbeat.ready() == (False, "no successful tick yet")
    heartbeat.beat()
    assert heartbeat.ready() == (True, "ok")


def test_heartbeat_ready_transitions_with_reason() -> None:
    heartbeat = Heartbeat(max_age=10.0, clock=FakeClock())
    heartbeat.beat()
    assert heartbeat.ready() == (False, "no tick has run yet")
    heartbeat.set_ready(True)
    assert heartbeat.ready() == (True, "ok")
    heartbeat.set_ready(False, "fusectl unavailable")
    assert heartbeat.ready() == (False, "fusectl unavailable")
    heartbeat.set_ready(True)
    assert heartbeat.ready() == (True, "ok")


# --- signals ----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_sets_stop_and_wake_and_restore_puts_back_the_old_handler(
    signum: signal.Signals,
) -> None:
    assert threading.current_thread() is threading.main_thread()
    received: list[int] = []

    def previous(sig: int, _frame: FrameType | None) -> None:
        received.append(sig)

    original = signal.signal(signum, previous)
    try:
        stop, wake = threading.Event(), threading.Event()
        restore = install_stop_signals(stop, wake)
        try:
            os.kill(os.getpid(), signum)
            assert stop.wait(1.0), "stop was not set by the signal"
            assert wake.is_set()
            assert received == []
        finally:
            restore()
        assert signal.getsignal(signum) is previous
        os.kill(os.getpid(), signum)
        deadline = time.monotonic() + 1.0
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received == [signum]
    finally:
        signal.signal(signum, original)


def test_stop_signal_without_wake() -> None:
    original = signal.getsignal(signal.SIGTERM)
    stop = threading.Event()
    restore = install_stop_signals(stop)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(1.0)
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is original
