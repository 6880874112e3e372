"""A real Prometheus (Debian's `prometheus` binary) on loopback, scraping agents.

It gets a generated config (one job per target, a short scrape interval) and
its own storage directory, listens on 127.0.0.1 only, and is queried through
its HTTP API (`/api/v1/query`), as a dashboard would query it. The demo uses
it to show that what the agents export is really scraped.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_agent(port: int, timeout: float = 5.0) -> Samples:
    """Every sample of one scrape of an agent's /metrics on 127.0.0.1:`port`, by (name,
    labels): values read together are of one moment. OSError while it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    text = _get(f"http://127.0.0.1:{port}/metrics", timeout).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, labels: Mapping[str, str] | None = None) -> float:
    """One sample of a scrape (0 when absent)."""
    return samples.get((name, frozenset((labels or {}).items())), 0.0)


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


class LocalPrometheus:
    """`prometheus` on 127.0.0.1:`port` scraping `targets` ({job: "host:port"})."""

    def __init__(
        self,
        workdir: Path,
        targets: Mapping[str, str],
        *,
        scrape_interval: float = 1.0,
        binary: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.targets = dict(targets)
        self.scrape_interval = scrape_interval
        self.binary = binary or shutil.which("prometheus") or "prometheus"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        interval = f"{self.scrape_interval:g}s"
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            for job, target in self.targets.items()
        )
        return (
            f"global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n"
            f"scrape_configs:\n{jobs}"
        )

    def start(self) -> LocalPrometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(self.config())
        self.port = free_port()
        self._log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own process group: a Ctrl-C in the terminal reaches the demo,
            # which stops Prometheus in order.
            process_group=0,
        )
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.log_tail()}")
        try:
            return _get(f"{self.url}/-/ready", timeout=1).startswith(b"Prometheus")
        except OSError:
            return False

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels without __name__, value) per series."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = json.loads(_get(url))
        if answer.get("status") != "success":
            raise RuntimeError(f"query {expr!r}: {answer}")
        return [
            (
                {k: v for k, v in series["metric"].items() if k != "__name__"},
                float(series["value"][1]),
            )
            for series in answer["data"]["result"]
        ]

    def total(self, expr: str) -> float | None:
        """The sum of an instant query's values; None when nothing matched."""
        found = self.query(expr)
        return sum(value for _, value in found) if found else None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.workdir / "prometheus.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
