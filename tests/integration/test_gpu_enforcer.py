"""The GPU memory enforcer on a fake card: real pynvml over the fake libnvidia-ml,
"pods" that are real processes in real kubelet-like cgroups, real kills (root).

Each test maps to an acceptance point of issue 3.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agents.common.process import ProcessRef, is_running, signal_process
from agents.gpu_enforcer.cli import main
from agents.gpu_enforcer.config import EnforcerConfig
from agents.gpu_enforcer.enforcer import Enforcer
from agents.gpu_enforcer.limits import ANNOTATION_LIMIT, ANNOTATION_NAMESPACE_DEFAULT
from agents.gpu_enforcer.metrics import EnforcerMetrics
from agents.gpu_enforcer.nvml import Nvml
from agents.gpu_enforcer.pods import LocalPods
from agents.gpu_enforcer.policy import PolicyConfig
from hack.autofs_world import wait_for
from hack.cgroups import CgroupsUnavailable, FakePodCgroups
from hack.fake_nvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    FakeGpu,
    FakeNvmlWorld,
    FakeProcess,
    fake_uuid,
)
from tests.conftest import IN_CI, IS_ROOT
from tests.support.agent import AgentThread
from tests.support.gpu_enforcer import CARD, GIB, NODE, cluster, enforcer_argv
from tests.support.rbac import GPU_EVICT_COMPONENT

pytestmark = pytest.mark.root


def _need(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


@dataclass
class Pod:
    uid: str
    name: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture
def pods() -> Iterator[Any]:
    """Start "pods": real processes moved into kubelet-like cgroups (systemd driver, v2)."""
    _need(IS_ROOT, "needs root: real cgroups and signals to other processes")
    started: list[Pod] = []
    try:
        cgroups = FakePodCgroups()
    except CgroupsUnavailable as err:
        _need(False, f"needs cgroups: {err}")
        raise

    def start(name: str) -> Pod:
        uid = str(uuid.uuid4())
        proc = subprocess.Popen(["sleep", "300"])
        handle = cgroups.create_pod_container(
            "systemd-v2-containerd", uid, uuid.uuid4().hex + uuid.uuid4().hex
        )
        cgroups.move(proc.pid, handle)
        pod = Pod(uid, name, proc)
        started.append(pod)
        return pod

    try:
        yield start
    finally:
        for pod in started:
            if pod.alive():
                pod.proc.kill()
            pod.proc.wait(10)
        cgroups.close()


def kube_pod(
    pod: Pod, namespace: str = "ml", annotations: dict[str, str] | None = None, gpus: int = 1
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": namespace,
            "uid": pod.uid,
            "annotations": annotations or {},
        },
        "spec": {
            "nodeName": NODE,
            "containers": [
                {
                    "name": "main",
                    "image": "jupyter",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
        },
        "status": {"phase": "Running"},
    }


# -- 1. only the pod over its share for longer than the hold is killed ---------------


def test_pod_over_its_share_is_killed_and_its_neighbour_untouched(
    card: FakeNvmlWorld, pods: Any, tmp_path: Path
) -> None:
    greedy, neighbour = pods("greedy"), pods("neighbour")
    card.write(
        processes=[FakeProcess(0, greedy.pid, 10 * GIB), FakeProcess(0, neighbour.pid, 4 * GIB)]
    )
    with (
        cluster(tmp_path, kube_pod(greedy), kube_pod(neighbour)) as kube,
        AgentThread(main, enforcer_argv(tmp_path, "--hold", "1", "--grace", "2")) as agent,
    ):
        started = time.monotonic()
        wait_for(lambda: not greedy.alive(), 10)
        assert time.monotonic() - started >= 1.0  # not before the hold
        assert greedy.proc.returncode == -signal.SIGTERM
        card.remove_process(greedy.pid)
        time.sleep(0.5)
        assert neighbour.alive()
        assert (
            agent.value("gpu_mem_enforcer_actions_total", {"action": "kill", "reason": "hold"}) == 1
        )
        assert agent.value("gpu_mem_enforcer_signals_total", {"signal": "SIGTERM"}) == 1
        events = [
            e for e in kube.objects("events", "ml") if e["involvedObject"].get("uid") == greedy.uid
        ]
        assert [e["reason"] for e in events] == ["GPUMemoryLimitEnforced"]
        assert events[0]["type"] == "Warning"
        assert str(10 * GIB) in events[0]["message"] and str(8 * GIB) in events[0]["message"]
        assert not [
            e
            for e in kube.objects("events", "ml")
            if e["involvedObject"].get("uid") == neighbour.uid
        ]


def test_a_spike_shorter_than_the_hold_is_left_alone(
    card: FakeNvmlWorld, pods: Any, tmp_path: Path
) -> None:
    spiky = pods("spiky")
    card.write(processes=[FakeProcess(0, spiky.pid, 10 * GIB)])
    with (
        cluster(tmp_path, kube_pod(spiky)),
        AgentThread(main, enforcer_argv(tmp_path, "--hold", "3")) as agent,
    ):
        wait_for(lambda: agent.value("gpu_mem_enforcer_ticks_total") >= 3, 10)
        card.set_used(spiky.pid, 5 * GIB)
        ticks = agent.value("gpu_mem_enforcer_ticks_total")
        wait_for(lambda: agent.value("gpu_mem_enforcer_ticks_total") >= ticks + 15, 10)
        assert spiky.alive()
        assert agent.value("gpu_mem_enforcer_signals_total", {"signal": "SIGTERM"}) == 0


def test_sigterm_ignored_is_followed_by_sigkill_after_the_grace(
    card: FakeNvmlWorld, pods: Any, tmp_path: Path
) -> None:
    stubborn = pods("stubborn")
    card.write(processes=[FakeProcess(0, stubborn.pid, 12 * GIB)])
    # A stopped process keeps SIGTERM pending, as one that ignores it would.
    os.kill(stubborn.pid, signal.SIGSTOP)
    with (
        cluster(tmp_path, kube_pod(stubborn)),
        AgentThread(main, enforcer_argv(tmp_path, "--hold", "0", "--grace", "1")) as agent,
    ):
        wait_for(
            lambda: agent.value("gpu_mem_enforcer_signals_total", {"signal": "SIGTERM"}) == 1, 10
        )
        wait_for(lambda: not stubborn.alive(), 10)
        assert stubborn.proc.returncode == -signal.SIGKILL
        assert agent.value("gpu_mem_enforcer_signals_total", {"signal": "SIGKILL"}) == 1


# -- 2. PID reuse: a PID that names another process now is never signalled -----------


def _spawn_with_pid(pid: int) -> subprocess.Popen[bytes]:
    """A new process with a given (free) PID, through ns_last_pid (root)."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(["sleep", "300"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    raise RuntimeError(f"could not get PID {pid}")


