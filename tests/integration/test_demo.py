"""The README's first command: a simulated node where all three agents act, a real
Prometheus scrapes them, and nothing is left behind, also when interrupted (root)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from agents.mount_healer.mountinfo import read_mount_table
from hack.autofs_world import scaled
from hack.cgroups import mounted_hierarchies
from hack.demo import WORKDIR_PREFIX, missing
from tests.conftest import IN_CI, require_root_tools

pytestmark = [pytest.mark.root, pytest.mark.autofs]

# The whole demo, set-up and clean-up included (stretched under the test VM's
# emulated CPU, as the demo's own step waits are).
RUN_TIMEOUT = scaled(120.0)
CLEANUP_TIMEOUT = 60.0
STAMP = r"^\[ *\d+\.\ds\] "


def need_demo_tools() -> None:
    require_root_tools()
    if lacking := missing():
        message = f"needs {', '.join(lacking)} (hack/setup.sh installs them)"
        if IN_CI:
            pytest.fail(f"CI must run this test: {message}")
        pytest.skip(message)


class DemoRun:
    """`python -m hack.demo` with its temporary directory under `tmp_path`, its
    stdout read line by line as it comes."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hack.demo"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, name="demo-stdout")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _take(self, timeout: float) -> str | None:
        line = self._queue.get(timeout=timeout)
        if line is not None:
            self.lines.append(line)
        return line

    def wait_for_line(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._take(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                message = f"no line {pattern!r} within {timeout}s:\n{self.text}"
                raise AssertionError(message) from None
            if line is None:
                raise AssertionError(f"demo ended before a line {pattern!r}:\n{self.text}")
            if re.search(pattern, line):
                return line

    def finish(self, timeout: float) -> int:
        """Wait for the exit; past `timeout`, SIGINT it (it cleans up) and fail."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(CLEANUP_TIMEOUT)
            self._drain()
            raise AssertionError(f"demo took longer than {timeout}s:\n{self.text}") from None
        self._drain()
        return code

    def _drain(self) -> None:
        if self.proc.stdout is None or self.proc.stdout.closed:
            return  # drained already
        self._reader.join(10)
        while True:
            try:
                if self._take(0) is None:
                    break
            except queue.Empty:
                break
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + ("\n--- stderr:\n" + self.stderr if self.stderr else "")

    @property
    def workdir(self) -> Path:
        found = re.search(r"\] demo: workdir (\S+)", self.text)
        assert found, self.text
        workdir = Path(found.group(1))
        assert workdir.parent == self.tmp_path and workdir.name.startswith(WORKDIR_PREFIX)
        return workdir

    def kill(self) -> None:
        """Test clean-up of last resort (the demo's own clean-up is under test)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(CLEANUP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain()


def leftovers(workdir: Path) -> list[str]:
    """Mounts, processes and cgroups of the demo still there, and its directory.

    The demo names everything after its workdir: mount points are inside it,
    every process it starts (automount, squashfuse, the agents, Prometheus,
    the pods' argv[0]) has it on its command line, and the pods' cgroups sit
    below one named after it on every hierarchy.
    """
    mounts = read_mount_table().mounts
    found = [f"mount {m.mountpoint}" for m in mounts if workdir.name in m.mountpoint]
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if any(workdir.name in arg for arg in cmdline):
            found.append(f"process {proc.pid} {' '.join(cmdline)}")
    for hierarchy in mounted_hierarchies():
        if (hierarchy.mountpoint / workdir.name).exists():
            found.append(f"cgroup {hierarchy.mountpoint / workdir.name}")
    if workdir.exists():
        found.append(f"directory {workdir}")
    return found


def line(text: str, pattern: str) -> re.Match[str]:
    """The narrative line matching `pattern` (after its timestamp)."""
    found = re.search(STAMP + pattern, text, re.MULTILINE)
    assert found, f"no line {pattern!r} in:\n{text}"
    return found


@pytest.mark.timeout(RUN_TIMEOUT + CLEANUP_TIMEOUT + 30)
def test_demo_shows_the_three_agents_at_work_and_cleans_up(tmp_path: Path) -> None:
    need_demo_tools()
    demo = DemoRun(tmp_path)
    try:
        code = demo.finish(RUN_TIMEOUT)
    finally:
        demo.kill()
    out = demo.text
    assert code == 0, out
    assert "Traceback" not in out
    assert not re.search(STAMP + r"\S+: (error|critical|raw):", out, re.MULTILINE)

    # autofs: severed before the healer runs, seen by hand, healed, then healed live.
    line(out, r"csi: node plugin restarts: kill -9 the squashfuse of atlas\.cern\.ch; .*ENOTCONN")
    line(out, r"healer: automount-healer --once --dry-run.*atlas\.cern\.ch severed, would-unmount")
    line(out, r"healer: unmounted severed …/cvmfs/atlas\.cern\.ch \(ENOTCONN\).*remounted it")
    line(out, r"healer: unmounted severed …/cvmfs/cms\.cern\.ch \(ENOTCONN\) \d+ ms after")
    # GPU: the pod over its share gets SIGTERM from the enforcer, its neighbour runs on.
    line(out, r"gpu: notebook-b grows to 10 GiB, over its 8 GiB share")
    line(out, r"enforcer: notebook-b over the limit .*SIGTERM through a pidfd; .*by signal SIGTERM")
    line(out, r"enforcer: notebook-a \(pid \d+, 5 GiB, within its share\) keeps running")
    # Token: refreshed at once (expiring), rendered with the EOS template, refreshed again.
    line(out, r"token-refresher: refreshed …/token\.json \(the access token was expiring\); new ")
    line(
        out,
        r"token-refresher: wrote …/pod-tmp/oauthtk_1000 \(mode 0400, uid 1000\) from the EOS "
        r"template: oauth2:<access token, \d+ chars>:127\.0\.0\.1:\d+/oauth/userinfo$",
    )
    line(out, r"token-refresher: refreshed …/token\.json \(at about 80% of its 6s lifetime\)")
    # Prometheus saw it all.
    line(
        out,
        r"prometheus: GET /api/v1/query\?query=automount_healer_heals_total -> "
        r'\{method="umount"\} 2$',
    )
    line(
        out,
        r'prometheus: .*gpu_mem_enforcer_actions_total\{action="kill"\} -> '
        r'\{action="kill",reason="hold"\} 1$',
    )
    refreshes = line(
        out,
        r'prometheus: .*token_refresher_refreshes_total\{result="ok"\} -> '
        r'\{result="ok"\} (\d+)$',
    )
    assert int(refreshes.group(1)) >= 2
    # The narrative runs forward in time.
    stamps = [float(m) for m in re.findall(r"^\[ *(\d+\.\d)s\]", out, re.M)]
    assert len(stamps) >= 15 and stamps == sorted(stamps)
    # The summary: one row per agent with the value Prometheus saw.
    rows = {r.split()[0]: r for r in out.splitlines() if r.split()[:1] and "_total" in r}
    assert 'automount_healer_heals_total{method="umount"} 2' in rows["automount-healer"]
    assert "SIGTERM to notebook-b" in rows["gpu-mem-enforcer"]
    kills = 'gpu_mem_enforcer_actions_total{action="kill",reason="hold"} 1'
    assert kills in rows["gpu-mem-enforcer"]
    assert 'token_refresher_refreshes_total{result="ok"}' in rows["token-refresher"]
    seconds = float(re.findall(r"\((\d+\.\d)s in all\)", out)[-1])
    assert seconds < RUN_TIMEOUT
    assert not leftovers(demo.workdir)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("signum", "after"),
    [
        # Everything is up: mounts, pods in cgroups, the IdP, Prometheus, the agents.
        (signal.SIGINT, r"\] healer: unmounted severed .*atlas"),
        # While the enforcer holds notebook-b and the token chain runs.
        (signal.SIGTERM, r"\] gpu: notebook-b grows"),
    ],
    ids=["SIGINT", "SIGTERM"],
)
@pytest.mark.timeout(RUN_TIMEOUT + CLEANUP_TIMEOUT + 30)
def test_an_interrupted_demo_cleans_up(tmp_path: Path, signum: signal.Signals, after: str) -> None:
    need_demo_tools()
    demo = DemoRun(tmp_path)
    try:
        demo.wait_for_line(after, RUN_TIMEOUT)
        workdir = demo.workdir
        running = leftovers(workdir)
        # The check below sees what the demo made (so its silence later means something).
        assert any(f.startswith("mount ") for f in running), running
        assert any(f.startswith("cgroup ") for f in running), running
        assert sum(f.startswith("process ") for f in running) >= 8, running
        demo.proc.send_signal(signum)
        code = demo.finish(CLEANUP_TIMEOUT)
    finally:
        demo.kill()
    assert code == 128 + signum, demo.text
    assert f"interrupted ({signum.name}): cleaning up" in demo.text
    assert "interrupted; cleaned up" in demo.text
    assert "Traceback" not in demo.text
    assert not leftovers(workdir)
    assert not list(tmp_path.iterdir())
