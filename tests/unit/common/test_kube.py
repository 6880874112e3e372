"""The optional Kubernetes client and the Event recorder, against the fake API server."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from agents.common.kube import EventRecorder, KubeConfigError, ObjectRef, load_api_client
from tests.support.fake_kube import FakeKube

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@pytest.fixture
def kubeconfig(kube: FakeKube, tmp_path: Path) -> Path:
    return kube.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Outside a pod, with no kubeconfig file: local mode."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing" / "config"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


# -- load_api_client ---------------------------------------------------------------------


@pytest.mark.usefixtures("no_cluster")
def test_no_config_anywhere_is_local_mode() -> None:
    assert load_api_client(None, enabled=True) is None


@pytest.mark.usefixtures("no_cluster")
def test_explicit_kubeconfig_talks_to_that_server(kube: FakeKube, kubeconfig: Path) -> None:
    api_client = load_api_client(str(kubeconfig))
    assert isinstance(api_client, client.ApiClient)
    with api_client:
        namespaces: Any = client.CoreV1Api(api_client).list_namespace()
    assert "default" in [ns.metadata.name for ns in namespaces.items]
    assert kube.count("GET", "/api/v1/namespaces") == 1


def test_kubeconfig_env_is_used_when_no_path_is_given(
    kube: FakeKube, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    api_client = load_api_client(None)
    assert api_client is not None
    with api_client:
        client.CoreV1Api(api_client).read_namespace("default")
    assert kube.count("GET", "/api/v1/namespaces/default") == 1


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("{}", id="no-contexts"),
        pytest.param("apiVersion: v1\nclusters: [\n", id="not-yaml"),
        pytest.param("just a string", id="not-a-mapping"),
    ],
)
def test_broken_kubeconfig_raises_kube_config_error(tmp_path: Path, content: str) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text(content)
    with pytest.raises(KubeConfigError, match="cannot load Kubernetes config"):
        load_api_client(str(broken))


def test_kube_config_error_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text("apiVersion: v1\nclusters: [\n")
    with pytest.raises(KubeConfigError) as err:
        load_api_client(str(broken))
    assert "\n" not in str(err.value)


def test_missing_explicit_kubeconfig_raises_kube_config_error(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError):
        load_api_client(str(tmp_path / "nowhere"))


def test_disabled_is_local_mode_even_with_a_kubeconfig(kubeconfig: Path) -> None:
    assert load_api_client(str(kubeconfig), enabled=False) is None


def test_kubeconfig_env_may_be_a_list_of_files(
    kube: FakeKube, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'absent'}:{kubeconfig}")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    api_client = load_api_client(None)
    assert api_client is not None
    api_client.close()


def test_missing_client_library_is_reported_as_config_error(
    kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What an install without the [kube] extra looks like to an import.
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    try:
        api_client = load_api_client(str(kubeconfig))
    except KubeConfigError:
        return
    assert api_client is None


# -- EventRecorder ---------------------------------------------------------------------------


def test_emit_posts_a_core_v1_event_on_a_pod(kube: FakeKube, api: Any) -> None:
    recorder = EventRecorder(api, "gpu-enforcer", host="node-a", clock=lambda: NOW)
    pod = ObjectRef(kind="Pod", name="trainer-0", namespace="team-a", uid="u-1")
    assert recorder.emit(pod, "Warning", "GpuMemoryOverShare", "uses 12 GiB of 8 GiB") is True
    (event,) = kube.objects("events")
    assert event["metadata"]["namespace"] == "team-a"
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "trainer-0",
        "namespace": "team-a",
        "uid": "u-1",
    }
    assert event["type"] == "Warning"
    assert event["reason"] == "GpuMemoryOverShare"
    assert event["message"] == "uses 12 GiB of 8 GiB"
    assert event["source"] == {"component": "gpu-enforcer", "host": "node-a"}
    assert event["reportingComponent"] == "gpu-enforcer"
    assert event["reportingInstance"] == "node-a"
    assert event["count"] == 1
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-01-01T00:00:00Z"
    assert kube.count("POST", "/api/v1/namespaces/team-a/events") == 1
    assert recorder.failures == 0


def test_node_events_go_to_the_default_namespace(kube: FakeKube, api: Any) -> None:
    recorder = EventRecorder(api, "automount-healer", host="node-a")
    node = ObjectRef(kind="Node", name="node-a", uid="node-a")
    assert recorder.emit(node, "Normal", "FuseMountHealed", "unmounted /cvmfs/x") is True
    (event,) = kube.objects("events")
    assert event["metadata"]["namespace"] == "default"
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Node",
        "name": "node-a",
        "uid": "node-a",
    }
    assert event["source"]["host"] == "node-a"


def test_each_emit_is_a_new_event(kube: FakeKube, api: Any) -> None:
    recorder = EventRecorder(api, "automount-healer")
    node = ObjectRef(kind="Node", name="node-a")
    for _ in range(3):
        assert recorder.emit(node, "Warning", "FuseMountHung", "hung")
    assert len({e["metadata"]["name"] for e in kube.objects("events")}) == 3


def test_a_failing_api_server_is_counted_not_raised(
    kube: FakeKube, api: Any, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = EventRecorder(api, "automount-healer", host="node-a")
    node = ObjectRef(kind="Node", name="node-a")
    kube.inject_error("POST", "/api/v1/namespaces/default/events", 500)
    with caplog.at_level(logging.WARNING, logger="agents.common.kube"):
        assert recorder.emit(node, "Normal", "FuseMountHealed", "healed") is False
    assert recorder.failures == 1
    (record,) = [r for r in caplog.records if r.name == "agents.common.kube"]
    assert record.levelno == logging.WARNING
    assert "FuseMountHealed" in record.getMessage() and "Node/node-a" in record.getMessage()
    assert kube.objects("events") == []
    # The next one goes through.
    assert recorder.emit(node, "Normal", "FuseMountHealed", "healed") is True
    assert recorder.failures == 1
    assert len(kube.objects("events")) == 1


def test_an_unreachable_api_server_is_counted_not_raised(kube: FakeKube, api: Any) -> None:
    recorder = EventRecorder(api, "automount-healer")
    kube.close()
    assert recorder.emit(ObjectRef(kind="Node", name="n"), "Normal", "X", "y") is False
    assert recorder.failures == 1


def test_an_api_error_is_one_short_line_without_its_body() -> None:
    from kubernetes.client.exceptions import ApiException

    from agents.common.kube import api_error_text

    err = ApiException(status=403, reason="Forbidden")
    err.body = '{"message": "secrets \\"tok\\" is forbidden", "echo": "Bearer s3cr3t"}'
    assert api_error_text(err) == "HTTP 403 Forbidden"
    assert api_error_text(OSError("connection\nrefused")) == "connection refused"
    assert api_error_text(TimeoutError()) == "TimeoutError"
    assert len(api_error_text(ValueError("x" * 1000), limit=50)) == 50


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_events_are_rate_limited_per_object_and_reason_and_counted(
    kube: FakeKube, api: Any
) -> None:
    """A tenant's flood (a problem per entry, per pass) is one Event per object and
    reason per interval once its burst is spent; other objects and reasons are not held."""
    clock = Clock()
    suppressed: list[str] = []
    recorder = EventRecorder(
        api,
        "token-injector",
        interval=300.0,
        burst=1,
        on_suppressed=suppressed.append,
        monotonic=clock,
    )
    pod = ObjectRef(kind="Pod", name="flood", namespace="t1", uid="u1")
    neighbour = ObjectRef(kind="Pod", name="calm", namespace="t2", uid="u2")
    assert recorder.emit(pod, "Warning", "TokenInjectionFailed", "file 0")
    for i in range(1, 100):
        assert not recorder.emit(pod, "Warning", "TokenInjectionFailed", f"file {i}")
    assert recorder.emit(pod, "Warning", "InvalidTokenAnnotation", "other reason")
    assert recorder.emit(neighbour, "Warning", "TokenInjectionFailed", "file 0")
    assert recorder.suppressed == 99 and suppressed == ["TokenInjectionFailed"] * 99
    clock.now += 299.0
    assert not recorder.emit(pod, "Warning", "TokenInjectionFailed", "still")
    clock.now += 1.0
    assert recorder.emit(pod, "Warning", "TokenInjectionFailed", "again")
    posted = [e for e in kube.objects("events", "t1") if e["reason"] == "TokenInjectionFailed"]
    assert [(e["message"], e["count"]) for e in posted] == [("file 0", 1), ("again", 101)]


def test_the_burst_allows_a_few_at_once(kube: FakeKube, api: Any) -> None:
    clock = Clock()
    recorder = EventRecorder(api, "gpu-enforcer", interval=60.0, burst=3, monotonic=clock)
    node = ObjectRef(kind="Node", name="n")
    assert [recorder.emit(node, "Normal", "X", str(i)) for i in range(5)] == [True] * 3 + [
        False
    ] * 2
    clock.now += 60.0
    assert [recorder.emit(node, "Normal", "X", "y") for _ in range(2)] == [True, False]


def test_a_failed_post_does_not_use_up_the_limit(kube: FakeKube, api: Any) -> None:
    recorder = EventRecorder(api, "automount-healer", burst=1, monotonic=Clock())
    node = ObjectRef(kind="Node", name="node-a")
    kube.inject_error("POST", "/api/v1/namespaces/default/events", 500)
    assert recorder.emit(node, "Normal", "FuseMountHealed", "healed") is False
    assert recorder.emit(node, "Normal", "FuseMountHealed", "healed") is True
    assert recorder.suppressed == 0
