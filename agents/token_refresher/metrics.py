"""Prometheus metrics of the token refresher (prefix `token_refresher_`).

Each role exports what it does: the controller refreshes and writes Secrets,
the injector writes files, local mode does both on one node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agents.token_refresher.config import OFFLINE_IDLE

if TYPE_CHECKING:  # oauth imports requests: the injector does without
    from agents.token_refresher.oauth import Token

PREFIX = "token_refresher"


def _refreshes(registry: CollectorRegistry) -> Counter:
    counter = Counter(
        f"{PREFIX}_refreshes",
        "Refresh attempts by result: ok, or the failure's kind (invalid_grant, "
        "invalid_client, timeout, connection, http_5xx, rate_limited, bad_response, tls, "
        "bad_token, bad_secret, token_url_refused, token_file, ...).",
        ["result"],
        registry=registry,
    )
    counter.labels("ok")
    return counter


def _time_to_expiry(registry: CollectorRegistry) -> Gauge:
    return Gauge(
        f"{PREFIX}_time_to_expiry_seconds",
        "Seconds until the current access token expires (negative: expired); "
        "token is namespace/name of the Secret, or the token file's name.",
        ["token"],
        registry=registry,
    )


class Expiries:
    """The two expiries of each token: the access token's and the chain's."""

    def __init__(self, registry: CollectorRegistry, offline_idle: float) -> None:
        self.offline_idle = offline_idle
        self.access = _time_to_expiry(registry)
        self.refresh = Gauge(
            f"{PREFIX}_refresh_token_time_to_expiry_seconds",
            "Seconds until the refresh token expires and the chain of refreshes "
            "ends (Keycloak's refresh_expires_in); offline tokens (refresh_expires_in "
            "0) end once unused for the Offline Session Idle, counted from their last "
            'refresh (offline="true").',
            ["token", "offline"],
            registry=registry,
        )

    def set(self, name: str, token: Token, now: float) -> None:
        if token.expires_at is not None:
            self.access.labels(name).set(token.expires_at - now)
        left = token.refresh_lifetime(now, self.offline_idle)
        offline = "true" if token.offline else "false"
        # One series per token: drop the other kind's after a new login.
        with contextlib.suppress(KeyError):
            self.refresh.remove(name, "false" if token.offline else "true")
        if left is None:
            with contextlib.suppress(KeyError):
                self.refresh.remove(name, offline)
        else:
            self.refresh.labels(name, offline).set(left)

    def remove(self, name: str) -> None:
        for gauge, labels in (
            (self.access, [(name,)]),
            (self.refresh, [(name, "true"), (name, "false")]),
        ):
            for values in labels:
                with contextlib.suppress(KeyError):  # it may never have had one
                    gauge.remove(*values)


def _files_written(registry: CollectorRegistry) -> Counter:
    return Counter(
        f"{PREFIX}_files_written",
        "Token files written (unchanged content is not rewritten).",
        registry=registry,
    )


def _injection_failures(registry: CollectorRegistry) -> Counter:
    return Counter(
        f"{PREFIX}_injection_failures",
        "Token files that could not be written, by reason.",
        ["reason"],
        registry=registry,
    )


def _api_calls(registry: CollectorRegistry) -> Counter:
    return Counter(
        f"{PREFIX}_api_calls",
        "Kubernetes API requests by verb and resource (a watch counts once, when opened).",
        ["verb", "resource"],
        registry=registry,
    )


class RefresherMetrics:
    """Local mode: refreshes one token file and writes one output file."""

    def __init__(self, registry: CollectorRegistry, offline_idle: float = OFFLINE_IDLE) -> None:
        self.refreshes = _refreshes(registry)
        self.expiries = Expiries(registry, offline_idle)
        self.files_written = _files_written(registry)
        self.injection_failures = _injection_failures(registry)


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry, offline_idle: float = OFFLINE_IDLE) -> None:
        self.refreshes = _refreshes(registry)
        self.expiries = Expiries(registry, offline_idle)
        self.api_calls = _api_calls(registry)
        self.leader = Gauge(
            f"{PREFIX}_leader",
            "1 while this replica holds the Lease and refreshes tokens.",
            registry=registry,
        )
        self.token_secrets = Gauge(
            f"{PREFIX}_token_secrets",
            "Token Secrets watched, by state: ok, retrying (transient failures), "
            "stopped (a final error: waits for the Secret to change), invalid.",
            ["state"],
            registry=registry,
        )
        self.write_conflicts = Counter(
            f"{PREFIX}_secret_write_conflicts",
            "Secret writes refused with 409 Conflict (stale resourceVersion) and retried.",
            registry=registry,
        )
        self.unpersisted = Gauge(
            f"{PREFIX}_unpersisted_tokens",
            "Refreshed tokens not yet written to their Secret (retried every pass).",
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_refreshes_in_flight",
            "Refreshes a worker is doing now (IdP request and Secret write); at most "
            "--refresh-workers, --refresh-per-host per IdP host.",
            registry=registry,
        )
        self.stalled = Gauge(
            f"{PREFIX}_stalled_seconds",
            "Seconds the refresh pass or a refresh worker has gone without progress (0: "
            "none busy); past --stall-limit this replica stops renewing its Lease.",
            registry=registry,
        )

    def api_call(self, verb: str, resource: str) -> None:
        self.api_calls.labels(verb, resource).inc()


class InjectorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.files_written = _files_written(registry)
        self.injection_failures = _injection_failures(registry)
        self.api_calls = _api_calls(registry)
        self.files = Gauge(
            f"{PREFIX}_files",
            "Token files this injector keeps, by state: ok, failing, waiting "
            "(container not running yet, Secret not seen yet).",
            ["state"],
            registry=registry,
        )
        self.write_seconds = Gauge(
            f"{PREFIX}_last_pass_seconds",
            "Duration of the last pass that wrote or checked files.",
            registry=registry,
        )
        self.controller_connected = Gauge(
            f"{PREFIX}_injector_controller_connected",
            "1 while a stream from a controller replica is open and has delivered its files.",
            registry=registry,
        )
        self.controller_errors = Counter(
            f"{PREFIX}_injector_controller_errors",
            "Failed or lost streams from the controller, by reason: unauthenticated, "
            "forbidden, too_many_pods, unavailable, bad_request, http_<code> (HTTP "
            "answers), connection, timeout (silent stream), tls, dns, protocol, token_file "
            "(projected token unreadable), ca (CA bundle unavailable).",
            ["reason"],
            registry=registry,
        )
        self.stuck_writes = Gauge(
            f"{PREFIX}_injector_stuck_writes",
            "Write threads abandoned at their deadline (--write-timeout) and still "
            "blocked in the kernel; at --max-stuck-writes the injector is not ready.",
            registry=registry,
        )
        self.stale_files_ignored = Counter(
            f"{PREFIX}_injector_stale_files_ignored",
            "Files delivered with an older token than the one already kept for them "
            "(a replica whose cache lags); the newer one stays.",
            registry=registry,
        )
        self._age = _SnapshotAge()
        registry.register(self._age)

    def api_call(self, verb: str, resource: str) -> None:
        self.api_calls.labels(verb, resource).inc()

    def snapshot_age_from(self, age: Callable[[], float | None]) -> None:
        """Where `injector_snapshot_age_seconds` comes from at scrape time."""
        self._age.age = age


class _SnapshotAge(Collector):
    """Seconds since the files in use were last confirmed by a controller; absent
    before any were received or loaded."""

    NAME = f"{PREFIX}_injector_snapshot_age_seconds"
    HELP = (
        "Seconds since the controller last confirmed the files this injector keeps "
        "(a snapshot or a heartbeat on a live stream; after a restart, the time the "
        "state file's files were received)."
    )

    def __init__(self) -> None:
        self.age: Callable[[], float | None] = lambda: None

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP)

    def collect(self) -> Iterator[Metric]:
        age = self.age()
        if age is None:
            return
        family = GaugeMetricFamily(self.NAME, self.HELP)
        family.add_metric([], age)
        yield family


FILES_REQUEST_OUTCOMES = (
    "ok",
    "bad_request",
    "unauthenticated",
    "forbidden",
    "too_many_pods",
    "unavailable",
)
REFUSED_REASONS = ("other_node", "not_found", "uid_mismatch")
REVIEW_OUTCOMES = ("authenticated", "rejected", "error")


class FilesMetrics:
    """The controller's file server: requests, refusals, streams, TokenReviews."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            f"{PREFIX}_files_requests",
            "Requests for a node's token files, by outcome: ok (a stream opened), "
            "bad_request, unauthenticated, forbidden, too_many_pods, unavailable.",
            ["outcome"],
            registry=registry,
        )
        self.refused_pods = Counter(
            f"{PREFIX}_files_refused_pods",
            "Pods an injector claimed and did not get files for, by reason: other_node, "
            "not_found, uid_mismatch.",
            ["reason"],
            registry=registry,
        )
        self.streams = Gauge(
            f"{PREFIX}_files_streams",
            "Streams of token files open now (one per connected injector).",
            registry=registry,
        )
        self.snapshots_sent = Counter(
            f"{PREFIX}_files_snapshots_sent",
            "Snapshots of a node's token files sent (the first of each stream, then each change).",
            registry=registry,
        )
        self.reviews = Counter(
            f"{PREFIX}_token_reviews",
            "TokenReviews of injector tokens sent to the API server, by outcome: "
            "authenticated, rejected, error (no answer: the caller got 503, nothing cached).",
            ["outcome"],
            registry=registry,
        )
        for outcome in FILES_REQUEST_OUTCOMES:
            self.requests.labels(outcome)
        for reason in REFUSED_REASONS:
            self.refused_pods.labels(reason)
        for outcome in REVIEW_OUTCOMES:
            self.reviews.labels(outcome)


class TlsExpiry(Collector):
    """Seconds left on the serving and CA certificates, computed at scrape."""

    def __init__(
        self, registry: CollectorRegistry, seconds_left: Callable[[], Mapping[str, float]]
    ) -> None:
        self._seconds_left = seconds_left
        registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            f"{PREFIX}_tls_certificate_expiry_seconds",
            "Seconds until the file server's certificates expire: serving, ca "
            "(absent until the TLS material is read).",
            labels=["certificate"],
        )
        for certificate, seconds in sorted(self._seconds_left().items()):
            family.add_metric([certificate], seconds)
        yield family
