"""The controller's file server over real TLS and HTTP against the fake API: who gets
which files, refusals, push to exactly the streams concerned, and never a refresh
token or client secret in any byte a client receives."""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agents.token_refresher.claims import ClaimVerifier
from agents.token_refresher.config import ControllerConfig, FilesConfig
from agents.token_refresher.controller import Controller
from agents.token_refresher.fileserver import (
    FileProblem,
    FileServer,
    Renderer,
    TemplateCache,
    WatchedSecrets,
    fair_shares,
)
from agents.token_refresher.metrics import ControllerMetrics, FilesMetrics
from agents.token_refresher.nodeauth import NodeAuthenticator
from agents.token_refresher.spec import MAX_FILE_BYTES
from hack.autofs_world import wait_for
from tests.support.fake_kube import FakeKube
from tests.support.token_files import (
    CLIENT_SECRET,
    CONTROLLER_NS,
    REFRESH_TOKEN,
    FilesStream,
    LoopbackCerts,
    Received,
    access_token,
    claim,
    injector_token,
    make_certs,
    put_injector,
    put_pod,
    put_token_secret,
)

FAST = FilesConfig(
    host="127.0.0.1",
    port=0,
    heartbeat=0.2,
    recheck=0.5,
    stream_lifetime=30.0,
    pod_check_ttl=0.5,
    template_refresh=0.3,
    send_timeout=2.0,
)


def _no_refresh(*args: Any) -> Any:
    raise AssertionError("the file server tests refresh nothing")


@dataclass
class Files:
    kube: FakeKube
    server: FileServer
    controller: Controller
    registry: CollectorRegistry
    certs: LoopbackCerts
    received: Received

    def open(self, token: str | None, pods: list[dict[str, Any]], **kw: Any) -> FilesStream:
        stream = FilesStream(
            self.server.port,
            token,
            [p if "uid" in p and "metadata" not in p else claim(p) for p in pods],
            received=self.received,
            context=self.certs.client_context(),
            **kw,
        )
        self.streams.append(stream)
        return stream

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def __post_init__(self) -> None:
        self.streams: list[FilesStream] = []


