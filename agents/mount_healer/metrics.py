"""Prometheus metrics of the healer (prefix `automount_healer_`).

Events (probes, heals, failures) are counters updated as they happen; the state
of the last sweep (mounts by verdict, roots) is computed at scrape time from
the healer's last report by `SweepStateCollector`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from agents.mount_healer.healer import MountReport

PREFIX = "automount_healer"
VERDICTS = ("healthy", "severed", "hung", "skipped")


class HealerMetrics:
    """Counters and histograms the healer updates during a sweep."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.probes = Counter(
            f"{PREFIX}_probes",
            "Confirming probes of mounts that fusectl flagged, by verdict.",
            ["verdict"],
            registry=registry,
        )
        self.probe_duration = Histogram(
            f"{PREFIX}_probe_duration_seconds",
            "Time a confirming probe took (timed-out probes count the timeout).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0),
            registry=registry,
        )
        self.heals = Counter(
            f"{PREFIX}_heals",
            "Severed mounts unmounted, by method (umount, or detach when busy).",
            ["method"],
            registry=registry,
        )
        self.dry_run_heals = Counter(
            f"{PREFIX}_dry_run_heals",
            "Severed mounts that would have been unmounted without --dry-run.",
            registry=registry,
        )
        self.heal_failures = Counter(
            f"{PREFIX}_heal_failures",
            "Unmounts of severed mounts that failed, by errno name.",
            ["reason"],
            registry=registry,
        )
        self.aborts = Counter(
            f"{PREFIX}_aborts",
            "Hung FUSE connections aborted through fusectl.",
            registry=registry,
        )
        self.sweep_duration = Histogram(
            f"{PREFIX}_sweep_duration_seconds",
            "Wall time of one sweep, probes and unmounts included.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.last_sweep = Gauge(
            f"{PREFIX}_last_sweep_timestamp_seconds",
            "Unix time the last sweep finished.",
            registry=registry,
        )
        self.mountinfo_malformed_lines = Gauge(
            f"{PREFIX}_mountinfo_malformed_lines",
            "Lines of the last mountinfo read that did not parse: mounts the healer cannot "
            "see (each is logged).",
            registry=registry,
        )
        self.event_driven = Gauge(
            f"{PREFIX}_event_driven",
            "1 when process exits wake a sweep (process-event connector), 0 when only the "
            "interval does.",
            registry=registry,
        )
        # Series exist at 0 from the start, so that rate() and increase()
        # see the first event.
        for verdict in VERDICTS:
            self.probes.labels(verdict)
        for method in ("umount", "detach"):
            self.heals.labels(method)
        self.fusectl_available = Gauge(
            f"{PREFIX}_fusectl_available",
            "1 when fusectl is readable: without it severed mounts cannot be seen.",
            registry=registry,
        )


class SweepStateCollector(Collector):
    """Mounts by root and verdict and autofs roots as of the last sweep; recent heals."""

    def __init__(
        self,
        last_reports: Callable[[], Sequence[MountReport]],
        roots: Callable[[], Sequence[str]],
        recent_heals: Callable[[], Mapping[tuple[str, str], int]],
    ) -> None:
        self._last_reports = last_reports
        self._roots = roots
        self._recent_heals = recent_heals

    def collect(self) -> Iterator[GaugeMetricFamily]:
        mounts = GaugeMetricFamily(
            f"{PREFIX}_mounts",
            "FUSE mounts under the autofs roots in the last sweep, by root and verdict.",
            labels=["root", "verdict"],
        )
        counts: dict[tuple[str, str], int] = {}
        for root in self._roots():
            for verdict in VERDICTS:
                counts[(root, verdict)] = 0
        for report in self._last_reports():
            key = (report.root, report.verdict)
            counts[key] = counts.get(key, 0) + 1
        for (root, verdict), n in sorted(counts.items()):
            mounts.add_metric([root, verdict], n)
        yield mounts
        skipped = GaugeMetricFamily(
            f"{PREFIX}_mounts_not_healable",
            "FUSE mounts in the last sweep the healer cannot act on, by root and reason "
            "(mount_propagation: in a slave copy whose master is not visible here).",
            labels=["root", "reason"],
        )
        reasons: dict[tuple[str, str], int] = {}
        for report in self._last_reports():
            if report.skip_reason:
                why = (report.root, report.skip_reason)
                reasons[why] = reasons.get(why, 0) + 1
        for (root, reason), n in sorted(reasons.items()):
            skipped.add_metric([root, reason], n)
        yield skipped
        roots = GaugeMetricFamily(f"{PREFIX}_autofs_roots", "autofs roots the healer watches.")
        roots.add_metric([], len(self._roots()))
        yield roots
        recent = GaugeMetricFamily(
            f"{PREFIX}_recent_heals",
            "Heals of this mount point in the last hour; only mount points healed in that "
            "hour have a series.",
            labels=["root", "mountpoint"],
        )
        for (root, mountpoint), n in sorted(self._recent_heals().items()):
            recent.add_metric([root, mountpoint], n)
        yield recent

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
