"""The injector's file stream client against a protocol-level controller on loopback.

`Replica` below speaks the wire protocol of issue 10 (POST /v1/files, chunked
NDJSON, real TLS with a throwaway CA): snapshots built from the claims it
receives, heartbeats, clean ends, silence, error answers. It is the boundary;
the real server (fileserver.py) has its own tests.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agents.token_refresher.config import ControllerLinkConfig
from agents.token_refresher.fileclient import (
    Assembly,
    CaFile,
    Claim,
    FileClient,
    ProtocolError,
    Snapshot,
    claims_of,
    merge,
    parse_snapshot,
)
from agents.token_refresher.metrics import InjectorMetrics
from tests.support.idp import ThrowawayCA

NODE = "node-a"
HOST = "localhost"  # in the throwaway certificate
ERRORS = "token_refresher_injector_controller_errors_total"
CONNECTED = "token_refresher_injector_controller_connected"
STALE = "token_refresher_injector_stale_files_ignored_total"
AGE = "token_refresher_injector_snapshot_age_seconds"


def wait_for(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        time.sleep(0.02)


# -- a controller replica, at the protocol level ------------------------------------------


@dataclass
class Seen:
    """One request as the replica received it."""

    token: str
    claims: list[dict[str, str]]


@dataclass
class Behaviour:
    status: int = 200
    heartbeat: float = 0.1
    """Seconds between heartbeats; 0: silent after the snapshot."""
    end_after: float = 0.0
    """End the stream cleanly after this long; 0: never."""
    cut_after: float = 0.0
    """Close the connection after this long, without the last chunk (a replica
    killed mid-stream); 0: never."""
    stamp: tuple[float, int] = (1000.0, 1)
    content: str = "at-1"


class Replica:
    """Serves POST /v1/files over TLS; one file per claimed pod."""

    def __init__(self, ca: ThrowawayCA, port: int = 0) -> None:
        self.behaviour = Behaviour()
        self.seen: list[Seen] = []
        self.open_streams = 0
        self._push = threading.Condition()
        self._generation = 0
        replica = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                replica._serve(self)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients hang up on purpose in these tests

        self.server = Server(("127.0.0.1", port), Handler)
        self.server.socket = ca.server_context().wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._push:
            self._generation = -1  # streams end
            self._push.notify_all()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def push(self, **changes: Any) -> None:
        """Change what is served and send a new snapshot on every open stream."""
        with self._push:
            for key, value in changes.items():
                setattr(self.behaviour, key, value)
            self._generation += 1
            self._push.notify_all()

    def snapshot(self, claims: list[dict[str, str]], revision: int) -> dict[str, Any]:
        b = self.behaviour
        return {
            "type": "snapshot",
            "node": NODE,
            "revision": revision,
            "pods": [
                {
                    **claim,
                    "problem": None,
                    "files": [
                        {
                            "container": "app",
                            "path": "/tmp/oauthtk_1000",
                            "mode": 0o400,
                            "owner": 1000,
                            "group": 1000,
                            "secret": "tok",
                            "content": base64.b64encode(b.content.encode()).decode(),
                            "stamp": list(b.stamp),
                            "problem": None,
                        }
                    ],
                }
                for claim in claims
            ],
            "refused": [],
        }

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length))
        auth = handler.headers.get("Authorization", "")
        self.seen.append(Seen(auth.removeprefix("Bearer "), body["pods"]))
        status = self.behaviour.status
        if status != 200:
            reason = {401: "unauthenticated", 403: "forbidden", 503: "unavailable"}[status]
            payload = json.dumps({"reason": reason, "message": f"{reason} here"}).encode()
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-ndjson")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        self.open_streams += 1
        try:
            self._stream(handler, body["pods"])
        except OSError:
            pass  # the client went away
        finally:
            self.open_streams -= 1

    def _stream(self, handler: BaseHTTPRequestHandler, claims: list[dict[str, str]]) -> None:
        def send(obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode() + b"\n"
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            handler.wfile.flush()

        revision = 1
        started = time.monotonic()
        with self._push:
            generation = self._generation
        send(self.snapshot(claims, revision))
        while True:
            b = self.behaviour
            with self._push:
                self._push.wait(b.heartbeat or 0.2)
                now_generation = self._generation
            if now_generation < 0:
                return  # closing: drop the connection, no clean end
            if now_generation != generation:
                generation, revision = now_generation, revision + 1
                send(self.snapshot(claims, revision))
            elif b.heartbeat:
                send({"type": "heartbeat"})
            if b.cut_after and time.monotonic() - started >= b.cut_after:
                handler.close_connection = True
                socket.socket.shutdown(handler.connection, socket.SHUT_RDWR)
                return
            if b.end_after and time.monotonic() - started >= b.end_after:
                handler.wfile.write(b"0\r\n\r\n")  # a clean end
                handler.wfile.flush()
                handler.close_connection = True
                return


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the client under test ------------------------------------------------------------------


class CountingCa:
    """A CA bundle source that counts its reads (the ConfigMap's role)."""

    def __init__(self, pem: str) -> None:
        self.pem_text = pem
        self.reads = 0
        self.fresh_reads = 0

    def pem(self, *, fresh: bool = False) -> str:
        self.reads += 1
        self.fresh_reads += fresh
        return self.pem_text


@dataclass
class Link:
    tmp: Path
    ca: ThrowawayCA
    claims: list[Claim] = field(default_factory=list)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    woken: threading.Event = field(default_factory=threading.Event)
    clients: list[FileClient] = field(default_factory=list)

    @property
    def token_file(self) -> Path:
        return self.tmp / "token"

    @property
    def state_file(self) -> Path:
        return self.tmp / "state" / "files.json"

    def client(
        self,
        ports: list[int],
        *,
        ca: Any = None,
        start: bool = True,
        registry: CollectorRegistry | None = None,
        **config: Any,
    ) -> FileClient:
        settings: dict[str, Any] = {
            "urls": (f"https://{HOST}:{ports[0]}",),
            "token_file": str(self.token_file),
            "state_file": str(self.state_file),
            "read_timeout": 1.0,
            "backoff_base": 0.05,
            "backoff_cap": 0.3,
            "debounce": 0.05,
            **config,
        }
        client = FileClient(
            ControllerLinkConfig(**settings),
            NODE,
            claims=lambda: list(self.claims),
            ca=ca or CaFile(str(self.ca.ca_path)),
            metrics=InjectorMetrics(registry or self.registry),
            on_files=self.woken.set,
            # The headless Service: one name, an address per replica.
            resolve=lambda host, port: [("127.0.0.1", p) for p in ports],
        )
        self.clients.append(client)
        return client.start() if start else client

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0


def claim(name: str, rv: str = "1") -> Claim:
    return Claim("science", name, f"uid-{name}", rv)


def content_of(client: FileClient, name: str) -> bytes | None:
    files = client.files()
    if files is None or f"uid-{name}" not in files.pods:
        return None
    return files.pods[f"uid-{name}"].files[0].content


@pytest.fixture
def link(tmp_path: Path) -> Iterator[Link]:
    w = Link(tmp_path, ThrowawayCA(tmp_path / "ca"))
    w.token_file.write_text("projected-token-1\n")
    w.claims = [claim("web")]
    yield w
    for client in w.clients:
        assert client.stop(), "the client's threads did not end"


@pytest.fixture
def replica(link: Link) -> Iterator[Replica]:
    r = Replica(link.ca)
    yield r
    r.close()


# -- the tests --------------------------------------------------------------------------------


def test_a_snapshot_is_delivered_for_the_claimed_pods(link: Link, replica: Replica) -> None:
    link.claims = [claim("web"), claim("db", "7")]
    client = link.client([replica.port])
    wait_for(lambda: content_of(client, "db") == b"at-1")
    assert content_of(client, "web") == b"at-1"
    # The injector is woken after the files are kept and saved to the state file.
    wait_for(link.woken.is_set)
    (seen,) = replica.seen
    assert seen.token == "projected-token-1"
    assert seen.claims == [c.to_json() for c in sorted(link.claims)]
    assert client.connected and link.value(CONNECTED) == 1
    assert link.value(AGE) == 0.0
    assert client.ready() == (True, "")
    # A push reaches the client on the same stream.
    replica.push(content="at-2", stamp=(2000.0, 2))
    wait_for(lambda: content_of(client, "web") == b"at-2")
    assert len(replica.seen) == 1


def test_no_claims_no_connection(link: Link, replica: Replica) -> None:
    link.claims = []
    client = link.client([replica.port])
    time.sleep(0.3)
    assert replica.seen == []
    assert client.ready() == (True, "")
    link.claims = [claim("web")]
    client.claims_changed()
    wait_for(lambda: content_of(client, "web") == b"at-1")


def test_a_claims_change_reopens_the_stream_with_the_new_body(link: Link, replica: Replica) -> None:
    client = link.client([replica.port])
    wait_for(lambda: content_of(client, "web"))
    # A burst of changes is one reconnection (debounced).
    link.claims = [claim("web", "2")]
    client.claims_changed()
    link.claims = [claim("web", "2"), claim("new")]
    client.claims_changed()
    wait_for(lambda: content_of(client, "new") == b"at-1")
    assert [s.claims for s in replica.seen] == [
        [claim("web").to_json()],
        [c.to_json() for c in sorted([claim("web", "2"), claim("new")])],
    ]
    wait_for(lambda: replica.open_streams == 1)  # the old one was closed
    assert link.value(ERRORS, {"reason": "connection"}) == 0
    # A change that leaves the claims as they are costs nothing.
    client.claims_changed()
    time.sleep(0.2)
    assert len(replica.seen) == 2


def test_a_replica_down_backs_off_capped_then_another_replica_takes_over(
    link: Link,
) -> None:
    down, later = free_port(), free_port()
    client = link.client([down, later], backoff_cap=0.2)
    wait_for(lambda: client.failures >= 8, 10)
    assert 0 < client.last_backoff <= 0.2
    assert link.value(ERRORS, {"reason": "connection"}) >= 8
    assert not client.connected and link.value(CONNECTED) == 0
    assert client.files() is None
    started = time.monotonic()
    second = Replica(link.ca, port=later)
    try:
        wait_for(lambda: content_of(client, "web") == b"at-1", 5)
        took = time.monotonic() - started
        assert took < 1.0, f"failover took {took:.2f}s"
        assert client.failures == 0  # reset by the snapshot
        assert link.value(CONNECTED) == 1
    finally:
        second.close()
    # That replica goes too: the files stay, the client says it is not connected.
    wait_for(lambda: not client.connected)
    assert content_of(client, "web") == b"at-1"


def test_a_silent_stream_is_ended_at_the_read_timeout(link: Link, replica: Replica) -> None:
    replica.behaviour.heartbeat = 0.0
    client = link.client([replica.port], read_timeout=0.5)
    wait_for(lambda: content_of(client, "web"))
    wait_for(lambda: link.value(ERRORS, {"reason": "timeout"}) >= 1, 3)
    wait_for(lambda: len(replica.seen) >= 2, 3)  # and it tries again
    # Heartbeats keep a stream alive past the timeout.
    replica.behaviour.heartbeat = 0.1
    wait_for(lambda: client.connected, 3)
    seen = len(replica.seen)
    time.sleep(1.2)
    assert len(replica.seen) == seen
    assert client.connected


def test_a_refusal_is_logged_once_and_counted_every_time(
    link: Link, replica: Replica, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agents.token_refresher")
    replica.behaviour.status = 401
    client = link.client([replica.port])
    wait_for(lambda: link.value(ERRORS, {"reason": "unauthenticated"}) >= 4)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "unauthenticated here" in warnings[0].getMessage()
    assert "projected-token" not in caplog.text
    # Once it works, one line says so; then a new refusal is said again.
    replica.behaviour.status = 200
    wait_for(lambda: client.connected, 3)
    assert sum("open" in r.getMessage() for r in caplog.records) == 1


def test_the_token_file_is_read_again_at_each_connection_and_a_clean_end_costs_no_backoff(
    link: Link, replica: Replica
) -> None:
    replica.behaviour.end_after = 0.2
    client = link.client([replica.port], backoff_base=5.0, backoff_cap=5.0)
    wait_for(lambda: len(replica.seen) >= 1)
    link.token_file.write_text("projected-token-2\n")  # the kubelet rotated it
    wait_for(lambda: any(s.token == "projected-token-2" for s in replica.seen), 3)
    assert replica.seen[0].token == "projected-token-1"
    assert client.failures == 0
    assert link.value(ERRORS, {"reason": "connection"}) == 0


def test_a_stream_cut_between_two_lines_is_a_connection_error_not_an_end(
    link: Link, replica: Replica
) -> None:
    """A replica killed mid-stream closes the connection between two chunks: that is
    counted as an error (and retried after backoff), not taken for a clean end."""
    replica.behaviour.cut_after = 0.2
    client = link.client([replica.port])
    wait_for(lambda: link.value(ERRORS, {"reason": "connection"}) >= 2, 3)
    assert content_of(client, "web") == b"at-1"  # kept
    assert client.last_backoff > 0


def test_a_server_certificate_of_another_ca_is_refused_and_the_ca_read_again(
    link: Link, replica: Replica
) -> None:
    stranger = ThrowawayCA(link.tmp / "other-ca")
    ca = CountingCa(stranger.ca_path.read_text())
    client = link.client([replica.port], ca=ca)
    wait_for(lambda: link.value(ERRORS, {"reason": "tls"}) >= 2)
    assert replica.seen == []  # no token ever went to it
    assert client.files() is None
    assert ca.fresh_reads >= 1  # read again after each verify failure
    ca.pem_text = link.ca.ca_path.read_text()  # the CA ConfigMap got the right one
    wait_for(lambda: content_of(client, "web") == b"at-1", 3)


def test_the_server_name_is_verified(link: Link, replica: Replica) -> None:
    client = link.client([replica.port], server_name="someone-else.example")
    wait_for(lambda: link.value(ERRORS, {"reason": "tls"}) >= 1)
    assert replica.seen == []
    assert client.files() is None


def test_the_state_file_is_written_0600_and_loaded_at_start(
    link: Link, replica: Replica, caplog: pytest.LogCaptureFixture
) -> None:
    client = link.client([replica.port])
    wait_for(link.state_file.exists)
    assert stat.S_IMODE(link.state_file.stat().st_mode) == 0o600
    state = json.loads(link.state_file.read_text())
    assert state["node"] == NODE
    client.stop()

    # The injector container restarted; the controller is down.
    registry = CollectorRegistry()
    restarted = link.client([free_port()], registry=registry)
    assert content_of(restarted, "web") == b"at-1"
    assert (registry.get_sample_value(AGE) or 0) >= 0
    assert restarted.ready()[0]  # the state counts as received, for the grace period

    caplog.set_level(logging.WARNING, logger="agents.token_refresher")
    other = dict(state, node="node-b")
    link.state_file.write_text(json.dumps(other))
    assert link.client([free_port()], start=False, registry=CollectorRegistry()).files() is None
    link.state_file.write_text("{not json")
    assert link.client([free_port()], start=False, registry=CollectorRegistry()).files() is None
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(ignored) == 2 and "node-b" in ignored[0]


def test_a_file_with_an_older_stamp_is_ignored(link: Link, replica: Replica) -> None:
    replica.behaviour.stamp = (1000.0, 5)
    client = link.client([replica.port])
    wait_for(lambda: content_of(client, "web") == b"at-1")
    # A replica whose cache lags sends an older token: ours stays.
    replica.push(content="at-0", stamp=(900.0, 7))
    wait_for(lambda: link.value(STALE) == 1)
    assert content_of(client, "web") == b"at-1"
    saved = json.loads(link.state_file.read_text())["snapshot"]
    assert base64.b64decode(saved["pods"][0]["files"][0]["content"]) == b"at-1"
    # The same token rendered anew (a template change) has the same stamp: taken.
    replica.push(content="eos:at-1", stamp=(1000.0, 5))
    wait_for(lambda: content_of(client, "web") == b"eos:at-1")
    assert link.value(STALE) == 1


def test_readiness_ends_after_the_grace_without_a_stream(link: Link) -> None:
    client = link.client([free_port()], ready_grace=0.3)
    assert client.ready()[0]
    wait_for(lambda: not client.ready()[0], 3)
    assert "no stream from the controller" in client.ready()[1]


# -- the pieces ---------------------------------------------------------------------------------


def test_claims_are_this_nodes_token_pods_that_may_still_run() -> None:
    def pod(name: str, annotations: dict[str, str], phase: str = "Running") -> dict[str, Any]:
        return {
            "metadata": {
                "namespace": "ns",
                "name": name,
                "uid": f"u-{name}",
                "resourceVersion": "3",
                "annotations": annotations,
            },
            "status": {"phase": phase},
        }

    ours = {"token-refresher.node-agents.io/to-inject": "[]"}
    cern = {"oauth2-refresh-controller.cern.ch/to-inject": "not even json"}
    claims = claims_of(
        [
            pod("b", ours),
            pod("a", cern),
            pod("plain", {"other": "x"}),
            pod("done", ours, "Succeeded"),
            pod("failed", ours, "Failed"),
            pod("pending", ours, "Pending"),
        ]
    )
    assert [c.name for c in claims] == ["a", "b", "pending"]
    assert claims[0].to_json() == {
        "namespace": "ns",
        "name": "a",
        "uid": "u-a",
        "resourceVersion": "3",
    }


def _snap(stamp: tuple[float, int] | None, content: str | None) -> Snapshot:
    file = {
        "container": "app",
        "path": "/t",
        "mode": 0o400,
        "owner": 1,
        "group": 1,
        "secret": "s",
        "content": None if content is None else base64.b64encode(content.encode()).decode(),
        "stamp": list(stamp or (0.0, 0)),
        "problem": None if content is not None else {"reason": "no_secret", "message": "m"},
    }
    pods = [{"uid": "u", "namespace": "ns", "name": "p", "files": [file]}]
    return parse_snapshot({"type": "snapshot", "node": NODE, "revision": 1, "pods": pods}, NODE)


def test_merge_never_goes_back_to_an_older_token() -> None:
    kept, _ = merge(None, _snap((10.0, 1), "new"))
    # A problem keeps the high stamp, so an older token cannot slip in after it.
    problem, ignored = merge(kept, _snap((0.0, 0), None))
    assert ignored == 0 and problem.pods["u"].files[0].stamp == (10.0, 1)
    held, ignored = merge(problem, _snap((9.0, 9), "older"))
    assert ignored == 1
    assert held.pods["u"].files[0].content is None
    assert held.pods["u"].files[0].problem is None
    newer, ignored = merge(held, _snap((10.0, 2), "newer"))
    assert ignored == 0 and newer.pods["u"].files[0].content == b"newer"


@pytest.mark.parametrize(
    "change",
    [
        {"node": "node-b"},
        {"pods": [{"uid": "u", "namespace": "ns", "name": "p", "files": [{"path": "x"}]}]},
        {"revision": "1"},
    ],
)
def test_a_snapshot_that_is_not_the_protocol_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        parse_snapshot(
            {"type": "snapshot", "node": NODE, "revision": 1, "pods": [], **change}, NODE
        )


def test_a_mode_letting_others_write_is_refused() -> None:
    file = {
        "container": "app",
        "path": "/t",
        "mode": 0o666,
        "owner": 1,
        "group": 1,
        "secret": "s",
        "content": None,
        "stamp": [0, 0],
    }
    pods = [{"uid": "u", "namespace": "ns", "name": "p", "files": [file]}]
    with pytest.raises(ValueError, match="mode"):
        parse_snapshot({"type": "snapshot", "node": NODE, "revision": 1, "pods": pods}, NODE)


def test_the_client_claims_no_more_than_the_server_takes() -> None:
    """More would be a 413 for the whole node: the client sends the first MAX_CLAIMS."""
    from agents.token_refresher.config import FilesConfig
    from agents.token_refresher.fileclient import MAX_CLAIMS

    assert MAX_CLAIMS == FilesConfig().max_pods >= 500


def _pod_line(uid: str, content: bytes) -> dict[str, Any]:
    return {
        "type": "pod",
        "pod": {
            "uid": uid,
            "namespace": "ns",
            "name": uid,
            "resourceVersion": "1",
            "problem": None,
            "files": [
                {
                    "container": "app",
                    "path": "/tmp/oauthtk_0",
                    "mode": 0o400,
                    "owner": 0,
                    "group": 0,
                    "secret": "tok",
                    "content": base64.b64encode(content).decode(),
                    "stamp": [1.0, 1],
                    "problem": None,
                }
            ],
        },
    }


def test_protocol_2_pod_lines_make_a_snapshot_at_each_commit() -> None:
    """A commit names the snapshot's pods; those not sent again are as last sent."""
    assembly = Assembly(NODE)
    assembly.pod(_pod_line("a", b"at-a"))
    assembly.pod(_pod_line("b", b"at-b"))
    first = assembly.commit({"type": "commit", "node": NODE, "revision": 1, "pods": ["a", "b"]})
    assert first.revision == 1 and sorted(first.pods) == ["a", "b"]
    assembly.pod(_pod_line("b", b"at-b2"))
    second = assembly.commit({"type": "commit", "node": NODE, "revision": 2, "pods": ["b", "a"]})
    assert second.pods["a"].files[0].content == b"at-a"
    assert second.pods["b"].files[0].content == b"at-b2"
    third = assembly.commit({"type": "commit", "node": NODE, "revision": 3, "pods": ["a"]})
    assert list(third.pods) == ["a"]
    with pytest.raises(ProtocolError, match="pod 'b' was never sent"):
        assembly.commit({"type": "commit", "node": NODE, "revision": 4, "pods": ["b"]})
    with pytest.raises(ProtocolError, match="a snapshot for node 'node-b'"):
        assembly.commit({"type": "commit", "node": "node-b", "revision": 5, "pods": []})
