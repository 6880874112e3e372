"""Node authentication against the fake API's TokenReview and pods, through the real client."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agents.common.kube import load_api_client
from agents.token_refresher.metrics import FilesMetrics
from agents.token_refresher.nodeauth import (
    INJECTOR_SELECTOR,
    AuthUnavailable,
    Caller,
    Forbidden,
    LabelSelector,
    NodeAuthenticator,
    Unauthenticated,
    token_expiry,
)
from hack.autofs_world import wait_for
from tests.support.fake_kube import FakeKube
from tests.support.token_files import CONTROLLER_NS, injector_token, put_injector

REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
PODS = f"/api/v1/namespaces/{CONTROLLER_NS}/pods"
INJECTOR_GETS = f"{PODS}/.+"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def _authenticator(
    api: Any, registry: CollectorRegistry, clock: Clock, **kw: Any
) -> NodeAuthenticator:
    return NodeAuthenticator(
        api, namespace=CONTROLLER_NS, metrics=FilesMetrics(registry), clock=clock, **kw
    )


@pytest.fixture
def auth(api: Any, registry: CollectorRegistry, clock: Clock) -> NodeAuthenticator:
    """Not started: its injector pod watch has not listed, every pod is a GET."""
    return _authenticator(api, registry, clock)


class Heard:
    """A listener recording the injector pod changes the watch reports."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []

    def __call__(self, type_: str, pod: dict[str, Any]) -> None:
        self.changes.append((type_, pod["metadata"]["name"]))


@pytest.fixture
def heard() -> Heard:
    return Heard()


@pytest.fixture
def watching(
    api: Any, registry: CollectorRegistry, clock: Clock, heard: Heard
) -> Iterator[NodeAuthenticator]:
    """Started, its injector pod watch listed."""
    auth = _authenticator(api, registry, clock, watch_timeout=5)
    auth.add_listener(heard)
    auth.start()
    try:
        assert auth.wait_synced(5)
        yield auth
    finally:
        auth.close()


def in_watch(auth: NodeAuthenticator, pod: dict[str, Any]) -> bool:
    held = auth.pods.named(CONTROLLER_NS, pod["metadata"]["name"])
    return (
        held is not None
        and held["metadata"]["resourceVersion"] == (pod["metadata"]["resourceVersion"])
    )


def reviews(registry: CollectorRegistry, outcome: str) -> float:
    return registry.get_sample_value("token_refresher_token_reviews_total", {"outcome": outcome})


def test_an_injector_is_its_pod_and_node(kube: FakeKube, auth: NodeAuthenticator) -> None:
    pod = put_injector(kube, "n1")
    caller = auth.authenticate(injector_token(kube, pod))
    assert caller == Caller("n1", CONTROLLER_NS, "injector-n1", pod["metadata"]["uid"], None)


def test_without_a_node_name_extra_the_node_comes_from_the_pod(
    tmp_path: Path, registry: CollectorRegistry, clock: Clock
) -> None:
    # Clusters before ServiceAccountTokenPodNodeInfo (Kubernetes < 1.30) set none.
    with FakeKube(node_info=False) as kube:
        api = load_api_client(str(kube.kubeconfig(tmp_path / "kubeconfig")))
        try:
            pod = put_injector(kube, "n2")
            assert _authenticator(api, registry, clock).authenticate(
                injector_token(kube, pod)
            ).node == ("n2")
        finally:
            api.close()


def test_a_node_name_extra_must_be_the_pods_node(kube: FakeKube, auth: NodeAuthenticator) -> None:
    pod = put_injector(kube, "n1")
    with pytest.raises(Forbidden) as refused:
        auth.authenticate(injector_token(kube, pod, node="n9"))
    assert refused.value.reason == "node_mismatch"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("garbage", "invalid_token"),
        ("expired", "invalid_token"),
        ("audience", "invalid_token"),
        ("account", "wrong_service_account"),
        ("unbound", "not_pod_bound"),
    ],
)
def test_tokens_we_refuse(
    kube: FakeKube, auth: NodeAuthenticator, registry: CollectorRegistry, case: str, reason: str
) -> None:
    pod = put_injector(kube, "n1")
    token = {
        "garbage": lambda: "garbage",
        "expired": lambda: injector_token(kube, pod, expires_in=-5),
        "audience": lambda: injector_token(kube, pod, audiences=("api",)),
        "account": lambda: injector_token(kube, pod, service_account="default"),
        "unbound": lambda: kube.service_account_token(
            CONTROLLER_NS, "token-refresher-injector", audiences=(auth.audience,)
        ),
    }[case]()
    with pytest.raises(Unauthenticated) as refused:
        auth.authenticate(token)
    assert refused.value.reason == reason
    assert token not in str(refused.value)
    assert reviews(registry, "rejected") == 1


