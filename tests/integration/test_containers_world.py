"""hack/containers.py: fake containers are chrooted processes in kubelet-like cgroups (root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.common.attribution import bare_container_id, processes_of_containers, read_cgroup
from hack.cgroups import cgroup_in, mounted_hierarchies
from hack.containers import ContainerWorld, new_pod_uid
from tests.support.containers import container_world

pytestmark = pytest.mark.root


@pytest.fixture
def containers(container_init: Path, tmp_path: Path) -> Iterator[ContainerWorld]:
    with container_world(tmp_path / "containers", container_init) as world:
        yield world


def test_a_container_is_a_chrooted_process_in_its_container_cgroup(
    containers: ContainerWorld,
) -> None:
    pod_uid = new_pod_uid()
    app = containers.add(pod_uid, "app", dirs=["etc/app"])
    assert os.readlink(f"/proc/{app.pid}/root") == str(app.root)
    assert (app.root / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (app.root / "etc" / "app").is_dir()
    ref = read_cgroup(app.pid)
    assert ref is not None
    assert (ref.pod_uid, ref.container_id, ref.runtime) == (pod_uid, app.id, "containerd")
    assert processes_of_containers({app.id}) == {app.id: [app.pid]}


def test_restart_keeps_the_root_and_changes_id_and_process(containers: ContainerWorld) -> None:
    app = containers.add(new_pod_uid(), "app")
    again = containers.restart(app)
    assert (again.root, again.pod_uid, again.name) == (app.root, app.pod_uid, app.name)
    assert again.id != app.id and again.pid != app.pid
    assert again.restarts == 1
    assert not containers.alive(app) and containers.alive(again)
    assert processes_of_containers({app.id, again.id}) == {again.id: [again.pid]}


def test_pod_is_reported_as_the_kubelet_does(containers: ContainerWorld) -> None:
    uid = new_pod_uid()
    app, sidecar = containers.add_many([(uid, "app"), (uid, "sidecar")])
    pod = containers.pod("web", "ns", "node-a", [app, sidecar], {"a": "b"}, waiting=["late"])
    assert pod["metadata"] == {
        "name": "web",
        "namespace": "ns",
        "uid": uid,
        "annotations": {"a": "b"},
    }
    assert pod["spec"]["nodeName"] == "node-a"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app", "sidecar", "late"]
    assert pod["status"]["phase"] == "Running"
    statuses = {s["name"]: s for s in pod["status"]["containerStatuses"]}
    assert bare_container_id(statuses["app"]["containerID"]) == app.id
    assert statuses["app"]["containerID"] == f"containerd://{app.id}"
    assert "running" in statuses["sidecar"]["state"]
    assert "containerID" not in statuses["late"] and "waiting" in statuses["late"]["state"]


def test_close_removes_processes_cgroups_roots_and_mounts(
    container_init: Path, tmp_path: Path
) -> None:
    base = tmp_path / "containers"
    with container_world(base, container_init) as world:
        app = world.add(new_pod_uid(), "app")
        unified = next(h for h in mounted_hierarchies() if h.version == 2)
        cgroup_dir = unified.mountpoint / cgroup_in(unified, app.pid).lstrip("/")
        assert cgroup_dir.is_dir()
        # A mount a test left inside a root: removed, never walked into by rmtree.
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(app.path("/tmp"))], check=True
        )
    assert not world.alive(app)
    assert not Path(f"/proc/{app.pid}").exists()
    assert not cgroup_dir.exists()
    assert list(base.iterdir()) == []