def _files(
    kube: FakeKube,
    api: Any,
    tmp_path: Path,
    config: FilesConfig = FAST,
    *,
    controller_config: ControllerConfig | None = None,
    start: bool = True,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> Iterator[Files]:
    registry = CollectorRegistry()
    metrics = FilesMetrics(registry)
    controller = Controller(
        api,
        controller_config or ControllerConfig(),
        refresh_fn=_no_refresh,
        metrics=ControllerMetrics(registry),
        elector=None,
    )
    secrets = WatchedSecrets(controller.caches)
    renderer = Renderer(
        secrets,
        TemplateCache(api, refresh=config.template_refresh),
        secret_selector=controller.config.secret_selector,
        max_file_bytes=max_file_bytes,
    )
    certs = make_certs()
    server = FileServer(
        config,
        authenticator=NodeAuthenticator(
            api,
            namespace=CONTROLLER_NS,
            metrics=metrics,
            pod_ttl=config.pod_check_ttl,
            review_ttl=config.review_ttl,
        ),
        verifier=ClaimVerifier(api, metrics=metrics),
        renderer=renderer,
        metrics=metrics,
        ssl_context=certs.server_context(),
        rng=random.Random(1),
    )
    controller.add_listener(server.secret_changed)
    if start:
        controller.start()
        assert controller.wait_synced(10)
    server.start()
    files = Files(kube, server, controller, registry, certs, Received())
    try:
        yield files
    finally:
        for stream in files.streams:
            stream.close()
        server.close()
        controller.stop()
        # Whatever a test saw: never a refresh token or a client secret.
        if files.received.chunks:
            files.received.assert_clean(REFRESH_TOKEN, CLIENT_SECRET)


@pytest.fixture
def files(kube: FakeKube, api: Any, tmp_path: Path) -> Iterator[Files]:
    yield from _files(kube, api, tmp_path)


APP = [{"secretName": "tok", "container": "app", "owner": 1000}]


def _content(pod: dict[str, Any]) -> str:
    (file,) = pod["files"]
    assert file["problem"] is None, file["problem"]
    return base64.b64decode(file["content"]).decode()


def test_a_node_gets_the_files_of_its_own_pods_only(files: Files) -> None:
    kube = files.kube
    secret = put_token_secret(kube, "tok", "apps", at := access_token("one"), expires_at=2e9)
    mine = put_pod(kube, "mine", "apps", "n1", inject=APP)
    theirs = put_pod(kube, "theirs", "apps", "n2", inject=APP)
    injector = put_injector(kube, "n1")
    stream = files.open(injector_token(kube, injector), [mine, theirs])
    assert stream.status == 200
    assert stream.response.headers["Content-Type"] == "application/x-ndjson"
    snapshot = stream.snapshot()
    assert snapshot["node"] == "n1"
    assert snapshot["revision"] == 1
    (pod,) = snapshot["pods"]
    assert (pod["namespace"], pod["name"], pod["uid"]) == ("apps", "mine", mine["metadata"]["uid"])
    assert _content(pod) == at
    (file,) = pod["files"]
    assert file == {
        "container": "app",
        "path": "/tmp/oauthtk_1000",
        "mode": 0o400,
        "owner": 1000,
        "group": 1000,
        "secret": "tok",
        "content": base64.b64encode(at.encode()).decode(),
        "stamp": [2e9, int(secret["metadata"]["resourceVersion"])],
        "problem": None,
    }
    assert snapshot["refused"] == [
        {
            "namespace": "apps",
            "name": "theirs",
            "uid": theirs["metadata"]["uid"],
            "reason": "other_node",
            "message": "pod apps/theirs is not on node n1",
        }
    ]
    assert files.value("token_refresher_files_refused_pods_total", reason="other_node") == 1
    assert files.value("token_refresher_files_requests_total", outcome="ok") == 1
    assert files.value("token_refresher_files_streams") == 1
    assert files.value("token_refresher_files_snapshots_sent_total") == 1
    # Nothing else comes while nothing changes: heartbeats only.
    assert {line["type"] for line in stream.lines_for(0.5)} == {"heartbeat"}


def test_forged_and_unknown_claims_are_refused_and_counted(files: Files) -> None:
    kube = files.kube
    put_token_secret(kube, "tok", "apps", access_token("x"))
    mine = put_pod(kube, "mine", "apps", "n1", inject=APP)
    injector = put_injector(kube, "n1")
    forged = claim(mine, uid="00000000-0000-0000-0000-000000000000")
    unknown = claim(mine, name="ghost")
    stream = files.open(injector_token(kube, injector), [forged, unknown])
    snapshot = stream.snapshot()
    assert snapshot["pods"] == []
    assert [(r["name"], r["reason"]) for r in snapshot["refused"]] == [
        ("mine", "uid_mismatch"),
        ("ghost", "not_found"),
    ]
    assert files.value("token_refresher_files_refused_pods_total", reason="uid_mismatch") == 1
    assert files.value("token_refresher_files_refused_pods_total", reason="not_found") == 1


def test_a_secret_no_pod_of_the_node_uses_is_never_served(files: Files) -> None:
    """Node n1 wants Secret apps/wanted, which only a pod of n2 uses: claiming that
    pod, a pod of its own under another resourceVersion, or a pod of its own that
    names `wanted` from another namespace gets no byte of it."""
    kube = files.kube
    put_token_secret(kube, "tok", "apps", mine_at := access_token("mine"))
    put_token_secret(kube, "wanted", "apps", wanted := access_token("wanted"))
    mine = put_pod(kube, "mine", "apps", "n1", inject=APP)
    theirs = put_pod(kube, "theirs", "apps", "n2", inject=[{**APP[0], "secretName": "wanted"}])
    # A tenant's pod on n1 naming `wanted`: Secrets are looked up in the pod's namespace.
    tenant = put_pod(kube, "tenant", "evil", "n1", inject=[{**APP[0], "secretName": "wanted"}])
    token = injector_token(kube, put_injector(kube, "n1"))
    stream = files.open(
        token,
        [
            claim(theirs),
            claim(mine, resourceVersion="1"),  # read again: still its own annotation
            tenant,
        ],
    )
    snapshot = stream.snapshot()
    assert [(r["name"], r["reason"]) for r in snapshot["refused"]] == [("theirs", "other_node")]
    pods = {p["name"]: p for p in snapshot["pods"]}
    assert _content(pods["mine"]) == mine_at
    assert [f["secret"] for f in pods["mine"]["files"]] == ["tok"]
    (file,) = pods["tenant"]["files"]
    assert (file["content"], file["problem"]["reason"]) == (None, "no_secret")
    assert "namespace evil" in file["problem"]["message"]
    # A change of `wanted` is pushed to nobody on n1.
    put_token_secret(kube, "wanted", "apps", newer := access_token("wanted"))
    assert {line["type"] for line in stream.lines_for(0.6)} == {"heartbeat"}
    everything = b"".join(files.received.chunks)
    for token_value in (wanted, newer):
        assert token_value.encode() not in everything
        assert base64.b64encode(token_value.encode()) not in everything
    assert files.value("token_refresher_files_refused_pods_total", reason="other_node") == 1


def test_verified_pods_are_reused_while_their_resource_version_is_claimed(files: Files) -> None:
    kube = files.kube
    put_token_secret(kube, "tok", "apps", access_token("x"))
    mine = put_pod(kube, "mine", "apps", "n1", inject=APP)
    token = injector_token(kube, put_injector(kube, "n1"))
    path = "/api/v1/namespaces/apps/pods/mine"
    files.open(token, [mine]).snapshot()
    files.open(token, [mine]).snapshot()
    assert kube.count("GET", path) == 1
    changed = kube.put({**mine, "metadata": {**mine["metadata"], "labels": {"new": "label"}}})
    files.open(token, [changed]).snapshot()
    assert kube.count("GET", path) == 2


@pytest.mark.parametrize(
    ("case", "status", "outcome"),
    [
        ("no token", 401, "unauthenticated"),
        ("garbage token", 401, "unauthenticated"),
        ("wrong audience", 401, "unauthenticated"),
        ("expired", 401, "unauthenticated"),
        ("other ServiceAccount", 401, "unauthenticated"),
        ("deleted injector pod", 401, "unauthenticated"),
        ("not an injector pod", 403, "forbidden"),
        ("pod of another ServiceAccount", 403, "forbidden"),
    ],
)
def test_callers_that_are_no_injector_are_refused_and_counted(
    files: Files, case: str, status: int, outcome: str
) -> None:
    kube = files.kube
    put_token_secret(kube, "tok", "apps", access_token("x"))
    mine = put_pod(kube, "mine", "apps", "n1", inject=APP)
    injector = put_injector(kube, "n1")
    token: str | None
    if case == "no token":
        token = None
    elif case == "garbage token":
        token = "not-a-token"
    elif case == "wrong audience":
        token = injector_token(kube, injector, audiences=("https://kubernetes.default.svc",))
    elif case == "expired":
        token = injector_token(kube, injector, expires_in=-1)
    elif case == "other ServiceAccount":
        token = injector_token(kube, injector, service_account="default")
    elif case == "deleted injector pod":
        token = injector_token(kube, injector)
        kube.delete("pods", CONTROLLER_NS, injector["metadata"]["name"])
    elif case == "not an injector pod":
        token = injector_token(kube, put_injector(kube, "n1", labels={"app": "other"}))
    else:
        token = injector_token(kube, put_injector(kube, "n1", service_account="default"))
    stream = files.open(token, [mine])
    assert stream.status == status
    body = stream.json()
    assert body["reason"] == outcome
    assert token is None or token not in json.dumps(body)
    assert files.value("token_refresher_files_requests_total", outcome=outcome) == 1
    assert files.value("token_refresher_files_streams") == 0
    reviewed = "token_refresher_token_reviews_total"
    if case != "no token":
        rejected = outcome == "unauthenticated"
        assert files.value(reviewed, outcome="rejected") == (1 if rejected else 0)
        assert files.value(reviewed, outcome="authenticated") == (0 if rejected else 1)


INJECTOR_PODS = f"/api/v1/namespaces/{CONTROLLER_NS}/pods"
# Re-checks as in production: a stream that ends within a second was ended by
# the injector pod watch, not by its periodic re-check.
SLOW_RECHECK = replace(FAST, recheck=30.0, pod_check_ttl=30.0)


def _watched(files: Files, pod: dict[str, Any]) -> None:
    """Wait until the file server's injector pod watch holds `pod` as it is now."""
    auth = files.server.authenticator
    assert auth.wait_synced(5)
    meta = pod["metadata"]

    def held() -> bool:
        found = auth.pods.named(CONTROLLER_NS, meta["name"])
        return (
            found is not None and found["metadata"]["resourceVersion"] == (meta["resourceVersion"])
        )

    wait_for(held, 5)


def _ends_within(stream: FilesStream, seconds: float) -> None:
    started = time.monotonic()
    while stream.line() is not None:
        pass
    assert time.monotonic() - started < seconds


@pytest.mark.parametrize("change", ["deleted", "relabelled"])
def test_an_open_stream_ends_within_a_second_when_its_injector_pod_goes(
    kube: FakeKube, api: Any, tmp_path: Path, change: str
) -> None:
    gen = _files(kube, api, tmp_path, SLOW_RECHECK)
    files = next(gen)
    try:
        put_token_secret(kube, "tok", "apps", access_token("x"))
        mine = put_pod(kube, "mine", "apps", "n1", inject=APP)
        injector = put_injector(kube, "n1")
        _watched(files, injector)
        other = put_injector(kube, "n2")
        theirs = put_pod(kube, "theirs", "apps", "n2", inject=APP)
        stream = files.open(injector_token(kube, injector), [mine])
        bystander = files.open(injector_token(kube, other), [theirs])
        stream.snapshot()
        bystander.snapshot()
        if change == "deleted":
            kube.delete("pods", CONTROLLER_NS, injector["metadata"]["name"])
        else:
            # Out of --injector-selector: the label-selected watch sees it DELETED.
            kube.put({**injector, "metadata": {**injector["metadata"], "labels": {"app": "x"}}})
        _ends_within(stream, 1.0)
        wait_for(lambda: files.value("token_refresher_files_streams") == 1, 2)
        # The other node's stream goes on: heartbeats, no snapshot.
        assert {line["type"] for line in bystander.lines_for(0.5)} == {"heartbeat"}
        # Reconnecting is refused: the TokenReview (deleted: the API server
        # invalidates a pod-bound token with its pod) or the pod check (relabelled).
        again = files.open(injector_token(kube, injector), [mine])
        assert again.status == (401 if change == "deleted" else 403)
    finally:
        gen.close()


def test_an_injector_pod_the_watch_has_not_seen_yet_is_served_through_a_get(
    files: Files,
) -> None:
    kube = files.kube
    put_token_secret(kube, "tok", "apps", at := access_token("x"))
    mine = put_pod(kube, "mine", "apps", "n1", inject=APP)
    assert files.server.authenticator.wait_synced(5)
    # Just created: the watch lags behind the GET, a consistent read.
    kube.hold_watches(f"{INJECTOR_PODS}.*")
    injector = put_injector(kube, "n1")
    stream = files.open(injector_token(kube, injector), [mine])
    assert _content(stream.snapshot()["pods"][0]) == at
    assert kube.count("GET", f"{INJECTOR_PODS}/injector-n1") == 1
    kube.release_watches()
    _watched(files, injector)
    # From now on the watch answers: re-checks and new streams read nothing.
    stream.lines_for(1.2)  # two re-checks at FAST's 0.5 s
    files.open(injector_token(kube, injector), [mine]).snapshot()
    assert kube.count("GET", f"{INJECTOR_PODS}/injector-n1") == 1


def test_open_streams_cost_no_pod_read_and_no_review_in_steady_state(files: Files) -> None:
    kube = files.kube
    put_token_secret(kube, "tok", "apps", access_token("x"))
    streams = []
    for node in ("n1", "n2", "n3"):
        injector = put_injector(kube, node)
        pod = put_pod(kube, f"p-{node}", "apps", node, inject=APP)
        _watched(files, injector)
        streams.append(files.open(injector_token(kube, injector), [pod]))
    for stream in streams:
        stream.snapshot()
    kube.clear_calls()
    # Four re-checks of each stream (FAST: every 0.5 s), heartbeats meanwhile.
    for stream in streams:
        stream.lines_for(0.7)
    assert kube.count("GET", f"{INJECTOR_PODS}/.+") == 0
    assert kube.count("POST", ".*/tokenreviews") == 0
    # What is left: the watches (Secrets, injector pods) and template re-reads, if any.
    assert {c.method for c in kube.calls()} <= {"GET"}
    assert all(c.watch for c in kube.calls())
    assert files.value("token_refresher_files_streams") == 3


def test_reviews_are_cached(files: Files) -> None:
    kube = files.kube
    put_token_secret(kube, "tok", "apps", access_token("x"))
    mine = put_pod(kube, "mine", "apps", "n1", inject=APP)
    token = injector_token(kube, put_injector(kube, "n1"))
    for _ in range(3):
        stream = files.open(token, [mine])
        stream.snapshot()
        stream.close()
    assert kube.count("POST", "/apis/authentication.k8s.io/v1/tokenreviews") == 1
    assert files.value("token_refresher_token_reviews_total", outcome="authenticated") == 1


def test_a_review_the_api_cannot_answer_is_503_and_not_cached(files: Files) -> None:
    kube = files.kube
    put_token_secret(kube, "tok", "apps", access_token("x"))
    mine = put_pod(kube, "mine", "apps", "n1", inject=APP)
    token = injector_token(kube, put_injector(kube, "n1"))
    kube.inject_error("POST", ".*/tokenreviews", 500)
    stream = files.open(token, [mine])
    assert stream.status == 503
    assert stream.response.headers["Retry-After"]
    assert stream.json()["reason"] == "unavailable"
    assert files.value("token_refresher_token_reviews_total", outcome="error") == 1
    assert files.open(token, [mine]).status == 200
    assert kube.count("POST", ".*/tokenreviews") == 2


def test_a_secret_update_reaches_only_the_nodes_whose_pods_use_it(files: Files) -> None:
    kube = files.kube
    put_token_secret(kube, "tok", "apps", access_token("one"))
    put_token_secret(kube, "tok2", "apps", at2 := access_token("two"))
    one = put_pod(kube, "one", "apps", "n1", inject=APP)
    two = put_pod(kube, "two", "apps", "n2", inject=[{**APP[0], "secretName": "tok2"}])
    s1 = files.open(injector_token(kube, put_injector(kube, "n1")), [one])
    s2 = files.open(injector_token(kube, put_injector(kube, "n2")), [two])
    s1.snapshot()
    assert _content(s2.snapshot()["pods"][0]) == at2
    put_token_secret(kube, "tok", "apps", new := access_token("new"))
    started = time.monotonic()
    pushed = s1.snapshot(timeout=2)
    assert time.monotonic() - started < 1.0
    assert pushed["revision"] == 2
    assert _content(pushed["pods"][0]) == new
    assert {line["type"] for line in s2.lines_for(0.6)} == {"heartbeat"}


def test_a_template_change_pushes(files: Files) -> None:
    kube = files.kube
    put_token_secret(kube, "tok", "apps", at := access_token("x"))
    template = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "eos", "namespace": "apps"},
        "data": {"template": "oauth2:$(ACCESS_TOKEN):https://idp/userinfo"},
    }
    kube.put(template)
    pod = put_pod(kube, "p", "apps", "n1", inject=[{**APP[0], "templateConfigMapName": "eos"}])
    stream = files.open(injector_token(kube, put_injector(kube, "n1")), [pod])
    assert _content(stream.snapshot()["pods"][0]) == f"oauth2:{at}:https://idp/userinfo"
    kube.put({**template, "data": {"template": "$(TOKEN_TYPE) $(ACCESS_TOKEN)"}})
    assert _content(stream.snapshot(timeout=3)["pods"][0]) == f"Bearer {at}"


