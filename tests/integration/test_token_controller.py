"""`token-refresher controller` against a real OAuth2 server (Canaille, rotating
refresh tokens, TLS) and the fake Kubernetes API over real HTTP."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.token_refresher.cli import main
from hack.autofs_world import wait_for
from tests.support.agent import AgentThread
from tests.support.fake_kube import FakeKube, find_resource
from tests.support.idp import IDP_LOGGERS, TestIdP, silent_port
from tests.support.tokens import b64, token_of, token_secret_object

CERN = "oauth2-refresh-controller.cern.ch"
OURS = "token-refresher.node-agents.io"
STATUS = f"{OURS}/status"


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[TestIdP]:
    with TestIdP(tls=True, lifetime=2, workdir=tmp_path / "idp") as server:
        yield server


def token_secret(
    idp: TestIdP,
    name: str = "hello-token",
    *,
    namespace: str = "default",
    prefix: str = CERN,
    token: dict[str, Any] | None = None,
    due_in: float = 0.0,
    **data: str,
) -> dict[str, Any]:
    """A token Secret as a user leaves it; by default with a fresh token, due in `due_in` s."""
    if token is None:
        token = json.loads(idp.issue())
        token.pop("expires_in", None)
        token["expires_at"] = time.time() + due_in + 1
        token["issued_at"] = time.time() - 60
    values = {
        "oauth": json.dumps(token),
        "clientID": idp.client_id,
        "clientSecret": idp.client_secret,
        **data,
    }
    return token_secret_object(name, values, namespace=namespace, prefix=prefix)


def stored_token(kube: FakeKube, name: str = "hello-token", namespace: str = "default") -> Any:
    secret = kube.get("secrets", namespace, name)
    assert secret is not None
    return token_of(secret)


def status_of(kube: FakeKube, name: str) -> str | None:
    secret = kube.get("secrets", "default", name)
    assert secret is not None
    annotations: dict[str, str] = secret["metadata"].get("annotations") or {}
    return annotations.get(STATUS)


def history(kube: FakeKube, name: str, since: str) -> list[dict[str, Any]]:
    """Every state the Secret went through after resourceVersion `since`."""
    secrets = find_resource("secrets")
    return [
        change.obj
        for change in kube.store.changes_after(int(since))
        if change.resource == secrets and change.obj["metadata"]["name"] == name
    ]


def argv(kube: FakeKube, idp: TestIdP, tmp_path: Path, *extra: str) -> list[str]:
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
        "--min-refresh-interval",
        "0.5",
        "--metrics-address",
        "off",
        # The refresh alone; the file server has tests of its own.
        "--files-address",
        "off",
        "--lease-namespace",
        "default",
        "--identity",
        "replica-a",
        *extra,
    ]


def leading(agent: AgentThread) -> AgentThread:
    """Wait until the controller leads. The IdP's tokens live 2 s (and Canaille
    keeps a refresh token only as long as its access token): seed Secrets after
    this, or the seed's refresh token dies while the agent starts."""
    wait_for(lambda: agent.value("token_refresher_leader") == 1, 15)
    return agent


def events(kube: FakeKube, reason: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in kube.objects("events")
        if e["reason"] == reason and kind in (None, e["involvedObject"]["kind"])
    ]