def test_a_reused_pid_is_never_signalled(card: FakeNvmlWorld, pods: Any) -> None:
    greedy = pods("greedy")
    pid = greedy.pid
    card.write(processes=[FakeProcess(0, pid, 12 * GIB)])
    replacement: list[subprocess.Popen[bytes]] = []

    def reuse_then_signal(ref: ProcessRef, sig: int) -> None:
        # Between the sample and the signal, the process exits and another
        # takes its PID: what a busy node does to a PID read earlier.
        greedy.proc.kill()
        greedy.proc.wait()
        replacement.append(_spawn_with_pid(ref.pid))
        signal_process(ref, sig)

    registry = CollectorRegistry()
    metrics = EnforcerMetrics(registry)
    config = EnforcerConfig(replicas=2, policy=PolicyConfig(hold=0))
    enforcer = Enforcer(
        config, nvml=Nvml(), pods=LocalPods(None, 2), metrics=metrics, signal_fn=reuse_then_signal
    )
    try:
        report = enforcer.tick()
        assert report.gpus[0].usages[0].verdict == "enforce"
        assert replacement and replacement[0].pid == pid
        time.sleep(0.2)
        assert replacement[0].poll() is None  # the newcomer lives
        assert registry.get_sample_value("gpu_mem_enforcer_identity_mismatches_total") == 1
        assert (
            registry.get_sample_value("gpu_mem_enforcer_signals_total", {"signal": "SIGTERM"}) == 0
        )
    finally:
        enforcer.close()
        for proc in replacement:
            proc.kill()
            proc.wait()


