"""The enforcer's clock: "now" in the ticks that process start times use."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agents.common.process import ProcessRef
from agents.gpu_enforcer.enforcer import ticks_since_boot

CLK_TCK = os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize(
    ("uptime", "centiseconds"),
    [
        ("4986.11 9000.00\n", 498611),  # float("4986.11") * 100 == 498610.99...
        ("1.13 0.50\n", 113),
        ("17888.61 26098.82\n", 1788861),
        ("0.00 0.00\n", 0),
        ("42.5 1.0\n", 4250),
    ],
)
def test_uptime_is_read_to_the_tick(tmp_path: Path, uptime: str, centiseconds: int) -> None:
    (tmp_path / "uptime").write_text(uptime)
    assert ticks_since_boot(str(tmp_path)) == centiseconds * CLK_TCK // 100


def test_a_process_started_before_the_sample_is_never_newer_than_it() -> None:
    """What the enforcer's PID-reuse check relies on, on the real clock.

    Read just after a child starts, the sample is mostly in the child's own
    tick: the case a one-tick error turned into a false "PID reused".
    """
    for _ in range(200):
        child = subprocess.Popen(["sleep", "10"])
        try:
            now = ticks_since_boot("/proc")
            assert ProcessRef.of(child.pid).start_time <= now
        finally:
            child.kill()
            child.wait()