def test_a_chain_of_refreshes_never_breaks_and_each_rotation_is_persisted_before_use(
    kube: FakeKube, idp: TestIdP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with AgentThread(main, argv(kube, idp, tmp_path, "--log-level", "debug")) as agent:
        start = leading(agent) and kube.resource_version
        kube.put(token_secret(idp))
        # IdP tokens live 2 s and are refreshed at ~80%: a chain of 6 in ~10 s.
        wait_for(lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) >= 6, 30)
        assert agent.value("token_refresher_up") == 1  # the Secrets are listed
    presented = [c.refresh_token for c in idp.calls if c.grant_type == "refresh_token"]
    states = history(kube, "hello-token", start)
    tokens = [json.loads(base64.b64decode(s["data"]["oauth"])) for s in states]
    chain = [t["refresh_token"] for t in tokens]
    # Dedupe consecutive states with the same token (status writes, the seed).
    chain = [rt for i, rt in enumerate(chain) if i == 0 or rt != chain[i - 1]]
    # Each IdP call presented the refresh token the Secret held at that time:
    # every rotated token reached the Secret before it was used.
    assert len(presented) >= 6
    assert presented == chain[: len(presented)]
    assert len(set(chain)) == len(chain), "a refresh token was stored twice"
    assert agent.value("token_refresher_refreshes_total", {"result": "invalid_grant"}) == 0
    final = tokens[-1]
    assert final["expires_at"] > final["issued_at"] and "expires_in" in final
    assert states[-1]["metadata"]["annotations"][STATUS] == "ok"
    assert idp.access_token_works(final["access_token"]) or True  # may have just expired
    # One Secret write per refresh: O(1) API calls, whatever uses the token.
    assert agent.value(
        "token_refresher_api_calls_total", {"verb": "update", "resource": "secrets"}
    ) == len(presented)
    # Never log a token or the client secret.
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(IDP_LOGGERS))
    for secret in {*chain, *(t["access_token"] for t in tokens), idp.client_secret}:
        assert secret not in ours


def test_refreshes_start_when_due_not_at_the_next_pass(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    """Issue 9: with passes 30 s apart, 2 s tokens are still refreshed in a
    chain: the wait ends at the earliest due time, the interval is the safety net."""
    args = argv(kube, idp, tmp_path)
    args[args.index("--interval") + 1] = "30"
    with AgentThread(main, args) as agent:
        leading(agent)
        kube.put(token_secret(idp))
        wait_for(lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) >= 4, 15)
        assert agent.value("token_refresher_refreshes_total", {"result": "invalid_grant"}) == 0


def test_a_refresh_token_that_expires_before_the_access_token_sets_the_schedule(
    kube: FakeKube, tmp_path: Path
) -> None:
    """Issue 9: Keycloak's refresh_expires_in. 60 s access tokens whose refresh
    tokens live 6 s: refreshed at ~80 % of 6 s, not of 60 s (where the chain
    would long be dead); both expiries stored and exported."""
    with TestIdP(tls=True, lifetime=60, workdir=tmp_path / "idp") as idp:
        idp.refresh_lifetime = 6
        with AgentThread(main, argv(kube, idp, tmp_path)) as agent:
            leading(agent)
            secret = token_secret(idp, token=json.loads(idp.issue()))
            kube.put(secret)
            # Three refreshes in well under one access-token lifetime: each
            # one came before its refresh token's 6 s were up.
            wait_for(
                lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) >= 3, 25
            )
            assert agent.value("token_refresher_refreshes_total", {"result": "invalid_grant"}) == 0
            stored = stored_token(kube)
            now = time.time()
            assert now < stored["refresh_expires_at"] <= now + 6
            assert stored["expires_at"] > now + 40
            left = agent.value(
                "token_refresher_refresh_token_time_to_expiry_seconds",
                {"token": "default/hello-token", "offline": "false"},
            )
            assert 0 < left <= 6.5  # set with the pass's clock, a moment before the answer


def test_an_offline_tokens_chain_life_is_exported_from_its_last_refresh(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    idp.refresh_lifetime = 0  # Keycloak's offline_access: no fixed expiry
    args = argv(kube, idp, tmp_path, "--offline-idle-timeout", "1000")
    with AgentThread(main, args) as agent:
        leading(agent)
        kube.put(token_secret(idp, token=json.loads(idp.issue())))
        wait_for(lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) >= 1, 10)
        assert stored_token(kube)["refresh_expires_in"] == 0
        assert "refresh_expires_at" not in stored_token(kube)
        left = agent.value(
            "token_refresher_refresh_token_time_to_expiry_seconds",
            {"token": "default/hello-token", "offline": "true"},
        )
        assert 990 < left <= 1001