# -- 3. NVML errors: no action, the agent stays up, and recovers ---------------------


def test_nvml_errors_mid_run_stop_actions_until_it_recovers(card: FakeNvmlWorld, pods: Any) -> None:
    greedy = pods("greedy")
    card.write(processes=[FakeProcess(0, greedy.pid, 12 * GIB)])
    card.inject("nvmlDeviceGetComputeRunningProcesses_v3", NVML_ERROR_GPU_IS_LOST, device=0)
    argv = [
        "--local",
        "--replicas",
        "2",
        "--hold",
        "0.5",
        "--interval",
        "0.2",
        "--metrics-address",
        "off",
    ]
    with AgentThread(main, argv) as agent:
        wait_for(
            lambda: agent.value("gpu_mem_enforcer_nvml_errors_total", {"code": "GPU_IS_LOST"}) >= 5,
            10,
        )
        assert greedy.alive()
        assert (
            agent.value(
                "gpu_mem_enforcer_gpu_trusted",
                {"gpu": fake_uuid(0), "index": "0", "status": "error"},
            )
            == 0
        )
        # The driver goes away entirely: not up, still running.
        card.clear_errors()
        card.inject("nvmlInit*", NVML_ERROR_DRIVER_NOT_LOADED)
        card.inject("nvmlDeviceGetCount*", NVML_ERROR_DRIVER_NOT_LOADED)
        wait_for(lambda: agent.value("gpu_mem_enforcer_up") == 0, 10)
        # Usage not available for its only process: nothing known is over.
        card.clear_errors()
        card.set_used(greedy.pid, None)
        wait_for(lambda: agent.value("gpu_mem_enforcer_up") == 1, 10)
        labels = {"gpu": fake_uuid(0), "index": "0"}
        wait_for(lambda: agent.value("gpu_mem_enforcer_usage_unknown_processes", labels) == 1, 10)
        time.sleep(1.0)
        assert greedy.alive()
        # Recovered: the hold runs and the pod is stopped.
        card.set_used(greedy.pid, 12 * GIB)
        wait_for(lambda: not greedy.alive(), 10)
        assert agent.value("gpu_mem_enforcer_tick_failures_total") == 0


def test_no_gpu_library_is_reported_and_the_agent_stays_up(card: FakeNvmlWorld) -> None:
    card.remove()  # the fake answers like a node whose driver is not loaded
    out = io.StringIO()
    code = main(["--local", "--once", "--metrics-address", "off"], stdout=out)
    assert code == 1  # nothing was checked (issue 9.8)
    assert "NVML unavailable" in out.getvalue() and "DRIVER_NOT_LOADED" in out.getvalue()


# -- 4. pressure-aware: borrow while there is room, reclaim under pressure ------------


def test_pressure_aware_borrows_then_reclaims_the_furthest_over(
    card: FakeNvmlWorld, pods: Any
) -> None:
    borrower, modest, grower = pods("borrower"), pods("modest"), pods("grower")
    card.write(
        processes=[
            FakeProcess(0, borrower.pid, 10 * GIB),
            FakeProcess(0, modest.pid, 2 * GIB),
            FakeProcess(0, grower.pid, 1 * GIB),
        ]
    )
    argv = [
        "--local",
        "--replicas",
        "2",
        "--hold",
        "0.4",
        "--interval",
        "0.2",
        "--pressure-aware",
        "--free-threshold",
        "0.1",
        "--grace",
        "1",
        "--metrics-address",
        "off",
    ]
    with AgentThread(main, argv) as agent:
        # 13 of 16 GiB used: 3 GiB free > 1.6 GiB threshold: borrowing is fine.
        wait_for(lambda: agent.value("gpu_mem_enforcer_ticks_total") >= 8, 10)
        assert borrower.alive()
        # The grower (within its share) takes 2 GiB more: 1 GiB free, pressure.
        card.set_used(grower.pid, 3 * GIB)
        wait_for(lambda: not borrower.alive(), 10)
        card.remove_process(borrower.pid)
        time.sleep(0.6)
        assert modest.alive() and grower.alive()
        assert (
            agent.value("gpu_mem_enforcer_actions_total", {"action": "kill", "reason": "pressure"})
            == 1
        )


