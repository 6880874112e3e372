"""/metrics, /healthz and /readyz over real HTTP on a loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from agents.common.http import AgentHTTPServer
from agents.common.loop import Heartbeat, run_loop
from agents.common.metrics import LoopMetrics
from agents.common.settings import Address

PREFIX = "demo_agent"
PROMTOOL = "/usr/bin/promtool"


class FakeClock:
    """A monotonic clock that moves only when a test sets `now`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def heartbeat(clock: FakeClock) -> Heartbeat:
    return Heartbeat(max_age=10.0, clock=clock)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def loop_metrics(registry: CollectorRegistry) -> LoopMetrics:
    """Loop metrics after two passes, one failed, so every series has a value to check."""
    metrics = LoopMetrics(registry, PREFIX, "1.2.3")
    outcomes = iter([None, RuntimeError("source broken")])

    def tick() -> None:
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome

    run_loop(tick, interval=0.001, stop=threading.Event(), iterations=2, metrics=metrics)
    metrics.up.set(1)
    return metrics


@pytest.fixture
def server(
    registry: CollectorRegistry, loop_metrics: LoopMetrics, heartbeat: Heartbeat
) -> Iterator[AgentHTTPServer]:
    server = AgentHTTPServer(Address("127.0.0.1", 0), registry, heartbeat).start()
    try:
        yield server
    finally:
        server.close()


def get(server: AgentHTTPServer, path: str, host: str = "127.0.0.1") -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of GET `path`; error statuses are answers too."""
    netloc = f"[{host}]" if ":" in host else host
    url = f"http://{netloc}:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read()


def test_port_zero_picks_a_free_port(server: AgentHTTPServer) -> None:
    assert server.port > 0


def test_metrics(server: AgentHTTPServer) -> None:
    status, content_type, body = get(server, "/metrics")
    assert status == 200
    assert content_type == CONTENT_TYPE_LATEST
    assert content_type.startswith("text/plain")
    text = body.decode()
    for name in (
        f"{PREFIX}_ticks_total 2.0",
        f"{PREFIX}_tick_failures_total 1.0",
        f"{PREFIX}_tick_duration_seconds_count 2.0",
        f"{PREFIX}_last_success_timestamp_seconds",
        f"{PREFIX}_up 1.0",
        f'{PREFIX}_build_info{{version="1.2.3"}} 1.0',
    ):
        assert name in text


def test_metrics_with_query_string(server: AgentHTTPServer) -> None:
    status, _, body = get(server, "/metrics?name[]=x")
    assert status == 200
    assert f"{PREFIX}_ticks_total".encode() in body


def test_metrics_are_read_at_scrape_time(
    server: AgentHTTPServer, loop_metrics: LoopMetrics
) -> None:
    assert f"{PREFIX}_ticks_total 2.0".encode() in get(server, "/metrics")[2]
    run_loop(
        lambda: None, interval=0.001, stop=threading.Event(), iterations=1, metrics=loop_metrics
    )
    assert f"{PREFIX}_ticks_total 3.0".encode() in get(server, "/metrics")[2]


def test_healthz_ok_then_503_when_stale(
    server: AgentHTTPServer, heartbeat: Heartbeat, clock: FakeClock
) -> None:
    heartbeat.beat()
    assert get(server, "/healthz") == (200, "text/plain", b"ok\n")
    clock.now += 10.5
    status, content_type, body = get(server, "/healthz")
    assert status == 503
    assert content_type == "text/plain"
    assert body == b"last successful tick 10.5s ago (limit 10.0s)\n"
    heartbeat.beat()
    assert get(server, "/healthz")[0] == 200


def test_readyz_503_until_a_tick_succeeded_and_ready(
    server: AgentHTTPServer, heartbeat: Heartbeat
) -> None:
    assert get(server, "/readyz") == (503, "text/plain", b"no successful tick yet\n")
    heartbeat.beat()
    heartbeat.set_ready(False, "fusectl unavailable")
    assert get(server, "/readyz") == (503, "text/plain", b"fusectl unavailable\n")
    heartbeat.set_ready(True)
    assert get(server, "/readyz") == (200, "text/plain", b"ok\n")


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/", "/healthz/extra", "/favicon.ico"])
def test_other_paths_404(server: AgentHTTPServer, path: str) -> None:
    status, _, body = get(server, path)
    assert status == 404
    assert body == b"not found\n"


def test_close_frees_the_port(registry: CollectorRegistry, heartbeat: Heartbeat) -> None:
    server = AgentHTTPServer(Address("127.0.0.1", 0), registry, heartbeat).start()
    port = server.port
    server.close()
    with socket.socket() as sock, pytest.raises(OSError):
        sock.settimeout(1)
        sock.connect(("127.0.0.1", port))


def test_ipv6_loopback(
    registry: CollectorRegistry, loop_metrics: LoopMetrics, heartbeat: Heartbeat
) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    server = AgentHTTPServer(Address("::1", 0), registry, heartbeat).start()
    try:
        status, _, body = get(server, "/metrics", host="::1")
        assert status == 200
        assert f"{PREFIX}_ticks_total".encode() in body
    finally:
        server.close()


def test_metrics_pass_promtool(server: AgentHTTPServer) -> None:
    if not shutil.which(PROMTOOL):
        pytest.skip(f"{PROMTOOL} not installed (Debian package prometheus)")
    _, _, body = get(server, "/metrics")
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    problems = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, problems
    assert problems.strip() == ""
