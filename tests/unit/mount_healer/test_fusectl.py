"""fusectl and `/proc/*/fdinfo` read from fake trees: files stand in for sysfs and procfs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agents.mount_healer.fusectl import (
    ABORTED_MAX_BACKGROUND,
    Connection,
    Daemon,
    Fusectl,
    FusectlError,
    connection_id,
    scan_fuse_fds,
)

# What fs/fuse/dev.c `fuse_dev_show_fdinfo` prints on newer kernels, and what
# older kernels print for the same fd (no connection named).
FDINFO_OLD_KERNEL = "pos:\t0\nflags:\t02100002\nmnt_id:\t26\nino:\t5\n"


def fdinfo_naming(conn_id: int) -> str:
    return f"{FDINFO_OLD_KERNEL}fuse_connection:\t{conn_id}\n"


def write_connection(root: Path, conn_id: int, max_background: str, waiting: str) -> Path:
    """A fusectl connection directory as the kernel shows it (values end in a newline)."""
    conn = root / str(conn_id)
    conn.mkdir()
    (conn / "max_background").write_text(max_background)
    (conn / "waiting").write_text(waiting)
    (conn / "abort").write_text("")
    return conn


class FakeProc:
    """A procfs tree: `<pid>/stat`, `<pid>/fd/<n>` symlinks and `<pid>/fdinfo/<n>` files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def process(self, pid: int, comm: str = "squashfuse", state: str = "S") -> Path:
        proc = self.root / str(pid)
        (proc / "fd").mkdir(parents=True)
        (proc / "fdinfo").mkdir()
        (proc / "stat").write_text(f"{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 4194560 120 0\n")
        return proc

    def fd(self, pid: int, fd: int, target: str = "/dev/fuse", fdinfo: str | None = None) -> None:
        """An open fd; readlink gives `target` (the device itself is never opened)."""
        proc = self.root / str(pid)
        os.symlink(target, proc / "fd" / str(fd))
        if fdinfo is not None:
            (proc / "fdinfo" / str(fd)).write_text(fdinfo)


@pytest.fixture
def fusectl_root(tmp_path: Path) -> Path:
    root = tmp_path / "connections"
    root.mkdir()
    return root


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    root = tmp_path / "proc"
    root.mkdir()
    return FakeProc(root)


# -- connection ids ------------------------------------------------------------------


def test_connection_id_of_an_anonymous_fuse_device_is_its_minor() -> None:
    assert connection_id(0, 40) == 40


def test_connection_id_of_a_fuseblk_device_is_the_kernel_dev_t() -> None:
    # fuseblk mounts have a real block device; fusectl names the connection
    # after the kernel-internal dev_t MKDEV(major, minor) = major << 20 | minor.
    assert connection_id(8, 1) == (8 << 20) | 1 == 8388609


# -- reading and aborting connections ----------------------------------------------------


def test_read_of_a_live_connection(fusectl_root: Path) -> None:
    write_connection(fusectl_root, 40, "12\n", "3\n")

    conn = Fusectl(fusectl_root).read(40)

    assert conn == Connection(conn_id=40, max_background=12, waiting=3)
    assert not conn.aborted


def test_read_of_an_aborted_connection(fusectl_root: Path) -> None:
    write_connection(fusectl_root, 41, "4294967295\n", "0\n")

    conn = Fusectl(fusectl_root).read(41)

    assert conn is not None
    assert conn.max_background == ABORTED_MAX_BACKGROUND
    assert conn.aborted


def test_read_of_a_missing_connection_is_none(fusectl_root: Path) -> None:
    write_connection(fusectl_root, 40, "12\n", "0\n")

    assert Fusectl(fusectl_root).read(99) is None


def test_read_of_a_connection_removed_halfway_is_none(fusectl_root: Path) -> None:
    # The mount went away between the two reads: its directory lost `waiting`.
    conn = write_connection(fusectl_root, 40, "12\n", "0\n")
    (conn / "waiting").unlink()

    assert Fusectl(fusectl_root).read(40) is None


@pytest.mark.parametrize(
    ("max_background", "waiting"),
    [("garbage\n", "0\n"), ("12\n", "many\n"), ("", "0\n")],
    ids=["words", "words-in-waiting", "empty"],
)
def test_read_of_garbage_raises_fusectl_error(
    fusectl_root: Path, max_background: str, waiting: str
) -> None:
    write_connection(fusectl_root, 40, max_background, waiting)

    with pytest.raises(FusectlError) as raised:
        Fusectl(fusectl_root).read(40)

    assert isinstance(raised.value, OSError)
    assert raised.value.errno == errno.EIO
    assert str(fusectl_root / "40") in str(raised.value)


def test_abort_writes_1_to_the_connection(fusectl_root: Path) -> None:
    conn = write_connection(fusectl_root, 40, "12\n", "2\n")

    Fusectl(fusectl_root).abort(40)

    assert (conn / "abort").read_text() == "1"


def test_abort_of_a_missing_connection_raises_fusectl_error(fusectl_root: Path) -> None:
    with pytest.raises(FusectlError) as raised:
        Fusectl(fusectl_root).abort(40)

    assert raised.value.errno == errno.ENOENT


def test_a_plain_directory_is_not_an_available_fusectl(fusectl_root: Path) -> None:
    assert not Fusectl(fusectl_root).available()


def test_ensure_mounted_without_the_directory_raises_and_mounts_nothing(tmp_path: Path) -> None:
    # No fuse module: /sys/fs/fuse/connections does not exist. Nothing to mount on.
    with pytest.raises(FusectlError) as raised:
        Fusectl(tmp_path / "absent").ensure_mounted()

    assert raised.value.errno == errno.ENOENT
    assert not (tmp_path / "absent").exists()


