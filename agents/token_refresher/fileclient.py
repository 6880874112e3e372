"""The injector's side of the file stream: this node's token files, pushed by the controller.

One stream at a time (`POST /v1/files`, NDJSON over HTTPS, the wire protocol of
issue 10) to one controller replica. The request claims this node's pods that
ask for tokens; the controller verifies every claim and answers with a
snapshot of their files, then a new snapshot whenever one of them changes, and
a heartbeat every 10 s.

- No claims, no connection: a node without token pods costs the controller nothing.
- Each `--controller-url` host is resolved to all its addresses (a headless
  Service: one per ready replica), tried in turn; after an error the next one
  is tried, after capped exponential backoff with jitter (reset once a stream
  delivered a snapshot). A stream the server ends cleanly (every ~300 s, so
  reviews are redone and load spreads) is reopened at once, to the next address;
  one cut without its last chunk (a replica killed) is an error like any other.
- TLS (tls.client_context) trusts only the CA bundle (the CA ConfigMap read by name, cached and
  read again after a verify failure, or a mounted file) and verifies the URL's
  host name (or --controller-server-name). The projected token is read again
  at every connection: the kubelet rotates it.
- 30 s of silence (three missed heartbeats) ends a stream: a replica that
  vanished without a FIN is noticed.
- A change of the claims (a pod added, removed or changed) closes the stream
  and opens a new one with the new body, debounced.
- Protocol 2 is asked for (a line per pod, then a `commit` line: fileserver.py);
  an older controller's protocol 1 (one `snapshot` line per node) is read too.

The files kept are the merge of the snapshots received: a file delivered with
an older stamp (token expiry, Secret resourceVersion) than the one kept is
ignored, so no file reverts to an older token when a standby replica lags.
They are saved to the state file (atomic, 0600) at each change, and loaded at
start: an injector container restarted while the controller is down writes
its files again.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import http.client
import json
import logging
import os
import random
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from agents.token_refresher.config import ControllerLinkConfig
from agents.token_refresher.metrics import InjectorMetrics
from agents.token_refresher.spec import PREFIXES, TO_INJECT
from agents.token_refresher.tls import TlsMaterialError, client_context

log = logging.getLogger(__name__)

PATH = "/v1/files"
MAX_CLAIMS = 1024
"""The server refuses more (413; FilesConfig.max_pods): beyond any node's pod limit."""
MAX_LINE = 64 << 20
"""Longest NDJSON line read. In protocol 2 a line holds one pod (at most 16 files of
64 KiB, about 1.4 MB); protocol 1 (an older controller) sends the node in one."""
PROTOCOL = 2
"""The wire protocol asked for (the controller answers in the newest both speak)."""
MAX_ERROR_BODY = 64 << 10
STATE_VERSION = 1
_DONE_PHASES = ("Succeeded", "Failed")
# HTTP answers the protocol names, and what the metric calls them.
_REASONS = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    413: "too_many_pods",
    503: "unavailable",
}

Stamp = tuple[float, int]
Address = tuple[str, int]
Resolve = Callable[[str, int], list[Address]]


class ProtocolError(ValueError):
    """What the controller sent is not the protocol (or the state file is broken)."""


# -- what is claimed and what is delivered --------------------------------------------


@dataclass(frozen=True, order=True)
class Claim:
    """One pod of this node, as the request body names it."""

    namespace: str
    name: str
    uid: str
    resource_version: str

    def to_json(self) -> dict[str, str]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
            "resourceVersion": self.resource_version,
        }


def claims_of(pods: Iterable[Mapping[str, Any]]) -> tuple[Claim, ...]:
    """The pods that ask for tokens (either prefix) and may still run, sorted."""
    keys = tuple(f"{prefix}/{TO_INJECT}" for prefix in PREFIXES)
    claims = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        if not any(key in annotations for key in keys):
            continue
        if (pod.get("status") or {}).get("phase") in _DONE_PHASES:
            continue
        claims.append(
            Claim(
                str(meta.get("namespace") or ""),
                str(meta.get("name") or ""),
                str(meta.get("uid") or ""),
                str(meta.get("resourceVersion") or ""),
            )
        )
    return tuple(sorted(claims))


@dataclass(frozen=True)
class Problem:
    """Why the controller sends no content (reasons and messages as the injector reports)."""

    reason: str
    message: str
    waiting: bool = False
    """Not an error yet: the Secret is not there *yet*, for instance."""


