"""What every agent does around its loop: stop signals and the HTTP endpoints."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry

from agents.common.http import AgentHTTPServer
from agents.common.loop import Heartbeat, install_stop_signals
from agents.common.settings import Address

log = logging.getLogger(__name__)


@contextlib.contextmanager
def serving(
    prog: str,
    registry: CollectorRegistry,
    heartbeat: Heartbeat,
    address: Address | None,
    *,
    stop: threading.Event | None = None,
    wake: threading.Event | None = None,
) -> Iterator[threading.Event]:
    """Serve /metrics, /healthz and /readyz and let SIGTERM/SIGINT set the stop event.

    Yields the stop event to run the loop with. Signals are taken over only
    in the main thread (a Python rule; tests run agents in threads and pass
    their own `stop`). On leaving, the server stops and the previous signal
    handlers come back.
    """
    stop = stop or threading.Event()
    restore = (
        install_stop_signals(stop, wake)
        if threading.current_thread() is threading.main_thread()
        else lambda: None
    )
    server = AgentHTTPServer(address, registry, heartbeat).start() if address is not None else None
    try:
        yield stop
    finally:
        if server is not None:
            server.close()
        restore()
        log.info("%s stopped", prog)
