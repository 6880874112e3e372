"""One tick of the GPU memory enforcer: sample, attribute, decide, act.

Time slicing shares a card with no memory isolation: one pod can take all of
it and make its neighbours fail. Each tick lists every GPU's compute
processes through NVML, maps each host PID to its pod through
/proc/<pid>/cgroup, sums memory per pod per GPU, and compares it with the
pod's limit (limits.py) through the policy (policy.py). Nothing is done on
uncertain data: an NVML error, a listing that fails a sanity check (PID 0, a
record above the card, a PID listed twice), a MIG card, a pod the node does
not know. A record whose usage is not available (an MPS server, a process
NVML cannot account) makes only its own pod's usage partly unknown: that pod
is over when its known part alone is (policy.py); every other pod on the card
is judged as usual.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from agents.common.attribution import AttributionError, ContainerRef, read_cgroup
from agents.common.attribution import ProcessGone as AttributionGone
from agents.common.process import (
    LiveProcesses,
    ProcessGone,
    ProcessRef,
    ProcessReplaced,
    is_running,
    signal_process,
)
from agents.gpu_enforcer.config import EnforcerConfig
from agents.gpu_enforcer.limits import AdminLimit, Limit, LimitPolicy
from agents.gpu_enforcer.metrics import EnforcerMetrics
from agents.gpu_enforcer.nvml import Gpu, Nvml, NvmlError
from agents.gpu_enforcer.policy import Decision, Policy, Usage, Verdict

log = logging.getLogger(__name__)

HOST = "host"


class Action(StrEnum):
    NONE = "none"
    KILL = "kill"
    EVICT = "evict"
    OBSERVE = "observe"
    WOULD_KILL = "would-kill"
    WOULD_EVICT = "would-evict"
    TERMINATING = "terminating"
    REFUSED = "refused"
    FAILED = "failed"


class PodDirectory(Protocol):
    """What the enforcer needs to know about pods: Kubernetes, or a limits file."""

    def pod(self, uid: str) -> Mapping[str, Any] | None: ...

    def admin_limit(self, pod: Mapping[str, Any]) -> AdminLimit | None:
        """The limit an admin wrote for this pod (namespace default, limits file)."""
        ...

    def replicas(self) -> int | None: ...


class Evictor(Protocol):
    def evict(self, namespace: str, name: str) -> bool:
        """True when the eviction was accepted, False when a disruption budget refused it."""
        ...


Notify = Callable[[Mapping[str, Any], str, str, str], None]
"""(pod, type, reason, message) -> posts an Event on the pod; no-op in local mode."""


@dataclass(frozen=True)
class ProcessSample:
    """One NVML process record, attributed."""

    pid: int
    used_bytes: int  # 0 when not available
    ref: ProcessRef | None
    container: ContainerRef | None
    owner: str  # pod UID, "host", or "" when gone
    usage_known: bool = True  # False: NVML_VALUE_NOT_AVAILABLE


@dataclass
class PodUsage:
    """One pod (or the host) on one GPU in this tick."""

    gpu: Gpu
    owner: str
    pod: Mapping[str, Any] | None
    used_bytes: int  # the known part
    limit: Limit | None
    processes: list[ProcessSample]
    verdict: Verdict = Verdict.OK
    action: Action = Action.NONE
    reason: str = ""

    @property
    def label(self) -> str:
        if self.pod is None:
            return self.owner
        meta = self.pod.get("metadata", {})
        return f"{meta.get('namespace', '')}/{meta.get('name', self.owner)}".lstrip("/")

    @property
    def unknown(self) -> int:
        """Processes of this pod on the card whose usage NVML could not tell."""
        return sum(1 for p in self.processes if not p.usage_known)


@dataclass
class GpuReport:
    gpu: Gpu
    status: str = "ok"  # ok | mig | error: ... | uncertain: ...
    usages: list[PodUsage] = field(default_factory=list)
    unattributed_bytes: int = 0
    samples: list[ProcessSample] = field(default_factory=list)

    @property
    def trusted(self) -> bool:
        return self.status == "ok"

    @property
    def usage_unknown(self) -> int:
        """Records on the card whose usage is not available."""
        return sum(1 for s in self.samples if not s.usage_known)


@dataclass
class TickReport:
    gpus: list[GpuReport] = field(default_factory=list)
    error: NvmlError | None = None

    @property
    def checked(self) -> bool:
        """Every card was sampled and judged (MIG cards count: nothing to enforce there)."""
        return self.error is None and all(g.status in ("ok", "mig") for g in self.gpus)

    def table(self) -> str:
        """The local debug table: per GPU, each process with its pod, usage, limit, verdict."""
        if self.error is not None:
            return f"NVML unavailable: {self.error}\n"
        lines = []
        for report in self.gpus:
            gpu = report.gpu
            lines.append(
                f"GPU {gpu.index} {gpu.uuid} {gpu.name}: {_mib(gpu.used_bytes)} / "
                f"{_mib(gpu.total_bytes)} used; {report.status}"
            )
            lines.append(
                f"  {'PID':>8}  {'POD/CONTAINER':<48} {'USED':>10} {'LIMIT':>10}  VERDICT / ACTION"
            )
            by_owner = {u.owner: u for u in report.usages}
            for sample in report.samples:
                usage = by_owner.get(sample.owner)
                who = usage.label if usage is not None else (sample.owner or "gone")
                if sample.container is not None and sample.container.container_id:
                    who = f"{who}/{sample.container.container_id[:12]}"
                limit = _mib(usage.limit.hard_bytes) if usage and usage.limit else "-"
                verdict = f"{usage.verdict} / {usage.action}" if usage is not None else "ignored"
                if usage is not None and usage.reason:
                    verdict += f" ({usage.reason})"
                used = _mib(sample.used_bytes) if sample.usage_known else "unknown"
                lines.append(f"  {sample.pid:>8}  {who:<48} {used:>10} {limit:>10}  {verdict}")
        return "\n".join(lines) + "\n"


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f}MiB"


def ticks_since_boot(proc_root: str) -> int:
    """Now, in the clock ticks that /proc/<pid>/stat start times use.

    /proc/uptime prints the boot-time clock in centiseconds ("4986.11"),
    truncated like the start times (fs/proc/uptime.c; nsec_to_clock_t). It is
    parsed as integers: float("4986.11") * 100 is 498610.99..., one tick
    short, and a process started in the tick of the sample looked newer.
    """
    with open(f"{proc_root}/uptime", encoding="ascii") as f:
        seconds, _, fraction = f.read().split()[0].partition(".")
    centiseconds = int(seconds) * 100 + int((fraction + "00")[:2])
    return centiseconds * os.sysconf("SC_CLK_TCK") // 100


class Enforcer:
    """The tick and the state it keeps between ticks. Every boundary is injected."""

    def __init__(
        self,
        config: EnforcerConfig,
        *,
        nvml: Nvml,
        pods: PodDirectory,
        metrics: EnforcerMetrics,
        evictor: Evictor | None = None,
        notify: Notify | None = None,
        signal_fn: Callable[[ProcessRef, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._nvml = nvml
        self._pods = pods
        self._metrics = metrics
        self._evictor = evictor
        self._notify = notify
        self._signal = signal_fn or (lambda ref, sig: signal_process(ref, sig, config.proc_root))
        self._clock = clock
        self._policies: dict[str, Policy] = {}
        self._terminating: dict[ProcessRef, tuple[float, str]] = {}
        # Processes signalled that NVML still lists (exiting, a zombie, the
        # driver tearing down the context): acted on once, never again.
        self._signalled: set[ProcessRef] = set()
        self._nvml_down: NvmlError | None = None
        self._evicted: dict[str, float] = {}
        self._soft_warned: set[tuple[str, str]] = set()
        # (pod UID, problem) already reported: one Event per bad input, not one per tick.
        self._limit_problems: set[tuple[str, str]] = set()
        # Per card, the PIDs whose usage was not available at the last report.
        self._unknown_usage: dict[str, frozenset[int]] = {}
        # Each GPU process's identity and pod, held by a pidfd while it lives.
        self._processes: LiveProcesses[ContainerRef | None] = LiveProcesses(config.proc_root)
        self.last_report = TickReport()

    # -- the tick ----------------------------------------------------------

    def tick(self) -> TickReport:
        started = self._clock()
        self._finish_terminations()
        # Read before NVML lists the processes: a PID whose process started
        # later than this was handed to a newcomer after the listing, or may
        # have been; either way that sample is not acted on.
        sample_ticks = ticks_since_boot(self.config.proc_root)
        try:
            gpus = self._nvml.snapshot()
        except NvmlError as err:
            self._metrics.nvml_errors.labels(err.name).inc()
            log.error("NVML unavailable, nothing enforced: %s", err)
            self._nvml_down = err
            self.last_report = TickReport(error=err)
            return self.last_report
        if self._nvml_down is not None:
            log.info(
                "NVML available again (was: %s): %d GPU(s), enforcing", self._nvml_down, len(gpus)
            )
            self._nvml_down = None
        self._processes.prune()
        report = TickReport([self._gpu(gpu, sample_ticks) for gpu in gpus])
        self._processes.retain(s.pid for g in report.gpus for s in g.samples)
        listed = {s.ref for g in report.gpus for s in g.samples if s.ref is not None}
        self._signalled = {r for r in self._signalled if r in listed or r in self._terminating}
        owners = {u.owner for g in report.gpus for u in g.usages}
        self._limit_problems = {p for p in self._limit_problems if p[0] in owners}
        self.last_report = report
        self._metrics.scan_duration.observe(self._clock() - started)
        return report

    def _gpu(self, gpu: Gpu, sample_ticks: int) -> GpuReport:
        report = GpuReport(gpu)
        if gpu.error is not None:
            self._metrics.nvml_errors.labels(gpu.error.name).inc()
            report.status = f"error: {gpu.error}"
            return report
        if gpu.mig:
            # MIG partitions are isolated in hardware: nothing to enforce.
            report.status = "mig"
            return report
        problem = self._sanity(gpu)
        if problem:
            report.status = f"uncertain: {problem}"
            log.warning("GPU %d %s: %s; no action on this card", gpu.index, gpu.uuid, problem)
            return report
        report.samples = [self._attribute(p.pid, p.used_bytes, sample_ticks) for p in gpu.processes]
        self._report_unknown_usage(gpu, report.samples)
        by_owner: dict[str, list[ProcessSample]] = {}
        for sample in report.samples:
            if not sample.owner:
                continue
            if sample.owner == HOST and self.config.host_limit is None:
                report.unattributed_bytes += sample.used_bytes
                continue
            by_owner.setdefault(sample.owner, []).append(sample)
        replicas = self.config.replicas or self._pods.replicas()
        limits = LimitPolicy(
            replicas=replicas,
            soft_fraction=self.config.soft_fraction,
            peer_schedulers=frozenset(self.config.peer_schedulers),
        )
        for owner, samples in by_owner.items():
            usage = self._usage(gpu, owner, samples, limits)
            if usage is None:
                report.unattributed_bytes += sum(s.used_bytes for s in samples)
                continue
            report.usages.append(usage)
        # One policy per card: each keeps the holds of the pods on its card.
        policy = self._policies.setdefault(gpu.uuid, Policy(self.config.policy))
        decisions = policy.decide(
            gpu.total_bytes,
            gpu.used_bytes,
            [Usage((gpu.uuid, u.owner), u.used_bytes, u.limit, u.unknown) for u in report.usages],
            self._clock(),
        )
        by_key = {d.key: d for d in decisions}
        for usage in report.usages:
            self._act(usage, by_key[(gpu.uuid, usage.owner)])
        return report

    @staticmethod
    def _sanity(gpu: Gpu) -> str:
        """Why this card's whole listing cannot be trusted, or '' when it can.

        Usage not available is not such a reason: it is one record's gap, and
        the policy judges that record's pod on the rest (policy.py).
        """
        seen: set[int] = set()
        for proc in gpu.processes:
            if proc.pid <= 0:
                return f"process record with PID {proc.pid}"
            if proc.used_bytes is not None and proc.used_bytes > gpu.total_bytes:
                return f"PID {proc.pid} uses {proc.used_bytes} bytes, more than the card has"
            if proc.pid in seen:
                return f"PID {proc.pid} listed twice"
            seen.add(proc.pid)
        return ""

    def _report_unknown_usage(self, gpu: Gpu, samples: list[ProcessSample]) -> None:
        """One log line when the card's set of records without usage changes."""
        unknown = frozenset(s.pid for s in samples if not s.usage_known)
        if unknown == self._unknown_usage.get(gpu.uuid, frozenset()):
            return
        self._unknown_usage[gpu.uuid] = unknown
        if not unknown:
            log.info("GPU %d %s: usage known again for every process", gpu.index, gpu.uuid)
            return
        whose = ", ".join(
            f"PID {s.pid} ({s.owner or 'gone'})" for s in samples if not s.usage_known
        )
        log.warning(
            "GPU %d %s: usage not available for %s; those pods are judged on their known "
            "usage, the others as usual",
            gpu.index,
            gpu.uuid,
            whose,
        )

    def _attribute(self, pid: int, used_or_none: int | None, sample_ticks: int) -> ProcessSample:
        known_usage = used_or_none is not None
        used = used_or_none or 0
        proc_root = self.config.proc_root
        known = self._processes.get(pid)
        try:
            if known is None:
                # The runtime places a process in its container's cgroup when
                # it creates it and never moves it: read once per lifetime.
                known = self._processes.add(pid, lambda _ref: read_cgroup(pid, proc_root))
        except (ProcessGone, AttributionGone):
            self._metrics.processes_vanished.inc()
            return ProcessSample(pid, used, None, None, "", known_usage)
        except (AttributionError, OSError) as err:
            log.warning("PID %d: %s; treated as unknown", pid, err)
            return ProcessSample(pid, used, None, None, "", known_usage)
        ref, container = known
        if ref.start_time > sample_ticks:
            # Started after the tick began, so after NVML may have listed the
            # PID: it may name a newcomer that reused it.
            self._metrics.identity_mismatches.inc()
            return ProcessSample(pid, used, None, None, "", known_usage)
        owner = container.pod_uid if container is not None else HOST
        return ProcessSample(pid, used, ref, container, owner, known_usage)

    def _usage(
        self, gpu: Gpu, owner: str, samples: list[ProcessSample], limits: LimitPolicy
    ) -> PodUsage | None:
        used = sum(s.used_bytes for s in samples)
        if owner == HOST:
            host_limit = self.config.host_limit
            limit = (
                None
                if host_limit is None
                else Limit(host_limit, int(host_limit * self.config.soft_fraction), "host limit")
            )
            return PodUsage(gpu, owner, None, used, limit, samples)
        pod = self._pods.pod(owner)
        if pod is None:
            # A pod this node does not know (yet): never act on it.
            return None
        resolution = limits.resolve(pod, gpu.total_bytes, self._pods.admin_limit(pod))
        for problem in resolution.problems:
            if (owner, problem) not in self._limit_problems:
                self._limit_problems.add((owner, problem))
                log.warning("pod %s: %s", owner, problem)
                self._notify_pod(pod, "Warning", "GPUMemoryLimitInvalid", problem)
        return PodUsage(gpu, owner, pod, used, resolution.limit, samples)

    # -- acting ------------------------------------------------------------

    def _act(self, usage: PodUsage, decision: Decision) -> None:
        usage.verdict, usage.reason = decision.verdict, decision.reason
        key = (usage.gpu.uuid, usage.owner)
        if decision.verdict is Verdict.SOFT:
            if key not in self._soft_warned and usage.limit is not None:
                self._soft_warned.add(key)
                self._notify_pod(
                    usage.pod,
                    "Warning",
                    "GPUMemoryOverSoftLimit",
                    self._numbers(usage, f"over the soft limit {usage.limit.soft_bytes}"),
                )
        elif decision.verdict is Verdict.OK:
            self._soft_warned.discard(key)
        if decision.verdict is not Verdict.ENFORCE:
            return
        if any(s.ref in self._terminating or s.ref in self._signalled for s in usage.processes):
            usage.action = Action.TERMINATING  # acted on already; its outcome is logged once
            return
        action = self.config.action
        if usage.pod is None and action == "evict":
            action = "kill"  # host processes have no pod to evict
        if action == "observe":
            usage.action = Action.OBSERVE
        elif self.config.dry_run:
            usage.action = Action.WOULD_KILL if action == "kill" else Action.WOULD_EVICT
        elif action == "kill":
            usage.action = self._kill(usage)
        else:
            usage.action = self._evict(usage)
        self._metrics.actions.labels(str(usage.action), _reason_label(decision)).inc()
        message = self._numbers(usage, f"{decision.reason}; action {usage.action}")
        log.warning("GPU %s pod %s: %s", usage.gpu.uuid, usage.label, message)
        self._notify_pod(usage.pod, "Warning", "GPUMemoryLimitEnforced", message)

    def _numbers(self, usage: PodUsage, what: str) -> str:
        limit = usage.limit
        unknown = (
            f" (and {usage.unknown} process(es) whose usage is not available)"
            if usage.unknown
            else ""
        )
        return (
            f"uses {usage.used_bytes} bytes{unknown} of GPU {usage.gpu.index} ({usage.gpu.uuid}), "
            f"limit {limit.hard_bytes if limit else '-'} bytes "
            f"({limit.source if limit else 'none'}); {what}"
        )

    def _kill(self, usage: PodUsage) -> Action:
        """SIGTERM now through a pidfd; SIGKILL after the grace, in a later tick."""
        try:
            listed = {p.pid for p in self._nvml.processes(usage.gpu.index)}
        except NvmlError as err:
            self._metrics.nvml_errors.labels(err.name).inc()
            log.error("cannot re-check GPU %d before killing: %s", usage.gpu.index, err)
            return Action.FAILED
        signalled = 0
        for sample in usage.processes:
            if sample.ref is None or sample.pid not in listed:
                continue  # gone, or no longer on this GPU
            if sample.container is not None and not sample.container.in_container:
                continue  # the pod's infrastructure (CRI-O's conmon), never a workload
            try:
                self._signal(sample.ref, signal.SIGTERM)
            except ProcessReplaced as err:
                # The PID names another process now (PID reuse): never signal it.
                self._metrics.identity_mismatches.inc()
                log.warning("PID %d not signalled: %s", sample.pid, err)
                continue
            except ProcessGone:
                self._metrics.processes_vanished.inc()
                continue
            except OSError as err:
                log.error("cannot signal PID %d: %s", sample.pid, err)
                continue
            self._metrics.signals.labels("SIGTERM").inc()
            deadline = self._clock() + self.config.grace
            self._terminating[sample.ref] = (deadline, usage.label)
            self._signalled.add(sample.ref)
            signalled += 1
        return Action.KILL if signalled else Action.FAILED

    def _finish_terminations(self) -> None:
        now = self._clock()
        for ref, (deadline, label) in list(self._terminating.items()):
            if not is_running(ref, self.config.proc_root):
                del self._terminating[ref]
                waited = self.config.grace - (deadline - now)
                log.info("PID %d of %s: terminated after SIGTERM (%.1fs)", ref.pid, label, waited)
                continue
            if now < deadline:
                continue
            del self._terminating[ref]
            try:
                self._signal(ref, signal.SIGKILL)
            except ProcessGone:
                log.info("PID %d of %s: gone before SIGKILL", ref.pid, label)
                continue
            except OSError as err:
                log.error("cannot SIGKILL PID %d: %s", ref.pid, err)
                continue
            self._metrics.signals.labels("SIGKILL").inc()
            log.warning(
                "PID %d of %s: killed after the grace (ignored SIGTERM for %.0fs)",
                ref.pid,
                label,
                self.config.grace,
            )

    def _evict(self, usage: PodUsage) -> Action:
        if self._evictor is None or usage.pod is None:
            return Action.FAILED
        meta = usage.pod.get("metadata", {})
        uid = usage.owner
        if self._clock() - self._evicted.get(uid, -1e9) < self.config.grace:
            return Action.TERMINATING
        try:
            accepted = self._evictor.evict(meta.get("namespace", ""), meta.get("name", ""))
        except Exception as err:
            log.error("eviction of %s failed: %s", usage.label, err)
            return Action.FAILED
        if not accepted:
            return Action.REFUSED  # a PodDisruptionBudget said no; retried next tick
        self._evicted[uid] = self._clock()
        return Action.EVICT

    def _notify_pod(
        self, pod: Mapping[str, Any] | None, type_: str, reason: str, message: str
    ) -> None:
        if self._notify is not None and pod is not None:
            self._notify(pod, type_, reason, message)

    def close(self) -> None:
        self._nvml.close()
        self._processes.close()


def _reason_label(decision: Decision) -> str:
    if decision.reason.startswith("above"):
        return "ceiling"
    if "pressure" in decision.reason:
        return "pressure"
    return "hold"