@dataclass(frozen=True)
class DeliveredFile:
    container: str
    path: str
    mode: int
    owner: int
    group: int
    secret: str
    content: bytes | None
    """None: nothing to write (a problem, or an older token than the one kept)."""
    stamp: Stamp
    """(token expiry or 0, Secret resourceVersion or 0): never replaced by a lower one."""
    problem: Problem | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.container, self.path)

    def __repr__(self) -> str:  # never a token in a log line
        return f"DeliveredFile({self.container!r}, {self.path!r}, stamp={self.stamp})"


@dataclass(frozen=True)
class DeliveredPod:
    uid: str
    namespace: str
    name: str
    resource_version: str
    problem: Problem | None
    """A pod-level problem (bad_annotation): no files for it."""
    files: tuple[DeliveredFile, ...]


@dataclass(frozen=True)
class Refusal:
    namespace: str
    name: str
    uid: str
    reason: str
    message: str


@dataclass(frozen=True)
class Snapshot:
    """The files of this node's pods, by pod UID."""

    node: str
    revision: int
    pods: Mapping[str, DeliveredPod]
    refused: tuple[Refusal, ...] = ()


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
        raise ProtocolError(f"{where}: {key} is missing or not a {_names(kind)}")
    return value


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _types(kind))


def _problem(value: Any, where: str) -> Problem | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: problem is not an object")
    return Problem(
        _get(value, "reason", str, where),
        _get(value, "message", str, where),
        bool(value.get("waiting", False)),
    )


def _file(obj: Any, where: str) -> DeliveredFile:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where} is not an object")
    path = _get(obj, "path", str, where)
    mode = _get(obj, "mode", int, where)
    if not path.startswith("/") or not 0 <= mode <= 0o777 or mode & 0o022:
        # The controller checks both (spec.parse_to_inject); never trust a peer for them.
        raise ProtocolError(f"{where}: bad path or mode")
    stamp = obj.get("stamp")
    if (
        not isinstance(stamp, list)
        or len(stamp) != 2
        or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in stamp)
    ):
        raise ProtocolError(f"{where}: stamp must be [expires_at, resourceVersion]")
    encoded = obj.get("content")
    content = None
    if encoded is not None:
        if not isinstance(encoded, str):
            raise ProtocolError(f"{where}: content is not base64 text")
        try:
            content = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise ProtocolError(f"{where}: content is not base64") from None
    return DeliveredFile(
        container=_get(obj, "container", str, where),
        path=path,
        mode=mode,
        owner=_get(obj, "owner", int, where),
        group=_get(obj, "group", int, where),
        secret=_get(obj, "secret", str, where),
        content=content,
        stamp=(float(stamp[0]), int(stamp[1])),
        problem=_problem(obj.get("problem"), where),
    )


def parse_snapshot(obj: Any, node: str) -> Snapshot:
    """A snapshot line (already JSON-decoded) for `node`; ProtocolError if it is not one."""
    if not isinstance(obj, dict) or obj.get("type") != "snapshot":
        raise ProtocolError("not a snapshot")
    sent_for = _get(obj, "node", str, "snapshot")
    if sent_for != node:
        raise ProtocolError(f"a snapshot for node {sent_for!r}; this is {node!r}")
    pods: dict[str, DeliveredPod] = {}
    for i, pod in enumerate(_get(obj, "pods", list, "snapshot")):
        delivered = parse_pod(pod, f"pods[{i}]")
        pods[delivered.uid] = delivered
    return Snapshot(node, _get(obj, "revision", int, "snapshot"), pods, _refused(obj))


def parse_pod(pod: Any, where: str = "pod") -> DeliveredPod:
    """One pod of a snapshot (protocol 1) or a `pod` line (protocol 2)."""
    if not isinstance(pod, dict):
        raise ProtocolError(f"{where} is not an object")
    uid = _get(pod, "uid", str, where)
    files = tuple(_file(f, f"{where}.files[{j}]") for j, f in enumerate(pod.get("files") or []))
    return DeliveredPod(
        uid=uid,
        namespace=_get(pod, "namespace", str, where),
        name=_get(pod, "name", str, where),
        resource_version=str(pod.get("resourceVersion") or ""),
        problem=_problem(pod.get("problem"), where),
        files=files,
    )


