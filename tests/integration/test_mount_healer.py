"""The healer against a real automount, real squashfuse daemons and real kills (root).

Each test maps to an acceptance point of issue 2.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agents.mount_healer.cli import main
from agents.mount_healer.fusectl import scan_fuse_fds
from agents.mount_healer.mountinfo import MountinfoSource, read_mount_table
from hack.autofs_world import AutofsWorld, force_unmount_under, scaled, wait_for
from hack.prometheus import free_port
from tests.conftest import IS_ROOT, require_root_tools
from tests.support.agent import AgentThread

pytestmark = pytest.mark.root


def once(*argv: str) -> tuple[int, list[list[str]], float]:
    """`automount-healer --once ...`: exit code, output rows split on tabs, seconds."""
    out = io.StringIO()
    started = time.monotonic()
    code = main(["--once", "--metrics-address", "off", *argv], stdout=out)
    rows = [line.split("\t") for line in out.getvalue().splitlines()]
    return code, rows, time.monotonic() - started


def row_for(rows: list[list[str]], path: Path) -> list[str]:
    matches = [r for r in rows if r[0] == str(path)]
    assert len(matches) == 1, f"no single row for {path} in {rows}"
    return matches[0]


@pytest.fixture
def holder() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes that hold files or block in mounts; killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def hold_open(path: Path) -> subprocess.Popen[bytes]:
    """A process keeping `path` open (a consumer busy in the mount)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; f=open(sys.argv[1]); print('ok', flush=True); time.sleep(120)",
            str(path),
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ok"
    return proc


# -- 1. severed by kill -9, healed within one interval, remounted on access ----------


@pytest.mark.parametrize("event_driven", [False, True], ids=["periodic", "event-driven"])
def test_killed_daemon_is_healed_within_one_interval(
    world: AutofsWorld, event_driven: bool
) -> None:
    assert world.access("repo1") == ["README"]
    world.access("repo2")
    severed = world.mount("repo1")
    assert severed is not None
    neighbour = world.mount("repo2")
    argv = ["--root", str(world.root), "--interval", "2", "--metrics-address", "off"]
    if not event_driven:
        argv.append("--no-event-driven")
    with AgentThread(main, argv) as agent:
        wait_for(lambda: agent.value("automount_healer_ticks_total") >= 1, 5)
        assert agent.value("automount_healer_event_driven") == (1 if event_driven else 0)
        old_pid = world.kill_daemon("repo1")
        took = wait_for(lambda: world.mount("repo1") is None, 5)
        # One interval (2 s, jitter 10 %) plus a probe; event-driven: well under.
        assert took < (scaled(1.0) if event_driven else 2.2 + scaled(0.3)), (
            f"healed after {took:.2f}s"
        )
        # The counter follows the unmount by a few instructions.
        wait_for(lambda: agent.value("automount_healer_heals_total", {"method": "umount"}) == 1, 2)
        assert agent.value("automount_healer_probes_total", {"verdict": "severed"}) == 1
        # The next access mounts it again, with a fresh daemon.
        assert world.access("repo1") == ["README"]
        assert world.daemon("repo1").pid != old_pid
        remounted = world.mount("repo1")
        assert remounted is not None
        # The neighbour was never touched.
        assert world.mount("repo2") == neighbour
    assert agent.value("automount_healer_heal_failures_total", {"reason": "EBUSY"}) == 0


def test_busy_severed_mount_is_detached_and_reported(
    world: AutofsWorld, holder: list[subprocess.Popen[bytes]]
) -> None:
    world.access("repo1")
    holder.append(hold_open(world.path("repo1") / "README"))
    world.kill_daemon("repo1")
    code, rows, _ = once("--root", str(world.root))
    assert code == 0
    assert row_for(rows, world.path("repo1"))[1:3] == ["severed", "detached"]
    assert world.mount("repo1") is None
    assert world.access("repo1") == ["README"]


