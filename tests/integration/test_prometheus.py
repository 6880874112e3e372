"""A real Prometheus (Debian's) scrapes the healer on loopback and sees a heal (root)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.mount_healer.cli import main
from hack.autofs_world import AutofsWorld, wait_for
from tests.conftest import IN_CI
from tests.support.agent import AgentThread

pytestmark = pytest.mark.root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: automount-healer\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self._log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                need("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def query(self, expr: str) -> float | None:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        result = json.loads(get(url))["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        try:
            return get(f"http://127.0.0.1:{self.port}/-/ready").startswith(b"Prometheus")
        except OSError:
            return False

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def prometheus(workdir: Path, metrics_port: int) -> Iterator[Prometheus]:
    need("prometheus")
    prom = Prometheus(workdir, f"127.0.0.1:{metrics_port}")
    try:
        wait_for(prom.ready, 30, interval=0.2)
        yield prom
    finally:
        prom.close()


def test_prometheus_scrapes_the_heal_counter(
    world: AutofsWorld, prometheus: Prometheus, metrics_port: int
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
        wait_for(lambda: prometheus.query("automount_healer_up") == 1, 20, interval=0.25)
        assert prometheus.query("sum(automount_healer_heals_total)") in (None, 0)
        world.kill_daemon("repo1")
        wait_for(lambda: world.mount("repo1") is None, 5)
        wait_for(
            lambda: prometheus.query('automount_healer_heals_total{method="umount"}') == 1,
            20,
            interval=0.25,
        )
        root = str(world.root)
        assert prometheus.query(f'automount_healer_mounts{{root="{root}"}}') is not None


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