def test_templates_cannot_reach_the_refresh_token(files: Files) -> None:
    kube = files.kube
    put_token_secret(kube, "tok", "apps", access_token("x"))
    for name, text in (("var", "$(REFRESH_TOKEN)"), ("copy", f"x {REFRESH_TOKEN} y")):
        kube.put(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": "apps"},
                "data": {"template": text},
            }
        )
    pods = [
        put_pod(kube, name, "apps", "n1", inject=[{**APP[0], "templateConfigMapName": name}])
        for name in ("var", "copy")
    ]
    stream = files.open(injector_token(kube, put_injector(kube, "n1")), pods)
    problems = [pod["files"][0]["problem"] for pod in stream.snapshot()["pods"]]
    assert [p["reason"] for p in problems] == ["bad_template", "bad_template"]
    assert "unknown variables ['REFRESH_TOKEN']" in problems[0]["message"]
    assert "refresh token or client secret" in problems[1]["message"]


def test_problems_are_reported_as_the_injector_did(files: Files) -> None:
    kube = files.kube
    put_token_secret(kube, "tok", "apps", access_token("x"))
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "broken",
                "namespace": "apps",
                "annotations": {"oauth2-refresh-controller.cern.ch/is-token": "true"},
            },
            "data": {"oauth": base64.b64encode(b"{}").decode()},
        }
    )
    pods = [
        put_pod(kube, "bad-annotation", "apps", "n1", raw_inject="[{"),
        put_pod(kube, "missing", "apps", "n1", inject=[{**APP[0], "secretName": "nope"}]),
        put_pod(kube, "broken", "apps", "n1", inject=[{**APP[0], "secretName": "broken"}]),
        put_pod(
            kube, "no-template", "apps", "n1", inject=[{**APP[0], "templateConfigMapName": "x"}]
        ),
    ]
    stream = files.open(injector_token(kube, put_injector(kube, "n1")), pods)
    by_name = {pod["name"]: pod for pod in stream.snapshot()["pods"]}
    assert by_name["bad-annotation"]["problem"]["reason"] == "bad_annotation"
    assert by_name["bad-annotation"]["files"] == []
    reasons = {
        name: (pod["files"][0]["problem"]["reason"], pod["files"][0]["problem"]["message"])
        for name, pod in by_name.items()
        if pod["files"]
    }
    assert reasons == {
        "missing": (
            "no_secret",
            'no token Secret nope in namespace apps (a Secret annotated is-token: "true")',
        ),
        "broken": ("bad_secret", "token Secret broken: Secret is missing clientID, clientSecret"),
        "no-template": ("bad_template", "template ConfigMap x not found"),
    }