# -- 2. the healer does not keep healthy mounts alive ---------------------------------


@pytest.mark.autofs
def test_healthy_mount_still_expires_while_the_agent_runs(workdir: Path) -> None:
    require_root_tools()
    world = AutofsWorld(workdir, ("repo1",), timeout=2).start()
    try:
        world.access("repo1")
        argv = ["--root", str(world.root), "--interval", "0.2", "--metrics-address", "off"]
        with AgentThread(main, argv) as agent:
            # autofs expires after `timeout` unused seconds, checked every timeout/4.
            wait_for(lambda: world.mount("repo1") is None, 10)
            assert agent.value("automount_healer_ticks_total") >= 5
            assert agent.value("automount_healer_probes_total", {"verdict": "healthy"}) == 0
    finally:
        world.stop()


# -- 3. a stopped daemon with a blocked consumer: hung, bounded, abort optional -------


def blocked_consumer(world: AutofsWorld, repo: str) -> subprocess.Popen[bytes]:
    """Stop the repo's daemon and start a consumer that blocks in the mount."""
    world.access(repo)
    world.daemon(repo).suspend()
    consumer = subprocess.Popen(
        [sys.executable, "-c", "import os,sys; os.statvfs(sys.argv[1])", str(world.path(repo))],
        stderr=subprocess.DEVNULL,
    )
    conn = world.mount(repo)
    assert conn is not None
    waiting = Path(f"/sys/fs/fuse/connections/{conn.minor}/waiting")
    wait_for(lambda: int(waiting.read_text()) > 0, 5)
    return consumer


def test_hung_daemon_is_reported_and_left_alone(
    world: AutofsWorld, holder: list[subprocess.Popen[bytes]]
) -> None:
    holder.append(consumer := blocked_consumer(world, "repo1"))
    before = world.mount("repo1")
    code, rows, took = once("--root", str(world.root), "--probe-timeout", "1", "--hung-after", "0")
    assert code == 0
    assert took < 1.0 + scaled(1.5), f"sweep took {took:.2f}s"
    row = row_for(rows, world.path("repo1"))
    assert row[1:3] == ["hung", "none"]
    if scan_fuse_fds().holders:
        assert "squashfuse" in row[3] and "state T" in row[3]
    else:  # kernels before 6.x print no `fuse_connection:` in fdinfo (the VM's 6.1)
        assert "daemon not found" in row[3]
    assert world.mount("repo1") == before
    assert consumer.poll() is None  # still blocked: nothing was aborted
    world.daemon("repo1").resume()
    consumer.wait(5)


@pytest.mark.parametrize("dry_run", [False, True], ids=["once", "once-dry-run"])
def test_once_says_hung_without_waiting_hung_after(
    world: AutofsWorld, holder: list[subprocess.Popen[bytes]], dry_run: bool
) -> None:
    """Issue 9, point 1: one sweep has no history of waiting requests; it probes them."""
    holder.append(consumer := blocked_consumer(world, "repo1"))
    before = world.mount("repo1")
    argv = ["--root", str(world.root), "--probe-timeout", "1"]  # --hung-after: default 6 s
    code, rows, took = once(*argv, *(["--dry-run"] if dry_run else []))
    assert code == 0
    # The answer costs one probe timeout, not --hung-after.
    assert took < 6.0, f"--once took {took:.2f}s"
    row = row_for(rows, world.path("repo1"))
    assert row[1:3] == ["hung", "none"]
    # (Its daemon is named only where fdinfo shows `fuse_connection:`, newer kernels.)
    assert "request(s) unanswered" in row[3]
    assert world.mount("repo1") == before
    assert consumer.poll() is None
    world.daemon("repo1").resume()
    consumer.wait(5)


