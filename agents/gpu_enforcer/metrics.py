"""Prometheus metrics of the enforcer (prefix `gpu_mem_enforcer_`).

Counters for what happens (actions, signals, NVML errors); the state of the
last sample (per GPU, per pod and GPU) is computed at scrape time from the
enforcer's last report by `SampleCollector`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from agents.gpu_enforcer.enforcer import TickReport

PREFIX = "gpu_mem_enforcer"


class EnforcerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.actions = Counter(
            f"{PREFIX}_actions",
            "Enforcement actions by kind (kill, evict, observe, would-kill, refused, ...) "
            "and reason (hold, ceiling, pressure).",
            ["action", "reason"],
            registry=registry,
        )
        self.signals = Counter(
            f"{PREFIX}_signals",
            "Signals sent through a pidfd, by signal.",
            ["signal"],
            registry=registry,
        )
        self.nvml_errors = Counter(
            f"{PREFIX}_nvml_errors",
            "NVML errors by code name; no action is taken on a card with an error.",
            ["code"],
            registry=registry,
        )
        self.identity_mismatches = Counter(
            f"{PREFIX}_identity_mismatches",
            "Processes not signalled because their PID now names another process.",
            registry=registry,
        )
        self.processes_vanished = Counter(
            f"{PREFIX}_processes_vanished",
            "Processes NVML listed that exited before they could be attributed.",
            registry=registry,
        )
        self.scan_duration = Histogram(
            f"{PREFIX}_scan_duration_seconds",
            "Time to sample NVML, attribute and decide.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        )
        for signal in ("SIGTERM", "SIGKILL"):
            self.signals.labels(signal)


class SampleCollector(Collector):
    """Per-GPU and per-pod state of the last sample."""

    def __init__(self, last_report: Callable[[], TickReport]) -> None:
        self._last_report = last_report

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self._last_report()
        gpu_labels = ["gpu", "index"]
        total = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_total_bytes", "Card memory.", labels=gpu_labels
        )
        used = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_used_bytes", "Card memory in use.", labels=gpu_labels
        )
        trusted = GaugeMetricFamily(
            f"{PREFIX}_gpu_trusted",
            "1 when the card's sample is usable; 0 on NVML errors, failed sanity checks or MIG.",
            labels=[*gpu_labels, "status"],
        )
        unattributed = GaugeMetricFamily(
            f"{PREFIX}_unattributed_bytes",
            "Memory of processes in no known pod (host processes, unknown pods).",
            labels=gpu_labels,
        )
        usage_unknown = GaugeMetricFamily(
            f"{PREFIX}_usage_unknown_processes",
            "Processes on the card whose memory NVML reports as not available (MPS, "
            "unaccounted); their pods are judged on the known part.",
            labels=gpu_labels,
        )
        pod_labels = ["gpu", "namespace", "pod"]
        pod_used = GaugeMetricFamily(
            f"{PREFIX}_pod_used_bytes", "GPU memory of a pod on a card.", labels=pod_labels
        )
        pod_limit = GaugeMetricFamily(
            f"{PREFIX}_pod_limit_bytes", "The pod's hard limit on the card.", labels=pod_labels
        )
        pod_unknown = GaugeMetricFamily(
            f"{PREFIX}_pod_usage_unknown_processes",
            "Processes of the pod on the card whose memory is not available; "
            "pod_used_bytes is the known part.",
            labels=pod_labels,
        )
        over = GaugeMetricFamily(
            f"{PREFIX}_pod_over_limit",
            "1 while the pod is over its hard limit on the card (holding or enforced).",
            labels=pod_labels,
        )
        for gpu_report in report.gpus:
            gpu = gpu_report.gpu
            labels = [gpu.uuid, str(gpu.index)]
            status = gpu_report.status.split(":", 1)[0]
            trusted.add_metric([*labels, status], 1 if gpu_report.trusted else 0)
            if gpu.error is not None:
                continue
            total.add_metric(labels, gpu.total_bytes)
            used.add_metric(labels, gpu.used_bytes)
            unattributed.add_metric(labels, gpu_report.unattributed_bytes)
            usage_unknown.add_metric(labels, gpu_report.usage_unknown)
            for usage in gpu_report.usages:
                meta = (usage.pod or {}).get("metadata", {})
                plabels = [gpu.uuid, meta.get("namespace", ""), meta.get("name", usage.owner)]
                pod_used.add_metric(plabels, usage.used_bytes)
                pod_unknown.add_metric(plabels, usage.unknown)
                if usage.limit is not None:
                    pod_limit.add_metric(plabels, usage.limit.hard_bytes)
                over.add_metric(plabels, 1 if usage.verdict in ("over-limit", "enforce") else 0)
        yield from (
            total,
            used,
            trusted,
            unattributed,
            usage_unknown,
            pod_used,
            pod_unknown,
            pod_limit,
            over,
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
