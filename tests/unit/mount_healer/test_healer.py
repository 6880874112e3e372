"""The sweep, with every OS boundary faked: mountinfo text, a fusectl tree of plain
files, a procfs tree, scripted probes, a recording umount2, a fake clock.

Mount IDs, devices and paths follow a node with CVMFS under the autofs root
`/cvmfs` (mount 42, device 0:39); FUSE mount `0:N` is fusectl connection N.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agents.mount_healer.config import HealerConfig
from agents.mount_healer.fusectl import Fusectl, FusectlError, connection_id
from agents.mount_healer.healer import Action, Healer, MountReport, Verdict
from agents.mount_healer.metrics import HealerMetrics, SweepStateCollector
from agents.mount_healer.mountinfo import MountTable
from agents.mount_healer.probe import Prober, ProbeResult
from agents.mount_healer.unmount import MNT_DETACH, PinError, PinnedMount

WALL_CLOCK = 1_700_000_000.0
ABORTED = 4294967295  # fuse_abort_conn(): max_background = UINT_MAX

HOST_ROOT = "1 0 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw"
CVMFS_ROOT = (
    "42 1 0:39 / /cvmfs rw,relatime shared:20 - autofs systemd-1 "
    "rw,fd=5,pgrp=1,timeout=60,minproto=5,maxproto=5,indirect"
)
# A consumer pod's `--rbind --make-rslave` copy of the root, with its copy of /cvmfs/a.
SLAVE_COPY = (
    "60 1 0:39 / /var/lib/kubelet/pods/p1/volumes/cvmfs rw,relatime master:20 - autofs "
    "systemd-1 rw,fd=5,pgrp=1,timeout=60,minproto=5,maxproto=5,indirect"
)
FDINFO = "pos:\t0\nflags:\t02100002\nmnt_id:\t26\nino:\t5\n"


def fuse(
    mount_id: int,
    path: str,
    device: str,
    parent: int = 42,
    *,
    fstype: str = "fuse.squashfuse",
    propagation: str = "shared:21",
) -> str:
    """A mountinfo line of a FUSE mount (the way automount mounts squashfuse)."""
    return (
        f"{mount_id} {parent} {device} / {path} ro,nosuid,nodev,relatime {propagation} - "
        f"{fstype} squashfuse ro,user_id=0,group_id=0,allow_other"
    )


class Mountinfo:
    """/proc/self/mountinfo: lines the test (and the fake umount2) change between reads.

    Each change of a mount bumps its generation: a mount that replaced another
    may show the same ID and device (the kernel reuses both), it is still another.
    """

    def __init__(self, *lines: str) -> None:
        self.lines = list(lines)
        self.reads = 0
        self.generation: dict[int, int] = {}
        self.after_read: Callable[[int], None] | None = None
        """Called with the number of reads so far, after a read (the world moves on)."""

    def __call__(self) -> MountTable:
        self.reads += 1
        table = self.table()
        if self.after_read is not None:
            self.after_read(self.reads)
        return table

    def table(self) -> MountTable:
        return MountTable.parse("\n".join(self.lines))

    def _changed(self, mount_id: int) -> None:
        self.generation[mount_id] = self.generation.get(mount_id, 0) + 1

    def add(self, line: str) -> None:
        self.lines.append(line)
        self._changed(int(line.split(" ", 1)[0]))

    def remove(self, mount_id: int) -> None:
        self.lines = [line for line in self.lines if not line.startswith(f"{mount_id} ")]
        self._changed(mount_id)

    def replace(self, mount_id: int, line: str) -> None:
        self.lines = [line if old.startswith(f"{mount_id} ") else old for old in self.lines]
        self._changed(mount_id)
        self._changed(int(line.split(" ", 1)[0]))


class FakePins:
    """pin_mount: a walk to the path reaches the top mount there; the pin holds that
    mount (its ID and generation), whatever is mounted at the path later."""

    def __init__(self, mountinfo: Mountinfo) -> None:
        self.mountinfo = mountinfo
        self.held: dict[str, tuple[int, int, str]] = {}
        """pin path -> (mount ID, generation, mount point) while the pin is open."""
        self.pinned: list[str] = []
        self.fail_with = 0
        self._next_fd = 10

    @contextlib.contextmanager
    def __call__(self, path: str) -> Iterator[PinnedMount]:
        if self.fail_with:
            raise PinError(self.fail_with, f"cannot pin {path}: {os.strerror(self.fail_with)}")
        top = self.mountinfo.table().top_at(path)
        assert top is not None, f"pin of {path}: not a mount point"
        self.pinned.append(path)
        self._next_fd += 1
        fd_path = f"/proc/self/fd/{self._next_fd}"
        generation = self.mountinfo.generation.get(top.mount_id, 0)
        self.held[fd_path] = (top.mount_id, generation, path)
        try:
            yield PinnedMount(fd_path, top.mount_id, top.device)
        finally:
            del self.held[fd_path]


class FakeUmount2:
    """umount2(2) of a pinned mount: records (mount point, flags), fails with scripted
    errnos, EINVAL if the pinned mount is no longer mounted (as the kernel does), and
    on success takes it out of the mountinfo and, unless a process holds a file on it,
    its connection out of fusectl (the kernel frees it with the pin's reference)."""

    def __init__(self, mountinfo: Mountinfo, pins: FakePins, fusectl_root: Path) -> None:
        self.mountinfo = mountinfo
        self.pins = pins
        self.fusectl_root = fusectl_root
        self.calls: list[tuple[str, int]] = []
        self.unmounted: list[int] = []
        self.fail_with: list[int] = []
        """errnos for the next calls, in order (0: succeed)."""
        self.held_open: set[int] = set()
        """mount IDs a process holds a file on: their connection outlives the unmount."""
        self.before_call: Callable[[], None] | None = None
        self.after_call: Callable[[], None] | None = None

    def __call__(self, path: str, flags: int) -> None:
        mount_id, generation, mountpoint = self.pins.held[path]
        self.calls.append((mountpoint, flags))
        if self.before_call is not None:
            self.before_call()
        err = self.fail_with.pop(0) if self.fail_with else 0
        if err:
            raise OSError(err, os.strerror(err), path)
        mount = self.mountinfo.table().by_id.get(mount_id)
        if mount is None or self.mountinfo.generation.get(mount_id, 0) != generation:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        self.unmounted.append(mount_id)
        self.mountinfo.remove(mount_id)
        if mount_id not in self.held_open:
            conn = self.fusectl_root / str(connection_id(mount.major, mount.minor))
            shutil.rmtree(conn, ignore_errors=True)
        if self.after_call is not None:
            self.after_call()


class ScriptedProber(Prober):
    """The probe boundary: answers scripted per path (an errno, 0, or None for no
    answer), and records every path probed."""

    def __init__(self) -> None:
        super().__init__(timeout=2.0)
        self.answers: dict[str, list[int | None]] = {}
        self.probed: list[str] = []
        self.during_probe: Callable[[], None] | None = None

    def answer(self, path: str, *errors: int | None) -> None:
        """Answer the next probes of `path` with `errors` in turn; the last one sticks."""
        self.answers[path] = list(errors)

    def probe(self, paths: Iterable[str]) -> dict[str, ProbeResult]:
        asked = list(paths)
        self.probed.extend(asked)
        if self.during_probe is not None:
            self.during_probe()
        results = {}
        for path in asked:
            script = self.answers[path]
            error = script.pop(0) if len(script) > 1 else script[0]
            results[path] = ProbeResult(path, error, self.timeout if error is None else 0.002)
        return results


class MountedFakeFusectl(Fusectl):
    """The real reader over a tree of plain files, which stands in for a mounted fusectl
    (the real `available()` asks whether the directory is a mount point)."""

    def available(self) -> bool:
        return self.root.is_dir()


class UnavailableFusectl(Fusectl):
    """fusectl not mounted and not mountable (no CAP_SYS_ADMIN)."""

    def available(self) -> bool:
        return False

    def ensure_mounted(self) -> None:
        raise FusectlError(errno.EPERM, f"cannot mount fusectl on {self.root}: not permitted")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Node:
    """One node's world as the healer sees it, and what the healer did to it."""

    def __init__(self, tmp_path: Path) -> None:
        self.fusectl_root = tmp_path / "connections"
        self.fusectl_root.mkdir()
        self.proc_root = tmp_path / "proc"
        self.proc_root.mkdir()
        self.mountinfo = Mountinfo(HOST_ROOT, CVMFS_ROOT)
        self.fusectl: Fusectl = MountedFakeFusectl(self.fusectl_root)
        self.prober = ScriptedProber()
        self.pins = FakePins(self.mountinfo)
        self.umount2 = FakeUmount2(self.mountinfo, self.pins, self.fusectl_root)
        self.registry = CollectorRegistry()
        self.metrics = HealerMetrics(self.registry)
        self.clock = FakeClock()
        self.events: list[tuple[str, str, str]] = []

    def connection(self, conn_id: int, max_background: int = 12, waiting: int = 0) -> None:
        """Create or update fusectl connection `conn_id`."""
        conn = self.fusectl_root / str(conn_id)
        conn.mkdir(exist_ok=True)
        (conn / "max_background").write_text(f"{max_background}\n")
        (conn / "waiting").write_text(f"{waiting}\n")
        if not (conn / "abort").exists():
            (conn / "abort").write_text("")

    def abort_written(self, conn_id: int) -> str:
        return (self.fusectl_root / str(conn_id) / "abort").read_text()

    def daemon(
        self, pid: int, conn_id: int | None, comm: str = "squashfuse", state: str = "S"
    ) -> None:
        """A process holding /dev/fuse; `conn_id` None: fdinfo of an older kernel."""
        proc = self.proc_root / str(pid)
        (proc / "fd").mkdir(parents=True)
        (proc / "fdinfo").mkdir()
        (proc / "stat").write_text(f"{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 4194560\n")
        os.symlink("/dev/fuse", proc / "fd" / "3")
        named = "" if conn_id is None else f"fuse_connection:\t{conn_id}\n"
        (proc / "fdinfo" / "3").write_text(FDINFO + named)

    def notify(self, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def healer(self, **config: Any) -> Healer:
        """A Healer wired to this node; `config` overrides HealerConfig fields."""
        settings = HealerConfig(
            proc_root=str(self.proc_root), fusectl_root=str(self.fusectl_root), **config
        )
        return Healer(
            settings,
            read_table=self.mountinfo,
            fusectl=self.fusectl,
            prober=self.prober,
            umount2=self.umount2,
            pin=self.pins,
            metrics=self.metrics,
            notify=self.notify,
            clock=self.clock,
            wall_clock=lambda: WALL_CLOCK,
        )

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(f"automount_healer_{name}", labels)


def by_id(reports: Iterable[MountReport]) -> dict[int, MountReport]:
    return {r.mount_id: r for r in reports}


def only(reports: list[MountReport]) -> MountReport:
    assert len(reports) == 1, reports
    return reports[0]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


@pytest.fixture
def severed_a(node: Node) -> Node:
    """/cvmfs/a (mount 50, connection 40) whose daemon died; /cvmfs/b (51, 41) is fine."""
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))
    node.mountinfo.add(fuse(51, "/cvmfs/b", "0:41"))
    node.connection(40, ABORTED)
    node.connection(41)
    node.prober.answer("/cvmfs/a", errno.ENOTCONN)
    return node


