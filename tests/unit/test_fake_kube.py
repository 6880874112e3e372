"""The fake Kubernetes API server, through the real `kubernetes` client over real HTTP.

These tests pin what later tests rely on: the fake answers as the apiserver
does (status codes, Status bodies, resourceVersions, watch streams), as seen
by the generated client the agents use.
"""

from __future__ import annotations

import base64
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from hack.autofs_world import wait_for
from tests.support.fake_kube import FakeKube

NS = "team-a"

# The client's annotations say models; it takes plain dicts as bodies, as the agents
# pass them (agents/common/kube.py): its entry points are Any here for that reason.
Watch: Any = watch.Watch
config: Any = kube_config


@pytest.fixture
def v1(api: Any) -> Any:
    return core(api)


def core(api: Any) -> Any:
    return client.CoreV1Api(api)


def pod(name: str, node: str = "", labels: dict[str, str] | None = None, **status: Any) -> Any:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }
    if node:
        body["spec"]["nodeName"] = node
    if status:
        body["status"] = status
    return body


def secret(name: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "stringData": data,
    }


def status_of(err: ApiException) -> dict[str, Any]:
    """The metav1.Status body of a failed call."""
    body: dict[str, Any] = json.loads(err.body or "")
    assert body["kind"] == "Status" and body["status"] == "Failure"
    assert body["code"] == err.status
    return body


def stored_pod(kube: FakeKube, name: str) -> dict[str, Any]:
    obj = kube.get("pods", NS, name)
    assert obj is not None, f"no pod {name} in the store"
    return obj


def names(items: Any) -> list[str]:
    return [item.metadata.name for item in items]


# -- create, get, list -------------------------------------------------------------------


def test_create_sets_server_fields_and_get_returns_the_object(kube: FakeKube, v1: Any) -> None:
    created = v1.create_namespaced_pod(NS, pod("p1", node="node-a"))
    assert created.metadata.uid and created.metadata.creation_timestamp is not None
    assert created.metadata.resource_version == kube.resource_version
    assert created.status.phase == "Pending"
    got = v1.read_namespaced_pod("p1", NS)
    assert got.metadata.uid == created.metadata.uid
    assert got.spec.node_name == "node-a"
    stored = kube.get("pods", NS, "p1")
    assert stored is not None
    assert stored["metadata"]["resourceVersion"] == got.metadata.resource_version
    assert stored["spec"]["containers"] == [{"name": "main", "image": "busybox"}]


def test_create_twice_is_409_already_exists(v1: Any) -> None:
    v1.create_namespaced_secret(NS, secret("s"))
    with pytest.raises(ApiException) as err:
        v1.create_namespaced_secret(NS, secret("s"))
    assert err.value.status == 409
    body = status_of(err.value)
    assert body["reason"] == "AlreadyExists"
    assert body["message"] == 'secrets "s" already exists'


def test_generate_name_makes_a_unique_name(v1: Any) -> None:
    body = {"metadata": {"generateName": "tok-"}, "data": {}}
    made = {v1.create_namespaced_config_map(NS, body).metadata.name for _ in range(5)}
    assert len(made) == 5
    assert all(name.startswith("tok-") and len(name) == 9 for name in made)


def test_missing_object_is_404_with_a_status_body(v1: Any) -> None:
    with pytest.raises(ApiException) as err:
        v1.read_namespaced_pod("nope", NS)
    assert err.value.status == 404
    assert status_of(err.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pods "nope" not found',
        "reason": "NotFound",
        "details": {"name": "nope", "kind": "pods"},
        "code": 404,
    }