def test_a_secret_the_controller_does_not_watch_is_no_secret(
    kube: FakeKube, api: Any, tmp_path: Path
) -> None:
    gen = _files(kube, api, tmp_path, controller_config=ControllerConfig(namespaces=("apps",)))
    files = next(gen)
    try:
        put_token_secret(kube, "tok", "other", access_token("x"))
        pod = put_pod(kube, "p", "other", "n1", inject=APP)
        stream = files.open(injector_token(kube, put_injector(kube, "n1")), [pod])
        problem = stream.snapshot()["pods"][0]["files"][0]["problem"]
        assert problem["reason"] == "no_secret"
        # A Secret created later in a watched namespace reaches the stream at once.
        put_token_secret(kube, "tok", "apps", at := access_token("y"))
        pod2 = put_pod(kube, "p2", "apps", "n1", inject=APP)
        stream2 = files.open(injector_token(kube, put_injector(kube, "n1")), [pod2])
        assert _content(stream2.snapshot()["pods"][0]) == at
    finally:
        gen.close()


def test_bad_requests(files: Files) -> None:
    kube = files.kube
    mine = put_pod(kube, "mine", "apps", "n1", inject=APP)
    token = injector_token(kube, put_injector(kube, "n1"))
    too_many = [claim(mine, name=f"p{i}") for i in range(FAST.max_pods + 1)]
    stream = files.open(token, too_many)
    assert (stream.status, stream.json()["reason"]) == (413, "too_many_pods")
    for body in (b"{", b"[]", b'{"pods": [{"name": "x"}]}', b'{"pods": [1]}'):
        stream = files.open(token, [], body=body)
        assert (stream.status, stream.json()["reason"]) == (400, "bad_request")
    assert files.value("token_refresher_files_requests_total", outcome="too_many_pods") == 1
    assert files.value("token_refresher_files_requests_total", outcome="bad_request") == 4


