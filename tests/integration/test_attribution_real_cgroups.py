"""Attribution of real processes in real kubelet-like cgroups (root).

`hack/cgroups.py` lays out pod and container cgroups as the kubelet and the
runtimes do (systemd driver on the v2 hierarchy, cgroupfs driver on the v1
hierarchies), a real `sleep` is moved in through `cgroup.procs`, and what the
kernel then prints in `/proc/<pid>/cgroup` is what `read_cgroup` parses. On a
hybrid host the other hierarchy keeps the process where it was, so each case
is also a hybrid file with one side naming the pod.
"""

from __future__ import annotations

import secrets
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agents.common.attribution import ContainerRef, ProcessGone, parse_cgroup, read_cgroup
from hack.cgroups import CgroupsUnavailable, FakePodCgroups
from tests.conftest import IN_CI, IS_ROOT

pytestmark = pytest.mark.root

Spawn = Callable[[], "subprocess.Popen[bytes]"]


def require_root() -> None:
    """Skip without root (fail in CI, where everything must run)."""
    if IS_ROOT:
        return
    reason = "needs root: creates cgroups and moves processes through cgroup.procs"
    if IN_CI:
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def new_pod() -> tuple[str, str]:
    """A pod UID and a container ID of the kinds the kubelet and runtimes make."""
    return str(uuid.uuid4()), secrets.token_hex(32)


def create(
    cgroups: FakePodCgroups, layout: str, pod_uid: str, container_id: str, **kwargs: str
) -> Path:
    try:
        return cgroups.create_pod_container(layout, pod_uid, container_id, **kwargs)
    except CgroupsUnavailable as err:
        if IN_CI:
            pytest.fail(f"CI must run this test: {err}")
        pytest.skip(str(err))


@pytest.fixture
def cgroups() -> Iterator[FakePodCgroups]:
    """Pod cgroups made by the test; every one is gone afterwards."""
    require_root()
    with FakePodCgroups() as fake:
        yield fake
        made = fake.created
    left = [path for path in made if path.exists()]
    assert not left, f"cgroups leaked: {left}"


@pytest.fixture
def spawn(cgroups: FakePodCgroups) -> Iterator[Spawn]:
    """Start `sleep 60` children; killed and reaped before the cgroups go
    (a populated cgroup cannot be removed)."""
    children: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        child = subprocess.Popen(["sleep", "60"])
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()


LAYOUTS = {
    "systemd-v2-containerd-burstable": ("systemd-v2-containerd", "burstable", "containerd"),
    "systemd-v2-containerd-besteffort": ("systemd-v2-containerd", "besteffort", "containerd"),
    "systemd-v2-containerd-guaranteed": ("systemd-v2-containerd", "guaranteed", "containerd"),
    "systemd-v2-crio": ("systemd-v2-crio", "burstable", "cri-o"),
    "systemd-v2-docker": ("systemd-v2-docker", "besteffort", "docker"),
    "cgroupfs-v1-containerd-burstable": ("cgroupfs-v1-containerd", "burstable", ""),
    "cgroupfs-v1-containerd-besteffort": ("cgroupfs-v1-containerd", "besteffort", ""),
    "cgroupfs-v1-guaranteed": ("cgroupfs-v1-guaranteed", "guaranteed", ""),
}