def test_list_filters_by_field_and_label_selectors(kube: FakeKube, v1: Any) -> None:
    kube.put(pod("a1", node="node-a", labels={"app": "x", "tier": "gpu"}, phase="Running"))
    kube.put(pod("a2", node="node-a", labels={"app": "y"}, phase="Succeeded"))
    kube.put(pod("b1", node="node-b", labels={"app": "x"}, phase="Running"))
    kube.put(pod("pending", labels={"app": "x"}))
    other = pod("elsewhere", node="node-a")
    other["metadata"]["namespace"] = "team-b"
    kube.put(other)

    def listed(**kw: str) -> list[str]:
        return names(v1.list_pod_for_all_namespaces(**kw).items)

    assert listed(field_selector="spec.nodeName=node-a") == ["a1", "a2", "elsewhere"]
    assert listed(field_selector="spec.nodeName=node-a,status.phase!=Succeeded") == [
        "a1",
        "elsewhere",
    ]
    assert listed(field_selector="spec.nodeName=") == ["pending"]  # unscheduled
    assert listed(field_selector="metadata.namespace==team-b") == ["elsewhere"]
    assert listed(label_selector="app=x") == ["a1", "b1", "pending"]
    assert listed(label_selector="app!=x") == ["a2", "elsewhere"]  # also: no label at all
    assert listed(label_selector="tier") == ["a1"]
    assert listed(label_selector="!tier,app") == ["a2", "b1", "pending"]
    assert listed(label_selector="app in (x, y),tier notin (gpu)") == ["a2", "b1", "pending"]
    in_ns = v1.list_namespaced_pod(NS, field_selector="metadata.name=a1", label_selector="app")
    assert names(in_ns.items) == ["a1"]


def test_list_carries_the_current_resource_version(kube: FakeKube, v1: Any) -> None:
    kube.put(pod("p1"))
    first = v1.list_namespaced_pod(NS).metadata.resource_version
    assert first == kube.resource_version
    v1.create_namespaced_secret(NS, secret("s"))  # any write moves the global version
    assert int(v1.list_namespaced_pod(NS).metadata.resource_version) > int(first)


def test_unsupported_field_label_is_400(v1: Any) -> None:
    with pytest.raises(ApiException) as err:
        v1.list_namespaced_secret(NS, field_selector="data.token=x")
    assert err.value.status == 400
    assert status_of(err.value)["message"] == "field label not supported: data.token"
    # Secrets register `type` as a field label.
    assert v1.list_namespaced_secret(NS, field_selector="type=Opaque").items == []


def test_list_pages_with_limit_and_continue(kube: FakeKube, v1: Any) -> None:
    for i in range(5):
        kube.put(pod(f"p{i}"))
    first = v1.list_namespaced_pod(NS, limit=2)
    assert names(first.items) == ["p0", "p1"]
    assert first.metadata.remaining_item_count == 3
    rest = v1.list_namespaced_pod(NS, limit=10, _continue=first.metadata._continue)
    assert names(rest.items) == ["p2", "p3", "p4"]
    assert rest.metadata._continue is None


# -- update, patch, delete -----------------------------------------------------------------


