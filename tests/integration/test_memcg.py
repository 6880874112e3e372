"""tests/support/memcg.py on this machine: a limit holds, the peak and OOM kills are seen."""

from __future__ import annotations

from pathlib import Path

import pytest

from hack.autofs_world import wait_for
from tests.support.memcg import MI, agent_in_memcg

pytestmark = pytest.mark.root


def test_a_process_under_its_limit_shows_its_peak(tmp_path: Path) -> None:
    with agent_in_memcg(
        ["64"], 128 * MI, module="tests.support.memcg", log=tmp_path / "log"
    ) as hog:
        wait_for(lambda: "held" in hog.log_text(), 10)
        hog.sample()
        assert hog.alive
        assert 64 * MI <= hog.cgroup.peak <= 128 * MI
        assert hog.rss_peak >= 64 * MI
        assert hog.cgroup.oom_kills == 0


def test_a_process_over_its_limit_is_oom_killed_and_counted(tmp_path: Path) -> None:
    with agent_in_memcg(["96"], 48 * MI, module="tests.support.memcg", log=tmp_path / "log") as hog:
        wait_for(lambda: not hog.alive, 10)
        assert hog.process.returncode == -9
        assert hog.cgroup.oom_kills == 1
        assert hog.cgroup.peak <= 48 * MI