# -- zero touch ----------------------------------------------------------------------


def test_healthy_mounts_are_never_probed_nor_unmounted(node: Node) -> None:
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))
    node.mountinfo.add(fuse(51, "/cvmfs/b", "0:41", fstype="fuse.cvmfs2"))
    node.mountinfo.add(fuse(52, "/cvmfs/c", "0:42", fstype="fuse"))
    for conn in (40, 41, 42):
        node.connection(conn)
    healer = node.healer()

    for _ in range(5):
        reports = healer.sweep()
        node.clock.advance(2.0)

    # A probe walks the path and refreshes the autofs expiry stamp: a healthy
    # mount must never see one, or it never expires.
    assert node.prober.probed == []
    assert node.umount2.calls == []
    assert {r.mountpoint: (r.verdict, r.action) for r in reports} == {
        "/cvmfs/a": (Verdict.HEALTHY, Action.NONE),
        "/cvmfs/b": (Verdict.HEALTHY, Action.NONE),
        "/cvmfs/c": (Verdict.HEALTHY, Action.NONE),
    }
    assert node.events == []
    for verdict in ("healthy", "severed", "hung", "skipped"):
        assert node.sample("probes_total", verdict=verdict) == 0
    assert node.sample("fusectl_available") == 1
    assert node.sample("sweep_duration_seconds_count") == 5
    assert node.sample("last_sweep_timestamp_seconds") == WALL_CLOCK