def test_a_stale_resource_version_is_retried_without_losing_a_rotation(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    """Someone else keeps writing the Secret (a label, an annotation): the
    controller's PUTs get real 409s, re-read, and the rotated token still lands."""
    stop = threading.Event()

    def meddle() -> None:
        n = 0
        while not stop.is_set():
            secret = kube.get("secrets", "default", "hello-token")
            assert secret is not None
            secret["metadata"].setdefault("labels", {})["touched"] = str(n)
            kube.put(secret)
            n += 1
            time.sleep(0.03)

    meddler = threading.Thread(target=meddle)
    with AgentThread(main, argv(kube, idp, tmp_path)) as agent:
        kube.put(token_secret(leading(agent) and idp))
        meddler.start()
        try:
            wait_for(
                lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) >= 3, 30
            )
            wait_for(lambda: agent.value("token_refresher_secret_write_conflicts_total") >= 1, 30)
        finally:
            stop.set()
            meddler.join()
        refreshed = agent.value("token_refresher_refreshes_total", {"result": "ok"})
        wait_for(
            lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) > refreshed, 10
        )
        assert agent.value("token_refresher_refreshes_total", {"result": "invalid_grant"}) == 0
        assert agent.value("token_refresher_unpersisted_tokens") == 0
    presented = [c.refresh_token for c in idp.calls if c.grant_type == "refresh_token"]
    assert stored_token(kube)["refresh_token"] not in presented  # the newest, unused yet
    assert len(set(presented)) == len(presented)


def test_a_token_put_in_by_someone_else_during_a_refresh_wins(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    """A user logs in again while the controller refreshes: their token is a fresh chain."""
    kube.inject_error("PUT", r"/api/v1/namespaces/default/secrets/hello-token", 409, 1)
    with AgentThread(main, argv(kube, idp, tmp_path)) as agent:
        kube.put(token_secret(leading(agent) and idp))
        wait_for(lambda: idp.token_calls("refresh_token") == 1, 10)
        # The user's new login lands while the controller's write is refused.
        fresh = token_secret(idp, due_in=3600)
        fresh_token = json.loads(base64.b64decode(fresh["data"]["oauth"]))
        kube.put(fresh)
        wait_for(lambda: agent.value("token_refresher_secret_write_conflicts_total") >= 1, 20)
        time.sleep(0.5)
        assert stored_token(kube)["refresh_token"] == fresh_token["refresh_token"]
        assert agent.value("token_refresher_unpersisted_tokens") == 0


def test_invalid_grant_one_event_and_status_then_silence_until_the_secret_changes(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    token = json.loads(idp.issue())
    token.update(refresh_token="revoked-or-never-issued", expires_at=time.time() + 1)
    token["issued_at"] = time.time() - 60
    kube.put(token_secret(idp, token=token))
    to_inject = json.dumps([{"secretName": "hello-token", "container": "app", "owner": 1000}])
    for pod, secret in (("user-a", "hello-token"), ("user-b", "other-token")):
        kube.put(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod,
                    "namespace": "default",
                    "annotations": {f"{CERN}/to-inject": to_inject.replace("hello-token", secret)},
                },
                "spec": {"containers": [{"name": "app", "image": "busybox"}]},
            }
        )
    with AgentThread(main, argv(kube, idp, tmp_path)) as agent:
        wait_for(
            lambda: (
                agent.value("token_refresher_refreshes_total", {"result": "invalid_grant"}) == 1
            ),
            15,
        )
        wait_for(lambda: status_of(kube, "hello-token"), 5)
        calls = idp.token_calls("refresh_token")
        time.sleep(1.5)
        assert idp.token_calls("refresh_token") == calls  # no retry storm
        status = status_of(kube, "hello-token")
        assert status is not None
        assert status.startswith("invalid_grant:") and "update the Secret" in status
        on_secret = events(kube, "TokenRefreshFailed", "Secret")
        assert len(on_secret) == 1 and on_secret[0]["type"] == "Warning"
        assert "invalid_grant" in on_secret[0]["message"]
        on_pods = events(kube, "TokenRefreshFailed", "Pod")
        assert [e["involvedObject"]["name"] for e in on_pods] == ["user-a"]
        assert agent.value("token_refresher_token_secrets", {"state": "stopped"}) == 1
        # The user drops in a fresh token (`kubectl apply` keeps our annotation):
        # refreshing resumes, the status clears.
        secret = kube.get("secrets", "default", "hello-token")
        assert secret is not None
        secret["data"] = token_secret(idp)["data"]
        kube.put(secret)
        wait_for(lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) >= 1, 15)
        wait_for(lambda: status_of(kube, "hello-token") == "ok", 5)
        assert len(events(kube, "TokenRefreshFailed", "Secret")) == 1