# -- 6. limits from annotations and the agreed share, through the Kubernetes API -----


def test_limits_come_from_annotations_namespace_default_and_share(
    card: FakeNvmlWorld, pods: Any, tmp_path: Path
) -> None:
    annotated, defaulted, shared, hami = (
        pods("annotated"),
        pods("defaulted"),
        pods("shared"),
        pods("hami"),
    )
    card.write(
        processes=[FakeProcess(0, p.pid, 1 * GIB) for p in (annotated, defaulted, shared, hami)]
    )
    hami_pod = kube_pod(hami)
    hami_pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpumem"] = "3000"
    objects = [
        kube_pod(annotated, annotations={ANNOTATION_LIMIT: "2500Mi"}),
        kube_pod(defaulted, namespace="team"),
        kube_pod(shared, gpus=1),
        hami_pod,
    ]
    with cluster(tmp_path, *objects, replicas=4) as kube:
        kube.put(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "team", "annotations": {ANNOTATION_NAMESPACE_DEFAULT: "2Gi"}},
            }
        )
        registry = CollectorRegistry()
        out = io.StringIO()
        code = main(enforcer_argv(tmp_path, "--once"), stdout=out, registry=registry)
    assert code == 0
    table = out.getvalue()

    def limit(pod: Pod, namespace: str = "ml") -> float | None:
        return registry.get_sample_value(
            "gpu_mem_enforcer_pod_limit_bytes",
            {"gpu": fake_uuid(0), "namespace": namespace, "pod": pod.name},
        )

    assert limit(annotated) == 2500 * 1024**2  # lowers the 4 GiB share
    assert limit(defaulted, "team") == 2 * GIB
    assert limit(shared) == CARD // 4  # node label nvidia.com/gpu.replicas=4
    assert limit(hami) == 3000 * 1024**2
    assert f"ml/{annotated.name}" in table and "team/defaulted" in table


# -- issue 9.6: a record without usage makes only its own pod's usage unknown --------


