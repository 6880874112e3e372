"""Confirming probes: `statvfs` of a suspected mount, in a child process, with a timeout.

A probe of a hung (stopped) FUSE daemon blocks in the kernel. In a thread it
could never be cancelled; a child process can: FUSE waits for an answer with
`wait_event_killable` (fs/fuse/dev.c `request_wait_answer`), so SIGKILL frees
it. `stat` is not used: it may be answered from the attribute cache for about
a second after the daemon died; `statvfs` always asks the daemon.

A probe walks the path, so it refreshes the autofs expiry stamp: it runs only
for mounts that fusectl already flagged, never for healthy ones.
"""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Errors that say the FUSE daemon is gone ("Transport endpoint is not
# connected", or "Software caused connection abort" after an abort).
DEAD_ENDPOINT_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})

# `error` of a probe that could not be started or whose output was garbage.
NOT_STARTED = -1

_PROBE_SOURCE = (
    "import os, sys\n"
    "try:\n"
    "    os.statvfs(sys.argv[1])\n"
    "except OSError as err:\n"
    "    print(err.errno or -1)\n"
    "else:\n"
    "    print(0)\n"
)


@dataclass(frozen=True)
class ProbeResult:
    """What a probe saw: `error` 0 for success, an errno, or None if it timed out."""

    path: str
    error: int | None
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.error is None

    @property
    def dead_endpoint(self) -> bool:
        return self.error in DEAD_ENDPOINT_ERRNOS

    def describe(self) -> str:
        if self.error is None:
            return f"no answer within {self.seconds:.1f}s"
        if self.error == NOT_STARTED:
            return "probe could not run"
        if self.error == 0:
            return "statvfs ok"
        return f"statvfs: {errno.errorcode.get(self.error, self.error)} ({self.error})"


class Prober:
    """Runs probes in parallel child processes; kills and later reaps stragglers."""

    def __init__(
        self,
        timeout: float,
        *,
        python: str = sys.executable,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self._python = python
        self._clock = clock
        self._unreaped: list[subprocess.Popen[bytes]] = []

    def probe(self, paths: Iterable[str]) -> dict[str, ProbeResult]:
        """Probe every path at once; returns within about `timeout` seconds."""
        self._reap()
        started = self._clock()
        children: dict[str, subprocess.Popen[bytes]] = {}
        results: dict[str, ProbeResult] = {}
        # Once per path: stacked mounts share a mount point, and a walk
        # reaches only the top one anyway.
        for path in dict.fromkeys(paths):
            try:
                children[path] = subprocess.Popen(
                    [self._python, "-I", "-S", "-c", _PROBE_SOURCE, path],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    close_fds=True,
                )
            except OSError as err:
                # Not a timeout: the mount was never asked, nothing is known.
                log.error("cannot start a probe for %s: %s", path, err)
                results[path] = ProbeResult(path, NOT_STARTED, 0.0)
        deadline = started + self.timeout
        for path, child in children.items():
            try:
                out, _ = child.communicate(timeout=max(0.0, deadline - self._clock()))
            except subprocess.TimeoutExpired:
                child.kill()
                self._unreaped.append(child)
                results[path] = ProbeResult(path, None, self._clock() - started)
                continue
            try:
                code = int(out.strip())
            except ValueError:
                code = NOT_STARTED
            results[path] = ProbeResult(path, code, self._clock() - started)
        return results

    def _reap(self) -> None:
        """Collect killed probes; one stuck in an unkillable wait is kept for later."""
        still = []
        for child in self._unreaped:
            if child.poll() is None:
                still.append(child)
            elif child.stdout is not None:
                child.stdout.close()
        self._unreaped = still

    def close(self, timeout: float = 1.0) -> None:
        """Wait a little for killed probes to exit (bounded; used at shutdown)."""
        deadline = self._clock() + timeout
        for child in self._unreaped:
            try:
                child.wait(timeout=max(0.0, deadline - self._clock()))
            except subprocess.TimeoutExpired:
                log.warning("probe pid %d is still blocked in the kernel", child.pid)
            if child.stdout is not None:
                child.stdout.close()
        self._unreaped = [c for c in self._unreaped if c.returncode is None]