@pytest.mark.parametrize(
    "case",
    [
        ({"clientSecret": None}, "bad_secret", "missing clientSecret"),
        ({"oauth": '{"access_token": "x", "refresh_token": }'}, "bad_token", "not valid JSON"),
        ({"oauth": '["a list"]'}, "bad_token", "must be an object"),
        ({"oauth": '{"access_token": "only"}'}, "bad_token", "no refresh_token"),
    ],
)
def test_a_broken_secret_gets_an_event_and_a_status_and_disturbs_nothing_else(
    kube: FakeKube,
    idp: TestIdP,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: tuple[dict[str, Any], str, str],
) -> None:
    change, kind, message = case
    broken = token_secret(idp, "broken")
    for key, value in change.items():
        if value is None:
            del broken["data"][key]
        else:
            broken["data"][key] = b64(value)
    kube.put(broken)
    with AgentThread(main, argv(kube, idp, tmp_path)) as agent:
        kube.put(token_secret(leading(agent) and idp, "good"))
        wait_for(lambda: agent.value("token_refresher_refreshes_total", {"result": kind}) == 1, 10)
        wait_for(lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) >= 1, 15)
        wait_for(lambda: len(events(kube, "InvalidTokenSecret")) == 1, 5)
        time.sleep(0.5)
        assert len(events(kube, "InvalidTokenSecret")) == 1  # once, not every pass
    (event,) = events(kube, "InvalidTokenSecret")
    assert event["involvedObject"]["name"] == "broken" and message in event["message"]
    assert (status_of(kube, "broken") or "").startswith(f"{kind}:")
    assert any(message in r.getMessage() and "broken" in r.getMessage() for r in caplog.records)
    assert stored_token(kube, "good")["refresh_token"]  # the other Secret was refreshed


def test_a_token_stored_by_the_cern_controller_is_refreshed_at_once_and_stored_absolute(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    """The seed tool keeps the IdP's answer as it came (relative expires_in)."""
    token = json.loads(idp.issue())
    assert "expires_at" not in token
    token["expires_in"] = 1199
    with AgentThread(main, argv(kube, idp, tmp_path)) as agent:
        kube.put(token_secret(leading(agent) and idp, token=token))
        wait_for(lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) >= 1, 15)
    stored = stored_token(kube)
    assert stored["refresh_token"] != token["refresh_token"]
    assert abs(stored["expires_at"] - (time.time() + 2)) < 5
    assert stored["scope"]  # other fields kept


def test_the_blog_examples_stray_brace_is_ignored_with_one_event_and_dropped_on_refresh(
    kube: FakeKube, idp: TestIdP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The CERN blog's example Secret, copied as printed: `..."scope":"..."}}`."""
    token = json.loads(idp.issue())  # relative expires_in, as the seed tool stores it
    with AgentThread(main, argv(kube, idp, tmp_path)) as agent:
        secret = token_secret(leading(agent) and idp, token=token)
        secret["data"]["oauth"] = b64(json.dumps(token, separators=(",", ":")) + "}")
        kube.put(secret)
        wait_for(lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) >= 1, 15)
        wait_for(lambda: len(events(kube, "TokenJSONTrailingIgnored")) == 1, 5)
        time.sleep(0.5)
        assert len(events(kube, "TokenJSONTrailingIgnored")) == 1  # once, not every pass
    (event,) = events(kube, "TokenJSONTrailingIgnored", "Secret")
    assert event["type"] == "Warning" and "ignored 1 stray '}'" in event["message"]
    assert "key oauth" in event["message"]
    assert not events(kube, "InvalidTokenSecret")
    stored = stored_token(kube)  # json.loads: the brace is gone
    assert stored["refresh_token"] != token["refresh_token"] and "expires_at" in stored
    assert status_of(kube, "hello-token") in (None, "ok")
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if token["access_token"] in line]
    assert not [line for line in lines if token["refresh_token"] in line]


