"""Metrics every agent exports, on the agent's own registry.

Each agent has one `CollectorRegistry` and one name prefix
(`automount_healer_`, ...); state is computed at scrape time by the agents'
own collectors, events are counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

TICK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopMetrics:
    """Ticks, failed ticks, tick duration, last success, build info, up; and the
    Events the agent's EventRecorder suppressed (its `on_suppressed`)."""

    def __init__(self, registry: CollectorRegistry, prefix: str, version: str) -> None:
        self.ticks = Counter(f"{prefix}_ticks", "Ticks (passes) run.", registry=registry)
        self.tick_failures = Counter(
            f"{prefix}_tick_failures",
            "Ticks that raised; the agent logged the error and kept running.",
            registry=registry,
        )
        self.tick_duration = Histogram(
            f"{prefix}_tick_duration_seconds",
            "Wall time of one tick.",
            buckets=TICK_BUCKETS,
            registry=registry,
        )
        self.last_success = Gauge(
            f"{prefix}_last_success_timestamp_seconds",
            "Unix time of the last tick that completed without error.",
            registry=registry,
        )
        self.up = Gauge(
            f"{prefix}_up",
            "1 when the agent's sources of truth are usable, 0 when it runs blind.",
            registry=registry,
        )
        self.events_suppressed = Counter(
            f"{prefix}_events_suppressed",
            "Events not posted: as many about the same object and reason were posted "
            "within the rate limit's interval.",
            registry=registry,
        )
        Info(f"{prefix}_build", "Agent version.", registry=registry).info({"version": version})

    def event_suppressed(self, reason: str) -> None:
        """EventRecorder's `on_suppressed`."""
        self.events_suppressed.inc()
