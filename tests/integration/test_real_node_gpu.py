"""The GPU memory enforcer on a real node: processes in runc containers started by
containerd (hack/containerd.py), listed by the fake libnvidia-ml, killed through a
pidfd (root, containerd, ctr, runc).

What the fake-cgroup tests (test_gpu_enforcer.py) cannot show: the cgroup paths
are the ones runc makes (both kubelet cgroup drivers), the PID is the host PID of
a container's init, and the kill leaves the runtime's shim alone.
"""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path

import psutil
import pytest

from agents.gpu_enforcer.cli import main
from hack.autofs_world import wait_for
from hack.containerd import CgroupStyle, Containerd, RealContainer
from hack.fake_nvml import FakeNvmlWorld, FakeProcess, fake_uuid
from tests.support.agent import AgentThread
from tests.support.gpu_enforcer import GIB, NODE, cluster, enforcer_argv

pytestmark = [pytest.mark.realnode, pytest.mark.root]

GPU = {"nvidia.com/gpu": "1"}


def pidfds_on(pid: int) -> list[str]:
    """This process's file descriptors that are pidfds of `pid` (their fdinfo's `Pid:`
    line, fs/pidfs.c): the enforcer runs in this process (AgentThread)."""
    held = []
    for info in Path("/proc/self/fdinfo").iterdir():
        try:
            lines = info.read_text().splitlines()
        except OSError:  # closed meanwhile
            continue
        if f"Pid:\t{pid}" in lines:
            held.append(info.name)
    return held


def notebook(containerd: Containerd, cgroup_style: CgroupStyle) -> RealContainer:
    """One "notebook" pod's main container (its init is the process on the GPU)."""
    return containerd.run(str(uuid.uuid4()), "main", cgroup_style=cgroup_style)


@pytest.mark.parametrize("cgroup_style", ["systemd", "systemd-literal", "cgroupfs"])
def test_a_container_over_its_share_is_killed_its_neighbour_and_shim_untouched(
    containerd: Containerd, card: FakeNvmlWorld, tmp_path: Path, cgroup_style: CgroupStyle
) -> None:
    greedy, neighbour = notebook(containerd, cgroup_style), notebook(containerd, cgroup_style)
    shim = psutil.Process(greedy.shim_pid)
    shim_started = shim.create_time()
    card.write(
        processes=[FakeProcess(0, greedy.pid, 10 * GIB), FakeProcess(0, neighbour.pid, 4 * GIB)]
    )
    pods = [
        containerd.pod("greedy", "ml", NODE, [greedy], limits=GPU),
        containerd.pod("neighbour", "ml", NODE, [neighbour], limits=GPU),
    ]
    with (
        cluster(tmp_path, *pods) as kube,
        AgentThread(main, enforcer_argv(tmp_path, "--hold", "0.5", "--grace", "1")) as agent,
    ):
        labels = {"gpu": fake_uuid(0), "namespace": "ml"}
        # Both PIDs are attributed to their pods through the cgroups runc made.
        wait_for(
            lambda: (
                agent.value("gpu_mem_enforcer_pod_used_bytes", {**labels, "pod": "neighbour"})
                == 4 * GIB
            ),
            10,
        )
        # The container's init, by its host PID, is held through a pidfd: the
        # signals go through it, never to a PID that may be reused.
        assert pidfds_on(greedy.pid), "no pidfd held on the container's process"
        wait_for(lambda: not containerd.alive(greedy), 15)
        card.remove_process(greedy.pid)
        # The container's init is PID 1 of its namespace: it ignores SIGTERM
        # (pid_namespaces(7)), so the grace ends with SIGKILL.
        assert agent.value("gpu_mem_enforcer_signals_total", {"signal": "SIGTERM"}) == 1
        assert agent.value("gpu_mem_enforcer_signals_total", {"signal": "SIGKILL"}) == 1
        assert (
            agent.value("gpu_mem_enforcer_actions_total", {"action": "kill", "reason": "hold"}) == 1
        )
        events = [
            e
            for e in kube.objects("events", "ml")
            if e["involvedObject"].get("uid") == greedy.pod_uid
        ]
        assert [e["reason"] for e in events] == ["GPUMemoryLimitEnforced"]
        assert str(10 * GIB) in events[0]["message"] and str(8 * GIB) in events[0]["message"]
        time.sleep(0.5)
    assert not psutil.pid_exists(greedy.pid) or psutil.Process(greedy.pid).status() == "zombie"
    assert containerd.task_status(greedy) == "STOPPED"
    assert containerd.alive(neighbour)
    assert containerd.exec(neighbour, ["true"]).returncode == 0
    # The runtime's shim of the killed container is untouched: same process, alive.
    assert shim.is_running() and shim.create_time() == shim_started
    assert shim.status() != psutil.STATUS_ZOMBIE
    assert shim.name() == "containerd-shim-runc-v2"


def test_a_dry_run_on_a_real_container_kills_nothing(
    containerd: Containerd, card: FakeNvmlWorld, tmp_path: Path
) -> None:
    greedy = notebook(containerd, "systemd")
    card.write(processes=[FakeProcess(0, greedy.pid, 12 * GIB)])
    out = io.StringIO()
    with cluster(tmp_path, containerd.pod("greedy", "ml", NODE, [greedy], limits=GPU)):
        argv = enforcer_argv(tmp_path, "--hold", "0", "--once", "--dry-run")
        assert main(argv, stdout=out) == 0
    report = out.getvalue()
    assert "enforce / would-kill" in report and "8192MiB" in report
    assert f"ml/greedy/{greedy.id[:12]}" in report  # the pod and its container, by its cgroup
    time.sleep(0.3)
    assert containerd.alive(greedy)
    assert containerd.task_status(greedy) == "RUNNING"
