"""Wake a sweep when a process exits: the kernel's process-event connector.

A FUSE daemon's death is a process exit; its /dev/fuse is closed, and the
connection aborted, before the connector reports the exit (kernel/exit.c
`do_exit`: `exit_files` and `exit_task_work` run before
`proc_exit_connector`). So a sweep woken by the event sees the flag at once.

The connector lives only in the initial network namespace and needs
CAP_NET_ADMIN; PIDs are the host's only with the host PID namespace. When it
cannot be used the healer falls back to its interval.
"""

from __future__ import annotations

import logging
import os
import select
import threading

log = logging.getLogger(__name__)


class ExitWatcher:
    """A daemon thread that sets `wake` on every process exit."""

    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket: object | None = None
        self.exits_seen = 0

    def start(self) -> bool:
        """Subscribe to process events; False (with a log line) when unavailable."""
        try:
            from pyroute2.netlink.connector.cn_proc import ProcEventMarshal, ProcEventSocket

            sock = ProcEventSocket()
            sock.bind()
            sock.control(listen=True)
        except Exception as err:
            log.warning("process-event connector unavailable (%s); sweeping on the interval", err)
            return False
        self._socket = sock
        marshal = ProcEventMarshal()
        self._thread = threading.Thread(
            target=self._run, args=(sock.fileno(), marshal), name="exit-watcher", daemon=True
        )
        self._thread.start()
        log.info("event-driven: a process exit wakes a sweep")
        return True

    def _run(self, fd: int, marshal: object) -> None:
        from pyroute2.netlink.connector.cn_proc import PROC_EVENT_EXIT

        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], 0.5)
                if not ready:
                    continue
                # pyroute2's own reader groups messages by sequence number and
                # drops connector events; read the datagram and let its
                # marshal decode it.
                data = os.read(fd, 65536)
                messages = marshal.parse(data)  # type: ignore[attr-defined]
            except OSError as err:
                if self._stop.is_set():
                    return
                # ENOBUFS: events were dropped; a sweep catches up with them.
                log.debug("process-event socket: %s", err)
                self._wake.set()
                continue
            if any(m.get("what") == PROC_EVENT_EXIT for m in messages):
                self.exits_seen += 1
                self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._socket is not None:
            try:
                self._socket.close()  # type: ignore[attr-defined]
            except Exception as err:
                log.debug("closing process-event socket: %s", err)
