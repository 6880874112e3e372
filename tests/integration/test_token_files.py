"""`token-refresher controller` serves token files: its own CA and certificate (tls.py),
TokenReview of the injector's token, push of a Secret change, over real TLS."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

from agents.token_refresher.cli import main
from agents.token_refresher.tls import client_context
from hack.autofs_world import wait_for
from tests.support.agent import AgentThread
from tests.support.fake_kube import FakeKube
from tests.support.token_files import (
    CLIENT_SECRET,
    INJECTOR_LABELS,
    INJECTOR_SA,
    REFRESH_TOKEN,
    FilesStream,
    Received,
    access_token,
    claim,
    put_pod,
    put_token_secret,
)

OWN_NAMESPACE = "node-agents"  # given by --own-namespace: no ServiceAccount mount here


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_controller_serves_files_over_its_own_tls(
    bundle_kube: FakeKube, tmp_path: Path
) -> None:
    """As its bundle ServiceAccount, under the bundle's RBAC: nothing it does is refused."""
    kube = bundle_kube
    port = _free_port()
    argv = [
        "controller",
        "--kubeconfig",
        str(
            kube.kubeconfig(
                tmp_path / "kubeconfig",
                service_account=f"{OWN_NAMESPACE}/token-refresher-controller",
            )
        ),
        "--own-namespace",
        OWN_NAMESPACE,
        "--token-url",
        "https://idp.invalid/token",
        "--interval",
        "0.2",
        "--metrics-address",
        "off",
        "--files-address",
        f"127.0.0.1:{port}",
        "--tls-names",
        "127.0.0.1,localhost",
    ]
    put_token_secret(kube, "tok", "apps", at := access_token("one"))
    app = put_pod(kube, "app", "apps", "n1", inject=[{"secretName": "tok", "container": "app"}])
    injector = put_pod(
        kube,
        "injector-n1",
        OWN_NAMESPACE,
        "n1",
        labels=INJECTOR_LABELS,
        service_account=INJECTOR_SA,
    )
    received = Received()
    with AgentThread(main, argv) as agent:
        wait_for(lambda: kube.get("configmaps", OWN_NAMESPACE, "token-refresher-ca"), 15)
        bundle = kube.get("configmaps", OWN_NAMESPACE, "token-refresher-ca")
        assert bundle is not None
        context = client_context(bundle["data"]["ca.crt"])
        wait_for(
            lambda: (
                agent.value(
                    "token_refresher_tls_certificate_expiry_seconds", {"certificate": "serving"}
                )
                > 0
            ),
            15,
        )
        token = kube.service_account_token(
            OWN_NAMESPACE,
            INJECTOR_SA,
            audiences=("node-agents.io/token-files",),
            pod=(injector["metadata"]["name"], injector["metadata"]["uid"]),
        )

        streams: list[FilesStream] = []

        def opened() -> bool:
            try:
                stream = FilesStream(port, token, [claim(app)], received=received, context=context)
            except OSError:
                return False  # not listening yet
            streams.append(stream)
            return stream.status == 200

        wait_for(opened, 15)
        stream = streams[-1]
        try:
            snapshot = stream.snapshot()
            content = snapshot["pods"][0]["files"][0]["content"]
            assert base64.b64decode(content).decode() == at
            put_token_secret(kube, "tok", "apps", new := access_token("two"))
            started = time.monotonic()
            pushed = stream.snapshot()
            assert time.monotonic() - started < 2
            assert base64.b64decode(pushed["pods"][0]["files"][0]["content"]).decode() == new
        finally:
            stream.close()
        assert agent.value("token_refresher_files_requests_total", {"outcome": "ok"}) >= 1
        assert agent.value("token_refresher_token_reviews_total", {"outcome": "authenticated"}) == 1
    received.assert_clean(REFRESH_TOKEN, CLIENT_SECRET)