def test_the_audience_is_configurable(
    api: Any, kube: FakeKube, registry: CollectorRegistry, clock: Clock
) -> None:
    auth = _authenticator(api, registry, clock, audience="other")
    pod = put_injector(kube, "n1")
    token = kube.service_account_token(
        CONTROLLER_NS,
        "token-refresher-injector",
        audiences=("other",),
        pod=(pod["metadata"]["name"], pod["metadata"]["uid"]),
    )
    assert auth.authenticate(token).node == "n1"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"metadata": {"labels": {"app": "x"}}}, "not_injector"),
        ({"spec": {"serviceAccountName": "default"}}, "wrong_service_account"),
        ({"status": {"phase": "Succeeded"}}, "pod_finished"),
    ],
)
def test_the_pod_must_be_a_live_injector(
    kube: FakeKube, auth: NodeAuthenticator, change: dict[str, Any], reason: str
) -> None:
    pod = put_injector(kube, "n1")
    token = injector_token(kube, pod)
    stored = kube.get("pods", CONTROLLER_NS, "injector-n1")
    assert stored is not None
    for part, values in change.items():
        stored[part] = {**stored.get(part, {}), **values}
    kube.put(stored)
    with pytest.raises(Forbidden) as refused:
        auth.authenticate(token)
    assert refused.value.reason == reason


def test_reviews_are_cached_by_token_for_a_bounded_time(
    kube: FakeKube, auth: NodeAuthenticator, clock: Clock, registry: CollectorRegistry
) -> None:
    pod = put_injector(kube, "n1")
    token = injector_token(kube, pod)
    for _ in range(3):
        auth.authenticate(token)
    assert kube.count("POST", REVIEWS) == 1
    clock.now += 299
    auth.authenticate(token)
    assert kube.count("POST", REVIEWS) == 1
    clock.now += 2
    auth.authenticate(token)
    assert kube.count("POST", REVIEWS) == 2
    assert reviews(registry, "authenticated") == 2


def test_the_review_cache_is_bounded(
    kube: FakeKube, api: Any, registry: CollectorRegistry, clock: Clock
) -> None:
    auth = _authenticator(api, registry, clock, max_reviews=3)
    pod = put_injector(kube, "n1")
    tokens = [injector_token(kube, pod) for _ in range(5)]
    for token in tokens:
        auth.authenticate(token)
    assert auth.cached_reviews == 3
    auth.authenticate(tokens[-1])  # the newest are kept
    assert kube.count("POST", REVIEWS) == 5
    auth.authenticate(tokens[0])
    assert kube.count("POST", REVIEWS) == 6


def test_before_the_watch_lists_a_pod_check_is_a_get_cached_and_a_recheck_reads_again(
    kube: FakeKube, auth: NodeAuthenticator, clock: Clock
) -> None:
    pod = put_injector(kube, "n1")
    token = injector_token(kube, pod)
    path = f"/api/v1/namespaces/{CONTROLLER_NS}/pods/injector-n1"
    auth.authenticate(token)
    auth.authenticate(token)
    assert kube.count("GET", path) == 1
    clock.now += 31
    auth.authenticate(token)
    assert kube.count("GET", path) == 2
    auth.authenticate(token, fresh_pod=True)
    assert kube.count("GET", path) == 3
    # Deleted: the cached review still names it, the fresh read does not find it.
    kube.delete("pods", CONTROLLER_NS, "injector-n1")
    with pytest.raises(Forbidden) as refused:
        auth.authenticate(token, fresh_pod=True)
    assert refused.value.reason == "pod_gone"


def test_api_errors_are_unavailable_and_never_cached(
    kube: FakeKube, auth: NodeAuthenticator, registry: CollectorRegistry
) -> None:
    pod = put_injector(kube, "n1")
    token = injector_token(kube, pod)
    kube.inject_error("POST", REVIEWS, 500)
    with pytest.raises(AuthUnavailable):
        auth.authenticate(token)
    assert reviews(registry, "error") == 1
    kube.inject_error("GET", f"/api/v1/namespaces/{CONTROLLER_NS}/pods/injector-n1", 503)
    with pytest.raises(AuthUnavailable):
        auth.authenticate(token)
    assert auth.authenticate(token).node == "n1"
    assert kube.count("POST", REVIEWS) == 2


def test_a_review_is_never_cached_past_the_tokens_expiry(
    kube: FakeKube, api: Any, registry: CollectorRegistry, clock: Clock
) -> None:
    auth = _authenticator(api, registry, clock)
    # Rejected by the fake (it issued no such token), but its exp bounds the caching.
    claims = base64.urlsafe_b64encode(json.dumps({"exp": clock.now + 5}).encode()).rstrip(b"=")
    token = f"eyJhbGciOiJSUzI1NiJ9.{claims.decode()}.c2ln"
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            auth.authenticate(token)
    assert kube.count("POST", REVIEWS) == 1
    clock.now += 6
    with pytest.raises(Unauthenticated):
        auth.authenticate(token)
    assert kube.count("POST", REVIEWS) == 2


