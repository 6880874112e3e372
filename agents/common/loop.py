"""The run loop every agent uses, its heartbeat, and signal handling.

`while not stop: tick(); wait(interval)`: a failing tick is logged and counted,
never fatal; SIGTERM/SIGINT only set the stop event, so shutdown is bounded by
the longest single tick. Tests pass `iterations` to run a loop N times (kopf's
`_iterations`).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from agents.common.metrics import LoopMetrics

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class Heartbeat:
    """When the last tick succeeded and whether the agent's sources work.

    `/healthz` fails once no tick has succeeded for `max_age` seconds (the loop
    is stuck or every tick fails); `/readyz` fails while `ready` is false (a
    source such as NVML or fusectl is unusable, the agent still runs).
    """

    def __init__(self, max_age: float, clock: Clock = time.monotonic) -> None:
        self.max_age = max_age
        self._clock = clock
        self._started = clock()
        self._last_success: float | None = None
        self._lock = threading.Lock()
        self._ready = False
        self._not_ready_reason = "no tick has run yet"

    def beat(self) -> None:
        with self._lock:
            self._last_success = self._clock()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        with self._lock:
            self._ready, self._not_ready_reason = ready, reason

    def healthy(self) -> tuple[bool, str]:
        with self._lock:
            now = self._clock()
            since = self._last_success if self._last_success is not None else self._started
            age = now - since
            if age > self.max_age:
                what = "last successful tick" if self._last_success is not None else "start"
                return False, f"{what} {age:.1f}s ago (limit {self.max_age:.1f}s)"
            return True, "ok"

    def ready(self) -> tuple[bool, str]:
        with self._lock:
            if self._last_success is None:
                return False, "no successful tick yet"
            return self._ready, "ok" if self._ready else self._not_ready_reason


def run_loop(
    tick: Callable[[], None],
    *,
    interval: float,
    stop: threading.Event,
    wake: threading.Event | None = None,
    min_gap: float = 0.0,
    next_due: Callable[[], float | None] | None = None,
    jitter: float = 0.1,
    iterations: int | None = None,
    metrics: LoopMetrics | None = None,
    heartbeat: Heartbeat | None = None,
    clock: Clock = time.monotonic,
    wall_clock: Clock = time.time,
) -> int:
    """Run `tick` until `stop` is set (or `iterations` ticks ran).

    `wake`, when set by another thread (an event source), starts the next tick
    early, but never sooner than `min_gap` seconds after the previous one
    started. `next_due`, asked after each successful tick, gives the seconds
    until the agent has work due (None: nothing known): the wait ends then if
    that is sooner than `interval`, which stays the safety net (a token that
    lives less than one interval must not wait for the next pass). After a
    failed tick the loop waits the full interval: a due time that the failure
    left in the past would otherwise spin. Returns the number of failed ticks.
    """
    failures = 0
    count = 0
    while not stop.is_set():
        started = clock()
        due: float | None = None
        try:
            tick()
            due = None if next_due is None else next_due()
        except Exception:
            failures += 1
            log.exception("tick failed; the agent keeps running")
            if metrics is not None:
                metrics.tick_failures.inc()
        else:
            if heartbeat is not None:
                heartbeat.beat()
            if metrics is not None:
                metrics.last_success.set(wall_clock())
        elapsed = clock() - started
        if metrics is not None:
            metrics.ticks.inc()
            metrics.tick_duration.observe(elapsed)
        count += 1
        if iterations is not None and count >= iterations:
            break
        delay = interval * (1.0 + jitter * (2.0 * random.random() - 1.0)) - elapsed
        until = clock() + max(0.0, delay)
        if due is not None:
            # Not sooner than min_gap after this tick started: work that stays
            # due (an agent that could not do it) must not spin the loop.
            until = min(until, max(clock() + due, started + min_gap))
        _wait(stop, wake, clock, until=until, earliest=started + min_gap)
    return failures


# Longest a wait on `wake` goes without looking at `stop`: a stop event set by
# a caller (not a signal handler) does not set `wake`.
_STOP_CHECK = 0.1


def _wait(
    stop: threading.Event,
    wake: threading.Event | None,
    clock: Clock,
    *,
    until: float,
    earliest: float,
) -> None:
    """Sleep until `until`, or until woken (but not before `earliest`), or stopped."""
    if wake is None:
        stop.wait(max(0.0, until - clock()))
        return
    while not stop.is_set():
        remaining = until - clock()
        if remaining <= 0:
            return
        if wake.wait(min(remaining, _STOP_CHECK)):
            wake.clear()
            stop.wait(max(0.0, earliest - clock()))
            return


def install_stop_signals(
    stop: threading.Event, wake: threading.Event | None = None
) -> Callable[[], None]:
    """SIGTERM and SIGINT set `stop` (and `wake`, to cut a wait short).

    Only callable from the main thread (a Python signal rule). Returns a
    function that restores the previous handlers.
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()
        if wake is not None:
            wake.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
