"""Processes named by (pid, start time), and signals that cannot hit the wrong one.

A PID alone is not an identity: once a process is reaped its number can be
handed to a new process, so a PID read a moment ago (from NVML, from a cgroup)
may name a stranger by the time we act. A `ProcessRef` adds the start time from
`/proc/<pid>/stat`, and every signal goes through a pidfd opened *before* that
start time is checked again (`_open_verified` says why that order is exact).
`os.kill` is never used.

The pidfd calls take the PID as the caller's PID namespace sees it, so
`proc_root` must be the procfs of that same namespace for the re-check to
mean anything: the host's `/proc` for an agent running with `hostPID`. Tests
pass fake trees for reading start times, and may pass one with a real child's
PID to see a mismatch refused.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

log = logging.getLogger(__name__)

ProcRoot = str | os.PathLike[str]
T = TypeVar("T")

# What terminate() did: the process exited after SIGTERM ("terminated"), needed
# SIGKILL ("killed"), or had exited before we sent anything ("gone").
Outcome = Literal["terminated", "killed", "gone"]

# proc(5): fields counted from 1; field 3 (state) is the first after comm,
# field 20 is num_threads and field 22 starttime, in clock ticks after boot.
_STATE = 3 - 3
_NUM_THREADS = 20 - 3
_STARTTIME = 22 - 3
# States of a task that has exited: zombie (not reaped yet) and dead.
_EXITED_STATES = frozenset({b"Z", b"X"})


class ProcessGone(LookupError):
    """The process no longer exists: it exited and was reaped (or never existed)."""


class ProcessReplaced(ProcessGone):
    """The PID now belongs to another process (PID reuse): the one we meant is gone."""


class ProcessError(OSError):
    """The process exists but cannot be read or signalled.

    Permission (EPERM without CAP_KILL over the target, EACCES under
    `hidepid`), a record that is not a `/proc/<pid>/stat`, or a kernel without
    pidfds (ENOSYS, before 5.3).
    """


@dataclass(frozen=True)
class ProcessRef:
    """One process for its whole life: its PID and its start time.

    `start_time` is field 22 of `/proc/<pid>/stat`, clock ticks since boot. Two
    processes share both if a PID is reaped and handed out again within one
    tick (10 ms), which a test forcing `ns_last_pid` does easily. So a ref
    taken through a pidfd also keeps `pidfd_inode`: on pidfs (Linux 6.9+)
    every process gets its own inode number, never reused before reboot, which
    makes the identity exact. Older kernels give every pidfd one shared
    anonymous inode, so there it adds nothing and takes nothing away.
    """

    pid: int
    start_time: int
    pidfd_inode: int | None = None

    def __post_init__(self) -> None:
        # 0 and negative numbers mean process groups to kill(2); never let one in.
        if self.pid < 1:
            raise ValueError(f"not a process ID: {self.pid}")
        if self.start_time < 0:
            raise ValueError(f"not a start time: {self.start_time}")

    @classmethod
    def of(cls, pid: int, proc_root: ProcRoot = "/proc") -> ProcessRef:
        """The process that has `pid` now. Raises ProcessGone if there is none."""
        return cls(pid, _start_time(_stat_fields(pid, proc_root)))

    @classmethod
    def of_pinned(cls, pidfd: int, pid: int, proc_root: ProcRoot = "/proc") -> ProcessRef:
        """The process that `pidfd` (opened on `pid` just before) names.

        Raises ProcessGone if `pid` has no process any more: then the number is
        free or taken by another, so the start time read would not be the
        pinned process's (`_open_verified` says why the order is exact).
        """
        return cls(pid, _start_time(_stat_fields(pid, proc_root)), os.fstat(pidfd).st_ino)

    def describe(self) -> str:
        return f"pid {self.pid} (started {self.start_time} ticks after boot)"


def _stat_fields(pid: int, proc_root: ProcRoot) -> list[bytes]:
    """The fields of `/proc/<pid>/stat` from field 3 (state) on."""
    # os.open/os.read on a plain string: the GPU enforcer reads this for
    # hundreds of processes per tick, and pathlib costs several times the
    # system calls.
    path = f"{proc_root}/{pid}/stat"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    except (FileNotFoundError, NotADirectoryError, ProcessLookupError) as err:
        # ESRCH: the process was reaped between open and read.
        raise ProcessGone(f"pid {pid}: no such process") from err
    except OSError as err:
        raise ProcessError(err.errno, f"cannot read {path}: {err.strerror}") from err
    # Field 2 is comm in parentheses, and comm may itself hold spaces and
    # parentheses ("(my (weird) proc)"); nothing after it can (fs/proc/array.c
    # do_task_stat prints numbers and the state letter), so split after the
    # last ')'. Bytes: comm need not be valid UTF-8.
    _, paren, rest = data.rpartition(b")")
    fields = rest.split()
    if not paren or len(fields) <= _STARTTIME:
        raise ProcessError(errno.EINVAL, f"{path}: not a /proc/<pid>/stat record")
    return fields


def _start_time(fields: list[bytes]) -> int:
    try:
        return int(fields[_STARTTIME])
    except ValueError as err:
        raise ProcessError(
            errno.EINVAL, f"start time {fields[_STARTTIME]!r} is not a number"
        ) from err


def is_running(ref: ProcessRef, proc_root: ProcRoot = "/proc") -> bool:
    """Whether that very process exists and has not exited.

    A zombie has exited (its memory, GPU contexts and files are released);
    only its parent has not collected the status yet, so it is not running.
    But "Z" alone is not enough: a main thread that called pthread_exit shows
    "Z" while the other threads run, so a zombie with more than one thread
    still runs. That is what a pidfd polls too (readable once the zombie
    leader's thread group is empty). Reads only `proc_root`, no pidfd.
    """
    try:
        fields = _stat_fields(ref.pid, proc_root)
    except ProcessGone:
        return False
    if _start_time(fields) != ref.start_time:
        return False
    if fields[_STATE] not in _EXITED_STATES:
        return True
    try:
        return int(fields[_NUM_THREADS]) > 1
    except ValueError as err:
        raise ProcessError(errno.EINVAL, f"thread count {fields[_NUM_THREADS]!r}") from err


def signal_process(ref: ProcessRef, sig: int, proc_root: ProcRoot = "/proc") -> None:
    """Send `sig` to that very process, or to nothing.

    Raises ProcessGone if it has exited and been reaped, ProcessReplaced if its
    PID now names another process (which is not signalled), ProcessError if the
    signal is not permitted. A zombie accepts the signal and ignores it.
    """
    pidfd = _open_verified(ref, proc_root)
    try:
        _send(pidfd, ref, sig)
    finally:
        os.close(pidfd)


def terminate(
    ref: ProcessRef,
    grace: float,
    *,
    kill_wait: float = 1.0,
    proc_root: ProcRoot = "/proc",
) -> Outcome:
    """SIGTERM, up to `grace` seconds for the process to exit, then SIGKILL.

    Returns "gone" if it had exited before the first signal (reaped, its PID
    reused, or a zombie), "terminated" if it exited after SIGTERM, "killed"
    after SIGKILL. Waits up to `kill_wait` after SIGKILL; a process in
    uninterruptible sleep (D: in a driver, on a hung FUSE mount) dies only when
    it wakes, which is logged. Works for any process the caller may signal,
    child or not: exit is seen through the pidfd, not through wait(2).
    """
    try:
        pidfd = _open_verified(ref, proc_root)
    except ProcessGone as err:
        log.debug("%s: gone before SIGTERM: %s", ref.describe(), err)
        return "gone"
    # Both signals go through this one verified pidfd: it names exactly the
    # process checked above for as long as we hold it, which is the re-check
    # before SIGKILL, kept without a gap. (Re-reading stat instead would be
    # weaker: after a reap and PID reuse it could only say "replaced".)
    try:
        if _exited(pidfd, 0.0):
            return "gone"
        try:
            _send(pidfd, ref, signal.SIGTERM)
        except ProcessGone:
            return "gone"  # reaped between the check and the signal: never reached
        if _exited(pidfd, grace):
            return "terminated"
        try:
            _send(pidfd, ref, signal.SIGKILL)
        except ProcessGone:
            return "terminated"  # exited and was reaped just after the grace period
        if not _exited(pidfd, kill_wait):
            log.warning(
                "%s: SIGKILL sent, still not exited after %.1fs "
                "(uninterruptible sleep?); it dies when it wakes",
                ref.describe(),
                kill_wait,
            )
        return "killed"
    finally:
        os.close(pidfd)


def _open_verified(ref: ProcessRef, proc_root: ProcRoot) -> int:
    """A pidfd for `ref`'s process, opened first, then checked against its start time.

    Why this order cannot signal a stranger: pidfd_open(2) binds the fd to
    the struct pid of whatever process holds the number at that moment, P.
    The start time is read after that. A PID number belongs to one process from
    fork until it is reaped, so if `ref`'s process held the number when `ref`
    was taken and still holds it at the check, it held it at the open too:
    P is that process. Whatever happens later, pidfd_send_signal(2) signals
    P or, once P has been reaped, fails with ESRCH, even if the number has been
    given to someone else (the pidfd pins the struct pid, not the number).
    Checking before opening would leave a window where the number is reused
    and the pidfd names the newcomer.
    """
    try:
        pidfd = os.pidfd_open(ref.pid)
    except ProcessLookupError as err:
        raise ProcessGone(f"{ref.describe()}: no such process") from err
    except OSError as err:
        raise ProcessError(
            err.errno, f"cannot open a pidfd for {ref.describe()}: {err.strerror}"
        ) from err
    try:
        now = ProcessRef.of_pinned(pidfd, ref.pid, proc_root)
        if now.start_time != ref.start_time or (
            ref.pidfd_inode is not None and now.pidfd_inode != ref.pidfd_inode
        ):
            raise ProcessReplaced(
                f"{ref.describe()}: that pid now belongs to another process "
                f"(started {now.start_time} ticks after boot)"
            )
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd


def _send(pidfd: int, ref: ProcessRef, sig: int) -> None:
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"  # 0 (permission and existence check) or a real-time one
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError as err:
        raise ProcessGone(f"{ref.describe()}: exited before {name}") from err
    except OSError as err:
        raise ProcessError(
            err.errno, f"cannot send {name} to {ref.describe()}: {err.strerror}"
        ) from err
    log.debug("sent %s to %s", name, ref.describe())


def _exited(pidfd: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for the process to exit; True once it has.

    A pidfd polls readable once the whole thread group has exited, zombie or
    reaped (fs/pidfs.c pidfd_poll; pidfd_open(2)), so this needs neither a
    parent's wait(2) nor a sleep loop. poll(2) is restarted on EINTR with the
    remaining time (PEP 475).
    """
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout * 1000))))


