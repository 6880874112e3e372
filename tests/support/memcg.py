"""An agent as a subprocess in a memory cgroup of its own, with its manifest's limit.

`agent_in_memcg(argv, limit)` makes a memory cgroup, sets its limit, and
starts `python -m agents.token_refresher <argv>` (or another module) inside
it: the child joins the cgroup before exec (preexec_fn), so every byte the
agent ever allocates is charged there. The handle gives the peak usage and
the OOM kills, as the kubelet's cgroup would count them.

- cgroup v1 (this machine: the hybrid layout, /sys/fs/cgroup/memory):
  `memory.limit_in_bytes`, `memory.max_usage_in_bytes`, `memory.failcnt`,
  `memory.oom_control` (`oom_kill N` since Linux 4.13).
- cgroup v2 (a `memory` controller in `cgroup.controllers` of the unified
  mount): `memory.max`, `memory.peak` (Linux 5.19), `memory.events`.
  Documentation/admin-guide/cgroup-v1/memory.rst, cgroup-v2.rst.

There is no swap here: the limit is what the process gets. The cgroup is
made under this process's own memory cgroup (a sandbox may hold us in one)
and removed afterwards. Needs root; tests skip without it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from hack.prometheus import Samples, free_port, sample, scrape_agent
from tests.conftest import IN_CI, IS_ROOT

CGROUP_ROOT = Path("/sys/fs/cgroup")
MI = 1 << 20


class MemcgUnavailable(RuntimeError):
    """No memory cgroup can be made here."""


def _skip(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def _own_v1_memory_cgroup(proc: Path = Path("/proc/self/cgroup")) -> str:
    for line in proc.read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    return "/"


def _base() -> tuple[Path, int]:
    """Where to make the cgroup, and its version (v1 first: this machine's layout)."""
    v1 = CGROUP_ROOT / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        own = v1 / _own_v1_memory_cgroup().lstrip("/")
        return (own if own.is_dir() else v1), 1
    for unified in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        controllers = unified / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            return unified, 2
    raise MemcgUnavailable("no memory cgroup controller mounted (v1 or v2)")


@dataclass
class MemoryCgroup:
    """One memory cgroup with a limit; values read from its control files."""

    path: Path
    version: int
    limit: int
    _fds: list[int] = field(default_factory=list)

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def _keyed(self, name: str) -> dict[str, int]:
        out = {}
        for line in self._read(name).splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
        return out

    @property
    def usage(self) -> int:
        return int(self._read("memory.usage_in_bytes" if self.version == 1 else "memory.current"))

    @property
    def peak(self) -> int:
        """Highest usage since the cgroup was made (page cache included, as the kernel counts)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return int(self._read(name))

    @property
    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this cgroup."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        return self._keyed(name).get("oom_kill", 0)

    @property
    def anon_and_file(self) -> tuple[int, int]:
        """(anonymous memory, page cache) charged now: the cache is reclaimable, and
        the files an agent writes (and its state file) are charged to it."""
        stat = self._keyed("memory.stat")
        if self.version == 1:
            return stat.get("total_rss", 0), stat.get("total_cache", 0)
        return stat.get("anon", 0), stat.get("file", 0)

    @property
    def limit_hits(self) -> int:
        """v1: times usage hit the limit (reclaim ran); v2: `max` events."""
        if self.version == 1:
            return int(self._read("memory.failcnt"))
        return self._keyed("memory.events").get("max", 0)

    def joiner(self) -> Callable[[], None]:
        """A preexec_fn moving the child in before it execs: it writes "0" (the
        writing task itself, in v1 and v2) to `cgroup.procs` opened here, so the
        child runs a single syscall and takes no lock (safe with threads)."""
        fd = os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        self._fds.append(fd)
        return lambda: os.write(fd, b"0") and None

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


@contextlib.contextmanager
def memory_cgroup(limit: int, name: str = "") -> Iterator[MemoryCgroup]:
    """A memory cgroup limited to `limit` bytes, removed at the end (empty by then)."""
    if not IS_ROOT:
        _skip("needs root: memory cgroups")
    try:
        base, version = _base()
    except MemcgUnavailable as err:
        _skip(str(err))
        raise
    path = base / f"test-memcg-{name or 'agent'}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    cgroup = MemoryCgroup(path, version, limit)
    try:
        if version == 1:
            (path / "memory.limit_in_bytes").write_text(str(limit))
        else:
            (path / "memory.max").write_text(str(limit))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
        yield cgroup
    finally:
        cgroup.close()
        _remove(path)


def _remove(path: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            # EBUSY while an exiting process is still charged to it.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class CgroupAgent:
    """An agent process in its memory cgroup."""

    process: subprocess.Popen[bytes]
    cgroup: MemoryCgroup
    log: Path
    rss_peak: int = 0
    """The process's own VmHWM (resident high water mark), last read while alive."""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def sample(self) -> None:
        """Read VmHWM now (gone with the process)."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.rss_peak = max(self.rss_peak, int(line.split()[1]) * 1024)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def agent_in_memcg(
    argv: Sequence[str],
    limit: int,
    *,
    module: str = "agents.token_refresher",
    name: str = "",
    env: Mapping[str, str] | None = None,
    log: Path,
    stop_timeout: float = 15.0,
) -> Iterator[CgroupAgent]:
    """`python -m <module> <argv>` in a memory cgroup limited to `limit` bytes.

    The block ends with SIGTERM (the agents' stop), then SIGKILL after
    `stop_timeout`; its output goes to `log`.
    """
    with memory_cgroup(limit, name) as cgroup:
        out: IO[bytes] = log.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            # Charged from its first allocation on; one write(2), no lock (joiner).
            preexec_fn=cgroup.joiner(),  # noqa: PLW1509
        )
        agent = CgroupAgent(process, cgroup, log)
        try:
            yield agent
        finally:
            agent.sample()
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(stop_timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            out.close()


MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def manifest_memory_limit(manifest: str) -> int:
    """The memory limit (bytes) of the first container in a manifest under manifests/,
    e.g. `token-refresher/injector.yaml`: what the kubelet's cgroup would enforce."""
    import yaml

    for doc in yaml.safe_load_all((MANIFESTS / manifest).read_text()):
        if not doc or doc.get("kind") not in ("Deployment", "DaemonSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            limit = str(container["resources"]["limits"]["memory"])
            return int(limit[:-2]) * _UNITS[limit[-2:]]
    raise AssertionError(f"no memory limit in {manifest}")


class BoundedAgent:
    """`with BoundedAgent(argv, manifest, log=...) as agent:` the agent as a process in a
    memory cgroup with its manifest's limit, read like tests/support/agent.AgentThread:
    `value()` scrapes its /metrics (a port of its own on loopback).

    The block ends with the check the red-team tests make of every agent they
    attack: it is still alive, was never OOM-killed and stayed under its limit.
    """

    def __init__(
        self,
        argv: Sequence[str],
        manifest: str,
        *,
        log: Path,
        module: str = "agents.token_refresher",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.limit = manifest_memory_limit(manifest)
        self.port = free_port()
        self._argv = [*argv, "--metrics-address", f"127.0.0.1:{self.port}"]
        self._module, self._env, self._log = module, env, log
        self._stack = contextlib.ExitStack()
        self.agent: CgroupAgent | None = None

    def scrape(self) -> Samples:
        """Every sample of one scrape (`hack.prometheus.scrape_agent`; empty when not
        served yet)."""
        try:
            return scrape_agent(self.port)
        except OSError:
            return {}

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample of the agent's metrics (0 when absent or not served yet)."""
        return sample(self.scrape(), name, labels)

    def log_text(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def __enter__(self) -> BoundedAgent:
        self.agent = self._stack.enter_context(
            agent_in_memcg(
                self._argv,
                self.limit,
                module=self._module,
                name=Path(self._log).stem,
                env=self._env,
                log=self._log,
            )
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        agent = self.agent
        assert agent is not None
        agent.sample()
        # Read before the block's end stops the agent and removes its cgroup.
        alive, peak, kills = agent.alive, agent.cgroup.peak, agent.cgroup.oom_kills
        self._stack.close()
        assert alive, f"the agent died under attack:\n{self.log_text()[-2000:]}"
        assert kills == 0, f"the agent was OOM-killed {kills} times (limit {self.limit >> 20} MiB)"
        assert peak < self.limit, f"peak {peak >> 20} MiB at the limit of {self.limit >> 20} MiB"
        print(f"{self._log.stem}: memory cgroup peak {peak / MI:.0f} MiB of {self.limit / MI:.0f}")


def _hog(mib: int) -> None:
    """`python -m tests.support.memcg <MiB>`: touch that much memory, then wait (self-test)."""
    held = bytearray(mib * MI)
    for i in range(0, len(held), 4096):
        held[i] = 1
    print("held", flush=True)
    time.sleep(30)


if __name__ == "__main__":
    _hog(int(sys.argv[1]))
