"""The injector's write threads: a deadline per write that no stuck syscall can hold.

The write function stands in for `Injector._write` (a boundary: what blocks it
here is an Event, what blocks it on a node is the kernel). Real threads, real
deadlines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from agents.token_refresher.injector import Target, _Job, _Problem, _Writers
from agents.token_refresher.spec import Injection

DEADLINE = 0.2


def job(container: str) -> _Job:
    injection = Injection(
        secret_name="tok", container="app", owner=1000, group=1000, path="/tmp/t", mode=0o400
    )
    return _Job(Target("uid", "ns", "pod", injection), container, b"token", b"digest")


class Kernel:
    """Writes into a container named `hung-*` block until released."""

    def __init__(self) -> None:
        self.answering = threading.Event()

    def write(self, job: _Job) -> bool | _Problem:
        if job.container_id.startswith("hung") and not self.answering.wait(30):
            raise AssertionError("never released")
        return True


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    kernel = Kernel()
    yield kernel
    kernel.answering.set()


def test_a_stuck_write_is_abandoned_and_replaced_while_the_others_finish(kernel: Kernel) -> None:
    writers = _Writers(2, 4, kernel.write)
    try:
        started = time.monotonic()
        outcomes = writers.run([job("hung-a"), job("ok-1"), job("ok-2"), job("ok-3")], DEADLINE)
        took = time.monotonic() - started

        assert isinstance(outcomes[0], _Problem) and outcomes[0].reason == "write_timeout"
        assert f"within {DEADLINE:g} s" in str(outcomes[0])
        assert outcomes[1:] == [True, True, True]
        assert took < DEADLINE + 0.5
        assert (writers.stuck, writers.held()) == (1, {"hung-a"})
        # Replaced: the pool still writes two at a time.
        assert writers.run([job("ok-4"), job("ok-5")], DEADLINE) == [True, True]

        kernel.answering.set()  # the filesystem answers again: the thread comes back
        deadline = time.monotonic() + 5
        while writers.stuck and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (writers.stuck, writers.held()) == (0, set())
    finally:
        writers.close(5)


def test_past_the_cap_the_pool_shrinks_and_then_says_why(kernel: Kernel) -> None:
    writers = _Writers(2, 1, kernel.write)
    try:
        # The first stuck thread is replaced (1 <= cap), the second not (2 > cap).
        writers.run([job("hung-a")], DEADLINE)
        writers.run([job("hung-b")], DEADLINE)
        assert writers.run([job("ok-1")], DEADLINE) == [True]
        # The last live thread gets stuck too: what is left waits for no thread.
        outcomes = writers.run([job("hung-c"), job("ok-2")], DEADLINE)
        assert [o.reason for o in outcomes if isinstance(o, _Problem)] == [
            "write_timeout",
            "write_timeout",
        ]
        assert "all write threads are stuck" in str(outcomes[1])
        assert writers.stuck == 3

        kernel.answering.set()
        deadline = time.monotonic() + 5
        while writers.stuck and time.monotonic() < deadline:
            time.sleep(0.01)
        # Back from the kernel, they fill the pool up to its size again.
        assert writers.stuck == 0
        assert writers.run([job("ok-3"), job("ok-4"), job("ok-5")], DEADLINE) == [True] * 3
    finally:
        writers.close(5)


def test_an_exception_in_a_write_is_that_jobs_problem() -> None:
    def write(job: _Job) -> bool | _Problem:
        if job.container_id == "bug":
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return True

    writers = _Writers(1, 1, write)
    try:
        outcomes = writers.run([job("bug"), job("ok")], DEADLINE)
    finally:
        writers.close(5)
    problem = outcomes[0]
    assert isinstance(problem, _Problem) and problem.reason == "internal"
    assert "UnicodeEncodeError" in str(problem) and "\ud800" not in str(problem)
    assert isinstance(problem.failure, UnicodeEncodeError)
    assert outcomes[1] is True