def test_update_with_a_stale_resource_version_is_409_conflict(v1: Any) -> None:
    v1.create_namespaced_secret(NS, secret("tok", oauth="v1"))
    read = v1.read_namespaced_secret("tok", NS)
    read.string_data = {"oauth": "v2"}
    updated = v1.replace_namespaced_secret("tok", NS, read)
    assert int(updated.metadata.resource_version) > int(read.metadata.resource_version)
    # The copy read before the update is stale now: optimistic concurrency refuses it.
    read.string_data = {"oauth": "v3"}
    with pytest.raises(ApiException) as err:
        v1.replace_namespaced_secret("tok", NS, read)
    assert err.value.status == 409
    body = status_of(err.value)
    assert body["reason"] == "Conflict"
    assert body["message"] == (
        'Operation cannot be fulfilled on secrets "tok": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert base64.b64decode(v1.read_namespaced_secret("tok", NS).data["oauth"]) == b"v2"


def test_update_that_changes_nothing_keeps_the_resource_version(kube: FakeKube, v1: Any) -> None:
    v1.create_namespaced_secret(NS, secret("tok", oauth="v1"))
    read = v1.read_namespaced_secret("tok", NS)
    again = v1.replace_namespaced_secret("tok", NS, read)
    assert again.metadata.resource_version == read.metadata.resource_version


def test_update_of_a_missing_object_is_404(v1: Any) -> None:
    with pytest.raises(ApiException) as err:
        v1.replace_namespaced_secret("nope", NS, secret("nope"))
    assert err.value.status == 404


def test_merge_strategic_and_json_patches(v1: Any, kube: FakeKube) -> None:
    v1.create_namespaced_pod(NS, pod("p", labels={"app": "x", "drop": "me"}))
    # The client sends a dict body as a strategic merge patch.
    v1.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"new": "1", "drop": None}}})
    assert stored_pod(kube, "p")["metadata"]["labels"] == {"app": "x", "new": "1"}
    v1.patch_namespaced_pod(
        "p",
        NS,
        {"metadata": {"annotations": {"a": "b"}}},
        _content_type="application/merge-patch+json",
    )
    ops = [
        {"op": "test", "path": "/metadata/labels/app", "value": "x"},
        {"op": "replace", "path": "/metadata/labels/app", "value": "z"},
        {"op": "add", "path": "/metadata/annotations/c~1d", "value": "e"},
    ]
    patched = v1.patch_namespaced_pod("p", NS, ops)  # a list body: JSON patch
    assert patched.metadata.labels == {"app": "z", "new": "1"}
    assert patched.metadata.annotations == {"a": "b", "c/d": "e"}
    with pytest.raises(ApiException) as err:
        v1.patch_namespaced_pod("p", NS, [{"op": "test", "path": "/metadata/name", "value": "q"}])
    assert err.value.status == 422


def test_patch_with_a_stale_resource_version_is_409(v1: Any) -> None:
    first = v1.create_namespaced_config_map(NS, {"metadata": {"name": "cm"}, "data": {"k": "1"}})
    v1.patch_namespaced_config_map("cm", NS, {"data": {"k": "2"}})
    stale = {"metadata": {"resourceVersion": first.metadata.resource_version}, "data": {"k": "3"}}
    with pytest.raises(ApiException) as err:
        v1.patch_namespaced_config_map("cm", NS, stale)
    assert err.value.status == 409
    assert v1.read_namespaced_config_map("cm", NS).data == {"k": "2"}


def test_status_subresource_separates_spec_and_status_writes(kube: FakeKube, v1: Any) -> None:
    kube.put(pod("p", node="node-a", phase="Running"))
    # A write to the pod cannot change its status ...
    v1.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"a": "b"}}, "status": {"phase": "X"}})
    assert stored_pod(kube, "p")["status"]["phase"] == "Running"
    # ... a write to /status changes nothing else.
    v1.patch_namespaced_pod_status(
        "p", NS, {"metadata": {"labels": {"c": "d"}}, "status": {"phase": "Failed"}}
    )
    stored = stored_pod(kube, "p")
    assert stored["status"]["phase"] == "Failed"
    assert stored["metadata"]["labels"] == {"a": "b"}


def test_delete_then_404(kube: FakeKube, v1: Any) -> None:
    v1.create_namespaced_secret(NS, secret("s"))
    gone = v1.delete_namespaced_secret("s", NS)  # the client leaves this one a dict
    assert gone["kind"] == "Status" and gone["status"] == "Success"
    assert gone["details"]["name"] == "s"
    assert kube.get("secrets", NS, "s") is None
    with pytest.raises(ApiException) as err:
        v1.delete_namespaced_secret("s", NS)
    assert err.value.status == 404
    # Pods answer with the deleted object instead of a Status.
    kube.put(pod("p"))
    assert v1.delete_namespaced_pod("p", NS).metadata.name == "p"


