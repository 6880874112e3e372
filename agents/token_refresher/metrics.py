"""Prometheus metrics of the token refresher (prefix `token_refresher_`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

PREFIX = "token_refresher"


class RefresherMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.refreshes = Counter(
            f"{PREFIX}_refreshes",
            "Refresh attempts by result: ok, or the failure's kind (invalid_grant, "
            "invalid_client, timeout, connection, http_5xx, rate_limited, bad_response, tls, "
            "bad_token, token_file).",
            ["result"],
            registry=registry,
        )
        self.seconds_to_expiry = Gauge(
            f"{PREFIX}_seconds_to_expiry",
            "Seconds until the current access token expires (negative: expired).",
            ["token"],
            registry=registry,
        )
        self.files_written = Counter(
            f"{PREFIX}_files_written",
            "Token files written (unchanged content is not rewritten).",
            registry=registry,
        )
        self.injection_failures = Counter(
            f"{PREFIX}_injection_failures",
            "Token files that could not be written, by reason.",
            ["reason"],
            registry=registry,
        )
        self.refreshes.labels("ok")