def test_a_mount_without_a_fusectl_connection_is_skipped_untouched(node: Node) -> None:
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))

    report = only(node.healer().sweep())

    assert report.verdict is Verdict.SKIPPED
    assert report.detail == "no fusectl connection 40"
    assert node.prober.probed == []
    assert node.umount2.calls == []


# -- severed: probe, unmount, fall back to detach ----------------------------------------


@pytest.mark.parametrize("dead", [errno.ENOTCONN, errno.ECONNABORTED], ids=errno.errorcode.get)
def test_a_severed_mount_is_unmounted_in_the_root(severed_a: Node, dead: int) -> None:
    node = severed_a
    node.prober.answer("/cvmfs/a", dead)

    reports = by_id(node.healer().sweep())

    assert node.prober.probed == ["/cvmfs/a"]
    assert node.umount2.calls == [("/cvmfs/a", MNT_DETACH)]
    severed = reports[50]
    assert severed.verdict is Verdict.SEVERED
    assert severed.action is Action.UNMOUNTED
    assert severed.conn_id == 40
    assert severed.root == "/cvmfs"
    assert "connection aborted" in severed.detail
    assert errno.errorcode[dead] in severed.detail
    assert reports[51].verdict is Verdict.HEALTHY
    assert reports[51].action is Action.NONE
    assert node.sample("heals_total", method="umount") == 1
    assert node.sample("heals_total", method="detach") == 0
    assert node.sample("probes_total", verdict="severed") == 1
    assert node.sample("probe_duration_seconds_count") == 1
    assert node.events == [
        ("Normal", "FuseMountHealed", "unmounted severed FUSE mount /cvmfs/a (umount)")
    ]


def test_a_severed_mount_named_with_a_carriage_return_is_healed(node: Node) -> None:
    # The kernel prints \r raw in mountinfo (it escapes only " \t\n\\"): the line
    # must not be split there, or the mount vanishes and is never healed.
    node.mountinfo.add(fuse(50, "/cvmfs/foo\rbar", "0:40"))
    node.connection(40, ABORTED)
    node.prober.answer("/cvmfs/foo\rbar", errno.ENOTCONN)

    report = only(node.healer().sweep())

    assert (report.mountpoint, report.verdict, report.action) == (
        "/cvmfs/foo\rbar",
        Verdict.SEVERED,
        Action.UNMOUNTED,
    )
    assert node.umount2.calls == [("/cvmfs/foo\rbar", MNT_DETACH)]
    assert node.sample("mountinfo_malformed_lines") == 0


def test_malformed_mountinfo_lines_are_counted_and_the_rest_healed(severed_a: Node) -> None:
    node = severed_a
    # No super options: the line is reported (the table source logs it), not parsed
    # into a mount with made-up fields.
    node.mountinfo.add("52 42 0:42 / /cvmfs/c ro,relatime shared:21 - fuse.squashfuse squashfuse")

    reports = by_id(node.healer().sweep())

    assert sorted(reports) == [50, 51]
    assert reports[50].action is Action.UNMOUNTED
    assert node.sample("mountinfo_malformed_lines") == 1


def test_a_healed_mount_is_gone_from_the_next_sweep(severed_a: Node) -> None:
    healer = severed_a.healer()
    healer.sweep()

    reports = healer.sweep()

    assert [r.mountpoint for r in reports] == ["/cvmfs/b"]
    assert severed_a.umount2.calls == [("/cvmfs/a", MNT_DETACH)]
    assert severed_a.prober.probed == ["/cvmfs/a"]


def test_a_busy_severed_mount_is_detached(severed_a: Node) -> None:
    # A process holds a file on the dead mount: after the unmount its connection
    # lives on until that file is closed.
    node = severed_a
    node.umount2.held_open.add(50)

    report = by_id(node.healer().sweep())[50]

    assert node.umount2.calls == [("/cvmfs/a", MNT_DETACH)]
    assert MNT_DETACH == 2
    assert report.verdict is Verdict.SEVERED
    assert report.action is Action.DETACHED
    assert node.sample("heals_total", method="detach") == 1
    assert node.sample("heals_total", method="umount") == 0
    assert node.events == [
        ("Normal", "FuseMountHealed", "unmounted severed FUSE mount /cvmfs/a (detach)")
    ]


@pytest.mark.parametrize(
    ("fail_with", "reason", "calls"),
    [
        ([errno.EPERM], "EPERM", [("/cvmfs/a", MNT_DETACH)]),
        # EINVAL while the pinned mount is still in the table: not "gone meanwhile".
        ([errno.EINVAL], "EINVAL", [("/cvmfs/a", MNT_DETACH)]),
    ],
    ids=["EPERM", "EINVAL"],
)
def test_a_failed_unmount_is_reported_and_counted(
    severed_a: Node, fail_with: list[int], reason: str, calls: list[tuple[str, int]]
) -> None:
    node = severed_a
    node.umount2.fail_with = list(fail_with)

    report = by_id(node.healer().sweep())[50]

    assert node.umount2.calls == calls
    assert report.verdict is Verdict.SEVERED
    assert report.action is Action.FAILED
    assert f"umount: {reason}" in report.detail
    assert node.sample("heal_failures_total", reason=reason) == 1
    assert node.sample("heals_total", method="umount") == 0
    assert node.sample("heals_total", method="detach") == 0
    ((type_, event_reason, message),) = node.events
    assert (type_, event_reason) == ("Warning", "FuseMountHealFailed")
    assert message.startswith("cannot unmount /cvmfs/a")