def test_delete_with_a_finalizer_only_marks_the_object(kube: FakeKube, v1: Any) -> None:
    body = secret("s")
    body["metadata"]["finalizers"] = ["example.com/keep"]
    v1.create_namespaced_secret(NS, body)
    v1.delete_namespaced_secret("s", NS)
    marked = kube.get("secrets", NS, "s")
    assert marked is not None and marked["metadata"]["deletionTimestamp"]
    v1.patch_namespaced_secret("s", NS, {"metadata": {"finalizers": None}})
    assert kube.get("secrets", NS, "s") is None


def test_secret_string_data_is_stored_as_base64_data(v1: Any) -> None:
    made = v1.create_namespaced_secret(NS, secret("s", token="abc"))
    assert made.string_data is None
    assert made.data == {"token": base64.b64encode(b"abc").decode()}
    assert made.type == "Opaque"


def test_event_namespace_must_match_the_involved_object(v1: Any) -> None:
    event = {
        "metadata": {"name": "e1", "namespace": "default"},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": NS},
        "reason": "Test",
    }
    with pytest.raises(ApiException) as err:
        v1.create_namespaced_event("default", event)
    assert err.value.status == 422
    assert "does not match event.namespace" in status_of(err.value)["message"]


# -- other resource types ------------------------------------------------------------------


def test_leases_nodes_namespaces_and_new_events(kube: FakeKube, api: Any) -> None:
    coordination: Any = client.CoordinationV1Api(api)
    lease = {
        "metadata": {"name": "token-refresher"},
        "spec": {
            "holderIdentity": "a",
            "leaseDurationSeconds": 15,
            "renewTime": datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=UTC),
        },
    }
    made = coordination.create_namespaced_lease("kube-system", lease)
    # Stored as the apiserver encodes a metav1.MicroTime.
    renewed = kube.get("leases", "kube-system", "token-refresher")
    assert renewed is not None and renewed["spec"]["renewTime"] == "2026-01-01T00:00:01.500000Z"
    assert made.spec.renew_time == datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=UTC)
    made.spec.holder_identity = "b"
    coordination.replace_namespaced_lease("token-refresher", "kube-system", made)
    made.spec.holder_identity = "c"  # a second candidate with the old copy loses
    with pytest.raises(ApiException) as err:
        coordination.replace_namespaced_lease("token-refresher", "kube-system", made)
    assert err.value.status == 409
    held = kube.get("leases", "kube-system", "token-refresher")
    assert held is not None and held["spec"]["holderIdentity"] == "b"

    v1 = core(api)
    kube.put({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})
    assert v1.read_node("node-a").metadata.name == "node-a"
    assert names(v1.list_node().items) == ["node-a"]
    assert "default" in names(v1.list_namespace().items)

    events: Any = client.EventsV1Api(api)
    events.create_namespaced_event(
        NS,
        {
            "metadata": {"name": "ev"},
            "regarding": {"kind": "Pod", "name": "p", "namespace": NS},
            "reason": "Evicted",
            "type": "Warning",
            "action": "Evict",
            "reportingController": "example.com/x",
            "reportingInstance": "x",
            "eventTime": "2026-01-01T00:00:00.000000Z",
        },
    )
    assert [e["reason"] for e in kube.objects("events.events.k8s.io", NS)] == ["Evicted"]
    assert kube.objects("events", NS) == []  # core/v1 Events are stored apart


def test_unknown_path_is_404(api: Any) -> None:
    request = api.param_serialize("GET", "/api/v1/widgets", auth_settings=["BearerToken"])
    response = api.call_api(*request)
    response.read()
    assert response.status == 404
    assert json.loads(response.data)["message"] == (
        "the server could not find the requested resource"
    )


def test_a_wrong_token_is_401(kube: FakeKube, tmp_path: Path) -> None:
    path = kube.kubeconfig(tmp_path / "kubeconfig")
    path.write_text(path.read_text().replace(kube.token, "stolen"))
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=cfg)
    with client.ApiClient(cfg) as api, pytest.raises(ApiException) as err:
        core(api).list_namespace()
    assert err.value.status == 401


