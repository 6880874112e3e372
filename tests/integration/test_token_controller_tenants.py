"""Red team: what a tenant's token Secret can do to the controller, and cannot.

A tenant writes its Secret: the token JSON, the client credentials and a
token URL of its choice. It must not be able to freeze everyone's refreshes
(a token endpoint that trickles its answer), to send the controller to an
internal host (URL tricks), or to read credentials back through Events,
status annotations or logs (an IdP that echoes what it got). Each attack runs
against the real controller (`main` in a thread, the fake Kubernetes API over
real HTTP, the bundle's RBAC), real servers on loopback (tests/support/
hostile_idp.py) and, for the neighbours, the real OAuth2 server (Canaille,
rotating refresh tokens, TLS).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus

import pytest
from prometheus_client import CollectorRegistry

from agents.common.kube import EventRecorder, ObjectRef, load_api_client
from agents.common.leader import LeaderElector
from agents.common.loop import run_loop
from agents.token_refresher.cli import main
from agents.token_refresher.config import ControllerConfig, IdPConfig
from agents.token_refresher.controller import Controller
from agents.token_refresher.metrics import ControllerMetrics
from agents.token_refresher.oauth import RetryableError, Token
from hack.autofs_world import wait_for
from tests.integration.test_token_controller import (
    AGENTS_NAMESPACE,
    CERN,
    CONTROLLER_ACCOUNT,
    argv,
    events,
    leading,
    token_secret,
)
from tests.support.fake_kube import FakeKube, find_resource
from tests.support.hostile_idp import CountingListener, HostileTokenEndpoint
from tests.support.idp import IDP_LOGGERS, TestIdP
from tests.support.memcg import BoundedAgent
from tests.support.token_files import put_pod
from tests.support.tokens import token_secret_object

STATUS = "token-refresher.node-agents.io/status"
TOKEN_URL = f"{CERN}/token-url"
TENANT = "evil"
REFRESHES = "token_refresher_refreshes_total"
CONTROLLER_MANIFEST = "token-refresher/controller.yaml"


@pytest.fixture
def kube(bundle_kube: FakeKube) -> FakeKube:
    kube = bundle_kube
    kube.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": TENANT}})
    return kube


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[TestIdP]:
    with TestIdP(tls=True, lifetime=2, workdir=tmp_path / "idp") as server:
        yield server


def tenant_secret(name: str, url: str, **overrides: str) -> dict[str, Any]:
    """A tenant's token Secret naming its own token URL, due now, with secrets
    of its own (random, long enough for every 8-character piece to mean it)."""
    token = {
        "access_token": overrides.get("access", secrets.token_urlsafe(30)),
        "refresh_token": overrides.get("refresh", secrets.token_urlsafe(30)),
        "token_type": "Bearer",
        "expires_at": time.time() + 1,
        "issued_at": time.time() - 60,
    }
    values = {
        "oauth": json.dumps(token),
        "clientID": overrides.get("client_id", "tenant-client"),
        "clientSecret": overrides.get("client_secret", secrets.token_urlsafe(24)),
    }
    secret = token_secret_object(name, values, namespace=TENANT)
    secret["metadata"]["annotations"][TOKEN_URL] = url
    return secret


def status_of(kube: FakeKube, name: str, namespace: str = TENANT) -> str:
    secret = kube.get("secrets", namespace, name)
    assert secret is not None
    return str((secret["metadata"].get("annotations") or {}).get(STATUS, ""))


def about(kube: FakeKube, reason: str, name: str) -> list[dict[str, Any]]:
    return [e for e in events(kube, reason) if e["involvedObject"]["name"] == name]


# -- 3. a token endpoint that trickles its answer --------------------------------


def test_a_slow_loris_token_url_times_out_alone_and_the_neighbours_refresh_on_time(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    """Headers, then a byte every 2 s: requests' per-read timeout never fires.
    The tenant's Secrets fail with a timeout at the 3 s deadline and get a
    Warning Event; the slow host holds at most 2 workers; three neighbours on
    the real IdP (tokens living 2 s) never serve an expired token."""
    assert idp.ca is not None
    with HostileTokenEndpoint("slowloris", context=idp.ca.server_context(), drip=2.0) as slow:
        args = argv(
            kube,
            idp,
            tmp_path,
            "--request-timeout",
            "3",
            "--allowed-token-urls",
            slow.url,
        )
        with BoundedAgent(args, CONTROLLER_MANIFEST, log=tmp_path / "controller.log") as agent:
            leading(agent)
            for n in range(4):
                kube.put(tenant_secret(f"slow-{n}", slow.url))
            neighbours = [f"neighbour-{n}" for n in range(3)]
            for name in neighbours:
                kube.put(token_secret(idp, name))
            # Each refresh of a neighbour is a new resourceVersion; the longest
            # gap between two must stay under the token's 2 s lifetime.
            started = time.monotonic()
            versions: dict[str, str] = {}
            changed = dict.fromkeys(neighbours, started)
            gaps: dict[str, float] = dict.fromkeys(neighbours, 0.0)
            warned: dict[str, float] = {}
            while time.monotonic() < started + 10:
                now = time.monotonic()
                for name in neighbours:
                    secret = kube.get("secrets", "default", name)
                    assert secret is not None
                    version = secret["metadata"]["resourceVersion"]
                    if versions.get(name) != version:
                        versions[name] = version
                        gaps[name] = max(gaps[name], now - changed[name])
                        changed[name] = now
                for event in events(kube, "TokenRefreshRetrying"):
                    warned.setdefault(event["involvedObject"]["name"], time.monotonic())
                time.sleep(0.05)
            for name in neighbours:
                gaps[name] = max(gaps[name], time.monotonic() - changed[name])
            timeouts = agent.value(REFRESHES, {"result": "timeout"})
            # One scrape: a pass ending between two would count in one and not the other.
            scrape = agent.scrape()
            ticks = scrape[("token_refresher_tick_duration_seconds_count", frozenset())]
            within_1s = scrape[
                ("token_refresher_tick_duration_seconds_bucket", frozenset({("le", "1.0")}))
            ]
            puts = {
                n: kube.count("PUT", rf"/api/v1/namespaces/default/secrets/{n}") for n in neighbours
            }

    assert max(gaps.values()) < 2.0, f"a neighbour went unrefreshed for longer than 2 s: {gaps}"
    assert all(count >= 4 for count in puts.values()), puts
    assert timeouts >= 1
    assert slow.max_open <= 2, f"the slow host held {slow.max_open} workers (limit 2)"
    # The first attempt timed out at its deadline, with an Event saying so.
    first = slow.accepted[0]
    slow_warned = sorted(t for name, t in warned.items() if name.startswith("slow-"))
    assert slow_warned and slow_warned[0] - first < 3 + 1.5, (slow_warned, first)
    message = next(
        e["message"] for e in events(kube, "TokenRefreshRetrying") if e["type"] == "Warning"
    )
    assert "timeout" in message and "within 3 s" in message, message
    assert not [n for n in warned if n.startswith("neighbour")]
    assert ticks > 0 and within_1s == ticks, "a pass waited for an IdP"


# -- 3. a stuck pass or worker gives up the Lease ---------------------------------


class HungEvents(EventRecorder):
    """An Events API that takes a request and never answers (until released)."""

    def __init__(self, api_client: Any, release: threading.Event) -> None:
        super().__init__(api_client, "token-refresher-controller", "replica-a")
        self.release = release

    def emit(self, ref: ObjectRef, type_: str, reason: str, message: str) -> bool:
        self.release.wait(60)
        return False


@pytest.mark.parametrize("stuck", ["worker", "pass"])
def test_a_stuck_worker_or_pass_stops_renewing_and_the_standby_takes_over(
    kube: FakeKube, tmp_path: Path, stuck: str
) -> None:
    """The bounds (the IdP deadline, the API timeouts) are what keep a worker
    or the pass moving; should one hang anyway (here an IdP call that ignores
    its deadline, or an Events request that never returns), the replica stops
    renewing its Lease after the stall limit, and the standby takes over."""
    release = threading.Event()

    def idp_ignoring_its_deadline(url: str, token: Token, client_id: str, secret: str) -> Token:
        release.wait(60)
        raise RetryableError("timeout", "released by the test")

    apis = [
        load_api_client(
            str(kube.kubeconfig(tmp_path / f"kubeconfig-{n}", service_account=CONTROLLER_ACCOUNT))
        )
        for n in range(2)
    ]
    registry = CollectorRegistry()
    config = ControllerConfig(
        idp=IdPConfig(token_url="https://idp.example/token", request_timeout=1.0),
        interval=0.1,
        stall_limit=1.0,
    )
    lease = {
        "name": "token-refresher",
        "namespace": AGENTS_NAMESPACE,
        "lease_duration": 8.0,
        "renew_interval": 0.5,
    }
    controller: Controller | None = None
    a = LeaderElector(
        apis[0],
        identity="replica-a",
        health=lambda: controller.stalled() if controller is not None else None,
        **lease,  # type: ignore[arg-type]
    )
    controller = Controller(
        apis[0],
        config,
        refresh_fn=idp_ignoring_its_deadline,
        metrics=ControllerMetrics(registry),
        elector=a,
        recorder=HungEvents(apis[0], release) if stuck == "pass" else None,
    )
    b = LeaderElector(apis[1], identity="replica-b", **lease)  # type: ignore[arg-type]
    stop = threading.Event()
    loop = threading.Thread(
        target=run_loop,
        args=(controller.tick,),
        kwargs={"interval": 0.1, "stop": stop, "wake": controller.wake, "min_gap": 0.05},
        name="controller-loop",
    )
    try:
        a.start()
        wait_for(a.is_leader, 10)
        b.start()
        controller.start()
        assert controller.wait_synced(10)
        loop.start()
        if stuck == "worker":
            kube.put(tenant_secret("stuck", "https://idp.example/token"))
        else:
            broken = tenant_secret("stuck", "https://idp.example/token")
            del broken["data"]["clientSecret"]  # reported by the pass: an Event
            kube.put(broken)
        hung = time.monotonic()
        wait_for(lambda: not a.is_leader(), 5)
        given_up = time.monotonic() - hung
        assert "made no progress" in a.unhealthy and "limit 1 s" in a.unhealthy
        expected = "the refresh of token Secret evil/stuck" if stuck == "worker" else "pass"
        assert expected in a.unhealthy, a.unhealthy
        assert (registry.get_sample_value("token_refresher_stalled_seconds") or 0) > 1.0
        # Not released: whatever hangs may still use the refresh token; the
        # standby waits the Lease out (8 s), then leads.
        held = kube.get("leases", AGENTS_NAMESPACE, "token-refresher")
        assert held is not None and held["spec"]["holderIdentity"] == "replica-a"
        wait_for(b.is_leader, 15)
        took_over = time.monotonic() - hung
        held = kube.get("leases", AGENTS_NAMESPACE, "token-refresher")
        assert held is not None and held["spec"]["holderIdentity"] == "replica-b"
        release.set()
        wait_for(lambda: a.unhealthy == "", 5)
        time.sleep(1)
        assert b.is_leader() and not a.is_leader()
    finally:
        release.set()
        stop.set()
        if loop.is_alive():
            loop.join(10)
        controller.stop()
        b.stop()
        a.stop()
        for api in apis:
            api.close()
    assert given_up < 1.0 + 0.5 + 1.0, f"gave up after {given_up:.1f} s"
    assert took_over < given_up + 8 + 0.5 + 1.5, f"took over after {took_over:.1f} s"


# -- 4. URLs that lead elsewhere ----------------------------------------------------


def test_token_urls_outside_the_allowed_ones_are_refused_and_never_connected_to(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    with CountingListener() as listener:
        port = listener.port
        idp_at = idp.token_url.split("/")[2]
        attacks = {
            "userinfo-idp": f"https://{idp_at}@127.0.0.1:{port}/token",
            "userinfo-port": f"https://auth.example.org:443@127.0.0.1:{port}/api",
            "userinfo-host": f"https://auth.example.org@127.0.0.1:{port}/",
            "other-port": f"https://127.0.0.1:{port}/token",
            "plain-http": f"http://127.0.0.1:{port}/token",
            "dot-segments": f"{idp.token_url}/../../admin",
            "prefix-not-segment": "https://auth.example.org/realmsevil/token",
            "query": f"{idp.token_url}?redirect=https://127.0.0.1:{port}/",
        }
        args = argv(kube, idp, tmp_path, "--allowed-token-urls", "https://auth.example.org/realms/")
        with BoundedAgent(args, CONTROLLER_MANIFEST, log=tmp_path / "controller.log") as agent:
            kube.put(token_secret(leading(agent) and idp, "neighbour"))
            for name, url in attacks.items():
                kube.put(tenant_secret(name, url))
            wait_for(lambda: len(events(kube, "TokenURLRefused")) == len(attacks), 15)
            wait_for(lambda: agent.value(REFRESHES, {"result": "ok"}) >= 2, 15)
            time.sleep(1)
            refused = agent.value(REFRESHES, {"result": "token_url_refused"})
            # Only the neighbour's refreshes reached the IdP (once none is in flight).
            wait_for(
                lambda: (
                    idp.token_calls("refresh_token") == agent.value(REFRESHES, {"result": "ok"})
                ),
                5,
            )
    assert listener.connections == 0
    assert refused == len(attacks)
    for name in attacks:
        assert status_of(kube, name).startswith("token_url_refused: "), name
        [event] = about(kube, "TokenURLRefused", name)
        assert event["type"] == "Warning"
        assert len(event["message"]) <= 1024 and event["message"].isprintable()
    assert "is not allowed" in about(kube, "TokenURLRefused", "other-port")[0]["message"]
    assert "user info" in about(kube, "TokenURLRefused", "userinfo-idp")[0]["message"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--token-url", "https://auth.example.org@evil.net/token"], "--token-url"),
        (["--token-url", "https://auth.example.org/token?x=1"], "no query"),
        (["--allowed-token-urls", "https://a.example/,https://b.example:99999/"], "entry"),
        (["--allowed-token-urls", "https://a.example/../b"], "'..'"),
        (["--stall-limit", "5"], "--stall-limit"),
        (["--refresh-workers", "0"], "--refresh-workers"),
    ],
)
def test_bad_idp_flags_exit_2_with_one_clear_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["controller", "--kubeconfig", "/nonexistent", *flags], environ={}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[-1], err


# -- 8. an IdP that echoes what it got ----------------------------------------------


def echo(headers: dict[str, str], body: bytes, count: int) -> tuple[int, dict[str, Any]]:
    """Error answers quoting the request back: the Basic credentials (as sent and
    upper-cased), the form body, a prefix of the refresh token, the refresh token
    upper-cased; the error code itself is a piece of the refresh token."""
    form = parse_qs(body.decode())
    refresh = form["refresh_token"][0]
    authorization = headers.get("Authorization", "")
    described = (
        f"Authorization: {authorization} ({authorization.upper()})"
        f" body {body.decode()} token {refresh[:10]}... {refresh.upper()}"
    )
    code = ["temporarily_unavailable", refresh[4:16], "invalid_client", "invalid_grant"][count % 4]
    return 400, {"error": code, "error_description": described}


def test_an_idp_echoing_credentials_gets_no_piece_of_them_into_events_status_or_logs(
    kube: FakeKube, idp: TestIdP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert idp.ca is not None
    tenants = [
        {
            "client_id": f"tenant-client-{n}",
            "client_secret": secrets.token_urlsafe(24),
            "access": secrets.token_urlsafe(30),
            "refresh": secrets.token_urlsafe(30),
        }
        for n in range(4)
    ]
    caplog.set_level(logging.DEBUG)
    with HostileTokenEndpoint("echo", context=idp.ca.server_context(), answer=echo) as server:
        args = argv(kube, idp, tmp_path, "--allowed-token-urls", server.url)
        with BoundedAgent(args, CONTROLLER_MANIFEST, log=tmp_path / "controller.log") as agent:
            # A neighbour on the real IdP, its token living 2 s, refreshed all along.
            kube.put(token_secret(leading(agent) and idp, "neighbour"))
            for n, tenant in enumerate(tenants):
                kube.put(tenant_secret(f"echoed-{n}", server.url, **tenant))
                put_pod(
                    kube,
                    f"app-{n}",
                    TENANT,
                    "node-1",
                    inject=[{"secretName": f"echoed-{n}", "container": "app", "owner": 1000}],
                )
            # Each kind of answer reached at least one Secret, final ones included.
            wait_for(
                lambda: agent.value("token_refresher_token_secrets", {"state": "stopped"}) == 4, 30
            )
            wait_for(lambda: len(events(kube, "TokenRefreshFailed", "Pod")) >= 1, 20)
            time.sleep(0.5)
            # Echoed answers are never "ok": these are the neighbour's, on time.
            wait_for(lambda: agent.value(REFRESHES, {"result": "ok"}) >= 3, 10)
        # What the agent wrote to its own output, as an operator's log collector has it.
        agent_log = agent.log_text().splitlines()
    pieces: set[str] = set()
    for tenant in tenants:
        basic = base64.b64encode(f"{tenant['client_id']}:{tenant['client_secret']}".encode())
        for secret in (
            tenant["client_secret"],
            tenant["access"],
            tenant["refresh"],
            basic.decode(),
            quote_plus(tenant["refresh"]),
            quote(tenant["client_secret"], safe=""),
        ):
            folded = secret.lower()
            pieces.update(folded[i : i + 8] for i in range(len(folded) - 7))
    texts = [f"event {e['reason']}: {e['message']}" for e in kube.objects("events")]
    secrets_resource = find_resource("secrets")
    for change in kube.store.changes_after(0):
        if change.resource == secrets_resource:
            status = (change.obj["metadata"].get("annotations") or {}).get(STATUS)
            if status:
                texts.append(f"status: {status}")
    for record in caplog.records:
        if not record.name.startswith(IDP_LOGGERS):
            text = record.getMessage()
            if record.exc_info:
                text += logging.Formatter().formatException(record.exc_info)
            texts.append(f"log {record.name}: {text}")
    texts += [f"agent log: {line}" for line in agent_log]
    assert len(agent_log) > 10  # it logged, and the lines are scanned
    assert any("Basic <redacted>" in t for t in texts if t.startswith("event")), texts
    assert len([t for t in texts if t.startswith("event")]) >= 8  # Secrets and pods
    assert any("TokenRefreshRetrying" in t for t in texts), texts  # a retryable answer too
    assert server.requests >= 6
    assert any(t.startswith("status: invalid_") for t in texts), texts
    leaks = [(p, t) for t in texts for p in pieces if p in t.lower()]
    assert not leaks, leaks[:3]