def test_503_until_the_secrets_are_listed(kube: FakeKube, api: Any, tmp_path: Path) -> None:
    gen = _files(kube, api, tmp_path, start=False)
    files = next(gen)
    try:
        mine = put_pod(kube, "mine", "apps", "n1", inject=APP)
        stream = files.open(injector_token(kube, put_injector(kube, "n1")), [mine])
        assert stream.status == 503
        assert stream.response.headers["Retry-After"] == "5"
        assert stream.json()["reason"] == "unavailable"
        assert files.value("token_refresher_files_requests_total", outcome="unavailable") == 1
        assert kube.count("POST", ".*/tokenreviews") == 0
    finally:
        gen.close()


def test_a_stream_ends_cleanly_after_its_lifetime(kube: FakeKube, api: Any, tmp_path: Path) -> None:
    gen = _files(kube, api, tmp_path, replace(FAST, stream_lifetime=0.6))
    files = next(gen)
    try:
        put_token_secret(kube, "tok", "apps", access_token("x"))
        # Seen by the controller's watch first: else a second snapshot (the
        # file, after "no_secret") may come in the stream's short life.
        wait_for(lambda: files.controller.caches[0].named("apps", "tok") is not None, 10)
        mine = put_pod(kube, "mine", "apps", "n1", inject=APP)
        stream = files.open(injector_token(kube, put_injector(kube, "n1")), [mine])
        started = time.monotonic()
        lines = []
        while (line := stream.line()) is not None:
            lines.append(line["type"])
        assert 0.5 < time.monotonic() - started < 1.0
        assert lines[0] == "snapshot" and set(lines[1:]) == {"heartbeat"}
    finally:
        gen.close()