def test_dry_run_probes_but_never_unmounts(severed_a: Node) -> None:
    node = severed_a

    report = by_id(node.healer(dry_run=True).sweep())[50]

    assert node.prober.probed == ["/cvmfs/a"]
    assert node.umount2.calls == []
    assert report.verdict is Verdict.SEVERED
    assert report.action is Action.WOULD_UNMOUNT
    assert node.sample("dry_run_heals_total") == 1
    assert node.sample("heals_total", method="umount") == 0
    assert node.events == []


def test_a_flagged_mount_that_answers_is_healthy(severed_a: Node) -> None:
    node = severed_a
    node.prober.answer("/cvmfs/a", 0)

    report = by_id(node.healer().sweep())[50]

    assert node.prober.probed == ["/cvmfs/a"]
    assert node.umount2.calls == []
    assert report.verdict is Verdict.HEALTHY
    assert report.action is Action.NONE
    assert node.sample("probes_total", verdict="healthy") == 1


def test_a_flagged_mount_with_another_error_is_left_alone(severed_a: Node) -> None:
    node = severed_a
    node.prober.answer("/cvmfs/a", errno.EIO)

    report = by_id(node.healer().sweep())[50]

    assert node.umount2.calls == []
    assert report.verdict is Verdict.SKIPPED
    assert report.action is Action.NONE
    assert "statvfs: EIO (5)" in report.detail
    assert node.sample("probes_total", verdict="skipped") == 1


def test_a_fuseblk_mount_is_read_from_its_dev_t_connection(node: Node) -> None:
    node.mountinfo.add(fuse(50, "/cvmfs/disk", "8:1", fstype="fuseblk"))
    conn_id = (8 << 20) | 1
    node.connection(1)  # the minor alone names another, healthy, connection
    node.connection(conn_id, ABORTED)
    node.prober.answer("/cvmfs/disk", errno.ENOTCONN)

    report = only(node.healer().sweep())

    assert report.conn_id == conn_id
    assert report.verdict is Verdict.SEVERED
    assert node.umount2.calls == [("/cvmfs/disk", MNT_DETACH)]


# -- hung: waiting requests that persist ----------------------------------------------


@pytest.fixture
def busy_a(node: Node) -> Node:
    """/cvmfs/a (mount 50, connection 40) with 3 requests its stopped daemon does not answer."""
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))
    node.connection(40, waiting=3)
    node.daemon(1234, 40, "squashfuse", "T")
    node.prober.answer("/cvmfs/a", None)
    return node


def test_waiting_requests_are_probed_only_after_hung_after(busy_a: Node) -> None:
    node = busy_a
    healer = node.healer(hung_after=6.0)

    first = only(healer.sweep())
    node.clock.advance(5.9)
    second = only(healer.sweep())

    assert node.prober.probed == []
    assert first.verdict is second.verdict is Verdict.HEALTHY

    node.clock.advance(0.1)
    third = only(healer.sweep())

    assert node.prober.probed == ["/cvmfs/a"]
    assert third.verdict is Verdict.HUNG
    assert "3 request(s) unanswered for 6.0s" in third.detail


@pytest.mark.parametrize("dry_run", [False, True], ids=["once", "once-dry-run"])
def test_once_probes_waiting_requests_at_once(busy_a: Node, dry_run: bool) -> None:
    # One sweep has no waiting history: without the probe it would say healthy.
    node = busy_a

    report = only(node.healer(once=True, dry_run=dry_run, hung_after=6.0).sweep())

    assert node.prober.probed == ["/cvmfs/a"]
    assert (report.verdict, report.action) == (Verdict.HUNG, Action.NONE)
    assert "3 request(s) unanswered" in report.detail
    assert "squashfuse[1234] state T" in report.detail
    assert node.umount2.calls == []


def test_once_with_no_waiting_request_probes_nothing(node: Node) -> None:
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))
    node.connection(40)

    report = only(node.healer(once=True).sweep())

    assert report.verdict is Verdict.HEALTHY
    assert node.prober.probed == []


def test_a_probe_without_answer_is_hung_and_not_probed_again(busy_a: Node) -> None:
    node = busy_a
    healer = node.healer(hung_after=0.0, probe_timeout=2.0)

    first = only(healer.sweep())

    assert node.prober.probed == ["/cvmfs/a"]
    assert first.verdict is Verdict.HUNG
    assert first.action is Action.NONE
    assert "no answer within 2.0s" in first.detail
    assert "daemon squashfuse[1234] state T" in first.detail
    assert node.sample("probes_total", verdict="hung") == 1
    ((type_, reason, message),) = node.events
    assert (type_, reason) == ("Warning", "FuseMountHung")
    assert "/cvmfs/a" in message

    for _ in range(3):
        node.clock.advance(2.0)
        again = only(healer.sweep())
        # Another probe would only block another process in the kernel.
        assert again.verdict is Verdict.HUNG
        assert again.detail == "daemon squashfuse[1234] state T"

    assert node.prober.probed == ["/cvmfs/a"]
    assert node.umount2.calls == []
    assert len(node.events) == 1
    assert node.abort_written(40) == ""


def test_a_hung_mount_without_a_daemon_says_so(node: Node) -> None:
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))
    node.connection(40, waiting=1)
    node.daemon(999, 41)  # serves another connection
    node.prober.answer("/cvmfs/a", None)

    report = only(node.healer(hung_after=0.0).sweep())

    assert report.verdict is Verdict.HUNG
    assert "daemon not found" in report.detail