class LiveProcesses(Generic[T]):
    """Facts about processes, each kept exactly as long as its process lives.

    A pidfd is held per process; it polls readable when the process exits
    (pidfd_open(2)), so one poll(2) per pass finds every exit and the facts of
    a PID are never handed to the next process that gets the number. This
    replaces re-reading `/proc/<pid>/stat` for every process on every pass
    (the GPU enforcer sees hundreds per tick).
    """

    def __init__(self, proc_root: ProcRoot = "/proc") -> None:
        self.proc_root = proc_root
        self._entries: dict[int, tuple[int, ProcessRef, T]] = {}  # pid -> (pidfd, ref, fact)
        self._by_fd: dict[int, int] = {}
        self._poller = select.poll()

    def __len__(self) -> int:
        return len(self._entries)

    def prune(self) -> None:
        """Forget every process that has exited since the last call."""
        for fd, _event in self._poller.poll(0):
            pid = self._by_fd.get(fd)
            if pid is not None:
                self._drop(pid)

    def get(self, pid: int) -> tuple[ProcessRef, T] | None:
        """(ref, fact) of the live process with this PID, if known. Call `prune` first."""
        entry = self._entries.get(pid)
        return None if entry is None else (entry[1], entry[2])

    def add(self, pid: int, learn: Callable[[ProcessRef], T]) -> tuple[ProcessRef, T]:
        """Pin the process that has `pid` now, and keep `learn(ref)` for it.

        The pidfd is opened first and the start time read after (the order
        `_open_verified` explains), so the ref and the fact belong to the
        pinned process. Raises ProcessGone when there is no such process.
        """
        self._drop(pid)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError as err:
            raise ProcessGone(f"pid {pid}: no such process") from err
        except OSError as err:
            raise ProcessError(err.errno, f"cannot open a pidfd for pid {pid}") from err
        try:
            ref = ProcessRef.of_pinned(pidfd, pid, self.proc_root)
            fact = learn(ref)
        except BaseException:
            os.close(pidfd)
            raise
        self._entries[pid] = (pidfd, ref, fact)
        self._by_fd[pidfd] = pid
        self._poller.register(pidfd, select.POLLIN)
        return ref, fact

    def retain(self, pids: Iterable[int]) -> None:
        """Forget the processes not in `pids` (no longer of interest)."""
        keep = set(pids)
        for pid in [p for p in self._entries if p not in keep]:
            self._drop(pid)

    def _drop(self, pid: int) -> None:
        entry = self._entries.pop(pid, None)
        if entry is not None:
            self._poller.unregister(entry[0])
            del self._by_fd[entry[0]]
            os.close(entry[0])

    def close(self) -> None:
        for pid in list(self._entries):
            self._drop(pid)