def test_a_client_that_does_not_read_holds_no_one_else(
    kube: FakeKube, api: Any, tmp_path: Path
) -> None:
    # Files over the cap: the stuck client's socket buffers must fill.
    gen = _files(
        kube, api, tmp_path, replace(FAST, send_timeout=0.5, heartbeat=5.0), max_file_bytes=4 << 20
    )
    files = next(gen)
    try:
        put_token_secret(kube, "tok", "apps", access_token("x"))
        stuck_pod = put_pod(kube, "stuck", "apps", "n1", inject=APP)
        live_pod = put_pod(kube, "live", "apps", "n2", inject=APP)
        stuck = files.open(injector_token(kube, put_injector(kube, "n1")), [stuck_pod])
        live = files.open(injector_token(kube, put_injector(kube, "n2")), [live_pod])
        stuck.snapshot()
        live.snapshot()
        # Snapshots of ~3 MB each that the stuck client never reads: its socket
        # buffers fill, its writes time out; the live stream hears every update.
        for i in range(4):
            put_token_secret(kube, "tok", "apps", big := f"{i}" * (2 << 20))
            started = time.monotonic()
            assert _content(live.snapshot(timeout=5)["pods"][0]) == big
            assert time.monotonic() - started < 1.5
        wait_for(lambda: files.value("token_refresher_files_streams") == 1, 5)
    finally:
        gen.close()