def test_waiting_back_to_zero_clears_the_hung_state(busy_a: Node) -> None:
    node = busy_a
    healer = node.healer(hung_after=6.0)
    healer.sweep()
    node.clock.advance(6.0)
    assert only(healer.sweep()).verdict is Verdict.HUNG

    node.connection(40, waiting=0)
    node.clock.advance(2.0)
    answered = only(healer.sweep())
    node.connection(40, waiting=3)
    node.clock.advance(2.0)
    busy_again = only(healer.sweep())

    assert answered.verdict is Verdict.HEALTHY
    # The wait starts over: a fresh hung_after before the next probe.
    assert busy_again.verdict is Verdict.HEALTHY
    assert node.prober.probed == ["/cvmfs/a"]
    node.clock.advance(6.0)
    assert only(healer.sweep()).verdict is Verdict.HUNG
    assert node.prober.probed == ["/cvmfs/a", "/cvmfs/a"]


def test_a_hung_connection_is_aborted_after_abort_hung_after_then_healed(busy_a: Node) -> None:
    node = busy_a
    node.prober.answer("/cvmfs/a", None, errno.ENOTCONN)
    healer = node.healer(hung_after=0.0, abort_hung_after=5.0)

    assert only(healer.sweep()).verdict is Verdict.HUNG
    node.clock.advance(4.9)
    assert only(healer.sweep()).verdict is Verdict.HUNG
    assert node.abort_written(40) == ""
    assert node.prober.probed == ["/cvmfs/a"]

    node.clock.advance(0.1)
    # The unmount frees the connection and its fusectl directory: look before.
    written: list[str] = []
    node.umount2.before_call = lambda: written.append(node.abort_written(40))
    report = only(healer.sweep())

    assert written == ["1"]
    assert node.prober.probed == ["/cvmfs/a", "/cvmfs/a"]  # the confirming re-probe
    assert report.verdict is Verdict.SEVERED
    assert report.action is Action.UNMOUNTED
    assert "aborted" in report.detail
    assert "aborted connection 40" in report.detail
    assert "ENOTCONN" in report.detail
    assert node.umount2.calls == [("/cvmfs/a", MNT_DETACH)]
    assert node.sample("aborts_total") == 1
    assert node.sample("heals_total", method="umount") == 1


def test_an_aborted_connection_that_still_does_not_answer_is_not_unmounted(
    busy_a: Node,
) -> None:
    node = busy_a
    healer = node.healer(hung_after=0.0, abort_hung_after=0.0)

    report = only(healer.sweep())

    assert node.abort_written(40) == "1"
    assert report.verdict is Verdict.HUNG
    assert report.action is Action.ABORTED
    assert node.umount2.calls == []


def test_dry_run_never_aborts(busy_a: Node) -> None:
    node = busy_a
    node.prober.answer("/cvmfs/a", None, errno.ENOTCONN)
    healer = node.healer(hung_after=0.0, abort_hung_after=0.0, dry_run=True)

    first = only(healer.sweep())
    node.clock.advance(10.0)
    second = only(healer.sweep())

    assert node.abort_written(40) == ""
    assert node.sample("aborts_total") == 0
    assert first.verdict is second.verdict is Verdict.HUNG
    assert "would abort" in second.detail
    assert node.umount2.calls == []


def test_a_probe_that_cannot_start_never_leads_to_an_abort(node: Node, tmp_path: Path) -> None:
    # The healer cannot fork or exec (EAGAIN, ENOMEM, a broken image): the mount
    # was never asked, so nothing is known about it.
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))
    node.connection(40, waiting=2)
    node.daemon(1234, 40, "cvmfs2", "S")
    healer = Healer(
        HealerConfig(proc_root=str(node.proc_root), hung_after=0.0, abort_hung_after=0.0),
        read_table=node.mountinfo,
        fusectl=node.fusectl,
        prober=Prober(1.0, python=str(tmp_path / "no-such-python")),
        umount2=node.umount2,
        metrics=node.metrics,
        notify=node.notify,
        clock=node.clock,
    )

    report = only(healer.sweep())

    assert node.abort_written(40) == ""
    assert report.verdict is not Verdict.HUNG


# -- the re-check and the order of unmounts ---------------------------------------------


@pytest.mark.parametrize(
    "remounted",
    [fuse(55, "/cvmfs/a", "0:40"), fuse(50, "/cvmfs/a", "0:44")],
    ids=["new-mount-id", "reused-mount-id-new-device"],
)
def test_a_mount_replaced_before_the_unmount_is_left_alone(severed_a: Node, remounted: str) -> None:
    # automount expired and remounted /cvmfs/a while the probe ran; connection
    # numbers and mount IDs are reused.
    node = severed_a
    node.prober.during_probe = lambda: node.mountinfo.replace(50, remounted)

    report = by_id(node.healer().sweep())[50]

    assert node.mountinfo.reads == 2  # read again right before the unmount
    assert node.umount2.calls == []
    assert report.verdict is Verdict.SEVERED
    assert report.action is Action.NONE
    assert "left alone" in report.detail
    assert node.sample("heals_total", method="umount") == 0


def test_a_mount_gone_before_the_unmount_is_left_alone(severed_a: Node) -> None:
    node = severed_a
    node.prober.during_probe = lambda: node.mountinfo.remove(50)

    report = by_id(node.healer().sweep())[50]

    assert node.umount2.calls == []
    assert report.action is Action.NONE


def test_every_unmount_is_checked_against_a_fresh_mountinfo(severed_a: Node) -> None:
    # Two severed mounts; while the first is unmounted, automount remounts the
    # other (its next access came in between).
    node = severed_a
    node.mountinfo.add(fuse(52, "/cvmfs/c", "0:42"))
    node.connection(42, ABORTED)
    node.prober.answer("/cvmfs/c", errno.ENOTCONN)
    node.umount2.after_call = lambda: node.mountinfo.replace(50, fuse(55, "/cvmfs/a", "0:40"))

    reports = by_id(node.healer().sweep())

    assert node.umount2.calls == [("/cvmfs/c", MNT_DETACH)]
    assert reports[52].action is Action.UNMOUNTED
    assert reports[50].action is Action.NONE
    assert "left alone" in reports[50].detail


