"""Fake containers on this host: a root directory, a real process chrooted into
it, in a kubelet-like container cgroup (root needed).

The token injector reaches a container through `/proc/<pid>/root` of one of
its processes, found by the container ID in `/proc/<pid>/cgroup`. A
`ContainerWorld` gives it exactly that, with no container runtime:

- each container is a directory (its root filesystem, with `/tmp` mode 1777)
  and one process of `container_init.c`, moved into
  `.../kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
  (`hack/cgroups.py`) and then chrooted into the directory;
- `restart()` kills that process and starts a new one with a new container
  ID in the same directory, as a kubelet restart keeps the pod's volumes
  but the runtime gives the container a new ID;
- `pod()` builds the Pod object as the kubelet reports it (`kubelet_pod`,
  which the real containers of `hack/containerd.py` share).

One small C process per container (a few hundred KB of RSS, no Python), so
that 500 containers fit on a 2-core VM; `add_many` starts them in a batch.
Everything made (processes, cgroups, directories, mounts a test left under
the roots) is removed by `close()`.

    with ContainerWorld(tmp_path) as world:
        app = world.add(pod_uid, "app")
        kube.put(world.pod("web", "ns", "node-a", [app], annotations))
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import select
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from agents.mount_healer.mountinfo import read_mount_table
from hack.cgroups import FakePodCgroups

SOURCE = Path(__file__).with_name("container_init.c")
LAYOUT = "systemd-v2-containerd"
RUNTIME_SCHEME = "containerd://"
IMAGE = "registry.example/fake:1"
# The handshake with container_init: both ends answer in far less than this.
HANDSHAKE_TIMEOUT = 10.0


class ContainersUnavailable(RuntimeError):
    """This machine cannot run fake containers (not root, no C compiler, no cgroups)."""


def find_compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def build(out_dir: Path) -> Path:
    """Compile `container_init.c` into `out_dir` (kept when already built from this source)."""
    compiler = find_compiler()
    if compiler is None:
        raise ContainersUnavailable("no C compiler (gcc or cc) on PATH")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    target = out_dir / f"container_init-{digest}"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".container_init.{os.getpid()}.tmp"
    result = subprocess.run(
        [compiler, "-O2", "-Wall", "-Werror", "-o", str(partial), str(SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ContainersUnavailable(f"cannot compile {SOURCE.name}: {result.stderr.strip()}")
    partial.rename(target)
    return target


def new_container_id() -> str:
    """64 hex digits, as containerd names a container."""
    return secrets.token_hex(32)


def new_pod_uid() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Container:
    """One running fake container."""

    pod_uid: str
    name: str
    id: str
    """Bare: 64 hex digits (the pod status says `containerd://<id>`)."""
    pid: int
    root: Path
    """Its root filesystem on the host: `/proc/<pid>/root` opens this directory."""
    restarts: int = 0

    @property
    def container_id(self) -> str:
        """As `status.containerStatuses[].containerID` shows it."""
        return RUNTIME_SCHEME + self.id

    def path(self, inside: str) -> Path:
        """The host path of `inside` (absolute, as the container sees it); no symlink followed."""
        return self.root / inside.lstrip("/")


class ContainerWorld:
    """Fake containers under `base`; a context manager (see the module docstring).

    `init` is a compiled `container_init` (tests build it once per session);
    without it, one is built into `base`. Start containers from one thread
    that outlives them: PR_SET_PDEATHSIG kills a container when the thread
    that started it exits.
    """

    def __init__(self, base: Path, *, init: Path | None = None, proc_root: str = "/proc") -> None:
        self.base = Path(base)
        self.proc_root = proc_root
        self._init = init
        self._cgroups: FakePodCgroups | None = None
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._roots: set[Path] = set()
        self._lock = threading.Lock()

    # -- life cycle

    def start(self) -> ContainerWorld:
        if os.geteuid() != 0:
            raise ContainersUnavailable("needs root: cgroups and chroot")
        if self._init is None:
            self._init = build(self.base / ".build")
        self.base.mkdir(parents=True, exist_ok=True)
        self._cgroups = FakePodCgroups()
        if self._cgroups.unified is None:
            self._cgroups = None
            raise ContainersUnavailable(f"{LAYOUT} needs a cgroup v2 hierarchy mounted")
        return self

    def __enter__(self) -> ContainerWorld:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill every container, then remove the cgroups, mounts under the roots, and roots."""
        with self._lock:
            procs = list(self._procs.values())
            self._procs.clear()
        for proc in procs:
            _kill(proc)
        failures: list[str] = []
        if self._cgroups is not None:
            try:
                self._cgroups.close()
            except OSError as err:
                failures.append(str(err))
            self._cgroups = None
        for root in sorted(self._roots):
            if not _unmount_under(root):
                failures.append(f"mounts left under {root}: not removing it")
                continue
            shutil.rmtree(root, ignore_errors=True)
            pod_dir = root.parent
            if pod_dir != self.base and pod_dir.is_dir() and not any(pod_dir.iterdir()):
                pod_dir.rmdir()
        self._roots.clear()
        if failures:
            raise OSError("; ".join(failures))

    # -- containers

    def add(
        self, pod_uid: str, name: str, *, dirs: Iterable[str] = (), container_id: str = ""
    ) -> Container:
        """Start container `name` of pod `pod_uid`; its root is `<base>/<pod_uid>/<name>`.

        `dirs` are made inside the root too (mode 0755), besides `/tmp` (1777).
        """
        return self.add_many([(pod_uid, name)], dirs=dirs, container_ids=[container_id])[0]

    def add_many(
        self,
        wanted: Sequence[tuple[str, str]],
        *,
        dirs: Iterable[str] = (),
        container_ids: Sequence[str] = (),
    ) -> list[Container]:
        """Start many (pod_uid, name) containers in one batch: all processes spawn,
        then all move, then all chroot (faster than one by one)."""
        dirs = list(dirs)
        ids = list(container_ids) or [""] * len(wanted)
        roots = []
        for pod_uid, name in wanted:
            root = self.base / pod_uid / name
            _make_root(root, dirs)
            with self._lock:
                self._roots.add(root)
            roots.append(root)
        return self._start(
            [
                (pod_uid, name, root, container_id or new_container_id(), 0)
                for (pod_uid, name), root, container_id in zip(wanted, roots, ids, strict=True)
            ]
        )

    def restart(self, container: Container) -> Container:
        """Kill its process; start a new one with a new container ID in the same root."""
        self.kill(container)
        return self._start(
            [
                (
                    container.pod_uid,
                    container.name,
                    container.root,
                    new_container_id(),
                    container.restarts + 1,
                )
            ]
        )[0]

    def kill(self, container: Container) -> None:
        """Kill the container's process (it exited); its cgroup and root stay until close()."""
        with self._lock:
            proc = self._procs.pop(container.pid, None)
        if proc is not None:
            _kill(proc)

    def alive(self, container: Container) -> bool:
        with self._lock:
            proc = self._procs.get(container.pid)
        return proc is not None and proc.poll() is None

    def _start(self, specs: list[tuple[str, str, Path, str, int]]) -> list[Container]:
        cgroups = self._cgroups
        if cgroups is None or self._init is None:
            raise RuntimeError("ContainerWorld is not started")
        started: list[tuple[subprocess.Popen[bytes], Container]] = []
        try:
            for pod_uid, name, root, container_id, restarts in specs:
                proc = subprocess.Popen(
                    [str(self._init), str(root), str(os.getpid())],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    close_fds=True,
                )
                with self._lock:
                    self._procs[proc.pid] = proc
                started.append(
                    (proc, Container(pod_uid, name, container_id, proc.pid, root, restarts))
                )
            for proc, container in started:
                handle = cgroups.create_pod_container(LAYOUT, container.pod_uid, container.id)
                cgroups.move(proc.pid, handle)
                assert proc.stdin is not None
                proc.stdin.write(b"g")
                proc.stdin.close()
            for proc, container in started:
                assert proc.stdout is not None
                ready = _read_with_timeout(proc.stdout, HANDSHAKE_TIMEOUT)
                proc.stdout.close()
                if ready != b"r":
                    raise RuntimeError(
                        f"container {container.name} of pod {container.pod_uid} did not start "
                        f"(exit code {proc.poll()})"
                    )
        except BaseException:
            for proc, _ in started:
                with self._lock:
                    self._procs.pop(proc.pid, None)
                _kill(proc)
            raise
        return [container for _, container in started]

    # -- what the kubelet reports

    def pod(
        self,
        name: str,
        namespace: str,
        node: str,
        containers: Sequence[Container],
        annotations: dict[str, str] | None = None,
        *,
        uid: str = "",
        waiting: Sequence[str] = (),
    ) -> dict[str, Any]:
        """The Pod as the API shows it once the kubelet reported it Running (`kubelet_pod`)."""
        return kubelet_pod(name, namespace, node, containers, annotations, uid=uid, waiting=waiting)