@pytest.mark.parametrize("layout, qos, runtime", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_process_in_pod_container(
    cgroups: FakePodCgroups, spawn: Spawn, layout: str, qos: str, runtime: str
) -> None:
    pod_uid, container_id = new_pod()
    container = create(cgroups, layout, pod_uid, container_id, qos=qos)
    child = spawn()
    cgroups.move(child.pid, container)

    text = Path(f"/proc/{child.pid}/cgroup").read_text()
    assert cgroups.cgroup_path(container) in text, text
    assert read_cgroup(child.pid) == ContainerRef(pod_uid, container_id, runtime, qos), text


@pytest.mark.parametrize(
    "layout, below, runtime",
    [
        ("systemd-v2-containerd", "init.scope", "containerd"),
        ("systemd-v2-crio", "container", "cri-o"),  # crun's sub-cgroup
        ("systemd-v2-containerd", "system.slice/systemd-journald.service", "containerd"),
        ("cgroupfs-v1-containerd", f"docker/{secrets.token_hex(32)}", ""),  # dind in a pod
    ],
    ids=["init-scope", "crun-container", "systemd-in-container", "docker-in-docker"],
)
def test_process_below_the_container(
    cgroups: FakePodCgroups, spawn: Spawn, layout: str, below: str, runtime: str
) -> None:
    pod_uid, container_id = new_pod()
    nested = create(cgroups, layout, pod_uid, container_id, below=below)
    child = spawn()
    cgroups.move(child.pid, nested)

    assert read_cgroup(child.pid) == ContainerRef(pod_uid, container_id, runtime, "burstable")


def test_kubelet_below_another_cgroup(spawn: Spawn) -> None:
    """A kind node: the kubelet's tree under the node container's `/docker/<id>`."""
    pod_uid, container_id = new_pod()
    with FakePodCgroups(parent=f"docker/{secrets.token_hex(32)}") as kind:
        container = create(kind, "cgroupfs-v1-containerd", pod_uid, container_id, qos="besteffort")
        child = spawn()
        try:
            kind.move(child.pid, container)
            assert read_cgroup(child.pid) == ContainerRef(pod_uid, container_id, "", "besteffort")
        finally:
            child.kill()
            child.wait()


@pytest.mark.parametrize(
    "layout, expected_qos",
    [("systemd-v2-containerd", "burstable"), ("cgroupfs-v1-containerd", "")],
)
def test_read_from_inside_a_cgroup_namespace(
    cgroups: FakePodCgroups, spawn: Spawn, layout: str, expected_qos: str
) -> None:
    """A reader in pod A's container with its own cgroup namespace sees pod B's
    process through `/../` (cgroup-v2.rst, "Namespace"); the pod and container
    are still found. A cgroupfs path seen that way does not show its QoS level."""
    pod_a, container_a = new_pod()
    pod_b, container_b = new_pod()
    reader_cgroup = create(cgroups, layout, pod_a, container_a)
    target_cgroup = create(cgroups, layout, pod_b, container_b)
    target = spawn()
    cgroups.move(target.pid, target_cgroup)

    # The shell waits until it is in pod A, then unshares: the namespace root
    # is the cgroup the process is in at unshare(CLONE_NEWCGROUP).
    reader = subprocess.Popen(
        ["sh", "-c", f"read go && exec unshare --cgroup cat /proc/{target.pid}/cgroup"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        cgroups.move(reader.pid, reader_cgroup)
        out, _ = reader.communicate(b"go\n", timeout=10)
    finally:
        reader.kill()
        reader.wait()
    text = out.decode()
    assert reader.returncode == 0
    assert "/../" in text, text
    assert parse_cgroup(text) == ContainerRef(
        pod_b, container_b, "containerd" if "systemd" in layout else "", expected_qos
    ), text


def test_exited_process_is_gone(cgroups: FakePodCgroups, spawn: Spawn) -> None:
    pod_uid, container_id = new_pod()
    container = create(cgroups, "systemd-v2-containerd", pod_uid, container_id)
    child = spawn()
    cgroups.move(child.pid, container)
    assert read_cgroup(child.pid) is not None
    child.kill()
    child.wait()
    with pytest.raises(ProcessGone):
        read_cgroup(child.pid)


def test_cgroups_are_removed_even_with_a_process_left_inside(spawn: Spawn) -> None:
    """close() moves a forgotten process back where it came from, then removes all."""
    pod_uid, container_id = new_pod()
    child = spawn()
    before = Path(f"/proc/{child.pid}/cgroup").read_text()
    with FakePodCgroups() as fake:
        container = create(fake, "cgroupfs-v1-containerd", pod_uid, container_id)
        fake.move(child.pid, container)
        assert read_cgroup(child.pid) is not None
        made = fake.created
    assert not [path for path in made if path.exists()]
    assert Path(f"/proc/{child.pid}/cgroup").read_text() == before