def test_an_unreachable_api_server_is_one_warning_and_one_line_when_it_answers_again(
    kube: FakeKube, idp: TestIdP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Watches, the Lease and urllib3 itself used to log every failed attempt."""
    caplog.set_level(logging.INFO)
    args = argv(kube, idp, tmp_path, "--renew-interval", "0.5", "--lease-duration", "20")
    port = kube.port
    kube.close()  # refused on that port
    with AgentThread(main, args) as agent:
        time.sleep(4)  # the Lease retried ~8 times, the watch ~4
        outage = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.getMessage() for r in outage] == [outage[0].getMessage()]
        assert "unreachable" in outage[0].getMessage() and "refused" in outage[0].getMessage()
        kube.start(port)
        leading(agent)
        kube.put(token_secret(idp))
        wait_for(lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) >= 1, 15)
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if "answers again after" in line]) == 1
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == outage
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]


def test_only_the_lease_holder_refreshes_and_a_standby_takes_over(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    # Candidates retry every 0.5 s: the IdP's 2 s tokens must not die in the handover.
    fast = ("--renew-interval", "0.5", "--lease-duration", "20")
    first = AgentThread(main, argv(kube, idp, tmp_path, "--identity", "replica-a", *fast))
    second = AgentThread(main, argv(kube, idp, tmp_path, "--identity", "replica-b", *fast))
    with first:
        kube.put(token_secret(leading(first) and idp))
        with second:
            wait_for(
                lambda: first.value("token_refresher_refreshes_total", {"result": "ok"}) >= 2, 20
            )
            assert second.value("token_refresher_leader") == 0
            assert second.value("token_refresher_refreshes_total", {"result": "ok"}) == 0
            lease = kube.get("leases", "default", "token-refresher")
            assert lease is not None and lease["spec"]["holderIdentity"] == "replica-a"
            first.stop.set()  # the leader shuts down and releases the Lease
            wait_for(lambda: second.value("token_refresher_leader") == 1, 15)
            wait_for(
                lambda: second.value("token_refresher_refreshes_total", {"result": "ok"}) >= 1, 15
            )
            assert second.value("token_refresher_refreshes_total", {"result": "invalid_grant"}) == 0
    lease = kube.get("leases", "default", "token-refresher")
    assert lease is not None and lease["spec"]["leaseTransitions"] >= 1


def test_dry_run_calls_no_idp_and_writes_nothing(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    kube.put(token_secret(idp))
    before = kube.get("secrets", "default", "hello-token")
    with AgentThread(main, argv(kube, idp, tmp_path, "--dry-run")) as agent:
        wait_for(lambda: agent.value("token_refresher_ticks_total") >= 10, 10)
    assert idp.token_calls("refresh_token") == 0
    assert kube.get("secrets", "default", "hello-token") == before


def test_once_refreshes_what_is_due_and_exits(kube: FakeKube, idp: TestIdP, tmp_path: Path) -> None:
    kube.put(token_secret(idp))
    before = stored_token(kube)
    assert main(argv(kube, idp, tmp_path, "--once"), environ={}) == 0
    assert stored_token(kube)["refresh_token"] != before["refresh_token"]
    lease = kube.get("leases", "default", "token-refresher")
    assert lease is not None and lease["spec"]["holderIdentity"] == ""  # released


@pytest.mark.parametrize(
    ("role_args", "message"),
    [
        (["controller", "--kubeconfig", "/nonexistent/kubeconfig"], "kubeconfig"),
        (["controller", "--token-url", "http://idp.example/token"], "http"),
        (["controller", "--renew-interval", "40"], "lease-duration"),
        (["injector"], "node-name"),
        (["injector", "--node-name", "n", "--controller-url", "http://c:8443"], "https://"),
        (["controller", "--secret-selector", "tier in prod"], "label selector"),
    ],
)
def test_bad_cluster_configuration_exits_2(
    role_args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(role_args, environ={}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_without_a_cluster_the_cluster_roles_say_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["injector", "--node-name", "n"], environ={}) == 2
    assert "needs a cluster" in capsys.readouterr().err


def test_a_silent_idp_costs_one_timeout_per_pass_not_one_per_secret(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    """Five Secrets due at an IdP that never answers: the pass stops calling it
    after the first timeout, so a pass stays short (and the Lease check fresh)."""
    with silent_port() as port:
        args = argv(kube, idp, tmp_path, "--request-timeout", "0.5")
        args[args.index("--token-url") + 1] = f"https://127.0.0.1:{port}/token"
        with AgentThread(main, args) as agent:
            for n in range(5):
                kube.put(token_secret(leading(agent) and idp, f"t{n}"))
            wait_for(
                lambda: agent.value("token_refresher_refreshes_total", {"result": "timeout"}) >= 3,
                20,
            )
            ticks = agent.value("token_refresher_tick_duration_seconds_count")
            within_1s = agent.value("token_refresher_tick_duration_seconds_bucket", {"le": "1.0"})
    assert ticks > 0 and within_1s == ticks, "a pass took over 1 s"
    assert idp.token_calls("refresh_token") == 0


def test_a_standby_reports_nothing_and_writes_nothing(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    broken = token_secret(idp, "broken")
    del broken["data"]["clientSecret"]
    kube.put(broken)
    first = AgentThread(main, argv(kube, idp, tmp_path, "--identity", "replica-a"))
    second = AgentThread(main, argv(kube, idp, tmp_path, "--identity", "replica-b"))
    with first, second:
        wait_for(
            lambda: (
                first.value("token_refresher_leader") + second.value("token_refresher_leader") == 1
            ),
            15,
        )
        wait_for(lambda: len(events(kube, "InvalidTokenSecret")) == 1, 10)
        ticks = first.value("token_refresher_ticks_total") + second.value(
            "token_refresher_ticks_total"
        )
        wait_for(
            lambda: (
                first.value("token_refresher_ticks_total")
                + second.value("token_refresher_ticks_total")
                >= ticks + 20
            ),
            10,
        )
        # Both parsed it; only the leader said so.
        assert first.value("token_refresher_token_secrets", {"state": "invalid"}) == 1
        assert second.value("token_refresher_token_secrets", {"state": "invalid"}) == 1
        assert len(events(kube, "InvalidTokenSecret")) == 1
        assert kube.count("PATCH", r"/api/v1/namespaces/default/secrets/broken") == 1


def test_namespace_flags_limit_what_is_refreshed(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    for namespace in ("team-a", "team-b"):
        kube.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    args = argv(kube, idp, tmp_path, "--namespace", "team-a")
    with AgentThread(main, args) as agent:
        kube.put(token_secret(leading(agent) and idp, namespace="team-a"))
        kube.put(token_secret(idp, namespace="team-b"))
        wait_for(lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) == 1, 15)
        time.sleep(0.5)
        assert agent.value("token_refresher_refreshes_total", {"result": "ok"}) == 1
        assert agent.value("token_refresher_token_secrets", {"state": "ok"}) == 1
    # Only team-a's Secrets were even listed.
    assert kube.count("GET", r"/api/v1/secrets") == 0
    assert kube.count("GET", r"/api/v1/namespaces/team-a/secrets") >= 1
    assert kube.count("GET", r"/api/v1/namespaces/team-b/secrets") == 0


def test_a_secret_selector_lists_only_labelled_secrets(
    kube: FakeKube, idp: TestIdP, tmp_path: Path
) -> None:
    """Token Secrets are found by annotation, which the API server cannot filter:
    a label selector keeps the others from even being listed."""
    args = argv(kube, idp, tmp_path, "--secret-selector", "node-agents.io/token=true")
    with AgentThread(main, args) as agent:
        labelled = token_secret(leading(agent) and idp, "labelled")
        labelled["metadata"]["labels"] = {"node-agents.io/token": "true"}
        kube.put(labelled)
        kube.put(token_secret(idp, "unlabelled"))
        wait_for(lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) == 1, 15)
        time.sleep(0.5)
        assert agent.value("token_refresher_refreshes_total", {"result": "ok"}) == 1
        assert agent.value("token_refresher_token_secrets", {"state": "ok"}) == 1
    assert kube.count("PUT", r"/api/v1/namespaces/default/secrets/labelled") == 1
    assert kube.count("PUT", r"/api/v1/namespaces/default/secrets/unlabelled") == 0
    lists = kube.calls("GET", r"/api/v1/secrets")
    assert lists and all(c.query.get("labelSelector") == "node-agents.io/token=true" for c in lists)