def test_a_process_without_usage_does_not_shield_the_other_pods(
    card: FakeNvmlWorld, pods: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    greedy, mps = pods("greedy"), pods("mps")
    host = subprocess.Popen(["sleep", "300"])  # an MPS server NVML cannot account
    try:
        card.write(
            processes=[
                FakeProcess(0, greedy.pid, 10 * GIB),
                FakeProcess(0, mps.pid, None),
                FakeProcess(0, host.pid, None),
            ]
        )
        argv = enforcer_argv(tmp_path, "--hold", "0.5", "--grace", "2")
        with (
            caplog.at_level("WARNING"),
            cluster(tmp_path, kube_pod(greedy), kube_pod(mps)),
            AgentThread(main, argv) as agent,
        ):
            wait_for(lambda: not greedy.alive(), 10)
            labels = {"gpu": fake_uuid(0), "index": "0"}
            assert agent.value("gpu_mem_enforcer_usage_unknown_processes", labels) == 2
            pod_labels = {"gpu": fake_uuid(0), "namespace": "ml", "pod": "mps"}
            assert agent.value("gpu_mem_enforcer_pod_usage_unknown_processes", pod_labels) == 1
            assert agent.value("gpu_mem_enforcer_pod_over_limit", pod_labels) == 0
        assert mps.alive() and host.poll() is None
        [line] = [r.getMessage() for r in caplog.records if "usage not available" in r.getMessage()]
        assert f"PID {mps.pid} ({mps.uid})" in line and f"PID {host.pid} (host)" in line
    finally:
        host.kill()
        host.wait()


def test_a_pid_listed_twice_makes_the_card_untrusted(card: FakeNvmlWorld, pods: Any) -> None:
    # Summed twice, 5 GiB would look like 10 GiB, over the 8 GiB share.
    doubled = pods("doubled")
    card.write(
        processes=[FakeProcess(0, doubled.pid, 5 * GIB), FakeProcess(0, doubled.pid, 5 * GIB)]
    )
    out = io.StringIO()
    argv = ["--local", "--replicas", "2", "--hold", "0", "--once", "--dry-run"]
    main(argv, stdout=out)
    assert f"uncertain: PID {doubled.pid} listed twice" in out.getvalue()
    assert "would-kill" not in out.getvalue()


# -- issue 9.8: exit codes, NVML recovery, one line per action and per outcome -------


def test_once_exits_1_when_a_card_could_not_be_checked(card: FakeNvmlWorld) -> None:
    argv = ["--local", "--replicas", "2", "--once"]
    assert main(argv, stdout=io.StringIO()) == 0
    card.inject("nvmlDeviceGetMemoryInfo", NVML_ERROR_GPU_IS_LOST, device=0)
    assert main(argv, stdout=io.StringIO()) == 1


def test_a_kill_is_logged_once_with_its_outcome_and_nvml_recovery_once(
    card: FakeNvmlWorld, pods: Any, caplog: pytest.LogCaptureFixture
) -> None:
    greedy = pods("greedy")
    card.write(processes=[FakeProcess(0, greedy.pid, 12 * GIB)])
    card.inject("nvmlInit*", NVML_ERROR_DRIVER_NOT_LOADED)
    card.inject("nvmlDeviceGetCount*", NVML_ERROR_DRIVER_NOT_LOADED)
    argv = ["--local", "--replicas", "2", "--hold", "0", "--interval", "0.2"]
    errors = ("gpu_mem_enforcer_nvml_errors_total", {"code": "DRIVER_NOT_LOADED"})
    with caplog.at_level("INFO"), AgentThread(main, [*argv, "--metrics-address", "off"]) as agent:
        wait_for(lambda: agent.value(*errors) >= 2, 10)
        assert greedy.alive()
        ref = ProcessRef.of(greedy.pid)
        card.clear_errors()
        # Not greedy.alive(): that would reap it. Unreaped, the exited process
        # stays a zombie NVML still lists, as while a driver tears down its
        # context: no second action.
        wait_for(lambda: not is_running(ref), 10)
        ticks = agent.value("gpu_mem_enforcer_ticks_total")
        wait_for(lambda: agent.value("gpu_mem_enforcer_ticks_total") >= ticks + 5, 10)
        assert agent.value("gpu_mem_enforcer_signals_total", {"signal": "SIGTERM"}) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "action kill" in m]) == 1
    assert len([m for m in messages if f"PID {greedy.pid} of" in m and "terminated" in m]) == 1
    assert len([m for m in messages if "NVML available again" in m]) == 1


# -- issue 9.5: a pod's own annotation may only lower the admin's limit ------------


def test_a_pod_cannot_exempt_itself_by_annotation(
    card: FakeNvmlWorld, pods: Any, tmp_path: Path
) -> None:
    huge, garbled = pods("huge"), pods("garbled")
    card.write(processes=[FakeProcess(0, huge.pid, 5 * GIB), FakeProcess(0, garbled.pid, 5 * GIB)])
    objects = [
        kube_pod(huge, annotations={ANNOTATION_LIMIT: "1Ei"}),
        kube_pod(garbled, annotations={ANNOTATION_LIMIT: "lots"}),
    ]
    argv = enforcer_argv(tmp_path, "--hold", "1", "--grace", "2")
    with cluster(tmp_path, *objects, replicas=4) as kube, AgentThread(main, argv) as agent:
        # 5 GiB each, over the 4 GiB share (16 GiB / 4): neither annotation helps.
        wait_for(lambda: not huge.alive() and not garbled.alive(), 10)
        # The counter follows the signal by a few instructions.
        wait_for(
            lambda: agent.value("gpu_mem_enforcer_signals_total", {"signal": "SIGTERM"}) == 2, 10
        )

        def reasons() -> list[str]:
            return [
                e["reason"]
                for e in kube.objects("events", "ml")
                if e["involvedObject"].get("uid") == garbled.uid
            ]

        # The Event follows the signal (one more API request, under RBAC now).
        wait_for(lambda: "GPUMemoryLimitEnforced" in reasons(), 10)
        reasons_seen = reasons()
    # Several ticks saw the bad annotation; it is reported once.
    assert sorted(reasons_seen) == ["GPUMemoryLimitEnforced", "GPUMemoryLimitInvalid"]


