"""The healer posts Kubernetes Events on its Node while healing real mounts (root).

A real automount with squashfuse daemons, the healer's `main` in a thread, and
the fake API server reached by the real `kubernetes` client over HTTP.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agents.mount_healer.cli import main
from hack.autofs_world import AutofsWorld, wait_for
from tests.support.agent import AgentThread
from tests.support.fake_kube import FakeKube

pytestmark = pytest.mark.root

NODE = "node-a"
SERVICE_ACCOUNT = "node-agents/automount-healer"  # manifests/mount-healer/serviceaccount.yaml


def test_a_healed_mount_is_one_normal_event_on_the_node(
    world: AutofsWorld, kube: FakeKube, tmp_path: Path, bundle_rbac: list[dict[str, Any]]
) -> None:
    # The healer talks to the API as its bundle ServiceAccount, under the bundle's RBAC.
    kube.enforce_rbac(bundle_rbac)
    kubeconfig = kube.kubeconfig(tmp_path / "kubeconfig", service_account=SERVICE_ACCOUNT)
    assert world.access("repo1") == ["README"]
    argv = [
        "--root",
        str(world.root),
        "--interval",
        "0.5",
        "--metrics-address",
        "off",
        "--node-name",
        NODE,
        "--kubeconfig",
        str(kubeconfig),
    ]
    with AgentThread(main, argv) as agent:
        # Started: the Kubernetes client's import alone takes seconds on a slow machine.
        wait_for(lambda: agent.value("automount_healer_ticks_total") >= 1, 15)
        assert kube.objects("events") == []  # healthy mounts: nothing to report
        world.kill_daemon("repo1")
        wait_for(lambda: kube.objects("events"), 5)
        # A few more sweeps must not report the same heal again.
        ticks = agent.value("automount_healer_ticks_total")
        wait_for(lambda: agent.value("automount_healer_ticks_total") >= ticks + 2, 5)
    events = kube.objects("events")
    assert len(events) == 1, events
    (event,) = events
    assert event["metadata"]["namespace"] == "default"
    assert event["involvedObject"]["kind"] == "Node"
    assert event["involvedObject"]["name"] == NODE
    assert event["type"] == "Normal"
    assert event["reason"] == "FuseMountHealed"
    assert str(world.path("repo1")) in event["message"]
    assert event["source"] == {"component": "automount-healer", "host": NODE}
    assert kube.count("POST", "/api/v1/namespaces/default/events") == 1
    assert kube.denied() == []
    # The healed mount comes back on the next access.
    assert world.access("repo1") == ["README"]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param('{"apiVersion": "v1", "kind": "Config"}', id="no-current-context"),
        pytest.param(
            "apiVersion: v1\nclusters: [\n",
            id="yaml-syntax-error",
        ),
    ],
)
def test_broken_kubeconfig_exits_2_with_one_error_line(
    tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text(content)
    started = time.monotonic()
    code = main(
        [
            "--once",
            "--root",
            str(tmp_path / "no-autofs-here"),
            "--metrics-address",
            "off",
            "--node-name",
            NODE,
            "--kubeconfig",
            str(broken),
        ]
    )
    assert code == 2
    assert time.monotonic() - started < 5
    out, err = capsys.readouterr()
    assert out == ""
    # The startup log record comes first (log level info); then exactly one error line.
    lines = [line for line in err.splitlines() if " INFO agents.mount_healer: " not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("automount-healer: error: cannot load Kubernetes config")