class PodContainer(Protocol):
    """What the Pod's status says of one running container (fake or real)."""

    @property
    def pod_uid(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def container_id(self) -> str: ...
    @property
    def restarts(self) -> int: ...


def kubelet_pod(
    name: str,
    namespace: str,
    node: str,
    containers: Sequence[PodContainer],
    annotations: Mapping[str, str] | None = None,
    *,
    uid: str = "",
    waiting: Sequence[str] = (),
    image: str = IMAGE,
    qos_class: str = "",
    limits: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The Pod as the API shows it once the kubelet reported it Running.

    `containers` are running; `waiting` names containers declared in the
    spec that have not started (state.waiting, no containerID). `qos_class`
    ("Burstable", ...) is `status.qosClass`; `limits` are every container's
    `resources.limits` (`{"nvidia.com/gpu": "1"}`).
    """
    uids = {c.pod_uid for c in containers} | ({uid} if uid else set())
    if len(uids) != 1:
        raise ValueError(f"containers of one pod must share its UID, got {sorted(uids)}")
    statuses: list[dict[str, Any]] = [
        {
            "name": c.name,
            "containerID": c.container_id,
            "image": image,
            "imageID": f"{image}@sha256:{'0' * 64}",
            "ready": True,
            "started": True,
            "restartCount": c.restarts,
            "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
        }
        for c in containers
    ]
    statuses += [
        {
            "name": other,
            "image": image,
            "imageID": "",
            "ready": False,
            "started": False,
            "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}},
        }
        for other in waiting
    ]
    spec_containers: list[dict[str, Any]] = [
        {"name": n, "image": image} for n in [c.name for c in containers] + list(waiting)
    ]
    if limits:
        for spec in spec_containers:
            spec["resources"] = {"limits": dict(limits)}
    status: dict[str, Any] = {"phase": "Running", "containerStatuses": statuses}
    if qos_class:
        status["qosClass"] = qos_class
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uids.pop(),
            "annotations": dict(annotations or {}),
        },
        "spec": {"nodeName": node, "containers": spec_containers},
        "status": status,
    }


def _make_root(root: Path, dirs: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o1777)
    for inside in dirs:
        (root / inside.strip("/")).mkdir(mode=0o755, parents=True, exist_ok=True)


def _read_with_timeout(pipe: Any, timeout: float) -> bytes:
    readable, _, _ = select.select([pipe], [], [], timeout)
    return bytes(os.read(pipe.fileno(), 1)) if readable else b""


def _kill(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout):
        if stream is not None and not stream.closed:
            stream.close()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
    proc.wait(HANDSHAKE_TIMEOUT)


def _unmount_under(root: Path) -> bool:
    """Detach every mount at or below `root` (deepest first); True when none is left.

    rmtree must never walk into a bind mount of something else.
    """
    prefix = str(root).rstrip("/") + "/"

    def below() -> list[str]:
        return [
            m.mountpoint
            for m in read_mount_table().mounts
            if m.mountpoint == str(root) or m.mountpoint.startswith(prefix)
        ]

    for _ in range(10):  # stacked mounts come off one per umount
        left = below()
        if not left:
            return True
        for mountpoint in sorted(set(left), key=lambda p: p.count("/"), reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
    return not below()
