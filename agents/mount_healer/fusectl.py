"""FUSE connections seen without touching the mounts: fusectl and `/proc/*/fdinfo`.

The mountinfo device `0:N` of a FUSE mount is its connection
`/sys/fs/fuse/connections/N` (fs/fuse/control.c names the directory after
`fc->dev`, the superblock's dev_t). When the daemon dies or the connection is
aborted, fs/fuse/dev.c `fuse_abort_conn` sets `max_background` to UINT_MAX, so
a severed mount shows there with no path walk through autofs. `waiting` counts
requests the daemon has not answered; with the daemon stopped it stays > 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FUSECTL_ROOT = Path("/sys/fs/fuse/connections")
# fuse_abort_conn(): fc->max_background = UINT_MAX
ABORTED_MAX_BACKGROUND = 2**32 - 1


class FusectlError(OSError):
    """fusectl is not available (not mounted and cannot be mounted)."""


def connection_id(major: int, minor: int) -> int:
    """The fusectl directory number of a device: the kernel's internal dev_t (MKDEV)."""
    return (major << 20) | minor


@dataclass(frozen=True)
class Connection:
    """One FUSE connection as fusectl shows it."""

    conn_id: int
    max_background: int
    waiting: int

    @property
    def aborted(self) -> bool:
        """The daemon died (its /dev/fuse closed) or someone wrote to `abort`."""
        return self.max_background == ABORTED_MAX_BACKGROUND


class Fusectl:
    """Reads and aborts connections under a fusectl mount (root injectable for tests)."""

    def __init__(self, root: Path | str = FUSECTL_ROOT) -> None:
        self.root = Path(root)

    def available(self) -> bool:
        return self.root.is_dir() and os.path.ismount(self.root)

    def ensure_mounted(self) -> None:
        """Mount fusectl at its root if it is not there (needs CAP_SYS_ADMIN)."""
        if self.available():
            return
        if not self.root.is_dir():
            raise FusectlError(
                errno.ENOENT, f"{self.root} does not exist (fuse module not loaded?)"
            )
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.mount(b"fusectl", os.fsencode(self.root), b"fusectl", 0, None) != 0:
            err = ctypes.get_errno()
            raise FusectlError(err, f"cannot mount fusectl on {self.root}: {os.strerror(err)}")
        log.info("mounted fusectl on %s", self.root)

    def read(self, conn_id: int) -> Connection | None:
        """The connection, or None if fusectl has no such directory."""
        base = f"{self.root}/{conn_id}"
        try:
            max_background = _read_int(f"{base}/max_background")
            waiting = _read_int(f"{base}/waiting")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise FusectlError(getattr(err, "errno", None) or errno.EIO, f"{base}: {err}") from err
        return Connection(conn_id, max_background, waiting)

    def abort(self, conn_id: int) -> None:
        """Abort the connection: blocked requests fail with ECONNABORTED, then ENOTCONN."""
        path = self.root / str(conn_id) / "abort"
        try:
            path.write_text("1")
        except OSError as err:
            raise FusectlError(err.errno, f"cannot abort {path}: {err.strerror}") from err


def _read_int(path: str) -> int:
    # os.open/os.read: a sweep reads two files per FUSE mount, and pathlib's
    # text layer costs several times the system calls.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return int(os.read(fd, 64))
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Daemon:
    """A process holding a /dev/fuse fd for a connection."""

    pid: int
    name: str
    state: str

    @property
    def stopped(self) -> bool:
        """`T` (SIGSTOP) or `t` (traced): it will not answer requests."""
        return self.state in ("T", "t")

    def __str__(self) -> str:
        return f"{self.name}[{self.pid}] state {self.state}"


@dataclass(frozen=True)
class FuseFdScan:
    """Who holds /dev/fuse, by connection, from `fuse_connection:` in fdinfo."""

    holders: dict[int, list[Daemon]]
    unnamed: int
    """/dev/fuse fds whose fdinfo names no connection: an older kernel, which
    cannot tell an unserved connection from a served one."""


def scan_fuse_fds(proc_root: Path | str = "/proc") -> FuseFdScan:
    """Every process holding /dev/fuse, by the connection it serves.

    Only newer kernels print `fuse_connection:` (fs/fuse/dev.c
    `fuse_dev_show_fdinfo`). Scans every process: use it for the few
    connections already suspected, or when fusectl is unavailable.
    """
    holders: dict[int, list[Daemon]] = {}
    unnamed = 0
    for entry in os.scandir(proc_root):
        if not entry.name.isdigit():
            continue
        try:
            fds = list(os.scandir(f"{entry.path}/fd"))
        except OSError:
            continue  # the process exited, or is not ours to read
        for fd in fds:
            try:
                if os.readlink(fd.path) != "/dev/fuse":
                    continue
                conn = _fdinfo_connection(f"{entry.path}/fdinfo/{fd.name}")
                if conn is None:
                    unnamed += 1
                else:
                    holders.setdefault(conn, []).append(_daemon(int(entry.name), entry.path))
            except OSError:
                continue  # this fd was closed meanwhile; the others still count
    return FuseFdScan(holders, unnamed)


def _fdinfo_connection(path: str) -> int | None:
    with open(path, encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("fuse_connection:"):
                return int(line.split(":", 1)[1])
    return None


def _daemon(pid: int, proc_dir: str) -> Daemon:
    with open(f"{proc_dir}/stat", encoding="utf-8", errors="replace") as f:
        stat = f.read()
    # comm may hold spaces and parentheses: it ends at the last ')'.
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    state = stat[stat.rindex(")") + 2 :].split(" ", 1)[0]
    return Daemon(pid, name, state)