# -- watch -------------------------------------------------------------------------------------


def test_watch_from_a_resource_version_replays_changes_in_order(kube: FakeKube, v1: Any) -> None:
    kube.put(pod("before"))
    since = v1.list_namespaced_pod(NS).metadata.resource_version
    v1.create_namespaced_pod(NS, pod("p"))
    v1.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"seen": "yes"}}})
    v1.delete_namespaced_pod("p", NS)
    events = [
        (e["type"], e["object"].metadata.name, e["object"].metadata.resource_version)
        for e in Watch().stream(
            v1.list_namespaced_pod, NS, resource_version=since, timeout_seconds=2
        )
    ]
    assert [(t, n) for t, n, _ in events] == [("ADDED", "p"), ("MODIFIED", "p"), ("DELETED", "p")]
    versions = [int(rv) for _, _, rv in events]
    assert versions == sorted(versions) and versions[0] > int(since)
    assert versions[-1] == int(kube.resource_version)


def test_watch_streams_live_changes(kube: FakeKube, v1: Any) -> None:
    since = v1.list_namespaced_pod(NS).metadata.resource_version

    def writer() -> None:
        wait_for(lambda: kube.watchers == 1, 5)
        kube.put(pod("p"))
        v1.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"a": "b"}}})
        kube.delete("pods", NS, "p")

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    stream = Watch()
    for event in stream.stream(v1.list_namespaced_pod, NS, resource_version=since):
        seen.append(event["type"])
        if len(seen) == 3:
            stream.stop()
    thread.join(5)
    assert seen == ["ADDED", "MODIFIED", "DELETED"]
    wait_for(lambda: kube.watchers == 0, 2)  # the fake notices the client left


def test_watch_without_a_resource_version_starts_with_the_current_state(
    kube: FakeKube, v1: Any
) -> None:
    kube.put(pod("a"))
    kube.put(pod("b"))
    events = list(Watch().stream(v1.list_namespaced_pod, NS, timeout_seconds=1))
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]


def test_watch_with_a_field_selector_sees_objects_enter_and_leave_it(
    kube: FakeKube, v1: Any
) -> None:
    since = kube.resource_version
    kube.put(pod("p"))  # not scheduled: not on node-a yet
    kube.put(pod("p", node="node-a", phase="Running"))  # bound: enters the selection
    kube.put(pod("p", node="node-a", phase="Succeeded"))  # leaves `status.phase=Running`
    events = Watch().stream(
        v1.list_pod_for_all_namespaces,
        field_selector="spec.nodeName=node-a,status.phase=Running",
        resource_version=since,
        timeout_seconds=1,
    )
    assert [(e["type"], e["object"].status.phase) for e in events] == [
        ("ADDED", "Running"),
        ("DELETED", "Running"),
    ]


def test_watch_from_a_compacted_resource_version_is_410(kube: FakeKube, v1: Any) -> None:
    old = kube.resource_version
    kube.put(pod("p"))
    kube.compact()
    # The apiserver answers 200 with one ERROR event holding a 410 Status; the
    # client's Watch turns it into ApiException 410 (it retries only without a timeout).
    with pytest.raises(ApiException) as err:
        list(Watch().stream(v1.list_namespaced_pod, NS, resource_version=old, timeout_seconds=2))
    assert err.value.status == 410
    assert err.value.reason.startswith("Expired: too old resource version")
    # The stream itself, as a client sees it without deserializing.
    raw = v1.list_namespaced_pod(
        NS, watch=True, resource_version=old, timeout_seconds=2, _preload_content=False
    )
    assert raw.status == 200
    lines = raw.read().decode().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
    # Relisting gives a version to watch from again.
    fresh = v1.list_namespaced_pod(NS).metadata.resource_version
    kube.delete("pods", NS, "p")
    events = Watch().stream(v1.list_namespaced_pod, NS, resource_version=fresh, timeout_seconds=1)
    assert [e["type"] for e in events] == ["DELETED"]


