"""Confirming probes in real child processes, on real paths (no mounts, no root)."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agents.mount_healer.probe import Prober, ProbeResult


@pytest.fixture
def stuck_python(tmp_path: Path) -> Path:
    """A "python" that never answers, like a probe blocked in a stopped FUSE daemon.

    The Prober runs `[python, "-I", "-S", "-c", SRC, path]`: sh takes the script
    and ignores the rest. `exec` so that the probe's SIGKILL hits the sleeper
    itself and no grandchild outlives the test.
    """
    script = tmp_path / "stuck-python"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.fixture
def prober() -> Iterator[Prober]:
    """A Prober with the real interpreter, closed at the end."""
    p = Prober(10.0)
    yield p
    p.close()


def children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def wait_until_dead(proc: psutil.Process, timeout: float = 5.0) -> None:
    """Wait for a killed child to become a zombie without reaping it."""
    deadline = time.monotonic() + timeout
    while proc.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"{proc} did not die"
        time.sleep(0.01)


def test_a_directory_probes_ok(prober: Prober, tmp_path: Path) -> None:
    results = prober.probe([str(tmp_path)])

    result = results[str(tmp_path)]
    assert result.error == 0
    assert not result.timed_out
    assert not result.dead_endpoint
    assert 0 < result.seconds < 10.0
    assert result.describe() == "statvfs ok"
    assert children() == []


def test_a_missing_path_probes_as_enoent_not_a_dead_endpoint(
    prober: Prober, tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing")

    result = prober.probe([missing])[missing]

    assert result.error == errno.ENOENT
    assert not result.dead_endpoint
    assert not result.timed_out
    assert result.describe() == "statvfs: ENOENT (2)"


def test_no_paths_start_no_probe(prober: Prober) -> None:
    assert prober.probe([]) == {}
    assert children() == []


def test_several_real_paths_answer_each_for_itself(prober: Prober, tmp_path: Path) -> None:
    paths = [str(tmp_path), str(tmp_path / "missing"), "/"]

    results = prober.probe(iter(paths))

    assert {p: r.error for p, r in results.items()} == {
        str(tmp_path): 0,
        str(tmp_path / "missing"): errno.ENOENT,
        "/": 0,
    }
    assert all(r.path == p for p, r in results.items())


def test_a_probe_that_does_not_answer_times_out_and_is_killed(
    stuck_python: Path, tmp_path: Path
) -> None:
    prober = Prober(0.3, python=str(stuck_python))
    try:
        started = time.monotonic()
        result = prober.probe([str(tmp_path)])[str(tmp_path)]
        elapsed = time.monotonic() - started

        assert result.timed_out
        assert result.error is None
        assert not result.dead_endpoint
        assert 0.3 <= result.seconds < 1.0
        assert elapsed < 1.0
        assert result.describe().startswith("no answer within 0.")
        (killed,) = children()
        wait_until_dead(killed)  # SIGKILLed, not yet reaped
    finally:
        prober.close()

    assert children() == []


def test_a_later_probe_reaps_a_killed_probe(stuck_python: Path, tmp_path: Path) -> None:
    prober = Prober(0.2, python=str(stuck_python))
    try:
        prober.probe([str(tmp_path)])
        (killed,) = children()
        wait_until_dead(killed)

        prober.probe([])

        assert children() == []
    finally:
        prober.close()


def test_several_paths_time_out_within_one_timeout_in_total(
    stuck_python: Path, tmp_path: Path
) -> None:
    paths = [str(tmp_path / name) for name in "abcdef"]
    for path in paths:
        os.mkdir(path)
    prober = Prober(0.3, python=str(stuck_python))
    try:
        started = time.monotonic()
        results = prober.probe(paths)
        elapsed = time.monotonic() - started

        assert sorted(results) == sorted(paths)
        assert all(r.timed_out for r in results.values())
        # One per path would take 6 x 0.3 s.
        assert elapsed < 1.0
    finally:
        prober.close()

    assert children() == []


def test_close_without_stragglers_returns_at_once(prober: Prober, tmp_path: Path) -> None:
    prober.probe([str(tmp_path)])

    started = time.monotonic()
    prober.close()

    assert time.monotonic() - started < 0.1


@pytest.mark.parametrize(
    ("result", "text"),
    [
        (ProbeResult("/cvmfs/a", None, 2.0), "no answer within 2.0s"),
        (ProbeResult("/cvmfs/a", None, 0.34), "no answer within 0.3s"),
        (ProbeResult("/cvmfs/a", 0, 0.001), "statvfs ok"),
        (ProbeResult("/cvmfs/a", errno.ENOTCONN, 0.001), "statvfs: ENOTCONN (107)"),
        (ProbeResult("/cvmfs/a", errno.ECONNABORTED, 0.001), "statvfs: ECONNABORTED (103)"),
        (ProbeResult("/cvmfs/a", errno.EIO, 0.001), "statvfs: EIO (5)"),
        (ProbeResult("/cvmfs/a", 9999, 0.001), "statvfs: 9999 (9999)"),
    ],
)
def test_describe(result: ProbeResult, text: str) -> None:
    assert result.describe() == text


@pytest.mark.parametrize(
    ("error", "dead"),
    [
        (errno.ENOTCONN, True),
        (errno.ECONNABORTED, True),
        (0, False),
        (errno.ENOENT, False),
        (errno.EIO, False),
        (None, False),
    ],
)
def test_only_enotconn_and_econnaborted_are_a_dead_endpoint(error: int | None, dead: bool) -> None:
    assert ProbeResult("/cvmfs/a", error, 0.0).dead_endpoint is dead


def test_a_probe_that_cannot_start_is_not_a_timeout(tmp_path: Path) -> None:
    prober = Prober(1.0, python=str(tmp_path / "no-such-python"))

    result = prober.probe([str(tmp_path)])[str(tmp_path)]

    assert not result.timed_out


def test_the_same_path_twice_leaves_no_child_behind(prober: Prober, tmp_path: Path) -> None:
    before = {p.pid for p in children()}
    try:
        results = prober.probe([str(tmp_path), str(tmp_path)])
        prober.close()
        assert results[str(tmp_path)].error == 0
        time.sleep(0.5)  # the forgotten child has exited by now, unreaped

        assert [p for p in children() if p.pid not in before] == []
    finally:
        # Reap the forgotten child here, so the leak check does not fail the
        # teardown of this (expected) failure.
        for child in children():
            if child.pid not in before:
                os.waitpid(child.pid, 0)