def test_a_mount_remounted_after_the_re_check_is_not_unmounted(severed_a: Node) -> None:
    """Issue 9, point 4: automount expires the severed mount and mounts the volume
    again between the re-check and the unmount. The unmount goes through the pin,
    which holds the probed mount: it is no longer attached, and the new mount stays.

    While the pin holds the old mount the kernel cannot give its ID or device to
    the new one (both are freed with the last reference): the new mount has others.
    An unmount by path would take it all the same."""
    node = severed_a
    node.umount2.before_call = lambda: node.mountinfo.replace(50, fuse(55, "/cvmfs/a", "0:44"))

    report = by_id(node.healer().sweep())[50]

    assert node.pins.pinned == ["/cvmfs/a"]
    assert node.umount2.calls == [("/cvmfs/a", MNT_DETACH)]
    assert node.umount2.unmounted == []
    assert node.mountinfo.table().top_at("/cvmfs/a").mount_id == 55  # type: ignore[union-attr]
    assert report.action is Action.NONE
    assert "before the unmount; left alone" in report.detail
    assert node.sample("heals_total", method="umount") == 0
    assert node.sample("heals_total", method="detach") == 0
    assert node.sample("heal_failures_total", reason="EINVAL") is None
    assert node.events == []


def test_a_mount_remounted_before_the_pin_is_left_alone(severed_a: Node) -> None:
    # The walk of the pin reaches another mount than the probed one: nothing is unmounted.
    node = severed_a
    # The sweep's read, then the pre-check before the pin: right after it, the remount.
    node.mountinfo.after_read = lambda reads: (
        node.mountinfo.replace(50, fuse(57, "/cvmfs/a", "0:40")) if reads == 2 else None
    )
    healer = node.healer()

    report = by_id(healer.sweep())[50]

    assert node.pins.pinned == ["/cvmfs/a"]
    assert node.umount2.calls == []
    assert report.action is Action.NONE
    assert "a walk reaches mount 57" in report.detail


def test_a_mount_point_that_cannot_be_pinned_is_a_failure_not_an_unmount(
    severed_a: Node,
) -> None:
    node = severed_a
    node.pins.fail_with = errno.ENOENT

    report = by_id(node.healer().sweep())[50]

    assert node.umount2.calls == []
    assert report.action is Action.FAILED
    assert "pin: ENOENT" in report.detail
    assert node.sample("heal_failures_total", reason="ENOENT") == 1


def test_dry_run_pins_and_checks_but_never_unmounts(severed_a: Node) -> None:
    node = severed_a

    report = by_id(node.healer(dry_run=True).sweep())[50]

    assert node.pins.pinned == ["/cvmfs/a"]
    assert node.umount2.calls == []
    assert report.action is Action.WOULD_UNMOUNT


def test_a_healthy_mount_is_never_pinned(severed_a: Node) -> None:
    # Pinning walks the path (an autofs expiry refresh): severed mounts only.
    node = severed_a
    node.healer().sweep()
    assert node.pins.pinned == ["/cvmfs/a"]


def test_stacked_severed_mounts_are_unmounted_top_first(node: Node) -> None:
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))
    node.mountinfo.add(fuse(51, "/cvmfs/a", "0:41", parent=50))
    node.connection(40, ABORTED)
    node.connection(41, ABORTED)
    node.prober.answer("/cvmfs/a", errno.ENOTCONN)

    reports = by_id(node.healer().sweep())

    assert node.umount2.unmounted == [51, 50]
    assert node.umount2.calls == [("/cvmfs/a", MNT_DETACH), ("/cvmfs/a", MNT_DETACH)]
    assert reports[50].action is reports[51].action is Action.UNMOUNTED
    assert node.sample("heals_total", method="umount") == 2


def test_dry_run_reports_what_a_real_run_does_with_stacked_mounts(node: Node) -> None:
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))
    node.mountinfo.add(fuse(51, "/cvmfs/a", "0:41", parent=50))
    node.connection(40, ABORTED)
    node.connection(41, ABORTED)
    node.prober.answer("/cvmfs/a", errno.ENOTCONN)

    reports = by_id(node.healer(dry_run=True).sweep())

    assert node.umount2.calls == []
    assert reports[51].action is Action.WOULD_UNMOUNT
    assert reports[50].action is Action.WOULD_UNMOUNT
    assert node.sample("dry_run_heals_total") == 2


def test_a_severed_mount_covered_by_a_healthy_one_is_left_alone(node: Node) -> None:
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))
    node.mountinfo.add(fuse(51, "/cvmfs/a", "0:41", parent=50))
    node.connection(40, ABORTED)
    node.connection(41)
    node.prober.answer("/cvmfs/a", errno.ENOTCONN)

    reports = by_id(node.healer().sweep())

    # Unmounting /cvmfs/a would take the healthy mount on top.
    assert node.umount2.calls == []
    assert reports[50].verdict is Verdict.SEVERED
    assert reports[50].action is Action.NONE
    assert "covered by another mount; left alone" in reports[50].detail
    assert reports[51].verdict is Verdict.HEALTHY


def test_a_severed_mount_inside_another_is_unmounted_first(node: Node) -> None:
    # Mount IDs are reused: the inner mount may have the smaller one.
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))
    node.mountinfo.add(fuse(45, "/cvmfs/a/b", "0:41", parent=50))
    node.connection(40, ABORTED)
    node.connection(41, ABORTED)
    node.prober.answer("/cvmfs/a", errno.ENOTCONN)
    node.prober.answer("/cvmfs/a/b", errno.ENOTCONN)

    reports = by_id(node.healer().sweep())

    assert node.umount2.calls == [("/cvmfs/a/b", MNT_DETACH), ("/cvmfs/a", MNT_DETACH)]
    assert reports[45].action is reports[50].action is Action.UNMOUNTED


# -- which mounts are looked at ------------------------------------------------------