def test_load_stores_objects_as_given_with_versions_and_no_events(kube: FakeKube, v1: Any) -> None:
    before = kube.resource_version
    shared = {"containers": [{"name": "main", "image": "busybox"}], "nodeName": "n1"}
    objects = [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}", "namespace": NS}}
        | {"spec": shared}
        for i in range(3)
    ]
    assert kube.load(iter(objects)) == 3
    versions = [int(o["metadata"]["resourceVersion"]) for o in objects]
    assert versions == [int(before) + 1, int(before) + 2, int(before) + 3]
    assert kube.resource_version == str(versions[-1])
    listed = v1.list_namespaced_pod(NS, field_selector="spec.nodeName=n1")
    assert [p.metadata.name for p in listed.items] == ["p0", "p1", "p2"]
    assert all(p.metadata.uid for p in listed.items)
    # No watch event: a watch from before the load must relist (410); one from
    # after it sees the later changes only.
    with pytest.raises(ApiException) as err:
        list(Watch().stream(v1.list_namespaced_pod, NS, resource_version=before, timeout_seconds=1))
    assert err.value.status == 410
    after = kube.resource_version
    kube.delete("pods", NS, "p1")
    events = Watch().stream(v1.list_namespaced_pod, NS, resource_version=after, timeout_seconds=1)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("DELETED", "p1")]


def test_an_open_watch_survives_compaction(kube: FakeKube, v1: Any) -> None:
    since = kube.resource_version

    def writer() -> None:
        wait_for(lambda: kube.watchers == 1, 5)
        kube.put(pod("a"))
        kube.compact()
        kube.put(pod("b"))

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    stream = Watch()
    for event in stream.stream(v1.list_namespaced_pod, NS, resource_version=since):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 2:
            stream.stop()
    thread.join(5)
    assert seen == [("ADDED", "a"), ("ADDED", "b")]


def test_bounded_history_expires_old_versions(v1: Any, tmp_path: Path) -> None:
    with FakeKube(history=2) as small:
        old = small.resource_version
        for i in range(3):
            small.put(pod(f"p{i}"))
        cfg = client.Configuration()
        config.load_kube_config(
            config_file=str(small.kubeconfig(tmp_path / "small")), client_configuration=cfg
        )
        with client.ApiClient(cfg) as api, pytest.raises(ApiException) as err:
            list(
                Watch().stream(
                    core(api).list_namespaced_pod,
                    NS,
                    resource_version=old,
                    timeout_seconds=1,
                )
            )
    assert err.value.status == 410


def test_close_ends_open_watches(kube: FakeKube, v1: Any) -> None:
    events: list[str] = []

    def watcher() -> None:
        for event in Watch().stream(v1.list_namespaced_pod, NS, timeout_seconds=60):
            events.append(event["type"])

    thread = threading.Thread(target=watcher)
    thread.start()
    wait_for(lambda: kube.watchers == 1, 5)
    kube.close()
    thread.join(5)
    assert not thread.is_alive()


# -- eviction ----------------------------------------------------------------------------------


def eviction(name: str) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}}


def test_eviction_deletes_the_pod_and_is_recorded(kube: FakeKube, v1: Any) -> None:
    kube.put(pod("p", node="node-a", phase="Running"))
    v1.create_namespaced_pod_eviction("p", NS, eviction("p"))
    assert kube.get("pods", NS, "p") is None
    assert [(e.namespace, e.name) for e in kube.evictions] == [(NS, "p")]
    assert kube.evictions[0].body["kind"] == "Eviction"