# -- issue 11: one pod per line, a node's limit shared fairly, failures contained -------


def _v2_snapshot(
    stream: FilesStream, timeout: float = 5.0
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Protocol 2: the `pod` lines up to the next `commit` line, and that line."""
    pods = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.line()
        assert line is not None, "the stream ended"
        if line["type"] == "pod":
            pods.append(line["pod"])
        elif line["type"] == "commit":
            return pods, line
    raise AssertionError("no commit in time")


def _open_v2(files: Files, token: str, pods: list[dict[str, Any]]) -> FilesStream:
    body = json.dumps({"protocol": 2, "pods": [claim(p) for p in pods]}).encode()
    return files.open(token, [], body=body)


def test_protocol_2_sends_a_line_per_pod_and_then_only_the_pods_that_changed(
    files: Files,
) -> None:
    kube = files.kube
    at1, at2 = access_token("one"), access_token("two")
    put_token_secret(kube, "one", "apps", at1)
    put_token_secret(kube, "two", "apps", at2)
    p1 = put_pod(kube, "p1", "apps", "n1", inject=[{**APP[0], "secretName": "one"}])
    p2 = put_pod(kube, "p2", "apps", "n1", inject=[{**APP[0], "secretName": "two"}])
    stream = _open_v2(files, injector_token(kube, put_injector(kube, "n1")), [p1, p2])
    assert stream.response.getheader("X-Token-Files-Protocol") == "2"
    pods, commit = _v2_snapshot(stream)
    assert sorted(_content(p) for p in pods) == sorted([at1, at2])
    assert commit["node"] == "n1" and commit["revision"] == 1
    assert sorted(commit["pods"]) == sorted([p1["metadata"]["uid"], p2["metadata"]["uid"]])
    at3 = access_token("three")
    put_token_secret(kube, "two", "apps", at3)
    pods, commit = _v2_snapshot(stream)
    assert [(p["name"], _content(p)) for p in pods] == [("p2", at3)]  # p1 is not sent again
    assert commit["revision"] == 2 and len(commit["pods"]) == 2


def test_a_nodes_limit_is_shared_fairly_between_namespaces(
    kube: FakeKube, api: Any, tmp_path: Path
) -> None:
    """One tenant's bulk takes only its share: the neighbour's small file is served."""
    gen = _files(kube, api, tmp_path, max_file_bytes=64 << 10)
    files = next(gen)
    try:
        files.server.renderer.max_node_bytes = 100_000
        for namespace in ("bulk", "calm"):
            kube.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        put_token_secret(kube, "big", "bulk", "B" * 30_000)
        put_token_secret(kube, "small", "calm", small := access_token("calm"))
        many = [
            {**APP[0], "secretName": "big", "path": f"/tmp/f{i}"} for i in range(4)
        ]  # 4 x 30 kB per pod
        pods = [put_pod(kube, f"bulk-{i}", "bulk", "n1", inject=many) for i in range(3)]
        pods.append(put_pod(kube, "calm", "calm", "n1", inject=[{**APP[0], "secretName": "small"}]))
        stream = files.open(injector_token(kube, put_injector(kube, "n1")), pods)
        by_name = {pod["name"]: pod for pod in stream.snapshot()["pods"]}
        assert _content(by_name["calm"]) == small
        bulk = [f for i in range(3) for f in by_name[f"bulk-{i}"]["files"]]
        served = [f for f in bulk if f["problem"] is None]
        refused = [f["problem"] for f in bulk if f["problem"] is not None]
        # The calm namespace's few bytes are its own; the rest of 100 kB goes to bulk.
        assert len(served) == (100_000 - len(small)) // 30_000 == 3
        assert {p["reason"] for p in refused} == {"node_limit"}
        assert "namespace bulk on node n1" in refused[0]["message"]
        assert "of the node's limit of 100000 bytes" in refused[0]["message"]
    finally:
        gen.close()


def test_fair_shares() -> None:
    assert fair_shares({"a": 10, "b": 100, "c": 100}, 150) == {"a": 10, "b": 70, "c": 70}
    assert fair_shares({"a": 10, "b": 20}, 100) == {"a": 10, "b": 20}
    assert fair_shares({"a": 100, "b": 100}, 50) == {"a": 25, "b": 25}


class _BrokenSecrets:
    """A Secret source with a bug for one Secret: what nothing foresaw."""

    def __init__(self, secrets: WatchedSecrets) -> None:
        self.secrets = secrets

    @property
    def synced(self) -> bool:
        return self.secrets.synced

    def named(self, namespace: str, name: str) -> dict[str, Any] | None:
        if name == "cursed":
            raise RuntimeError("a bug nobody foresaw")
        return self.secrets.named(namespace, name)


def test_an_unexpected_error_is_that_files_problem_logged_once(
    files: Files, caplog: pytest.LogCaptureFixture
) -> None:
    kube = files.kube
    files.server.renderer.secrets = _BrokenSecrets(files.server.renderer.secrets)  # type: ignore[assignment]
    put_token_secret(kube, "tok", "apps", at := access_token("x"))
    good = put_pod(kube, "good", "apps", "n1", inject=APP)
    cursed = put_pod(
        kube,
        "cursed",
        "apps",
        "n1",
        inject=[{**APP[0], "secretName": "cursed"}, {**APP[0], "path": "/tmp/other"}],
    )
    for _ in range(2):
        stream = files.open(injector_token(kube, put_injector(kube, "n1")), [good, cursed])
        by_name = {pod["name"]: pod for pod in stream.snapshot()["pods"]}
        assert _content(by_name["good"]) == at
        broken, fine = by_name["cursed"]["files"]
        assert broken["problem"]["reason"] == "internal" and broken["content"] is None
        assert base64.b64decode(fine["content"]).decode() == at
        stream.close()
    tracebacks = [r for r in caplog.records if r.exc_info and "rendering failed" in r.getMessage()]
    assert len(tracebacks) == 1
    assert "a bug nobody foresaw" in caplog.text


def test_a_namespace_gets_a_bounded_number_of_templates_each_read_once(
    kube: FakeKube, api: Any
) -> None:
    """Each template in use is re-read every 30 s: a tenant naming thousands would be
    thousands of GETs every 30 s."""
    for name in ("a", "b", "c"):
        kube.put(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": "apps"},
                "data": {"template": f"{name}:$(ACCESS_TOKEN)"},
            }
        )
    cache = TemplateCache(api, max_per_namespace=2)
    for _ in range(3):
        assert cache.template("apps", "a") == "a:$(ACCESS_TOKEN)"
        assert cache.template("apps", "b") == "b:$(ACCESS_TOKEN)"
    with pytest.raises(FileProblem, match="namespace apps uses more than 2 template ConfigMaps"):
        cache.template("apps", "c")
    with pytest.raises(FileProblem, match="template ConfigMap c not found"):
        cache.template("other", "c")  # another namespace has its own
    assert cache.reads == 3