def test_hung_daemon_is_aborted_and_healed_when_enabled(
    world: AutofsWorld, holder: list[subprocess.Popen[bytes]]
) -> None:
    holder.append(consumer := blocked_consumer(world, "repo1"))
    stopped = world.daemon("repo1")
    code, rows, _ = once(
        "--root",
        str(world.root),
        "--probe-timeout",
        "1",
        "--hung-after",
        "0",
        "--abort-hung-after",
        "0",
    )
    assert code == 0
    row = row_for(rows, world.path("repo1"))
    assert row[1:3] == ["severed", "unmounted"]
    assert "aborted" in row[3]
    # The blocked consumer is released (ECONNABORTED) and the mount comes back.
    assert consumer.wait(5) != 0
    assert world.access("repo1") == ["README"]
    fresh = [p for p in world.daemons("repo1") if p.pid != stopped.pid]
    assert len(fresh) == 1 and fresh[0].status() != psutil.STATUS_STOPPED
    stopped.resume()


# -- 4. dry run, mounts outside the roots ---------------------------------------------


def test_dry_run_changes_nothing(world: AutofsWorld) -> None:
    world.access("repo1")
    world.kill_daemon("repo1")
    before = read_mount_table().mounts
    code, rows, _ = once("--root", str(world.root), "--dry-run")
    assert code == 0
    assert row_for(rows, world.path("repo1"))[1:3] == ["severed", "would-unmount"]
    assert read_mount_table().mounts == before


def test_mounts_outside_the_roots_are_never_touched(world: AutofsWorld, workdir: Path) -> None:
    # A severed FUSE mount outside any autofs root ...
    outside = workdir / "outside"
    outside.mkdir()
    subprocess.run(["squashfuse", str(world.images["repo2"]), str(outside)], check=True)
    try:
        for proc in world.daemons("repo2"):
            proc.kill()
        # ... and a severed one under another autofs root that was not selected.
        other = AutofsWorld(workdir, ("repo3",), name="other").start()
        try:
            other.access("repo3")
            other.kill_daemon("repo3")
            world.access("repo1")
            before = read_mount_table().mounts
            code, rows, _ = once("--root", str(world.root))
            assert code == 0
            assert [r[0] for r in rows] == [str(world.path("repo1"))]
            assert read_mount_table().mounts == before
        finally:
            other.stop()
    finally:
        force_unmount_under(workdir / "outside")
        subprocess.run(["umount", "-l", str(outside)], check=False, capture_output=True)


# -- 5. the consumer's slave bind copy heals with the root ----------------------------


def test_consumer_slave_copy_heals_with_the_root(world: AutofsWorld, workdir: Path) -> None:
    subprocess.run(["mount", "--make-shared", str(world.root)], check=True)
    consumer = workdir / "consumer"
    consumer.mkdir()
    subprocess.run(
        ["mount", "--rbind", "--make-rslave", str(world.root), str(consumer)], check=True
    )
    try:
        assert sorted(os.listdir(consumer / "repo1")) == ["README"]
        world.kill_daemon("repo1")
        with pytest.raises(OSError):
            os.statvfs(consumer / "repo1")
        # Default roots: the consumer copy is a slave, only the real root is healed.
        code, rows, _ = once()
        assert code == 0
        assert row_for(rows, world.path("repo1"))[1:3] == ["severed", "unmounted"]
        assert all(not r[0].startswith(str(consumer)) for r in rows)
        table = read_mount_table()
        assert (
            table.top_at(str(consumer / "repo1")) is None
            or not table.top_at(str(consumer / "repo1")).is_fuse
        )  # type: ignore[union-attr]
        # An access through the consumer's copy mounts it again, in both views.
        assert sorted(os.listdir(consumer / "repo1")) == ["README"]
        assert world.mount("repo1") is not None
    finally:
        subprocess.run(["umount", "-R", "-l", str(consumer)], check=False, capture_output=True)


