"""Token endpoints a tenant could point its Secret at, on loopback, for red-team tests.

- `HostileTokenEndpoint("slowloris")` reads the request, sends a status line
  and headers promising a body, then one byte every `drip` seconds for as long
  as the client stays: a per-read timeout never fires.
- `HostileTokenEndpoint("slow_headers")` sends the status line, then one
  header byte every `drip` seconds.
- `HostileTokenEndpoint("echo", answer=...)` answers what `answer(headers,
  body, count)` returns (status, JSON object): an IdP that echoes its input in
  `error_description`.
- `CountingListener` accepts and counts connections and answers nothing: proof
  that a refused URL was never even connected to.

Each connection runs in a thread of its own (a slow client or server holds no
other); TLS, when given a server context, is the throwaway CA's of
tests/support/idp.py, so the controller verifies it for real.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

Answer = Callable[[dict[str, str], bytes, int], tuple[int, dict[str, Any]]]


class HostileTokenEndpoint:
    """A token endpoint that misbehaves as `mode` says (see the module docstring)."""

    def __init__(
        self,
        mode: str,
        *,
        context: ssl.SSLContext | None = None,
        drip: float = 2.0,
        answer: Answer | None = None,
    ) -> None:
        if mode not in ("slowloris", "slow_headers", "echo"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.drip = drip
        self._answer = answer
        self._context = context
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.accepted: list[float] = []
        """Monotonic time of each connection accepted."""
        self.requests = 0
        self._open = 0
        self.max_open = 0
        """Most connections open at once."""
        self._acceptor = threading.Thread(target=self._accept, name=f"hostile-{mode}")

    @property
    def url(self) -> str:
        scheme = "https" if self._context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/token"

    def __enter__(self) -> HostileTokenEndpoint:
        self._acceptor.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(5)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted.append(time.monotonic())
                self._open += 1
                self.max_open = max(self.max_open, self._open)
            thread = threading.Thread(target=self._serve, args=(conn,), name="hostile-conn")
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            stream: socket.socket = conn
            if self._context is not None:
                stream = self._context.wrap_socket(conn, server_side=True)
            headers, body = _read_request(stream)
            with self._lock:
                self.requests += 1
                count = self.requests
            if self.mode == "slowloris":
                stream.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000000\r\n\r\n{"
                )
                self._drip(stream, b" ")
            elif self.mode == "slow_headers":
                stream.sendall(b"HTTP/1.1 200 OK\r\n")
                self._drip(stream, b"X")
            else:
                assert self._answer is not None
                status, data = self._answer(headers, body, count)
                payload = json.dumps(data).encode()
                stream.sendall(
                    f"HTTP/1.1 {status} Hostile\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                    + payload
                )
        except (OSError, ValueError):
            pass  # the client gave up: what a slow server wants to see
        finally:
            with self._lock:
                self._open -= 1
            conn.close()

    def _drip(self, stream: socket.socket, byte: bytes) -> None:
        """One byte every `drip` seconds until the client goes or the test ends.

        The client's close is seen at once (the socket turns readable at EOF),
        so `max_open` counts the connections a client really holds."""
        deadline = time.monotonic() + self.drip
        while not self._stop.is_set():
            readable, _, _ = select.select([stream], [], [], 0.05)
            if readable and not stream.recv(1):
                return
            if time.monotonic() >= deadline:
                stream.sendall(byte)
                deadline += self.drip


def _read_request(stream: socket.socket) -> tuple[dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = stream.recv(4096)
        if not chunk:
            raise ValueError("the client closed before its request ended")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")[1:]
    headers = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("Content-Length") or 0)
    while len(body) < length:
        chunk = stream.recv(4096)
        if not chunk:
            break
        body += chunk
    return headers, body


class CountingListener:
    """A loopback port that accepts connections, counts them and closes them."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="counting-listener")

    def __enter__(self) -> CountingListener:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()