def test_fuse_mounts_outside_the_root_and_in_slave_copies_are_not_reported(node: Node) -> None:
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))
    node.mountinfo.add(SLAVE_COPY)
    node.mountinfo.add(
        fuse(61, "/var/lib/kubelet/pods/p1/volumes/cvmfs/a", "0:40", 60, propagation="master:21")
    )
    node.mountinfo.add(fuse(70, "/mnt/sshfs", "0:45", parent=1, fstype="fuse.sshfs"))
    node.connection(40)
    node.connection(45, ABORTED)  # not ours to heal, however dead

    healer = node.healer()
    reports = healer.sweep()

    assert [(r.mount_id, r.mountpoint, r.root) for r in reports] == [(50, "/cvmfs/a", "/cvmfs")]
    assert healer.last_roots == ("/cvmfs",)
    assert node.prober.probed == []
    assert node.umount2.calls == []


def test_a_mount_under_nested_autofs_roots_is_reported_and_unmounted_once(node: Node) -> None:
    # An autofs submount (its own superblock) inside /cvmfs: both are roots,
    # and the FUSE mount below lies under both.
    node.mountinfo.add(
        "43 42 0:50 / /cvmfs/sub rw,relatime shared:22 - autofs /etc/auto.sub rw,indirect"
    )
    node.mountinfo.add(fuse(80, "/cvmfs/sub/x", "0:51", parent=43))
    node.connection(51, ABORTED)
    node.prober.answer("/cvmfs/sub/x", errno.ENOTCONN)
    healer = node.healer()

    reports = healer.sweep()

    assert healer.last_roots == ("/cvmfs", "/cvmfs/sub")
    assert [(r.mount_id, r.action) for r in reports] == [(80, Action.UNMOUNTED)]
    assert node.prober.probed == ["/cvmfs/sub/x"]
    assert node.umount2.calls == [("/cvmfs/sub/x", MNT_DETACH)]