def _refused(obj: Mapping[str, Any]) -> tuple[Refusal, ...]:
    return tuple(
        Refusal(
            str(r.get("namespace", "")),
            str(r.get("name", "")),
            str(r.get("uid", "")),
            str(r.get("reason", "")),
            str(r.get("message", "")),
        )
        for r in obj.get("refused") or []
        if isinstance(r, dict)
    )


class Assembly:
    """Protocol 2 on one stream: `pod` lines are kept until a `commit` line names
    the snapshot's pods (each as last sent on this stream)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._staged: dict[str, DeliveredPod] = {}
        self._committed: dict[str, DeliveredPod] = {}

    def pod(self, obj: Mapping[str, Any]) -> None:
        pod = parse_pod(obj.get("pod"))
        self._staged[pod.uid] = pod

    def commit(self, obj: Mapping[str, Any]) -> Snapshot:
        sent_for = _get(obj, "node", str, "commit")
        if sent_for != self.node:
            raise ProtocolError(f"a snapshot for node {sent_for!r}; this is {self.node!r}")
        pods: dict[str, DeliveredPod] = {}
        for uid in _get(obj, "pods", list, "commit"):
            if not isinstance(uid, str):
                raise ProtocolError("commit: pods must be pod UIDs")
            pod = self._staged.get(uid) or self._committed.get(uid)
            if pod is None:
                raise ProtocolError(f"commit: pod {uid!r} was never sent")
            pods[uid] = pod
        self._staged.clear()
        self._committed = pods
        return Snapshot(self.node, _get(obj, "revision", int, "commit"), pods, _refused(obj))


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    """The wire form of a snapshot (the state file holds it)."""

    def problem(p: Problem | None) -> dict[str, Any] | None:
        return None if p is None else dataclasses.asdict(p)

    return {
        "type": "snapshot",
        "node": snapshot.node,
        "revision": snapshot.revision,
        "pods": [
            {
                "uid": pod.uid,
                "namespace": pod.namespace,
                "name": pod.name,
                "resourceVersion": pod.resource_version,
                "problem": problem(pod.problem),
                "files": [
                    {
                        "container": f.container,
                        "path": f.path,
                        "mode": f.mode,
                        "owner": f.owner,
                        "group": f.group,
                        "secret": f.secret,
                        "content": None
                        if f.content is None
                        else base64.b64encode(f.content).decode(),
                        "stamp": list(f.stamp),
                        "problem": problem(f.problem),
                    }
                    for f in pod.files
                ],
            }
            for pod in snapshot.pods.values()
        ],
        "refused": [dataclasses.asdict(r) for r in snapshot.refused],
    }


def merge(kept: Snapshot | None, new: Snapshot) -> tuple[Snapshot, int]:
    """`new`, except where it would revert a file to an older token: (result, ignored).

    Per (pod UID, container, path): content with a lower stamp than the one
    kept is ignored and the kept file stays; a problem (no content) keeps the
    higher stamp, so a lagging replica cannot slip an older token in after it.
    Pods and files `new` does not list are dropped from what is kept (their
    files stay in the containers: the injector never deletes one).
    """
    ignored = 0
    pods: dict[str, DeliveredPod] = {}
    for uid, pod in new.pods.items():
        before = kept.pods.get(uid) if kept is not None else None
        known = {f.key: f for f in before.files} if before is not None else {}
        files = []
        for sent in pod.files:
            prev = known.get(sent.key)
            file = sent
            if prev is not None and sent.content is not None and sent.stamp < prev.stamp:
                ignored += 1
                # Keep ours; without content of ours, hold: write nothing, say nothing.
                file = (
                    prev
                    if prev.content is not None
                    else dataclasses.replace(sent, content=None, problem=None, stamp=prev.stamp)
                )
            elif prev is not None and sent.content is None:
                file = dataclasses.replace(sent, stamp=max(sent.stamp, prev.stamp))
            files.append(file)
        pods[uid] = dataclasses.replace(pod, files=tuple(files))
    return dataclasses.replace(new, pods=pods), ignored


# -- trust: the CA bundle --------------------------------------------------------------


class CaUnavailable(Exception):
    """The CA bundle cannot be read: no stream can be verified."""


class CaBundle(Protocol):
    def pem(self, *, fresh: bool = False) -> str:
        """The PEM bundle; `fresh`: read it again (a verify failure, a CA rotation)."""
        ...


class CaFile:
    """A mounted bundle (cert-manager, trust-manager): read at every connection."""

    def __init__(self, path: str) -> None:
        self.path = path

    def pem(self, *, fresh: bool = False) -> str:
        try:
            text = Path(self.path).read_text()
        except OSError as err:
            raise CaUnavailable(f"cannot read --ca-file {self.path}: {err.strerror}") from err
        if "BEGIN CERTIFICATE" not in text:
            raise CaUnavailable(f"--ca-file {self.path} holds no PEM certificate")
        return text


class CaConfigMap:
    """Key `ca.crt` of one ConfigMap, read by name (the injector may GET only that one)."""

    KEY = "ca.crt"

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        *,
        on_api_call: Callable[[str, str], None] = lambda verb, resource: None,
    ) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.name = name
        self._on_api_call = on_api_call
        self._cached = ""

    def pem(self, *, fresh: bool = False) -> str:
        if self._cached and not fresh:
            return self._cached
        from kubernetes import client

        self._on_api_call("get", "configmaps")
        core: Any = client.CoreV1Api(self.api_client)
        try:
            response = core.read_namespaced_config_map(
                self.name, self.namespace, _preload_content=False, _request_timeout=10
            )
            body: dict[str, Any] = json.loads(response.data)
        except Exception as err:
            status = getattr(err, "status", None)
            what = f"HTTP {status}" if status else type(err).__name__
            if self._cached:
                log.warning(
                    "cannot read CA ConfigMap %s/%s again (%s); keeping the bundle read before",
                    self.namespace,
                    self.name,
                    what,
                )
                return self._cached
            raise CaUnavailable(
                f"cannot read CA ConfigMap {self.namespace}/{self.name}: {what}"
            ) from err
        text = (body.get("data") or {}).get(self.KEY)
        if not isinstance(text, str) or "BEGIN CERTIFICATE" not in text:
            raise CaUnavailable(
                f"CA ConfigMap {self.namespace}/{self.name} has no PEM {self.KEY} key"
            )
        self._cached = text
        return text


# -- the stream ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One address of one replica, and the names the request and TLS use."""

    url: str
    host: str
    port: int
    address: str
    server_name: str

    def __str__(self) -> str:
        shown = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.host} ({shown}:{self.port})"


