"""Finding a container's processes from its ID, over real kubelet-like cgroups (root)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from agents.common.attribution import container_processes
from hack.cgroups import FakePodCgroups
from tests.conftest import IN_CI, IS_ROOT

pytestmark = pytest.mark.root


@pytest.fixture
def cgroups() -> Iterator[FakePodCgroups]:
    if not IS_ROOT:
        if IN_CI:
            pytest.fail("CI must run this test: needs root for cgroups")
        pytest.skip("needs root: real cgroups")
    with FakePodCgroups() as made:
        yield made


def test_processes_of_one_container_and_no_other(cgroups: FakePodCgroups) -> None:
    pod = str(uuid.uuid4())
    first, second = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        a = cgroups.create_pod_container("systemd-v2-containerd", pod, first)
        b = cgroups.create_pod_container("systemd-v2-containerd", pod, second)
        cgroups.move(procs[0].pid, a)
        cgroups.move(procs[1].pid, a)
        cgroups.move(procs[2].pid, b)
        assert container_processes(first) == sorted(p.pid for p in procs[:2])
        assert container_processes(f"containerd://{second}") == [procs[2].pid]
        assert container_processes(uuid.uuid4().hex * 2) == []
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_empty_id_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        container_processes("containerd://")