def test_a_configured_root_that_is_not_autofs_is_warned_about_once(
    severed_a: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agents.mount_healer.healer")
    healer = severed_a.healer(roots=("/nonexistent",))

    first = healer.sweep()
    second = healer.sweep()

    assert first == second == []
    assert healer.last_roots == ()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "/nonexistent" in warnings[0].getMessage()
    assert "not an autofs mount" in warnings[0].getMessage()
    assert severed_a.prober.probed == []
    assert severed_a.umount2.calls == []


def test_a_configured_root_picks_that_root_only(severed_a: Node) -> None:
    node = severed_a
    node.mountinfo.add("43 1 0:50 / /eos rw,relatime shared:30 - autofs systemd-1 rw,indirect")
    node.mountinfo.add(fuse(80, "/eos/user", "0:51", parent=43, fstype="fuse.eosxd"))
    node.connection(51, ABORTED)
    node.prober.answer("/eos/user", errno.ENOTCONN)

    healer = node.healer(roots=("/eos/",))
    reports = healer.sweep()

    # /cvmfs/a is severed too, but not under a configured root.
    assert [(r.mount_id, r.root, r.action) for r in reports] == [(80, "/eos", Action.UNMOUNTED)]
    assert healer.last_roots == ("/eos",)
    assert node.prober.probed == ["/eos/user"]
    assert node.umount2.calls == [("/eos/user", MNT_DETACH)]


# -- without fusectl: who holds /dev/fuse -------------------------------------------------


@pytest.fixture
def no_fusectl(node: Node) -> Node:
    """fusectl cannot be mounted; /cvmfs/a (40) has a daemon, /cvmfs/b (41) has none."""
    node.fusectl = UnavailableFusectl(node.fusectl_root)
    node.mountinfo.add(fuse(50, "/cvmfs/a", "0:40"))
    node.mountinfo.add(fuse(51, "/cvmfs/b", "0:41"))
    node.prober.answer("/cvmfs/b", errno.ENOTCONN)
    return node


def test_without_fusectl_an_unserved_connection_is_probed_and_healed(
    no_fusectl: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agents.mount_healer.healer")
    node = no_fusectl
    node.daemon(1234, 40, "squashfuse")
    healer = node.healer()

    reports = by_id(healer.sweep())
    healer.sweep()

    assert node.prober.probed == ["/cvmfs/b"]
    assert reports[50].verdict is Verdict.HEALTHY
    assert reports[51].verdict is Verdict.SEVERED
    assert reports[51].action is Action.UNMOUNTED
    assert node.umount2.calls == [("/cvmfs/b", MNT_DETACH)]
    assert node.sample("fusectl_available") == 0
    fallbacks = [r for r in caplog.records if "falling back to fdinfo" in r.getMessage()]
    assert len(fallbacks) == 1


def test_without_fusectl_and_unnamed_fdinfo_nothing_is_touched(no_fusectl: Node) -> None:
    # An older kernel: fdinfo does not name connections, so a served connection
    # cannot be told from an unserved one.
    node = no_fusectl
    node.daemon(1234, 40, "squashfuse")
    node.daemon(1235, None, "cvmfs2")

    reports = node.healer().sweep()

    assert node.prober.probed == []
    assert node.umount2.calls == []
    assert {r.verdict for r in reports} == {Verdict.SKIPPED}
    assert {r.detail for r in reports} == {"fusectl unavailable and fdinfo names no connections"}


# -- what a sweep tells the operator ---------------------------------------------------


def test_report_line_is_tab_separated_path_verdict_action_detail(severed_a: Node) -> None:
    reports = by_id(severed_a.healer().sweep())

    assert reports[50].line() == (
        "/cvmfs/a\tsevered\tunmounted\tconnection aborted (daemon gone); statvfs: ENOTCONN (107)"
    )
    # No detail: no trailing tab.
    assert reports[51].line() == "/cvmfs/b\thealthy\tnone"
    assert reports[51].line().split("\t") == ["/cvmfs/b", "healthy", "none"]


def test_sweep_state_collector_counts_mounts_by_root_and_verdict(severed_a: Node) -> None:
    node = severed_a
    node.mountinfo.add(fuse(52, "/cvmfs/c", "0:42"))
    node.connection(42)
    healer = node.healer()
    node.registry.register(
        SweepStateCollector(
            lambda: healer.last_reports, lambda: healer.last_roots, healer.recent_heals
        )
    )

    assert node.sample("mounts", root="/cvmfs", verdict="healthy") is None
    healer.sweep()

    assert node.sample("mounts", root="/cvmfs", verdict="healthy") == 2
    assert node.sample("mounts", root="/cvmfs", verdict="severed") == 1
    assert node.sample("mounts", root="/cvmfs", verdict="hung") == 0
    assert node.sample("mounts", root="/cvmfs", verdict="skipped") == 0
    assert node.sample("autofs_roots") == 1

    healer.sweep()  # the severed mount is gone

    assert node.sample("mounts", root="/cvmfs", verdict="healthy") == 2
    assert node.sample("mounts", root="/cvmfs", verdict="severed") == 0


def test_a_mount_point_severed_after_every_remount_is_counted_per_mount_point(
    severed_a: Node,
) -> None:
    """What AutomountHealerHealsRepeating needs: heals per mount point in the last hour."""
    node = severed_a
    healer = node.healer()
    node.registry.register(
        SweepStateCollector(
            lambda: healer.last_reports, lambda: healer.last_roots, healer.recent_heals
        )
    )
    assert node.sample("recent_heals", root="/cvmfs", mountpoint="/cvmfs/a") is None
    for remount in range(3):
        if remount:
            # autofs mounted it again; the new daemon died as well.
            node.clock.advance(600)
            node.mountinfo.add(fuse(60 + remount, "/cvmfs/a", f"0:{70 + remount}"))
            node.connection(70 + remount, ABORTED)
        assert only([r for r in healer.sweep() if r.mountpoint == "/cvmfs/a"]).action == "unmounted"

    assert node.sample("recent_heals", root="/cvmfs", mountpoint="/cvmfs/a") == 3
    assert node.sample("recent_heals", root="/cvmfs", mountpoint="/cvmfs/b") is None
    assert node.sample("heals_total", method="umount") == 3
    healed = [m for _, reason, m in node.events if reason == "FuseMountHealed"]
    assert healed[0] == "unmounted severed FUSE mount /cvmfs/a (umount)"
    assert healed[2].endswith("; healed 3 times in the last hour")
    # An hour after the first heal it drops out of the count; the series ends
    # an hour after the last.
    node.clock.advance(3600 - 1200)
    assert node.sample("recent_heals", root="/cvmfs", mountpoint="/cvmfs/a") == 2
    node.clock.advance(1200)
    assert node.sample("recent_heals", root="/cvmfs", mountpoint="/cvmfs/a") is None


def test_a_dry_run_counts_no_heal_per_mount_point(severed_a: Node) -> None:
    healer = severed_a.healer(dry_run=True)
    for _ in range(3):
        healer.sweep()
    assert healer.recent_heals() == {}
    assert severed_a.sample("dry_run_heals_total") == 3


def test_one_unreadable_connection_does_not_stop_the_sweep(severed_a: Node) -> None:
    # fusectl answers an empty read for a connection being torn down
    # (fs/fuse/control.c: i_private cleared in fuse_ctl_remove_conn).
    node = severed_a
    node.mountinfo.add(fuse(52, "/cvmfs/c", "0:42"))
    node.connection(42)
    (node.fusectl_root / "42" / "waiting").write_text("")

    reports = by_id(node.healer().sweep())

    assert node.umount2.calls == [("/cvmfs/a", MNT_DETACH)]
    assert reports[50].action is Action.UNMOUNTED
    assert reports[52].verdict is Verdict.SKIPPED


# -- slave copies (issue 9, point 2) ----------------------------------------------------

COPY = "/var/lib/kubelet/pods/p1/volumes/cvmfs"


def copy_of_a(node: Node) -> None:
    """A consumer's `--rbind --make-rslave` copy of /cvmfs with its copy of severed /cvmfs/a."""
    node.mountinfo.add(SLAVE_COPY)
    node.mountinfo.add(fuse(61, f"{COPY}/a", "0:40", parent=60, propagation="master:21"))


def test_a_slave_copy_root_is_healed_in_its_master(severed_a: Node) -> None:
    node = severed_a
    copy_of_a(node)
    node.prober.answer(f"{COPY}/a", errno.ENOTCONN)

    reports = by_id(node.healer(roots=(COPY,)).sweep())

    # The unmount must happen in the master: one in the copy would not propagate
    # back, the root would stay severed and the copy cache ENOENT.
    assert node.umount2.unmounted == [50]
    assert 61 not in reports
    assert (reports[50].root, reports[50].verdict, reports[50].action) == (
        "/cvmfs",
        Verdict.SEVERED,
        Action.UNMOUNTED,
    )


def test_a_slave_copy_whose_master_is_not_visible_is_skipped_and_counted(node: Node) -> None:
    node.mountinfo.remove(42)  # a container that sees only its rslave copy
    copy_of_a(node)
    node.connection(40, ABORTED)
    registry = node.registry
    healer = node.healer(roots=(COPY,))
    registry.register(
        SweepStateCollector(lambda: healer.last_reports, lambda: healer.last_roots, dict)
    )

    report = only(healer.sweep())

    assert (report.mountpoint, report.verdict, report.action) == (
        f"{COPY}/a",
        Verdict.SKIPPED,
        Action.NONE,
    )
    assert "mount propagation" in report.detail
    assert node.prober.probed == [] and node.pins.pinned == [] and node.umount2.calls == []
    assert node.sample("mounts_not_healable", root=COPY, reason="mount_propagation") == 1


def test_only_slave_copies_say_how_to_fix_the_manifest(node: Node) -> None:
    node.mountinfo.remove(42)
    copy_of_a(node)
    healer = node.healer()

    assert healer.sweep() == []
    assert healer.slave_copies == (COPY,)
    message = healer.only_slaves_message()
    assert COPY in message and "Bidirectional" in message and "rshared" in message