def test_token_expiry() -> None:
    claims = base64.urlsafe_b64encode(json.dumps({"exp": 1234}).encode()).decode().rstrip("=")
    assert token_expiry(f"a.{claims}.c") == 1234.0
    assert token_expiry("opaque") is None
    assert token_expiry("a.!!!.c") is None
    assert token_expiry("a.e30.c") is None  # {}


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ("a=1,b=2", {"a": "1", "b": "2", "c": "3"}, True),
        ("a=1,b=2", {"a": "1"}, False),
        ("a==1", {"a": "1"}, True),
        ("a!=1", {"a": "2"}, True),
        ("a!=1", {}, True),
        ("a", {"a": ""}, True),
        ("!a", {"a": ""}, False),
        ("a in (1, 2),b notin (3)", {"a": "2", "b": "4"}, True),
        ("a in (1,2)", {"a": "3"}, False),
        ("", {}, True),
    ],
)
def test_label_selector(selector: str, labels: dict[str, str], matches: bool) -> None:
    assert LabelSelector(selector).matches(labels) is matches


# -- the injector pod watch


def test_a_watched_pod_costs_no_get_however_often_it_is_checked(
    kube: FakeKube, watching: NodeAuthenticator, clock: Clock
) -> None:
    pod = put_injector(kube, "n1")
    wait_for(lambda: in_watch(watching, pod), 5)
    token = injector_token(kube, pod)
    for _ in range(5):
        assert watching.authenticate(token, fresh_pod=True).node == "n1"
        clock.now += 31  # past the pod check's TTL: the watch has no TTL
    assert kube.count("GET", INJECTOR_GETS) == 0
    assert watching.pod_reads == 0
    # One paged, label-selected LIST of this namespace, then the watch.
    (listed,) = kube.calls("GET", PODS, watch=False)
    assert listed.query["labelSelector"] == INJECTOR_SELECTOR
    assert listed.query["limit"] == "500"


def test_only_what_the_check_reads_is_kept_of_an_injector_pod(
    kube: FakeKube, watching: NodeAuthenticator
) -> None:
    pod = put_injector(kube, "n1")
    wait_for(lambda: in_watch(watching, pod), 5)
    held = watching.pods.named(CONTROLLER_NS, "injector-n1")
    assert held is not None
    assert held["spec"] == {"nodeName": "n1", "serviceAccountName": "token-refresher-injector"}
    assert held["status"] == {"phase": "Running"}
    assert "annotations" not in held["metadata"]


def test_a_pod_not_in_the_watch_yet_is_read_with_one_get(
    kube: FakeKube, watching: NodeAuthenticator
) -> None:
    # The watch lags (the pod was just created): the GET, a consistent read, has it.
    kube.hold_watches(f"{PODS}.*")
    pod = put_injector(kube, "n1")
    token = injector_token(kube, pod)
    assert watching.authenticate(token).node == "n1"
    assert watching.authenticate(token).node == "n1"  # the GET's answer is reused
    assert kube.count("GET", f"{PODS}/injector-n1") == 1
    kube.release_watches()
    wait_for(lambda: in_watch(watching, pod), 5)
    assert watching.authenticate(token, fresh_pod=True).node == "n1"
    assert kube.count("GET", f"{PODS}/injector-n1") == 1


def test_other_pods_of_the_namespace_are_not_watched(
    kube: FakeKube, watching: NodeAuthenticator, heard: Heard
) -> None:
    put_injector(kube, "n1", labels={"app": "other"})
    marker = put_injector(kube, "n2")
    wait_for(lambda: in_watch(watching, marker), 5)
    assert watching.pods.named(CONTROLLER_NS, "injector-n1") is None
    assert heard.changes == [("ADDED", "injector-n2")]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("deleted", "pod_gone"),
        ("relabelled", "not_injector"),
        ("finished", "pod_finished"),
        ("terminating", "pod_deleted"),
    ],
)
def test_a_change_that_disqualifies_the_pod_is_heard_and_refused(
    kube: FakeKube, watching: NodeAuthenticator, heard: Heard, change: str, reason: str
) -> None:
    pod = put_injector(kube, "n1")
    token = injector_token(kube, pod)
    wait_for(lambda: in_watch(watching, pod), 5)
    assert watching.authenticate(token).node == "n1"
    stored = kube.get("pods", CONTROLLER_NS, "injector-n1")
    assert stored is not None
    if change == "deleted":
        kube.delete("pods", CONTROLLER_NS, "injector-n1")
    elif change == "relabelled":
        kube.put({**stored, "metadata": {**stored["metadata"], "labels": {"app": "x"}}})
    elif change == "finished":
        kube.put({**stored, "status": {"phase": "Failed"}})
    else:
        # Graceful deletion: the pod stays, with a deletionTimestamp, until its
        # kubelet confirms (a finalizer holds it here).
        kube.put({**stored, "metadata": {**stored["metadata"], "finalizers": ["x/y"]}})
        kube.delete("pods", CONTROLLER_NS, "injector-n1")
    # Leaving the label selector is a DELETED event, as the API server sends it.
    expected = "DELETED" if change in ("deleted", "relabelled") else "MODIFIED"
    wait_for(lambda: heard.changes[-1:] == [(expected, "injector-n1")], 5)
    with pytest.raises(Forbidden) as refused:
        watching.authenticate(token, fresh_pod=True)
    assert refused.value.reason == reason
    # Still in the watch (finished, terminating): refused without a GET.
    gets = kube.count("GET", f"{PODS}/injector-n1")
    assert gets == (1 if expected == "DELETED" else 0)
