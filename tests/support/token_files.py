"""A cluster for the controller's file server: injector pods, app pods, token Secrets,
and a client that reads `POST /v1/files` streams over real HTTP(S) and keeps
every byte it received (tests scan them for refresh tokens and client secrets)."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agents.token_refresher.spec import OUR_PREFIX
from agents.token_refresher.tls import (
    TlsMaterial,
    client_context,
    issue_serving_cert,
    make_ca,
    server_context,
)
from tests.support.fake_kube import FakeKube
from tests.support.tokens import token_secret_object

CONTROLLER_NS = "token-refresher"
INJECTOR_SA = "token-refresher-injector"
INJECTOR_LABELS = {
    "app.kubernetes.io/name": "token-refresher",
    "app.kubernetes.io/component": "injector",
}
AUDIENCE = "node-agents.io/token-files"
# Long, recognisable values: found by substring in whatever a test receives.
REFRESH_TOKEN = "RT-must-never-leave-the-controller-0123456789"
CLIENT_SECRET = "CS-must-never-leave-the-controller-9876543210"


def access_token(tag: str) -> str:
    return f"AT-{tag}-{uuid.uuid4().hex[:8]}"


def put_token_secret(
    kube: FakeKube,
    name: str,
    namespace: str,
    access: str,
    *,
    expires_at: float | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    token = {
        "access_token": access,
        "refresh_token": REFRESH_TOKEN,
        "token_type": "Bearer",
        "expires_at": expires_at if expires_at is not None else time.time() + 3600,
    }
    secret = token_secret_object(
        name,
        {"oauth": json.dumps(token), "clientID": "client", "clientSecret": CLIENT_SECRET},
        namespace=namespace,
    )
    if labels:
        secret["metadata"]["labels"] = labels
    return kube.put(secret)


def put_pod(
    kube: FakeKube,
    name: str,
    namespace: str,
    node: str,
    *,
    inject: list[dict[str, Any]] | None = None,
    raw_inject: str | None = None,
    labels: dict[str, str] | None = None,
    service_account: str = "default",
    phase: str = "Running",
) -> dict[str, Any]:
    annotations = {}
    if inject is not None:
        annotations[f"{OUR_PREFIX}/to-inject"] = json.dumps(inject)
    if raw_inject is not None:
        annotations[f"{OUR_PREFIX}/to-inject"] = raw_inject
    return kube.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "labels": labels or {},
                "annotations": annotations,
            },
            "spec": {
                "nodeName": node,
                "serviceAccountName": service_account,
                "containers": [{"name": "app", "image": "busybox"}],
            },
            "status": {"phase": phase},
        }
    )


def put_injector(kube: FakeKube, node: str, **kw: Any) -> dict[str, Any]:
    """The injector pod of `node` in the controller's namespace."""
    return put_pod(
        kube,
        f"injector-{node}",
        CONTROLLER_NS,
        node,
        labels=kw.pop("labels", INJECTOR_LABELS),
        service_account=kw.pop("service_account", INJECTOR_SA),
        **kw,
    )


def injector_token(kube: FakeKube, pod: dict[str, Any], **kw: Any) -> str:
    """A projected token of the injector ServiceAccount, bound to `pod`, as kubelet makes it."""
    meta = pod["metadata"]
    return kube.service_account_token(
        meta["namespace"],
        kw.pop("service_account", INJECTOR_SA),
        audiences=kw.pop("audiences", (AUDIENCE,)),
        pod=(meta["name"], meta["uid"]),
        **kw,
    )


def claim(pod: dict[str, Any], **changes: str) -> dict[str, str]:
    meta = pod["metadata"]
    entry = {
        "namespace": meta["namespace"],
        "name": meta["name"],
        "uid": meta["uid"],
        "resourceVersion": meta["resourceVersion"],
    }
    entry.update(changes)
    return entry


# -- TLS: the controller's own CA and serving certificate (tls.py), for loopback


@dataclass(frozen=True)
class LoopbackCerts:
    ca_pem: str
    material: TlsMaterial

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.material)

    def client_context(self) -> ssl.SSLContext:
        return client_context(self.ca_pem)


def make_certs() -> LoopbackCerts:
    """A CA and a serving certificate for localhost and 127.0.0.1, made as the controller does."""
    now = time.time()
    ca = make_ca(now)
    serving = issue_serving_cert(ca, ["localhost", "127.0.0.1"], now)
    material = TlsMaterial(
        cert_pem=serving.cert_pem,
        key_pem=serving.key_pem,
        ca_pem=ca.cert_pem,
        bundle_pem=ca.cert_pem,
        serving_not_after=now + 3600,
        ca_not_after=None,
    )
    return LoopbackCerts(ca.cert_pem, material)


# -- the client side


@dataclass
class Received:
    """Everything any client of one test got back: headers and bodies."""

    chunks: list[bytes] = field(default_factory=list)

    def add(self, data: bytes) -> None:
        self.chunks.append(data)

    def assert_clean(self, *secrets: str) -> None:
        """None of `secrets` in any byte received, nor in any file content (base64 on
        the wire, where a plain search would miss a leak)."""
        everything = b"".join(self.chunks)
        assert everything, "nothing received: the check would prove nothing"
        decoded = b"".join(_contents(everything))
        for secret in secrets:
            assert secret.encode() not in everything, "a response held a refresh token or secret"
            assert secret.encode() not in decoded, "a file held a refresh token or secret"


def _contents(received: bytes) -> list[bytes]:
    """Every `content` of every JSON line received, base64-decoded."""
    found: list[bytes] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "content" and isinstance(item, str):
                    found.append(base64.b64decode(item))
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for line in received.splitlines():
        try:
            walk(json.loads(line))
        except ValueError:
            continue  # headers, chunk sizes
    return found


class FilesStream:
    """One `POST /v1/files` as an injector makes it; reads NDJSON lines."""

    def __init__(
        self,
        port: int,
        token: str | None,
        pods: Iterable[dict[str, str]],
        *,
        received: Received,
        context: ssl.SSLContext | None = None,
        body: bytes | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.received = received
        if context is None:
            self.conn: http.client.HTTPConnection = http.client.HTTPConnection(
                "127.0.0.1", port, timeout=timeout
            )
        else:
            self.conn = http.client.HTTPSConnection(
                "127.0.0.1", port, timeout=timeout, context=context
            )
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if body is None:
            body = json.dumps({"pods": list(pods)}).encode()
        self.conn.request("POST", "/v1/files", body=body, headers=headers)
        self.response = self.conn.getresponse()
        self.status = self.response.status
        received.add(str(self.response.headers).encode())

    def json(self) -> Any:
        data = self.response.read()
        self.received.add(data)
        return json.loads(data)

    def line(self) -> dict[str, Any] | None:
        """The next line; None at the end of the stream."""
        data = self.response.readline()
        self.received.add(data)
        if not data:
            return None
        parsed: dict[str, Any] = json.loads(data)
        return parsed

    def snapshot(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next snapshot (heartbeats skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.line()
            assert line is not None, "the stream ended"
            if line["type"] == "snapshot":
                return line
        raise AssertionError("no snapshot in time")

    def lines_for(self, seconds: float) -> list[dict[str, Any]]:
        """Every line received within `seconds` (the stream must stay open)."""
        lines = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            line = self.line()
            assert line is not None, "the stream ended"
            lines.append(line)
        return lines

    def close(self) -> None:
        self.conn.close()
