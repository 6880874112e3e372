"""The demo: one simulated node, the three agents at work, a real Prometheus scraping them.

    sudo hack/demo.sh          (set-up, then: .venv/bin/python -m hack.demo)

On the node:
- storage: a real automount serves an autofs root with three squashfuse
  "repositories", published to a "pod" as cvmfs-csi does. The FUSE daemon of
  one is killed (a CSI node plugin restart): the mount is severed, every
  access fails with ENOTCONN. `automount-healer` unmounts it in the root and
  the next access mounts it again; a second one is severed while it runs.
- GPU: a fake card (a C `libnvidia-ml.so.1` read by the real pynvml) shared
  by two "pods", real processes in kubelet-like cgroups. One grows over its
  share; `gpu-mem-enforcer --local --replicas 2` holds it, then stops it with
  SIGTERM through a pidfd. The other keeps running.
- credentials: a real OAuth2 server (Canaille) on loopback over TLS, with
  short-lived tokens and rotating refresh tokens. `token-refresher local`
  refreshes a token file in place and renders it with the EOS template.

Each agent runs as its own process (`python -m agents.<agent>`) with its
metrics on a loopback port; a real Prometheus (Debian's) scrapes them, and the
demo ends by asking Prometheus' HTTP API what it saw. The narrative comes from
the agents' own log lines (JSON on stderr) and what the demo observes.

Needs root (autofs, FUSE, mounts, cgroups, signals to other processes), gcc
and `prometheus`. Cleans up after itself, also on Ctrl-C (SIGINT) and SIGTERM:
mounts, processes, cgroups and the temporary directory all go.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

import psutil

from hack.autofs_world import (
    AutofsWorld,
    force_unmount_under,
    missing_tools,
    mounts_under,
    scaled,
)
from hack.cgroups import CgroupsUnavailable, FakePodCgroups
from hack.fake_nvml import FakeGpu, FakeNvmlWorld, FakeProcess, build, fake_uuid, find_compiler
from hack.prometheus import LocalPrometheus, free_port

WORKDIR_PREFIX = "node-agents-demo-"
REPOS = ("atlas.cern.ch", "cms.cern.ch", "alice.cern.ch")
GIB = 1 << 30
CARD = 16 * GIB
REPLICAS = 2  # time-slicing replicas: each pod's agreed share is CARD / REPLICAS
HOLD = 2.0  # seconds a pod may stay over its share before the enforcer acts
TOKEN_LIFETIME = 6  # seconds an access token (and its refresh token) lives at the IdP
EOS_TEMPLATE = "oauth2:$(ACCESS_TOKEN):{userinfo}"
OWNER = 1000  # the uid of the pod's user: eosxd looks for /tmp/oauthtk_<uid>
WAIT = 20.0  # seconds any single step may take before the demo gives up


class DemoError(RuntimeError):
    """A step did not happen in time; the message says which."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One log line of an agent (JSON, see agents/common/logs.py), or a raw stderr line."""

    agent: str
    level: str
    message: str
    at: float = dataclasses.field(default_factory=time.monotonic)
    """When the demo read it (time.monotonic)."""


