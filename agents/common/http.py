"""The HTTP endpoints of every agent: /metrics, /healthz, /readyz."""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agents.common.loop import Heartbeat
from agents.common.settings import Address

log = logging.getLogger(__name__)


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class AgentHTTPServer:
    """Serves the agent's registry and health in a daemon thread."""

    def __init__(self, address: Address, registry: CollectorRegistry, heartbeat: Heartbeat) -> None:
        registry_ = registry
        heartbeat_ = heartbeat

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry_), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, reason = heartbeat_.healthy() if path == "/healthz" else heartbeat_.ready()
                    self._send(200 if ok else 503, f"{reason}\n".encode(), "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

        server_class = _IPv6Server if ":" in address.host else ThreadingHTTPServer
        self._server = server_class((address.host, address.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="agent-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> AgentHTTPServer:
        self._thread.start()
        log.info("serving /metrics /healthz /readyz on port %d", self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