def test_root_given_as_a_slave_copy_heals_in_the_master(world: AutofsWorld, workdir: Path) -> None:
    """Issue 9, point 2: `--root` on a consumer's rslave copy unmounts in the master."""
    subprocess.run(["mount", "--make-shared", str(world.root)], check=True)
    consumer = workdir / "consumer"
    consumer.mkdir()
    subprocess.run(
        ["mount", "--rbind", "--make-rslave", str(world.root), str(consumer)], check=True
    )
    try:
        assert sorted(os.listdir(consumer / "repo1")) == ["README"]
        world.kill_daemon("repo1")
        code, rows, _ = once("--root", str(consumer))
        assert code == 0
        assert row_for(rows, world.path("repo1"))[1:3] == ["severed", "unmounted"]
        # The real root is healed (an unmount in the copy would leave it severed).
        assert world.mount("repo1") is None
        assert world.access("repo1") == ["README"]
        assert sorted(os.listdir(consumer / "repo1")) == ["README"]
    finally:
        subprocess.run(["umount", "-R", "-l", str(consumer)], check=False, capture_output=True)


def test_in_an_rslave_view_nothing_is_unmounted_and_the_fix_is_named(world: AutofsWorld) -> None:
    """Issue 9, point 2: a container that got the root `rslave` (HostToContainer).

    `unshare --propagation slave` makes every mount of a new namespace a slave of
    the host's, whose peers are not visible there: the healer's view in such a pod.
    """
    subprocess.run(["mount", "--make-shared", str(world.root)], check=True)
    world.access("repo1")
    world.kill_daemon("repo1")
    severed = world.mount("repo1")
    healer = f"{sys.executable} -m agents.mount_healer --once --log-level error"
    script = f"{healer}; echo ---; {healer} --root {world.root}"
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    default, _, explicit = done.stdout.partition("---\n")
    assert "only slave copies" in default and str(world.root) in default
    assert "Bidirectional" in default
    rows = [line.split("\t") for line in explicit.splitlines()]
    row = row_for(rows, world.path("repo1"))
    assert row[1:3] == ["skipped", "none"]
    assert "mount propagation" in row[3]
    # Still severed on the host: nothing was unmounted in the copy.
    assert world.mount("repo1") == severed


# -- bad arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["--interval", "0"], ["--root", "relative/path"], ["--probe-timeout", "x"], ["--bogus"]],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("automount-healer: error:")


def test_sigterm_stops_the_agent_promptly(world: AutofsWorld) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agents.mount_healer",
            "--root",
            str(world.root),
            "--interval",
            "30",
            "--metrics-address",
            f"127.0.0.1:{port}",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        # The stop signals are taken over just before the HTTP server starts:
        # once /healthz answers (any status), SIGTERM is the agent's to handle.
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 30, interval=0.1)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(scaled(5)) == 0
        assert time.monotonic() - started < scaled(2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # 503 before the first sweep: the server is up
    except OSError:
        return False


def test_fusectl_is_mounted_when_missing(world: AutofsWorld) -> None:
    """In a container's fresh /sys fusectl is not mounted: the healer mounts it.

    Runs in a private mount namespace (unshare), so the host's fusectl stays.
    """
    world.access("repo1")
    script = (
        "umount /sys/fs/fuse/connections && "
        f"{sys.executable} -m agents.mount_healer --once --log-level error "
        f"--root {world.root} && grep -c ' - fusectl ' /proc/self/mountinfo"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split("\t")[:3] == [str(world.path("repo1")), "healthy", "none"]
    assert lines[-1] == "1"


def test_mount_table_is_read_again_only_after_a_change(workdir: Path) -> None:
    if not IS_ROOT:
        pytest.skip("needs root: mounts a tmpfs")
    source = MountinfoSource()
    try:
        first = source()
        assert source() is first and source.reads == 1
        target = workdir / "tmpfs"
        target.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
        try:
            changed = source()
            assert changed is not first and source.reads == 2
            assert changed.top_at(str(target)) is not None
        finally:
            subprocess.run(["umount", str(target)], check=True)
        assert source().top_at(str(target)) is None and source.reads == 3
    finally:
        source.close()