def test_local_mode_names_the_limits_file_and_its_entries_are_the_admins(
    card: FakeNvmlWorld, pods: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raised, defaulted = pods("raised"), pods("defaulted")
    card.write(
        processes=[FakeProcess(0, raised.pid, 6 * GIB), FakeProcess(0, defaulted.pid, 6 * GIB)]
    )
    limits = tmp_path / "limits.yaml"
    limits.write_text(f'default: 4Gi\npods:\n  "{raised.uid}": 7Gi\n')
    out = io.StringIO()
    argv = ["--local", "--limits-file", str(limits), "--hold", "0", "--once", "--dry-run"]
    with caplog.at_level("WARNING"):
        assert main(argv, stdout=out) == 0
    table = out.getvalue()
    # The operator's per-pod entry raises that pod above the file's default.
    [row] = [r for r in table.splitlines() if raised.uid in r]
    assert "7168MiB" in row and "ok / none" in row
    [line] = [r.getMessage() for r in caplog.records if "would-kill" in r.getMessage()]
    assert defaulted.uid in line and f"({limits} default)" in line
    assert "namespace default" not in caplog.text


# -- the other actions and policies -------------------------------------------------


def test_evict_goes_through_the_eviction_api_and_retries_a_refusal(
    card: FakeNvmlWorld, pods: Any, tmp_path: Path
) -> None:
    greedy = pods("greedy")
    card.write(processes=[FakeProcess(0, greedy.pid, 12 * GIB)])
    # --action evict needs the opt-in component's pods/eviction grant (issue 10);
    # until it exists, the base bundle still grants it.
    with cluster(tmp_path, kube_pod(greedy), components=(GPU_EVICT_COMPONENT,)) as kube:
        kube.refuse_evictions(times=1)
        with AgentThread(
            main, enforcer_argv(tmp_path, "--action", "evict", "--hold", "0")
        ) as agent:
            # The counter follows the API call by a few instructions.
            wait_for(
                lambda: (
                    agent.value(
                        "gpu_mem_enforcer_actions_total", {"action": "evict", "reason": "hold"}
                    )
                    == 1
                ),
                10,
            )
            assert (
                agent.value(
                    "gpu_mem_enforcer_actions_total", {"action": "refused", "reason": "hold"}
                )
                == 1
            )
            assert [(e.namespace, e.name) for e in kube.evictions] == [("ml", "greedy")]
        assert greedy.alive()  # evicting is the kubelet's job, not a signal from us
        assert agent.value("gpu_mem_enforcer_signals_total", {"signal": "SIGTERM"}) == 0


def test_observe_and_dry_run_touch_nothing(card: FakeNvmlWorld, pods: Any) -> None:
    greedy = pods("greedy")
    card.write(processes=[FakeProcess(0, greedy.pid, 12 * GIB)])
    out = io.StringIO()
    assert (
        main(["--local", "--replicas", "2", "--hold", "0", "--once", "--dry-run"], stdout=out) == 0
    )
    assert "enforce / would-kill" in out.getvalue()
    assert greedy.uid in out.getvalue() and "8192MiB" in out.getvalue()
    argv = [
        "--local",
        "--replicas",
        "2",
        "--hold",
        "0",
        "--action",
        "observe",
        "--interval",
        "0.2",
        "--metrics-address",
        "off",
    ]
    with AgentThread(main, argv) as agent:
        wait_for(
            lambda: (
                agent.value(
                    "gpu_mem_enforcer_actions_total", {"action": "observe", "reason": "hold"}
                )
                >= 2
            ),
            10,
        )
    assert greedy.alive()


def test_host_processes_are_ignored_unless_a_host_limit_is_set(card: FakeNvmlWorld) -> None:
    host = subprocess.Popen(["sleep", "300"])  # in no pod's cgroup
    try:
        card.write(processes=[FakeProcess(0, host.pid, 6 * GIB)])
        registry = CollectorRegistry()
        assert (
            main(["--local", "--replicas", "2", "--once"], stdout=io.StringIO(), registry=registry)
            == 0
        )
        assert (
            registry.get_sample_value(
                "gpu_mem_enforcer_unattributed_bytes", {"gpu": fake_uuid(0), "index": "0"}
            )
            == 6 * GIB
        )
        argv = [
            "--local",
            "--host-limit",
            "4Gi",
            "--hold",
            "0",
            "--interval",
            "0.2",
            "--metrics-address",
            "off",
        ]
        with AgentThread(main, argv):
            wait_for(lambda: host.poll() is not None, 10)
        assert host.returncode == -signal.SIGTERM
    finally:
        if host.poll() is None:
            host.kill()
        host.wait()


def test_mig_cards_are_reported_and_never_enforced(card: FakeNvmlWorld, pods: Any) -> None:
    greedy = pods("greedy")
    card.write(
        gpus=[FakeGpu(0, fake_uuid(0), total=CARD, mig=True)],
        processes=[FakeProcess(0, greedy.pid, 12 * GIB)],
    )
    out = io.StringIO()
    registry = CollectorRegistry()
    assert (
        main(["--local", "--replicas", "2", "--hold", "0", "--once"], stdout=out, registry=registry)
        == 0
    )
    assert "; mig" in out.getvalue()
    assert (
        registry.get_sample_value(
            "gpu_mem_enforcer_gpu_trusted", {"gpu": fake_uuid(0), "index": "0", "status": "mig"}
        )
        == 0
    )
    assert greedy.alive()


def test_metrics_pass_promtool(card: FakeNvmlWorld, pods: Any) -> None:
    promtool = shutil.which("promtool")
    _need(promtool is not None, "needs promtool (apt-get install prometheus)")
    greedy = pods("greedy")
    card.write(processes=[FakeProcess(0, greedy.pid, 5 * GIB)])
    registry = CollectorRegistry()
    assert (
        main(["--local", "--replicas", "2", "--once"], stdout=io.StringIO(), registry=registry) == 0
    )
    body = generate_latest(registry)
    assert b"gpu_mem_enforcer_pod_used_bytes{" in body
    checked = subprocess.run(
        [str(promtool), "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout


def test_a_lost_gpu_does_not_blind_the_others(card: FakeNvmlWorld) -> None:
    card.write(gpus=[FakeGpu(0, fake_uuid(0), total=CARD), FakeGpu(1, fake_uuid(1), total=CARD)])
    card.inject("nvmlDeviceGetMemoryInfo", NVML_ERROR_GPU_IS_LOST, device=0)
    nvml = Nvml()
    try:
        first = nvml.snapshot()
        assert first[0].error is not None and first[0].error.name == "GPU_IS_LOST"
        assert first[1].error is None and first[1].total_bytes == CARD
        card.clear_errors()
        assert [g.error for g in nvml.snapshot()] == [None, None]  # initialised again
    finally:
        nvml.close()


def test_holds_are_kept_per_card_on_a_node_with_several(card: FakeNvmlWorld, pods: Any) -> None:
    greedy, other = pods("greedy"), pods("other")
    card.write(
        gpus=[FakeGpu(0, fake_uuid(0), total=CARD), FakeGpu(1, fake_uuid(1), total=CARD)],
        processes=[FakeProcess(0, greedy.pid, 10 * GIB), FakeProcess(1, other.pid, 2 * GIB)],
    )
    argv = [
        "--local",
        "--replicas",
        "2",
        "--hold",
        "1",
        "--interval",
        "0.2",
        "--metrics-address",
        "off",
    ]
    with AgentThread(main, argv):
        wait_for(lambda: not greedy.alive(), 10)
    assert other.alive()
