"""`token-refresher controller` while its IdP is down, and when it comes back (root).

The IdP (Canaille with rotating refresh tokens, over TLS) listens inside a
network namespace with no default route (tests/support/netns.py); the
controller's `main` runs in a thread against the fake Kubernetes API over real
HTTP. Each fault is real: a closed port (RST), packets that vanish in the
namespace (connect timeouts), a 503 with Retry-After from the IdP itself.

Timings follow oauth.Backoff (base 2 s, doubling, equal jitter: the n-th
consecutive failure waits between 2**(n-2) and 2**(n-1) s, or the server's
Retry-After when longer), counted from the start of the failed attempt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.token_refresher.cli import main
from hack.autofs_world import wait_for
from tests.conftest import IN_CI, IS_ROOT
from tests.support.agent import AgentThread
from tests.support.fake_kube import FakeKube, find_resource
from tests.support.idp import TestIdP
from tests.support.netns import IsolatedIdPNetwork
from tests.support.tokens import token_of, token_secret_object

pytestmark = pytest.mark.root

NAME = "eos-token"
NAMESPACE = "default"
STATUS = "token-refresher.node-agents.io/status"
REFRESHES = "token_refresher_refreshes_total"
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")
RECOVERED_LIFETIME = 10
"""expires_in of the tokens issued after the outage: with --refresh-fraction
0.2 the controller refreshes them again 1-3 s later on its own (the chain goes
on), well before their refresh token dies with them (see tests/support/idp.py)."""


@pytest.fixture
def network() -> Iterator[IsolatedIdPNetwork]:
    if not IS_ROOT:
        if IN_CI:
            pytest.fail("CI must run this test: needs root for network namespaces")
        pytest.skip("needs root: network namespaces and veth pairs")
    with IsolatedIdPNetwork() as made:
        yield made


@pytest.fixture
def idp(network: IsolatedIdPNetwork, tmp_path: Path) -> Iterator[TestIdP]:
    """The IdP inside the namespace; its seed tokens live an hour (the outage must
    not kill the seed's refresh token)."""
    with TestIdP(tls=True, workdir=tmp_path / "idp", listen=network.bind) as server:
        assert server.url.startswith(f"https://{network.address}:")
        yield server


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests honours proxy variables: the IdP's traffic must stay in the namespace."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def seed_secret(kube: FakeKube, idp: TestIdP) -> dict[str, Any]:
    """A token Secret as a user leaves it, due now: issued a minute ago, and its
    access token expires 5 s from now (refreshes are due at 10-30% of a lifetime)."""
    token = json.loads(idp.issue())
    token.pop("expires_in", None)
    token["expires_at"] = time.time() + 5
    token["issued_at"] = time.time() - 60
    values = {
        "oauth": json.dumps(token),
        "clientID": idp.client_id,
        "clientSecret": idp.client_secret,
    }
    return kube.put(token_secret_object(NAME, values, namespace=NAMESPACE))


def current_secret(kube: FakeKube) -> dict[str, Any]:
    secret = kube.get("secrets", NAMESPACE, NAME)
    assert secret is not None
    return secret


def argv(kube: FakeKube, idp: TestIdP, tmp_path: Path) -> list[str]:
    return [
        "controller",
        "--kubeconfig",
        str(kube.kubeconfig(tmp_path / "kubeconfig")),
        "--token-url",
        idp.token_url,
        "--ca-bundle",
        str(idp.ca_bundle),
        "--interval",
        "0.1",
        "--request-timeout",
        "1",
        "--min-refresh-interval",
        "0.5",
        "--refresh-fraction",
        "0.2",
        "--metrics-address",
        "off",
        # The refresh alone; the file server has tests of its own.
        "--files-address",
        "off",
        "--lease-namespace",
        NAMESPACE,
        "--identity",
        "replica-a",
    ]


def results(agent: AgentThread) -> dict[str, float]:
    """Refresh attempts counted so far, by result (zeros left out)."""
    return {
        sample.labels["result"]: sample.value
        for metric in agent.registry.collect()
        for sample in metric.samples
        if sample.name == REFRESHES and sample.value
    }


def counted_at(agent: AgentThread, result: str, count: int, timeout: float) -> list[float]:
    """When (time.monotonic) the controller counted its first `count` refreshes
    ending in `result`; polled every 10 ms, from zero."""
    times: list[float] = []
    deadline = time.monotonic() + timeout
    while len(times) < count:
        now = time.monotonic()
        seen = int(agent.value(REFRESHES, {"result": result}))
        times.extend([now] * (min(seen, count) - len(times)))
        if len(times) < count:
            assert now < deadline, f"{len(times)} of {count} {result!r} refreshes in {timeout} s"
            time.sleep(0.01)
    return times


def retrying_events(kube: FakeKube) -> list[dict[str, Any]]:
    return [e for e in kube.objects("events") if e["reason"] == "TokenRefreshRetrying"]


def secret_versions(kube: FakeKube, since: str) -> list[dict[str, Any]]:
    """Every state the token Secret went through after resourceVersion `since`."""
    secrets = find_resource("secrets")
    return [
        change.obj
        for change in kube.store.changes_after(int(since))
        if change.resource == secrets and change.obj["metadata"]["name"] == NAME
    ]


def ride_out(
    agent: AgentThread,
    kube: FakeKube,
    idp: TestIdP,
    seeded: dict[str, Any],
    *,
    result: str,
    failures: int,
    restore: Callable[[], None],
) -> tuple[list[float], float]:
    """Wait for `failures` attempts failing with `result`, check that nothing
    else happened meanwhile, `restore()` the IdP and wait for the refresh that
    follows; returns the failures' times and the recovery's."""
    failed = counted_at(agent, result, failures, timeout=20)
    # Old token kept: not one write to the Secret, so the pods keep the token.
    current = current_secret(kube)
    assert current["metadata"]["resourceVersion"] == seeded["metadata"]["resourceVersion"]
    assert current["data"] == seeded["data"]
    assert STATUS not in current["metadata"]["annotations"]
    assert results(agent) == {result: failures}
    # One Warning per failure streak, on the Secret, saying what failed.
    (event,) = retrying_events(kube)
    assert event["type"] == "Warning"
    assert event["involvedObject"]["kind"] == "Secret"
    assert event["involvedObject"]["name"] == NAME
    assert f"({result})" in event["message"]
    idp.lifetime = RECOVERED_LIFETIME
    restore()
    (recovered,) = counted_at(agent, "ok", 1, timeout=15)
    return failed, recovered


def check_recovery(
    agent: AgentThread, kube: FakeKube, idp: TestIdP, seeded: dict[str, Any], result: str
) -> None:
    """The new token is in the Secret (status ok) and the chain goes on: the
    next refresh, at the controller's own pace, presents the rotated refresh
    token the controller stored."""
    seed = token_of(seeded)
    wait_for(lambda: STATUS in current_secret(kube)["metadata"]["annotations"], 5)
    current = current_secret(kube)
    assert current["metadata"]["annotations"][STATUS] == "ok"
    assert token_of(current)["access_token"] != seed["access_token"]
    assert token_of(current)["refresh_token"] != seed["refresh_token"]
    wait_for(lambda: agent.value(REFRESHES, {"result": "ok"}) >= 2, 10)
    answered = [c for c in idp.calls if c.grant_type == "refresh_token" and c.status == 200]
    assert answered[0].refresh_token == seed["refresh_token"]
    stored = {
        token_of(version)["refresh_token"]
        for version in secret_versions(kube, seeded["metadata"]["resourceVersion"])
    }
    assert answered[1].refresh_token in stored - {seed["refresh_token"]}
    assert results(agent).keys() == {result, "ok"}  # no invalid_grant: the chain held
    assert len(retrying_events(kube)) == 1  # recovering is not another streak


def test_refused_backs_off_keeps_the_token_and_recovers_on_the_same_port(
    network: IsolatedIdPNetwork, idp: TestIdP, kube: FakeKube, tmp_path: Path
) -> None:
    # Nothing listens on the IdP's port: the namespace's kernel answers the
    # SYN with an RST, and connect() fails at once with ECONNREFUSED.
    idp.refuse_connections()
    seeded = seed_secret(kube, idp)
    with AgentThread(main, argv(kube, idp, tmp_path)) as agent:
        failed, recovered = ride_out(
            agent,
            kube,
            idp,
            seeded,
            result="connection",
            failures=3,
            restore=idp.accept_connections,
        )
        # Growing waits, not a tight loop (the pass interval is 0.1 s):
        # 1-2 s, then 2-4 s, then 4-8 s (plus up to a pass, minus polling).
        first, second = failed[1] - failed[0], failed[2] - failed[1]
        assert 0.9 <= first <= 2.4, failed
        assert 1.9 <= second <= 4.4, failed
        assert 3.9 <= recovered - failed[2] <= 9.0, (failed, recovered)
        assert idp.token_calls("refresh_token", status=200) >= 1
        # Refused connections never reached the IdP.
        assert idp.token_calls("refresh_token") == idp.token_calls("refresh_token", status=200)
        check_recovery(agent, kube, idp, seeded, "connection")


def test_a_cut_link_times_out_backs_off_keeps_the_token_and_recovers(
    network: IsolatedIdPNetwork, idp: TestIdP, kube: FakeKube, tmp_path: Path
) -> None:
    # Packets to the namespace vanish (IsolatedIdPNetwork.cut: the namespace
    # cannot route anything back). The kernel here never answers EHOSTUNREACH
    # for it: the veth stays up and ARP keeps working, so the host's neighbour
    # entry stays valid and nothing tells connect() the peer is gone; it waits
    # for a SYN-ACK until --request-timeout (1 s), and requests raises
    # ConnectTimeout: result "timeout". (Setting the namespace's end of the
    # veth down instead fails ARP and gives EHOSTUNREACH after about 3 s.)
    network.cut()
    seeded = seed_secret(kube, idp)
    with AgentThread(main, argv(kube, idp, tmp_path)) as agent:
        failed, recovered = ride_out(
            agent, kube, idp, seeded, result="timeout", failures=3, restore=network.restore
        )
        # The wait runs from each failure, and each attempt then takes the 1 s
        # timeout: failures are spaced by the backoff plus 1 s; the recovering
        # attempt answers at once, 4-8 s after the third failure.
        first, second = failed[1] - failed[0], failed[2] - failed[1]
        assert 1.9 <= first <= 3.4, failed
        assert 2.9 <= second <= 5.4, failed
        assert 3.9 <= recovered - failed[2] <= 9.0, (failed, recovered)
        # The SYNs reached the namespace but no connection was ever made.
        assert idp.token_calls("refresh_token") == idp.token_calls("refresh_token", status=200)
        check_recovery(agent, kube, idp, seeded, "timeout")


def test_503_with_retry_after_is_honoured_keeps_the_token_and_recovers(
    network: IsolatedIdPNetwork, idp: TestIdP, kube: FakeKube, tmp_path: Path
) -> None:
    # The IdP answers (TLS and HTTP work), with 503 and Retry-After: 3, as an
    # IdP in maintenance or its proxy does; the refresh token is not consumed.
    idp.fail_token_endpoint(503, times=None, retry_after=3)
    seeded = seed_secret(kube, idp)
    with AgentThread(main, argv(kube, idp, tmp_path)) as agent:
        failed, recovered = ride_out(
            agent,
            kube,
            idp,
            seeded,
            result="http_5xx",
            failures=2,
            restore=lambda: idp.fail_token_endpoint(times=0),
        )
        # Backoff alone would wait 1-2 s after the first failure: Retry-After
        # makes it 3 s. After the second, backoff says 2-4 s, Retry-After 3 s.
        assert 2.9 <= failed[1] - failed[0] <= 3.5, failed
        assert 2.9 <= recovered - failed[1] <= 5.0, (failed, recovered)
        assert idp.token_calls("refresh_token", status=503) == 2
        check_recovery(agent, kube, idp, seeded, "http_5xx")