def test_eviction_answers_201(kube: FakeKube, v1: Any) -> None:
    kube.put(pod("p", phase="Running"))
    _, code, _ = v1.create_namespaced_pod_eviction_with_http_info("p", NS, eviction("p"))
    assert code == 201
    with pytest.raises(ApiException) as err:
        v1.create_namespaced_pod_eviction("p", NS, eviction("p"))
    assert err.value.status == 404


def test_refused_eviction_is_429_and_keeps_the_pod(kube: FakeKube, v1: Any) -> None:
    kube.put(pod("p", phase="Running"))
    kube.refuse_evictions(1, budget="gpu-pdb")
    with pytest.raises(ApiException) as err:
        v1.create_namespaced_pod_eviction("p", NS, eviction("p"))
    assert err.value.status == 429
    body = status_of(err.value)
    assert body["reason"] == "TooManyRequests"
    assert body["details"]["causes"][0]["reason"] == "DisruptionBudget"
    assert "gpu-pdb" in body["details"]["causes"][0]["message"]
    assert kube.get("pods", NS, "p") is not None and kube.evictions == []
    # Only the next one was refused.
    v1.create_namespaced_pod_eviction("p", NS, eviction("p"))
    assert kube.get("pods", NS, "p") is None


def test_terminal_pods_are_evicted_despite_a_budget(kube: FakeKube, v1: Any) -> None:
    kube.put(pod("done", phase="Succeeded"))
    kube.refuse_evictions(None)
    v1.create_namespaced_pod_eviction("done", NS, eviction("done"))
    assert kube.get("pods", NS, "done") is None


# -- injected errors and the request log -----------------------------------------------------


def test_injected_500_fails_only_the_next_matching_calls(kube: FakeKube, v1: Any) -> None:
    kube.put(pod("p"))
    kube.inject_error("GET", f"/api/v1/namespaces/{NS}/pods/p", 500, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            v1.read_namespaced_pod("p", NS)
        assert err.value.status == 500
        assert status_of(err.value)["reason"] == "InternalError"
    assert v1.read_namespaced_pod("p", NS).metadata.name == "p"
    assert v1.list_namespaced_pod(NS).items  # another path was never affected


@pytest.mark.parametrize("code", [409, 410, 429, 503])
def test_injected_errors_carry_the_apiserver_reason(kube: FakeKube, v1: Any, code: int) -> None:
    kube.inject_error("*", ".*/secrets", code)
    with pytest.raises(ApiException) as err:
        v1.list_namespaced_secret(NS)
    assert err.value.status == code
    assert (
        status_of(err.value)["reason"]
        == {
            409: "Conflict",
            410: "Expired",
            429: "TooManyRequests",
            503: "ServiceUnavailable",
        }[code]
    )
    assert kube.count("GET", ".*/secrets") == 1  # no hidden client retries


def test_injected_errors_can_target_watches_only(kube: FakeKube, v1: Any) -> None:
    kube.inject_error("GET", f"/api/v1/namespaces/{NS}/pods", 500, watch=True)
    assert v1.list_namespaced_pod(NS).items == []
    with pytest.raises(ApiException) as err:
        list(Watch().stream(v1.list_namespaced_pod, NS, timeout_seconds=1))
    assert err.value.status == 500


def test_request_log_counts_calls(kube: FakeKube, v1: Any) -> None:
    kube.put(pod("p"))
    for _ in range(3):
        v1.read_namespaced_pod("p", NS)
    v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-a")
    list(Watch().stream(v1.list_namespaced_pod, NS, timeout_seconds=1))
    assert kube.count("GET", f"/api/v1/namespaces/{NS}/pods/p") == 3
    assert kube.count("GET", "/api/v1/pods") == 1
    (listed,) = kube.calls("GET", "/api/v1/pods")
    assert listed.query == {"fieldSelector": "spec.nodeName=node-a"}
    assert kube.count(path=".*/pods", watch=True) == 1
    assert kube.count("POST") == 0
    kube.clear_calls()
    assert kube.calls() == []