# -- who holds /dev/fuse -------------------------------------------------------------


def test_scan_finds_holders_by_connection(proc: FakeProc) -> None:
    proc.process(100, "squashfuse")
    proc.fd(100, 0, "/dev/null")
    proc.fd(100, 3, "/dev/fuse", fdinfo_naming(40))
    proc.process(200, "cvmfs2")
    proc.fd(200, 1, "socket:[4711]")
    proc.fd(200, 7, "/dev/fuse", fdinfo_naming(41))
    proc.process(300, "bash")
    proc.fd(300, 0, "/dev/pts/0")

    scan = scan_fuse_fds(proc.root)

    assert scan.holders == {
        40: [Daemon(100, "squashfuse", "S")],
        41: [Daemon(200, "cvmfs2", "S")],
    }
    assert scan.unnamed == 0


def test_scan_accepts_a_path_as_text(proc: FakeProc) -> None:
    proc.process(100)
    proc.fd(100, 3, "/dev/fuse", fdinfo_naming(40))

    assert list(scan_fuse_fds(str(proc.root)).holders) == [40]


@pytest.mark.parametrize(
    ("state", "stopped"), [("T", True), ("t", True), ("S", False), ("R", False), ("D", False)]
)
def test_daemon_is_stopped_when_sigstopped_or_traced(
    proc: FakeProc, state: str, stopped: bool
) -> None:
    proc.process(100, "squashfuse", state)
    proc.fd(100, 3, "/dev/fuse", fdinfo_naming(40))

    (daemon,) = scan_fuse_fds(proc.root).holders[40]

    assert daemon.state == state
    assert daemon.stopped is stopped


def test_daemon_name_may_hold_spaces_and_parentheses(proc: FakeProc) -> None:
    # comm is free text: `1234 ((a) b)) T 1 ...` is one comm "(a) b)"; it ends
    # at the last ')' (proc(5), /proc/pid/stat).
    proc.process(1234, "(a) b)", "T")
    proc.fd(1234, 3, "/dev/fuse", fdinfo_naming(42))

    (daemon,) = scan_fuse_fds(proc.root).holders[42]

    assert daemon == Daemon(1234, "(a) b)", "T")
    assert daemon.stopped
    assert str(daemon) == "(a) b)[1234] state T"


def test_squash_fuse_comm_with_a_space(proc: FakeProc) -> None:
    proc.process(1234, "squash fuse", "T")
    proc.fd(1234, 3, "/dev/fuse", fdinfo_naming(42))

    assert scan_fuse_fds(proc.root).holders[42] == [Daemon(1234, "squash fuse", "T")]


def test_fds_without_fuse_connection_are_counted_unnamed(proc: FakeProc) -> None:
    # An older kernel: fdinfo of /dev/fuse does not say which connection.
    proc.process(100)
    proc.fd(100, 3, "/dev/fuse", FDINFO_OLD_KERNEL)
    proc.process(200)
    proc.fd(200, 4, "/dev/fuse", FDINFO_OLD_KERNEL)
    proc.process(300)
    proc.fd(300, 5, "/dev/fuse", fdinfo_naming(41))

    scan = scan_fuse_fds(proc.root)

    assert scan.unnamed == 2
    assert scan.holders == {41: [Daemon(300, "squashfuse", "S")]}


def test_non_numeric_entries_and_processes_without_fd_are_ignored(proc: FakeProc) -> None:
    # `self`, `net`, `uptime` ... are not processes; a pid dir without fd/ is
    # a process that exited or that we may not read.
    fake_self = proc.root / "self"
    (fake_self / "fd").mkdir(parents=True)
    (fake_self / "fdinfo").mkdir()
    os.symlink("/dev/fuse", fake_self / "fd" / "3")
    (fake_self / "fdinfo" / "3").write_text(fdinfo_naming(40))
    (fake_self / "stat").write_text("1 (self) S 0\n")
    (proc.root / "uptime").write_text("123.45 67.89\n")
    (proc.root / "500").mkdir()
    (proc.root / "500" / "stat").write_text("500 (gone) Z 1\n")
    proc.process(100, "squashfuse")
    proc.fd(100, 3, "/dev/fuse", fdinfo_naming(41))

    scan = scan_fuse_fds(proc.root)

    assert scan.holders == {41: [Daemon(100, "squashfuse", "S")]}
    assert scan.unnamed == 0


def test_scan_of_an_empty_proc_finds_nothing(proc: FakeProc) -> None:
    scan = scan_fuse_fds(proc.root)

    assert scan.holders == {}
    assert scan.unnamed == 0


def test_an_fd_closed_mid_scan_does_not_hide_the_daemons_other_fds(proc: FakeProc) -> None:
    # A daemon with a cloned /dev/fuse fd per worker (libfuse clone_fd): a worker
    # exits and closes its fd between the listing of fd/ and the read of its
    # fdinfo. The daemon's main fd still serves connection 42.
    proc.process(100, "eosxd")
    proc.fd(100, 3, "/dev/fuse")
    proc.fd(100, 4, "/dev/fuse")
    listed = [entry.name for entry in os.scandir(proc.root / "100" / "fd")]
    closed, serving = listed  # the fd the scan meets first is the one that vanished
    (proc.root / "100" / "fdinfo" / serving).write_text(fdinfo_naming(42))

    scan = scan_fuse_fds(proc.root)

    assert closed != serving
    assert scan.holders == {42: [Daemon(100, "eosxd", "S")]}