def resolve_all(host: str, port: int) -> list[Address]:
    """Every address of `host` (a headless Service: one per ready replica), in DNS order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))


def parse_url(url: str) -> tuple[str, int]:
    """(host, port) of an https:// controller URL; ValueError if it is not one."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"not an https:// URL: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"give scheme, host and port only: {url!r}")
    return parts.hostname, parts.port or 443


class _Failure(Exception):
    """One attempt failed; `reason` is the metric label, `message` says more."""

    def __init__(self, reason: str, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class _Connection(http.client.HTTPSConnection):
    """HTTPS to one address, verifying another name (the Service's, not the pod IP)."""

    def __init__(self, endpoint: Endpoint, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(endpoint.host, endpoint.port, timeout=timeout, context=context)
        self._endpoint = endpoint
        self._tls = context

    def connect(self) -> None:
        sock = socket.create_connection((self._endpoint.address, self._endpoint.port), self.timeout)
        try:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self._endpoint.server_name)
        except BaseException:
            sock.close()
            raise


class _Lines:
    """The lines of a chunked response, where only the last chunk is an end.

    HTTPResponse.readline() takes a connection closed between two chunks for the
    end of the body (its peek() swallows the IncompleteRead): a replica killed
    mid-stream would look like one that ended its stream on purpose. read1()
    raises IncompleteRead there, so that a cut stream is an error.
    """

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self._response = response
        self._buffer = bytearray()

    def readline(self, limit: int) -> bytes:
        """One line (with its newline), at most `limit` bytes; b"" after the last chunk."""
        scanned = 0
        while True:
            end = self._buffer.find(b"\n", scanned)
            if end >= 0 or len(self._buffer) >= limit:
                size = min(end + 1 if end >= 0 else limit, limit)
                line = bytes(self._buffer[:size])
                del self._buffer[:size]
                return line
            scanned = len(self._buffer)
            data = self._response.read1(65536)  # IncompleteRead when cut
            if not data:  # the last chunk was read: a clean end
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            self._buffer += data


class FileClient:
    """Keeps one stream open to a controller replica while this node has claims.

    `claims()` gives this node's current claims, None while they are not known
    (the pods are not listed yet); it is called from the client's threads, and
    `claims_changed()` says they may have changed. `on_files()` is
    called (from the stream thread) after the kept files changed; `files()`
    gives them. Boundaries are injected: the resolver, the CA bundle, clocks,
    jitter.
    """

    def __init__(
        self,
        config: ControllerLinkConfig,
        node_name: str,
        *,
        claims: Callable[[], Sequence[Claim] | None],
        ca: CaBundle,
        metrics: InjectorMetrics,
        on_files: Callable[[], None] = lambda: None,
        resolve: Resolve = resolve_all,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        for url in config.urls:
            parse_url(url)
        if not config.urls:
            raise ValueError("no controller URL")
        self.config = config
        self.node_name = node_name
        self._claims = claims
        self._ca = ca
        self._metrics = metrics
        self._on_files = on_files
        self._resolve = resolve
        self._clock = clock
        self._monotonic = monotonic
        self._jitter = jitter

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._changed = threading.Event()  # claims may have changed
        self._reconnect = threading.Event()  # the open stream's claims are out of date
        self._current = threading.Event()  # a stream delivered a snapshot
        self._kept: Snapshot | None = None
        self._confirmed = 0.0  # wall clock: the kept files were last known current
        self._live = monotonic()  # a live stream was last seen (or a state loaded)
        self._streaming: tuple[Claim, ...] | None = None
        self._sock: socket.socket | None = None
        self._endpoints: list[Endpoint] = []
        self._next = 0
        self._ca_fresh = False  # re-read the CA before the next connection
        self._said = ""  # the outcome last logged: each is said once
        self._ready_said = True
        self._capped_said = 0
        self._has_claims = False
        self._connected = False
        self.failures = 0
        """Failed attempts since a stream last delivered a snapshot."""
        self.last_backoff = 0.0
        """The delay slept after the last failure (seconds)."""
        self.connects = 0
        """Streams opened (responses 200), for tests and benchmarks."""
        self._threads: list[threading.Thread] = []
        metrics.snapshot_age_from(self.snapshot_age)
        self._load_state()

    # -- life cycle

    def start(self) -> FileClient:
        if self._threads:
            raise RuntimeError("FileClient.start() called twice")
        self._threads = [
            threading.Thread(target=self._run, name="files-stream", daemon=True),
            threading.Thread(target=self._watch_claims, name="files-claims", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Close the stream and end the threads; True when they ended within `timeout`."""
        self._stopping.set()
        self._changed.set()
        self._reconnect.set()
        self._close_stream()
        deadline = self._monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - self._monotonic()))
        self._set_connected(False)
        return not any(t.is_alive() for t in self._threads)

    def wait_current(self, timeout: float) -> bool:
        """Wait until a stream delivered its snapshot; True at once with nothing to claim."""
        if self._current_claims() == ():
            return True
        return self._current.wait(timeout)

    def claims_changed(self) -> None:
        """This node's pods changed: the claims are compared (debounced) and, if
        they differ, the stream is reopened with them."""
        self._changed.set()

    # -- what the injector reads (any thread)

    def files(self) -> Snapshot | None:
        """The files kept (received or loaded); None before any."""
        with self._lock:
            return self._kept

    @property
    def connected(self) -> bool:
        """A stream is open and has delivered a snapshot."""
        return self._connected

    def _set_connected(self, connected: bool) -> None:
        self._connected = connected
        self._metrics.controller_connected.set(1 if connected else 0)

    def snapshot_age(self) -> float | None:
        with self._lock:
            if self._kept is None:
                return None
            confirmed = self._confirmed
        if self.connected:
            return 0.0  # heartbeats confirm it every 10 s
        return max(0.0, self._clock() - confirmed)

    def ready(self) -> tuple[bool, str]:
        """Not ready once there are claims and no live stream (or state loaded) for a while."""
        with self._lock:
            has_claims, live = self._has_claims, self._live
        if not has_claims or self.connected:
            ok, reason = True, ""
        else:
            quiet = self._monotonic() - live
            ok = quiet < self.config.ready_grace
            reason = (
                ""
                if ok
                else f"no stream from the controller for {quiet:.0f}s; files kept as they are"
            )
        if ok != self._ready_said:
            self._ready_said = ok
            if ok:
                log.info("files stream: ready again")
            else:
                log.warning("not ready: %s", reason)
        return ok, reason

    # -- claims (the files-claims thread)

    def _current_claims(self) -> tuple[Claim, ...] | None:
        known = self._claims()
        if known is None:
            return None
        claims = tuple(sorted(known))
        if len(claims) > MAX_CLAIMS:
            if self._capped_said != len(claims):
                self._capped_said = len(claims)
                log.warning(
                    "%d pods of this node ask for tokens; the controller serves %d per "
                    "node: %d get no files",
                    len(claims),
                    MAX_CLAIMS,
                    len(claims) - MAX_CLAIMS,
                )
            claims = claims[:MAX_CLAIMS]
        with self._lock:
            self._has_claims = bool(claims)
        return claims

    def _watch_claims(self) -> None:
        while not self._stopping.is_set():
            self._changed.wait()
            if self._stopping.wait(self.config.debounce):
                break
            self._changed.clear()
            try:
                claims = self._current_claims()
            except Exception:
                log.exception("cannot compute this node's claims")
                continue
            with self._lock:
                current = self._streaming
            if claims != current:
                log.debug("claims changed (%d pods): reopening the stream", len(claims or ()))
                self._reconnect.set()
                self._close_stream()

    def _close_stream(self) -> None:
        with self._lock:
            sock = self._sock
        if sock is not None:
            # The plain socket's shutdown, not SSLSocket's (which drops its SSL
            # object under the reading thread): the blocked read ends at once.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    # -- the stream thread

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._reconnect.clear()
            claims = self._current_claims()
            with self._lock:
                self._streaming = claims
            if not claims:
                self._idle(claims)
                continue
            try:
                endpoint = self._endpoint()
                ended = self._stream(endpoint, claims)
            except _Failure as failure:
                self._failed(failure)
                continue
            except Exception as err:  # our bug: say so, keep the agent up
                log.exception("files stream failed unexpectedly")
                self._failed(_Failure("protocol", f"{type(err).__name__}: {err}"))
                continue
            if ended:
                self._next += 1  # a clean end: at once, to the next replica

    def _idle(self, claims: tuple[Claim, ...] | None) -> None:
        """No claims: no stream. Once the pods are known to claim nothing, the files
        of pods gone are forgotten (containers keep theirs)."""
        self._set_connected(False)
        with self._lock:
            kept = self._kept
        if claims is not None and kept is not None and kept.pods:
            self._keep(dataclasses.replace(kept, pods={}), save=True)
        self._reconnect.wait()

    def _endpoint(self) -> Endpoint:
        if self._next >= len(self._endpoints):
            self._endpoints = self._resolve_endpoints()
            self._next = 0
        return self._endpoints[self._next]

    def _resolve_endpoints(self) -> list[Endpoint]:
        found: list[Endpoint] = []
        problems = []
        for url in self.config.urls:
            host, port = parse_url(url)
            try:
                addresses = self._resolve(host, port)
            except OSError as err:
                problems.append(f"{host}: {err}")
                continue
            # Start at a random replica: a restarted DaemonSet must not all pick the first.
            if addresses:
                start = int(self._jitter() * len(addresses)) % len(addresses)
                addresses = addresses[start:] + addresses[:start]
            server_name = self.config.server_name or host
            found.extend(Endpoint(url, host, p, a, server_name) for a, p in addresses)
        if not found:
            raise _Failure("dns", "; ".join(problems) or "no address for any controller URL")
        return found

    def _stream(self, endpoint: Endpoint, claims: tuple[Claim, ...]) -> bool:
        """One stream; True when the server ended it cleanly after a snapshot, False when
        we closed it (claims changed, stopping). Raises _Failure otherwise."""
        token = self._token()
        try:
            pem = self._ca.pem(fresh=self._ca_fresh)
        except CaUnavailable as err:
            raise _Failure("ca", str(err)) from None
        self._ca_fresh = False
        try:
            context = client_context(pem)  # trusts this bundle only, checks host names
        except TlsMaterialError as err:
            self._ca_fresh = True
            raise _Failure("ca", str(err)) from None
        conn = _Connection(endpoint, context, self.config.connect_timeout)
        delivered = False
        try:
            try:
                conn.connect()
            except ssl.SSLCertVerificationError as err:
                self._ca_fresh = True  # the CA may have been rotated: read it again
                raise _Failure("tls", f"{endpoint}: {err.verify_message}") from None
            except ssl.SSLError as err:
                raise _Failure("tls", f"{endpoint}: {err.reason or err}") from None
            except TimeoutError:
                raise _Failure("timeout", f"{endpoint}: no connection within timeout") from None
            except OSError as err:
                raise _Failure("connection", f"{endpoint}: {err.strerror or err}") from None
            assert conn.sock is not None
            with self._lock:
                self._sock = conn.sock
            if self._reconnect.is_set():
                return False  # claims changed while connecting
            conn.sock.settimeout(self.config.read_timeout)
            body = json.dumps(
                {"protocol": PROTOCOL, "pods": [c.to_json() for c in claims]}
            ).encode()
            conn.request(
                "POST",
                PATH,
                body,
                {
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/json",
                    "Accept": "application/x-ndjson",
                },
            )
            response = conn.getresponse()
            if response.status != http.HTTPStatus.OK:
                raise self._refusal(endpoint, response)
            self.connects += 1
            lines = _Lines(response)
            assembly = Assembly(self.node_name)
            while True:
                line = lines.readline(MAX_LINE)
                if not line:
                    if self._reconnect.is_set():
                        return False
                    if not delivered:
                        raise _Failure("protocol", f"{endpoint}: stream ended before a snapshot")
                    log.debug("%s ended the stream; reconnecting", endpoint)
                    return True
                if not line.endswith(b"\n"):
                    raise _Failure("protocol", f"{endpoint}: a line longer than {MAX_LINE} bytes")
                if line.strip():
                    delivered = self._message(endpoint, line, assembly) or delivered
                del line  # a pod's files: not held while the next line is read
        except _Failure:
            if self._reconnect.is_set():
                return False
            raise
        except (TimeoutError, OSError, http.client.HTTPException) as err:
            if self._reconnect.is_set():
                return False  # we closed it
            if isinstance(err, TimeoutError):
                raise _Failure(
                    "timeout", f"{endpoint}: silent for {self.config.read_timeout:g}s"
                ) from None
            raise _Failure("connection", f"{endpoint}: {type(err).__name__}: {err}") from None
        finally:
            with self._lock:
                self._sock = None
            self._set_connected(False)
            conn.close()
            if delivered:
                with self._lock:
                    self._live = self._monotonic()

    def _message(self, endpoint: Endpoint, line: bytes, assembly: Assembly) -> bool:
        """Handle one line; True for a snapshot (protocol 1) or a commit (2)."""
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            raise _Failure("protocol", f"{endpoint}: a line that is not JSON") from None
        kind = message.get("type") if isinstance(message, dict) else None
        now = self._clock()
        if kind == "heartbeat":
            with self._lock:
                self._confirmed, self._live = now, self._monotonic()
            return False
        try:
            if kind == "pod":
                assembly.pod(message)
                return False
            if kind == "commit":
                snapshot = assembly.commit(message)
            elif kind == "snapshot":
                snapshot = parse_snapshot(message, self.node_name)
            else:
                log.debug("%s sent a message of type %r; ignored", endpoint, kind)
                return False
        except ProtocolError as err:
            raise _Failure("protocol", f"{endpoint}: {err}") from None
        del message
        with self._lock:
            kept = self._kept
            self._confirmed, self._live = now, self._monotonic()
        merged, ignored = merge(kept, snapshot)
        if ignored:
            self._metrics.stale_files_ignored.inc(ignored)
            log.info("%s: %d files with an older token than ours, ignored", endpoint, ignored)
        for refusal in snapshot.refused:
            # not_found is a race with a deletion; the others mean our view and the
            # API server's differ, which someone should look at.
            level = logging.DEBUG if refusal.reason == "not_found" else logging.WARNING
            log.log(level, "controller refused pod %s/%s: %s", *_named(refusal))
        self.failures = 0
        self._set_connected(True)
        if self._said != "ok":
            log.info(
                "files stream from %s open: %d pods, %d files",
                endpoint,
                len(merged.pods),
                sum(len(p.files) for p in merged.pods.values()),
            )
            self._said = "ok"
        self._keep(merged, save=merged != kept)
        self._current.set()  # after _keep: a waiter reads these files next
        return True

    def _refusal(self, endpoint: Endpoint, response: http.client.HTTPResponse) -> _Failure:
        status = response.status
        try:
            raw = response.read(MAX_ERROR_BODY)
            body = json.loads(raw) if raw else {}
        except (ValueError, OSError, http.client.HTTPException):
            body = {}
        message = body.get("message") if isinstance(body, dict) else None
        detail = f": {' '.join(str(message).split())[:300]}" if message else ""
        retry_after = 0.0
        with contextlib.suppress(TypeError, ValueError):
            retry_after = float(response.getheader("Retry-After") or 0)
        return _Failure(
            _REASONS.get(status, f"http_{status}"),
            f"{endpoint}: HTTP {status}{detail}",
            retry_after=retry_after,
        )

    def _token(self) -> str:
        path = self.config.token_file
        try:
            token = Path(path).read_text().strip()
        except OSError as err:
            raise _Failure("token_file", f"cannot read {path}: {err.strerror}") from None
        if not token:
            raise _Failure("token_file", f"{path} is empty")
        return token

    def _failed(self, failure: _Failure) -> None:
        self.failures += 1
        self._next += 1  # another replica may answer
        self._metrics.controller_errors.labels(failure.reason).inc()
        self._set_connected(False)
        delay = min(
            self.config.backoff_cap, self.config.backoff_base * 2.0 ** min(self.failures - 1, 32)
        )
        delay *= 0.5 + 0.5 * self._jitter()
        delay = max(delay, min(failure.retry_after, self.config.backoff_cap))
        self.last_backoff = delay
        if failure.reason != self._said:
            self._said = failure.reason
            log.warning(
                "files stream: %s (%s); retrying with backoff, silent until that changes",
                failure,
                failure.reason,
            )
        else:
            log.debug("files stream: %s again, next try in %.2fs", failure.reason, delay)
        self._stopping.wait(delay)

    # -- kept files and the state file

    def _keep(self, snapshot: Snapshot, *, save: bool) -> None:
        with self._lock:
            self._kept = snapshot
        try:
            self._on_files()
        except Exception:
            log.exception("on_files failed")
        if save:
            # After the injector was told: with a node's files at the limit the
            # state file is 21 MB and its fsync must not delay every write.
            self._save_state(snapshot)

    def _save_state(self, snapshot: Snapshot) -> None:
        path = self.config.state_file
        if not path:
            return
        try:
            _write_atomically(Path(path), state_chunks(snapshot, self.node_name, self._clock()))
        except OSError as err:
            self._metrics.controller_errors.labels("state_file").inc()
            log.warning("cannot save the files to %s: %s", path, err.strerror or err)

    def _load_state(self) -> None:
        path = self.config.state_file
        if not path:
            return
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            log.warning("cannot read the state file %s: %s; ignored", path, err.strerror)
            return
        try:
            state = json.loads(raw)
            del raw
            if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                raise ProtocolError("unknown format")
            if state.get("node") != self.node_name:
                raise ProtocolError(
                    f"written for node {state.get('node')!r}, this is {self.node_name!r}"
                )
            snapshot = parse_snapshot(state.pop("snapshot", None), self.node_name)
            received = float(state.get("received_at") or 0.0)
        except (ValueError, TypeError, RecursionError) as err:  # ProtocolError is a ValueError
            log.warning("state file %s ignored: %s", path, err)
            return
        with self._lock:
            self._kept, self._confirmed, self._live = snapshot, received, self._monotonic()
        log.info(
            "files of %d pods loaded from %s (received %.0fs ago)",
            len(snapshot.pods),
            path,
            max(0.0, self._clock() - received),
        )


def _named(refusal: Refusal) -> tuple[str, str, str]:
    return refusal.namespace, refusal.name, f"{refusal.reason}: {refusal.message}"


def state_chunks(snapshot: Snapshot, node: str, received_at: float) -> Iterator[bytes]:
    """The state file, one JSON document written a pod at a time: the node's files
    are never one string in memory (16 MiB of them would be three of 21 MB)."""
    head = {
        "version": STATE_VERSION,
        "node": node,
        "received_at": received_at,
        "snapshot": snapshot_json(dataclasses.replace(snapshot, pods={})),
    }
    text = json.dumps(head, separators=(",", ":"))
    # The document up to the empty pod list of the snapshot, then each pod, then the rest.
    marker = '"pods":[]'
    before, after = text.split(marker, 1)
    yield (before + '"pods":[').encode()
    for i, pod in enumerate(snapshot.pods.values()):
        (wire,) = snapshot_json(dataclasses.replace(snapshot, pods={pod.uid: pod}))["pods"]
        yield (b"," if i else b"") + json.dumps(wire, separators=(",", ":")).encode()
    yield ("]" + after).encode()


def _write_atomically(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Temp file (0600) + fsync + rename in the same directory: old or new, never half."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:  # mkstemp makes it 0600
            for chunk in [data] if isinstance(data, bytes) else data:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