class AgentProcess:
    """An agent as its own process; its JSON log lines are read into a queue."""

    def __init__(
        self, name: str, argv: list[str], *, port: int, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.port = port
        self.records: list[Record] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self, inbox: queue.Queue[Record]) -> AgentProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                *self.argv,
                "--metrics-address",
                f"127.0.0.1:{self.port}",
                "--log-format",
                "json",
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # Its own process group: a Ctrl-C in the terminal reaches the demo
            # only, which then stops every agent in order.
            process_group=0,
        )
        assert self.proc.stderr is not None
        self._reader = threading.Thread(
            target=self._read,
            args=(self.proc.stderr, inbox),
            name=f"log-{self.name}",
            daemon=True,
        )
        self._reader.start()
        return self

    def _read(self, stream: IO[bytes], inbox: queue.Queue[Record]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                entry = json.loads(line)
                record = Record(self.name, str(entry["level"]), str(entry["message"]))
            except (ValueError, KeyError, TypeError):
                record = Record(self.name, "raw", line)  # a traceback, a crash
            inbox.put(record)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def terminate(self) -> None:
        """SIGTERM: the agent's bounded shutdown (signals set its stop event)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def tail(self, lines: int = 8) -> str:
        return "\n".join(f"    {r.level}: {r.message}" for r in self.records[-lines:])


@dataclasses.dataclass
class Pod:
    """A "pod": one real process in a kubelet-like cgroup, holding fake GPU memory."""

    name: str
    uid: str
    proc: subprocess.Popen[bytes]
    used: int

    @property
    def pid(self) -> int:
        return self.proc.pid


class Demo:
    def __init__(self, stack: contextlib.ExitStack, workdir: Path, started: float) -> None:
        self.stack = stack
        self.workdir = workdir
        self.started = started
        self.inbox: queue.Queue[Record] = queue.Queue()
        self.agents: dict[str, AgentProcess] = {}
        self._taken: set[int] = set()  # ids of records a step has used
        self._watches: list[tuple[Callable[[], bool], Callable[[], None]]] = []
        self.refreshes = 0
        self.heals: list[str] = []
        self.killed: list[Pod] = []

    # -- the narrative -----------------------------------------------------

    def say(self, who: str, text: str) -> None:
        print(f"[{time.monotonic() - self.started:4.1f}s] {who}: {text}", flush=True)

    def short(self, path: Path | str) -> str:
        """A path inside the workdir, as …/<rest> (the workdir is printed once)."""
        return "…/" + str(Path(path).relative_to(self.workdir))

    # -- waiting while the agents' log lines come in ----------------------

    def pump(self) -> None:
        """Take in the agents' log lines, narrate the spontaneous ones, run due watches."""
        while True:
            try:
                record = self.inbox.get_nowait()
            except queue.Empty:
                break
            self.agents[record.agent].records.append(record)
            self._on_record(record)
        for watch in list(self._watches):
            if watch[0]():
                self._watches.remove(watch)
                watch[1]()
        for agent in self.agents.values():
            if (code := agent.exited()) is not None:
                raise DemoError(f"{agent.name} exited with {code}:\n{agent.tail()}")

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = WAIT) -> Any:
        """Pump until `predicate()` is truthy; returns its value. `timeout` is the
        host's figure, stretched under an emulated CPU (the test VM's, `scaled`)."""
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            if value := predicate():
                return value
            if time.monotonic() > deadline:
                tails = "\n".join(f"  {a.name}:\n{a.tail()}" for a in self.agents.values())
                raise DemoError(f"{what}: not within {timeout:g}s\n{tails}")
            time.sleep(0.02)

    def take(self, agent: str, *needles: str) -> Record | None:
        """The first record of `agent` not used yet whose message holds every needle."""
        for record in self.agents[agent].records:
            if id(record) not in self._taken and all(n in record.message for n in needles):
                self._taken.add(id(record))
                return record
        return None

    def when(self, condition: Callable[[], bool], action: Callable[[], None]) -> None:
        """Run `action` once, on the first pump where `condition()` holds."""
        self._watches.append((condition, action))

    def _on_record(self, record: Record) -> None:
        if record.agent == "token-refresher" and record.message.startswith("refreshed "):
            self._taken.add(id(record))
            self._refreshed()
        elif record.level in ("error", "critical", "raw") or "refresh failed" in record.message:
            self.say(record.agent, f"{record.level}: {record.message}")

    # -- the node ------------------------------------------------------------

    def run(self) -> None:
        self.say("demo", f"workdir {self.workdir} (paths below: …/)")
        # The fake NVML compiles (gcc, its own process) while the IdP starts: the
        # two slowest steps of the set-up, overlapped (a minute saved per run
        # under the test VM's emulated CPU).
        compiling = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gcc")
        self.stack.callback(compiling.shutdown)
        self.library = compiling.submit(build, self.workdir / "nvml")
        self.start_prometheus()
        self.start_storage()
        self.start_idp()
        self.start_gpu()
        self.wait("Prometheus ready", self.prometheus.ready)
        self.say(
            "node",
            f"Prometheus on 127.0.0.1:{self.prometheus.port} scrapes the three agents every 1s",
        )
        self.sever_before_the_healer()
        self.start_agents()
        self.first_heal()
        self.gpu_overrun()
        self.live_heal()
        self.enforce()
        self.wait("a second token refresh", lambda: self.refreshes >= 2, TOKEN_LIFETIME + WAIT)
        self.wait("the token file rendered", lambda: not self._watches)
        self.scraped()
        print("\n" + self.summary() + "\n", flush=True)

    def start_prometheus(self) -> None:
        # The agents' ports are chosen now, so that Prometheus can be told them.
        self.ports = {
            name: free_port()
            for name in ("automount-healer", "gpu-mem-enforcer", "token-refresher")
        }
        self.prometheus = LocalPrometheus(
            self.workdir / "prometheus",
            {name: f"127.0.0.1:{port}" for name, port in self.ports.items()},
        )
        self.stack.callback(self.prometheus.stop)
        self.prometheus.start()

    def start_storage(self) -> None:
        # An expiry longer than the demo: automount's default 60 s would unmount
        # the repositories (their daemons exit) while a slow machine (the VM's
        # emulated CPU: 45 s for the IdP alone) still sets up the node, and the
        # demo severs a mount it expects to find mounted.
        self.world = AutofsWorld(self.workdir, REPOS, name="cvmfs", timeout=900)
        self.stack.callback(self.world.stop)
        # automount does not exit on SIGTERM while a severed mount is in its
        # root (it waits until killed, 10 s later): unmount them all first.
        self.stack.callback(force_unmount_under, self.world.root)
        self.world.start()
        # A consumer pod's view, as cvmfs-csi publishes it (rbind + make-rslave).
        self.consumer = self.workdir / "pod-volume"
        subprocess.run(["mount", "--make-shared", str(self.world.root)], check=True)
        self.consumer.mkdir()
        self.stack.callback(
            subprocess.run,
            ["umount", "-R", "-l", str(self.consumer)],
            check=False,
            capture_output=True,
        )
        subprocess.run(
            ["mount", "--rbind", "--make-rslave", str(self.world.root), str(self.consumer)],
            check=True,
        )
        for repo in REPOS:
            self.world.access(repo)
        self.say(
            "node",
            f"automount serves {self.short(self.world.root)}: {', '.join(REPOS)} (squashfuse); "
            f"a pod sees it at {self.short(self.consumer)}",
        )

    def start_gpu(self) -> None:
        library = self.library.result()
        # Every cgroup the demo makes sits below one named after the workdir,
        # so a leftover is easy to spot; the enforcer finds pods by their own
        # segments at any depth (kind nodes nest the kubelet root the same way).
        cgroups = self.stack.enter_context(FakePodCgroups(parent=self.workdir.name))
        self.pods: dict[str, Pod] = {}
        self.stack.callback(self._stop_pods)
        # The kubelet's systemd driver on cgroup v2, else its cgroupfs driver on v1.
        layout = "systemd-v2-containerd" if cgroups.unified else "cgroupfs-v1-containerd"
        sleep = shutil.which("sleep") or "/bin/sleep"
        for name, used in (("notebook-a", 5 * GIB), ("notebook-b", 4 * GIB)):
            uid = str(uuid.uuid4())
            handle = cgroups.create_pod_container(layout, uid, uuid.uuid4().hex + uuid.uuid4().hex)
            # argv[0] names the pod and the workdir: `ps` shows it, leak checks find it.
            proc = subprocess.Popen(
                [str(self.workdir / "pods" / name), "600"], executable=sleep, process_group=0
            )
            self.pods[name] = Pod(name, uid, proc, used)
            cgroups.move(proc.pid, handle)
        self.nvml = FakeNvmlWorld(
            self.workdir / "nvml.state",
            [FakeGpu(0, fake_uuid(0), total=CARD)],
            [FakeProcess(0, pod.pid, pod.used) for pod in self.pods.values()],
        ).write()
        self.nvml_env = self.nvml.subprocess_env(library)
        a, b = self.pods["notebook-a"], self.pods["notebook-b"]
        self.say(
            "node",
            f"fake GPU 0, {CARD // GIB} GiB, {REPLICAS} time-slicing replicas "
            f"(share {CARD // REPLICAS // GIB} GiB): pods notebook-a (pid {a.pid}, "
            f"{a.used // GIB} GiB) and notebook-b (pid {b.pid}, {b.used // GIB} GiB), "
            "each in a kubelet-like cgroup",
        )

    def _stop_pods(self) -> None:
        for pod in self.pods.values():
            if pod.proc.poll() is None:
                pod.proc.kill()
            pod.proc.wait(10)

    def start_idp(self) -> None:
        # A test-support module: hack/setup.sh installs the project with its
        # test extra (pytest-iam, Canaille), which the demo needs for its IdP.
        from tests.support.idp import TestIdP

        # The seed token lives a minute at the IdP; the refreshed ones TOKEN_LIFETIME.
        self.idp = self.stack.enter_context(
            TestIdP(tls=True, lifetime=60, workdir=self.workdir / "idp")
        )
        seed = json.loads(self.idp.issue())
        self.idp.lifetime = TOKEN_LIFETIME
        # As a login TOKEN_LIFETIME seconds ago left it: the access token expires now.
        seed.pop("expires_in", None)
        seed["issued_at"] = time.time() - TOKEN_LIFETIME
        seed["expires_at"] = time.time()
        self.token_file = _write_private(self.workdir / "token.json", json.dumps(seed))
        self.refresh_tokens_seen = {seed["refresh_token"]}
        self.client_secret_file = _write_private(
            self.workdir / "client-secret", self.idp.client_secret + "\n"
        )
        (self.workdir / "pod-tmp").mkdir()
        self.token_out = self.workdir / "pod-tmp" / f"oauthtk_{OWNER}"
        self.template = EOS_TEMPLATE.format(userinfo=self.idp.userinfo_url.split("://", 1)[1])
        self.say(
            "node",
            f"OAuth2 IdP (Canaille) on {self.idp.url}, TLS, tokens live {TOKEN_LIFETIME}s, "
            f"refresh tokens rotate; {self.short(self.token_file)} from a login, expiring now",
        )

    def sever_before_the_healer(self) -> None:
        victim = REPOS[0]
        self._kill_daemon(victim)
        try:
            os.listdir(self.consumer / victim)
            seen = "still lists it (attribute cache)"
        except OSError as err:
            seen = f"{err.strerror} ({_errno_name(err.errno)})"
        self.say(
            "csi",
            f"node plugin restarts: kill -9 the squashfuse of {victim}; "
            f"the pod: ls {self.short(self.consumer / victim)}: {seen}",
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "agents.mount_healer",
                "--once",
                "--dry-run",
                "--root",
                str(self.world.root),
                "--log-level",
                "error",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        found = []
        for line in done.stdout.splitlines():
            path, verdict, action, *_ = [*line.split("\t"), "", ""]
            done_ = f", {action}" if action not in ("", "none") else ""
            found.append(f"{Path(path).name} {verdict}{done_}")
        self.say("healer", "automount-healer --once --dry-run, by hand: " + "; ".join(found))

    def start_agents(self) -> None:
        healer = ["agents.mount_healer", "--root", str(self.world.root), "--interval", "2"]
        enforcer = [
            "agents.gpu_enforcer",
            "--local",
            "--replicas",
            str(REPLICAS),
            "--interval",
            "0.5",
            "--hold",
            f"{HOLD:g}",
            "--grace",
            "5",
        ]
        refresher = [
            "agents.token_refresher",
            "local",
            "--token-file",
            str(self.token_file),
            "--token-url",
            self.idp.token_url,
            "--client-id",
            self.idp.client_id,
            "--client-secret-file",
            str(self.client_secret_file),
            "--ca-bundle",
            str(self.idp.ca_bundle),
            "--out",
            str(self.token_out),
            "--owner",
            str(OWNER),
            "--template",
            self.template,
            "--interval",
            "0.5",
            "--min-refresh-interval",
            "1",
        ]
        for name, argv, env in (
            ("automount-healer", healer, None),
            ("gpu-mem-enforcer", enforcer, self.nvml_env),  # pynvml loads the fake library
            ("token-refresher", refresher, None),
        ):
            self.agents[name] = AgentProcess(name, argv, port=self.ports[name], env=env)
        self.stack.callback(self._stop_agents)
        for agent in self.agents.values():
            agent.start(self.inbox)
        self.say(
            "demo",
            "started "
            + ", ".join(f"{name} (pid {a.pid}, :{a.port})" for name, a in self.agents.items()),
        )

    def _stop_agents(self) -> None:
        # All at once: each shutdown takes a few hundred milliseconds.
        for agent in self.agents.values():
            agent.terminate()
        for agent in self.agents.values():
            agent.stop()

    # -- storage -------------------------------------------------------------

    def _kill_daemon(self, repo: str) -> None:
        """kill -9 the repo's FUSE daemon, as a CSI node plugin restart does.

        The kernel aborts the connection when the dying process closes
        /dev/fuse, before it is a zombie; automount reaps it later.
        """
        daemon = self.world.daemon(repo)
        daemon.kill()

        def dead() -> bool:
            try:
                return daemon.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        self.wait(f"the squashfuse of {repo} dying", dead, 5)

    def _healed(self, repo: str) -> Record:
        path = str(self.world.path(repo))
        record: Record = self.wait(
            f"the healer unmounting {repo}",
            lambda: self.take("automount-healer", "healed severed", path),
        )
        self.heals.append(repo)
        return record

    def _severed_because(self, repo: str) -> str:
        record = self.take("automount-healer", f"{self.world.path(repo)} is severed")
        found = re.findall(r"\b(E[A-Z]+) \(\d+\)", record.message) if record else []
        return found[-1] if found else "severed"

    def _remounted(self, repo: str) -> str:
        entries = ", ".join(sorted(os.listdir(self.consumer / repo)))
        daemon = self.world.daemon(repo).pid
        return f"next access remounted it (ls: {entries}; new squashfuse pid {daemon})"

    def first_heal(self) -> None:
        victim = REPOS[0]
        self._healed(victim)
        self.say(
            "healer",
            f"unmounted severed {self.short(self.world.path(victim))} "
            f"({self._severed_because(victim)}) in the autofs root; {self._remounted(victim)}",
        )

    def live_heal(self) -> None:
        victim = REPOS[1]
        killed_at = time.monotonic()
        self._kill_daemon(victim)
        self.say("csi", f"again while the healer runs: kill -9 the squashfuse of {victim}")
        took = self._healed(victim).at - killed_at
        self.say(
            "healer",
            f"unmounted severed {self.short(self.world.path(victim))} "
            f"({self._severed_because(victim)}) {took * 1000:.0f} ms after its daemon died; "
            f"{self._remounted(victim)}",
        )

    # -- GPU -----------------------------------------------------------------

    def gpu_overrun(self) -> None:
        pod = self.pods["notebook-b"]
        pod.used = 10 * GIB  # over its share, below the ceiling (1.5x): held first
        self.nvml.set_used(pod.pid, pod.used)
        self.say(
            "gpu",
            f"notebook-b grows to {pod.used // GIB} GiB, over its "
            f"{CARD // REPLICAS // GIB} GiB share (notebook-a holds "
            f"{self.pods['notebook-a'].used // GIB} GiB)",
        )

    def enforce(self) -> None:
        pod, neighbour = self.pods["notebook-b"], self.pods["notebook-a"]
        record: Record = self.wait(
            "the enforcer acting on notebook-b",
            lambda: self.take("gpu-mem-enforcer", f"pod {pod.uid}:", "action kill"),
        )
        self.wait("notebook-b exiting", lambda: pod.proc.poll() is not None)
        code = pod.proc.returncode
        # The driver forgets a process that exited; so does the fake.
        self.nvml.remove_process(pod.pid)
        self.killed.append(pod)
        parts = record.message.split("; ")
        reason = parts[-2] if len(parts) >= 2 else "over its share"
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        self.say(
            "enforcer",
            f"notebook-b {reason} (limit: share 1/{REPLICAS}, {CARD // REPLICAS // GIB} GiB; "
            f"hold {HOLD:g}s): SIGTERM through a pidfd; pid {pod.pid} ended by {how}",
        )
        if neighbour.proc.poll() is not None:
            raise DemoError("notebook-a was stopped too")
        self.say(
            "enforcer",
            f"notebook-a (pid {neighbour.pid}, {neighbour.used // GIB} GiB, within its share) "
            "keeps running",
        )

    # -- token ---------------------------------------------------------------

    def _refreshed(self) -> None:
        self.refreshes += 1
        try:
            stored = json.loads(self.token_file.read_text())
        except (OSError, ValueError):
            stored = {}
        rotated = stored.get("refresh_token") not in self.refresh_tokens_seen
        self.refresh_tokens_seen.add(stored.get("refresh_token", ""))
        if self.refreshes == 1:
            when = "the access token was expiring"
        else:
            when = f"at about 80% of its {TOKEN_LIFETIME}s lifetime"
        self.say(
            "token-refresher",
            f"refreshed {self.short(self.token_file)} ({when}); "
            + (
                "new refresh token persisted before use" if rotated else "refresh token not rotated"
            ),
        )
        access = str(stored.get("access_token", ""))
        expected = self.template.replace("$(ACCESS_TOKEN)", access).encode()
        first = self.refreshes == 1

        def rendered() -> bool:
            try:
                return bool(access) and self.token_out.read_bytes() == expected
            except OSError:
                return False

        def report() -> None:
            info = self.token_out.stat()
            shown = self.template.replace("$(ACCESS_TOKEN)", f"<access token, {len(access)} chars>")
            if first:
                self.say(
                    "token-refresher",
                    f"wrote {self.short(self.token_out)} (mode {info.st_mode & 0o777:04o}, "
                    f"uid {info.st_uid}) from the EOS template: {shown}",
                )
            else:
                self.say(
                    "token-refresher", f"rewrote {self.short(self.token_out)} with the new token"
                )

        self.when(rendered, report)

    # -- Prometheus ----------------------------------------------------------

    def scraped(self) -> None:
        expected = {
            "automount_healer_heals_total": len(self.heals),
            'gpu_mem_enforcer_actions_total{action="kill"}': len(self.killed),
            'token_refresher_refreshes_total{result="ok"}': self.refreshes,
        }
        self.wait(
            "Prometheus scraping the agents' counters",
            lambda: all(
                (self.prometheus.total(expr) or 0) >= value for expr, value in expected.items()
            ),
        )
        self.results: dict[str, str] = {}
        for expr in expected:
            series = self.prometheus.query(expr)
            # Series that are still 0 (heals by detach) are left out.
            shown = "; ".join(
                f"{{{_labels(labels)}}} {value:g}"
                for labels, value in sorted(series, key=lambda s: sorted(s[0].items()))
                if value
            )
            self.results[expr] = shown
            self.say("prometheus", f"GET /api/v1/query?query={expr} -> {shown}")

    def summary(self) -> str:
        heals = ", ".join(self.heals)
        rows = [
            ("agent", "what it did", "as Prometheus saw it"),
            (
                "automount-healer",
                f"unmounted {len(self.heals)} severed mounts ({heals}); all remounted",
                f"automount_healer_heals_total{self.results['automount_healer_heals_total']}",
            ),
            (
                "gpu-mem-enforcer",
                f"SIGTERM to {', '.join(p.name for p in self.killed)} "
                f"(over its {CARD // REPLICAS // GIB} GiB share); notebook-a untouched",
                "gpu_mem_enforcer_actions_total"
                + self.results['gpu_mem_enforcer_actions_total{action="kill"}'],
            ),
            (
                "token-refresher",
                f"{self.refreshes} refreshes, rotated refresh tokens persisted, "
                f"oauthtk_{OWNER} kept current",
                "token_refresher_refreshes_total"
                + self.results['token_refresher_refreshes_total{result="ok"}'],
            ),
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        return "\n".join(lines)


def _write_private(path: Path, text: str) -> Path:
    """Write a file only its owner may read (a token, a client secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return path


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k not in ("instance", "job"))


def _errno_name(number: int | None) -> str:
    return errno.errorcode.get(number or 0, str(number))


def _leftovers(workdir: Path) -> Iterator[psutil.Process]:
    """Processes whose command line names the workdir (automount, squashfuse,
    agents, Prometheus, pods), other than this one."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.pid != os.getpid() and any(str(workdir) in arg for arg in cmdline):
            yield proc


def _sweep(workdir: Path) -> None:
    """Last line of defence: an interrupt between a fork and its bookkeeping
    must not leave a process or a mount behind."""
    for proc in list(_leftovers(workdir)):
        with contextlib.suppress(psutil.Error):
            proc.kill()
            proc.wait(5)
    force_unmount_under(workdir)


class _Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (and SIGINT) become KeyboardInterrupt: the ExitStack unwinds.
    raise _Interrupted(signum)


def missing() -> list[str]:
    """What this machine lacks for the demo."""
    lacking = list(missing_tools())
    if shutil.which("prometheus") is None:
        lacking.append("prometheus")
    if find_compiler() is None:
        lacking.append("gcc")
    return lacking


def main() -> int:
    started = time.monotonic()
    if os.geteuid() != 0:
        print(
            "demo: needs root (autofs, FUSE, mounts, cgroups): sudo hack/demo.sh", file=sys.stderr
        )
        return 2
    if lacking := missing():
        print(f"demo: missing {', '.join(lacking)}: run hack/setup.sh", file=sys.stderr)
        return 2
    saved = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        with contextlib.ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=WORKDIR_PREFIX)))
            stack.callback(_sweep, workdir)
            try:
                Demo(stack, workdir, started).run()
            except KeyboardInterrupt as err:
                signum = err.signum if isinstance(err, _Interrupted) else signal.SIGINT
                print(f"\ninterrupted ({signal.Signals(signum).name}): cleaning up", flush=True)
                code = 128 + signum
            except (DemoError, CgroupsUnavailable) as err:
                print(f"demo: {err}", file=sys.stderr, flush=True)
                code = 1
            finally:
                # Clean-up must run to its end: a second Ctrl-C must not cut it short.
                for s in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(s, signal.SIG_IGN)
        left = [m.mountpoint for m in mounts_under(workdir)] + [
            str(p.pid) for p in _leftovers(workdir)
        ]
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    if left:
        print(f"demo: left behind: {left}", file=sys.stderr)
        return code or 1
    what = "demo done" if code == 0 else "interrupted" if code > 128 else "demo failed"
    print(
        f"{what}; cleaned up: agents, Prometheus, automount and pods stopped; mounts, cgroups "
        f"and {workdir} gone ({time.monotonic() - started:.1f}s in all)",
        flush=True,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
