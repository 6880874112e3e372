"""A real Prometheus (Debian's) scrapes the healer on loopback and sees a heal (root)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.mount_healer.cli import main
from hack.autofs_world import AutofsWorld, wait_for
from hack.prometheus import LocalPrometheus, free_port
from tests.conftest import IN_CI
from tests.support.agent import AgentThread

pytestmark = pytest.mark.root


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"needs {tool} (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(f"CI must run this test: {message}")
        pytest.skip(message)
    return path


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def prometheus(workdir: Path, metrics_port: int) -> Iterator[LocalPrometheus]:
    prom = LocalPrometheus(
        workdir / "prometheus",
        {"automount-healer": f"127.0.0.1:{metrics_port}"},
        binary=need("prometheus"),
    )
    try:
        prom.start()
        wait_for(prom.ready, 30, interval=0.2)
        yield prom
    finally:
        prom.stop()


def test_prometheus_scrapes_the_heal_counter(
    world: AutofsWorld, prometheus: LocalPrometheus, metrics_port: int
) -> None:
    world.access("repo1")
    argv = [
        "--root",
        str(world.root),
        "--interval",
        "0.5",
        "--metrics-address",
        f"127.0.0.1:{metrics_port}",
    ]
    with AgentThread(main, argv):
        wait_for(lambda: prometheus.total("automount_healer_up") == 1, 20, interval=0.25)
        assert prometheus.total("sum(automount_healer_heals_total)") in (None, 0)
        world.kill_daemon("repo1")
        wait_for(lambda: world.mount("repo1") is None, 5)
        wait_for(
            lambda: prometheus.total('automount_healer_heals_total{method="umount"}') == 1,
            20,
            interval=0.25,
        )
        root = str(world.root)
        assert prometheus.total(f'automount_healer_mounts{{root="{root}"}}') is not None


def test_metrics_pass_promtool(world: AutofsWorld, metrics_port: int) -> None:
    promtool = need("promtool")
    world.access("repo1")
    world.kill_daemon("repo1")
    argv = [
        "--root",
        str(world.root),
        "--interval",
        "0.5",
        "--metrics-address",
        f"127.0.0.1:{metrics_port}",
    ]
    with AgentThread(main, argv) as agent:
        wait_for(lambda: agent.value("automount_healer_heals_total", {"method": "umount"}), 5)
        body = get(f"http://127.0.0.1:{metrics_port}/metrics")
        health = get(f"http://127.0.0.1:{metrics_port}/healthz")
        ready = get(f"http://127.0.0.1:{metrics_port}/readyz")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == b"" and checked.stderr.strip() == b""
    for name in (
        b"automount_healer_probes_total",
        b"automount_healer_heals_total",
        b"automount_healer_heal_failures_total",
        b"automount_healer_probe_duration_seconds_bucket",
        b"automount_healer_sweep_duration_seconds_bucket",
        b"automount_healer_last_sweep_timestamp_seconds",
        b"automount_healer_event_driven",
        b"automount_healer_mounts{",
    ):
        assert name in body, name
    assert health.strip() == b"ok" and ready.strip() == b"ok"
