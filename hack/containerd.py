"""Real containers for the real-node tests: a private containerd, runc, the Debian base.

The fake containers of `hack/containers.py` are chrooted processes; these are
what a kubelet gets from containerd: runc containers in their own namespaces,
with a `containerd-shim-runc-v2` each, in the cgroups the kubelet asks for.

    with Containerd() as node:                 # its own containerd, base imported
        app = node.run(pod_uid, "app", cgroup_style="cgroupfs")
        node.exec(app, ["cat", "/etc/os-release"])
        kube.put(node.pod("web", "ns", "node-a", [app]))

- `Containerd` starts Debian's `containerd` with a config of its own in a
  temporary directory (root, state, sockets; the CRI plugin and the
  snapshotters it does not use disabled, so it is up in well under a second),
  detached from the caller (its parent is init, as on a node), and imports
  the base (`hack/base_image.py`) as an OCI archive into namespace `k8s.io`,
  the kubelet's.
- `run()` starts a container through `ctr run -d` in the cgroup the kubelet
  would give it (cgroupfs or systemd driver naming), `restart()` replaces it
  with a new container ID in the same pod, as the kubelet does.
- `close()` kills every task, deletes every container, stops containerd and
  the shims, and removes every cgroup made for a pod (the pod and QoS levels
  too, where they did not exist before); `clear()` does it all but stop
  containerd, so that one containerd serves a test session. A harness whose owner died (a killed
  pytest) is cleaned up by the next `start()`.

Needs root, containerd, ctr and runc (hack/setup.sh installs them).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from agents.mount_healer.mountinfo import read_mount_table
from hack.base_image import base_tarball
from hack.cgroups import (
    cgroupfs_segments,
    has_children,
    mounted_hierarchies,
    remove_cgroup,
    systemd_segments,
)
from hack.containers import RUNTIME_SCHEME, kubelet_pod, new_container_id

NAMESPACE = "k8s.io"  # the kubelet's containerd namespace
RUNTIME = "io.containerd.runc.v2"
TEMP_PREFIX = "node-agents-containerd-"
START_TIMEOUT = 20.0
CTR_TIMEOUT = 60.0
OUTPUT_END = "--end-of-output--"  # printed after a command whose output is read (output())
OUTPUT_ATTEMPTS = 5
# What ctr, runc containers and an image import need; the rest is disabled.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.restart",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.native",
    "io.containerd.snapshotter.v1.zfs",
)
QOS_CLASS = {"guaranteed": "Guaranteed", "burstable": "Burstable", "besteffort": "BestEffort"}
CgroupStyle = Literal["systemd", "systemd-literal", "cgroupfs"]


class ContainerdError(RuntimeError):
    """containerd did not start, or a ctr command failed."""


@dataclass(frozen=True)
class Bind:
    """A host path bind-mounted into a container."""

    source: str | Path
    destination: str
    read_only: bool = False
    propagation: str = ""
    """"rshared" as the kubelet asks for `mountPropagation: Bidirectional`, "rslave" for
    HostToContainer; "" for runc's default (rprivate, None)."""


@dataclass(frozen=True)
class RunOptions:
    """How a container was asked for; a restart asks again the same way."""

    qos: str = "burstable"
    cgroup_style: CgroupStyle = "systemd"
    user: tuple[int, int] | None = None
    read_only: bool = False
    tmpfs_tmp: bool = False
    mounts: tuple[Bind, ...] = ()
    argv: tuple[str, ...] = ("sleep", "infinity")
    # What a privileged node agent's pod asks for (privileged: true, hostPID,
    # hostNetwork), and an image of its own: a root filesystem directory.
    privileged: bool = False
    host_pid: bool = False
    host_network: bool = False
    rootfs: Path | None = None
    rootfs_propagation: str = ""
    env: tuple[str, ...] = ()
    log: Path | None = None
    """Where its output goes (else nowhere: `--null-io`)."""


@dataclass(frozen=True)
class RealContainer:
    """One container (its task started) in the harness's containerd."""

    pod_uid: str
    name: str
    id: str
    """Bare: 64 hex digits (the pod status says `containerd://<id>`)."""
    pid: int
    """Host PID of its init process."""
    shim_pid: int
    """Host PID of its `containerd-shim-runc-v2`."""
    cgroup: str
    """Its cgroup path as `/proc/<pid>/cgroup` shows it on the host."""
    options: RunOptions = field(default_factory=RunOptions)
    restarts: int = 0

    @property
    def container_id(self) -> str:
        """As `status.containerStatuses[].containerID` shows it."""
        return RUNTIME_SCHEME + self.id


def cgroup_path(pod_uid: str, container_id: str, qos: str, style: CgroupStyle) -> str:
    """The container's cgroup as a kubelet on containerd makes it.

    cgroupfs driver: `/kubepods/<qos>/pod<uid>/<id>` (Guaranteed without the
    QoS level). systemd driver: the kubelet passes runc
    `kubepods-<qos>-pod<uid_>.slice:cri-containerd:<id>`, which runc's systemd
    driver expands to the slice path below with `cri-containerd-<id>.scope`.
    systemd-literal: that name itself, at the top, as runc's cgroup v1 systemd
    driver leaves it in the controllers systemd does not manage (containerd 1.6,
    Kubernetes 1.24; tests/data/cgroup_corpus.txt has such lines from nodes).
    """
    if qos not in QOS_CLASS:
        raise ValueError(f"unknown QoS class {qos!r}, expected one of {sorted(QOS_CLASS)}")
    if style == "systemd":
        segments = [*systemd_segments(pod_uid, qos), f"cri-containerd-{container_id}.scope"]
    elif style == "systemd-literal":
        segments = [f"{systemd_segments(pod_uid, qos)[-1]}:cri-containerd:{container_id}"]
    else:
        segments = [*cgroupfs_segments(pod_uid, qos), container_id]
    return "/" + "/".join(segments)


def oci_archive(tarball: Path, ref: str) -> Path:
    """An OCI image archive of `tarball` (one uncompressed layer), cached next to it.

    Built here, not with a registry tool: the layer is the tarball itself, so
    its digest is its diff_id (image-spec config.md, "layer DiffID").
    """
    archive = tarball.with_name(f"{tarball.stem}.oci.tar")
    if archive.exists():
        return archive
    digest = hashlib.sha256()
    with tarball.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    layer = f"sha256:{digest.hexdigest()}"
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = _json(
        {
            "architecture": arch,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
            },
            "rootfs": {"type": "layers", "diff_ids": [layer]},
        }
    )
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer,
                    "size": tarball.stat().st_size,
                }
            ],
        }
    )
    index = _json(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    **_descriptor("application/vnd.oci.image.manifest.v1+json", manifest),
                    "annotations": {"org.opencontainers.image.ref.name": ref},
                    "platform": {"architecture": arch, "os": "linux"},
                }
            ],
        }
    )
    partial = archive.with_name(f".{archive.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(partial, "w") as out:
            _add_bytes(out, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
            _add_bytes(out, "index.json", index)
            for blob in (config, manifest):
                _add_bytes(out, f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}", blob)
            out.add(tarball, arcname=f"blobs/sha256/{digest.hexdigest()}")
        partial.rename(archive)
    finally:
        partial.unlink(missing_ok=True)
    return archive


class Containerd:
    """A private containerd with the base imported; a context manager (module docstring)."""

    def __init__(self, *, tarball: Path | None = None, import_base: bool = True) -> None:
        """`import_base=False`: no image (every container brings its `rootfs`)."""
        self._tarball = tarball
        self._import_base = import_base
        self.dir = Path()
        self.address = ""
        self.image = ""
        self.pid = 0
        self._containers: dict[str, RealContainer] = {}
        self._cgroups: set[str] = set()  # directories made for pods, in every hierarchy
        self._exec_ids = 0

    # -- life cycle

    def start(self) -> Containerd:
        _reap_orphans()
        # A short path: unix socket paths have 108 bytes (unix(7)).
        self.dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp"))
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        self.address = str(self.dir / "containerd.sock")
        try:
            self._start_daemon()
            if self._import_base:
                tarball = self._tarball or base_tarball()
                self.image = f"localhost/node-agents/base:{tarball.stem}"
                self._ctr("images", "import", str(oci_archive(tarball, self.image)))
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill and delete every container, stop containerd and the shims, remove the
        pods' cgroups and the temporary directory; raises if a cgroup stays."""
        if not self.dir.parts:
            return
        self._remove_all()
        failures = _shutdown(self.dir, self._cgroups)
        self._cgroups.clear()
        self.dir = Path()
        if failures:
            raise OSError(errno.EBUSY, "cgroups left behind: " + "; ".join(failures))

    def clear(self) -> None:
        """Kill and delete every container and remove the pods' cgroups; containerd and
        the image stay (a session's containerd between two tests)."""
        self._remove_all()
        failures = _remove_cgroups(self._cgroups)
        self._cgroups.clear()
        (self.dir / "cgroups").unlink(missing_ok=True)
        if failures:
            raise OSError(errno.EBUSY, "cgroups left behind: " + "; ".join(failures))

    def _remove_all(self) -> None:
        if _alive(self.pid):
            listed = self._ctr("containers", "ls", "--quiet", check=False).stdout.split()
            for container_id in {*listed, *self._containers}:
                with contextlib.suppress(ContainerdError, subprocess.TimeoutExpired):
                    self._remove_id(container_id)
        self._containers.clear()

    def _start_daemon(self) -> None:
        config = self.dir / "config.toml"
        config.write_text(
            "\n".join(
                [
                    "version = 2",
                    f'root = "{self.dir}/root"',
                    f'state = "{self.dir}/state"',
                    f"disabled_plugins = {json.dumps(list(DISABLED_PLUGINS))}",
                    "[grpc]",
                    f'  address = "{self.address}"',
                    "[ttrpc]",
                    f'  address = "{self.dir}/containerd-ttrpc.sock"',
                    "",
                ]
            )
        )
        log = self.dir / "containerd.log"
        # Detached (the shell exits at once): containerd's parent is init, as on a
        # node, and no test sees it as a child process it leaked.
        script = 'containerd --config "$1" </dev/null >>"$2" 2>&1 & echo $!'
        launched = subprocess.run(
            ["sh", "-c", script, "sh", str(config), str(log)],
            capture_output=True,
            text=True,
            check=True,
        )
        self.pid = int(launched.stdout)
        (self.dir / "containerd.pid").write_text(str(self.pid))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not _alive(self.pid):
                raise ContainerdError(f"containerd exited at start:\n{_tail(log)}")
            if os.path.exists(self.address):
                done = self._ctr_run(["version"], timeout=5)
                if done.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise ContainerdError(
                    f"containerd not serving {self.address} after {START_TIMEOUT:.0f} s:\n"
                    + _tail(log)
                )
            time.sleep(0.05)

    # -- containers

    def run(
        self,
        pod_uid: str,
        name: str,
        *,
        qos: str = "burstable",
        cgroup_style: CgroupStyle = "systemd",
        user: tuple[int, int] | None = None,
        read_only: bool = False,
        tmpfs_tmp: bool = False,
        mounts: Iterable[Bind] = (),
        argv: Sequence[str] = ("sleep", "infinity"),
        privileged: bool = False,
        host_pid: bool = False,
        host_network: bool = False,
        rootfs: Path | None = None,
        env: Sequence[str] = (),
        log: Path | None = None,
    ) -> RealContainer:
        """Start container `name` of pod `pod_uid` (a new 64-hex ID); returns once its
        task runs. `rootfs`: that directory as its root instead of the base image."""
        mounts = tuple(mounts)
        # As containerd's CRI does: a Bidirectional mount makes the root rshared too
        # (else runc makes it rslave and the mount's own peers stop at the
        # container's root), a HostToContainer one makes it rslave.
        propagations = {m.propagation for m in mounts}
        root = next((p for p in ("rshared", "rslave") if p in propagations), "")
        options = RunOptions(
            qos=qos,
            cgroup_style=cgroup_style,
            user=user,
            read_only=read_only,
            tmpfs_tmp=tmpfs_tmp,
            mounts=mounts,
            argv=tuple(argv),
            privileged=privileged,
            host_pid=host_pid,
            host_network=host_network,
            rootfs=rootfs,
            rootfs_propagation=root,
            env=tuple(env),
            log=log,
        )
        return self._run(pod_uid, name, options, 0)

    def restart(self, container: RealContainer) -> RealContainer:
        """Kill and delete it; start it again with a new container ID in the same pod."""
        self._remove(container)
        return self._run(
            container.pod_uid, container.name, container.options, container.restarts + 1
        )

    def kill(self, container: RealContainer) -> None:
        """SIGKILL its task (it shows as stopped; the container stays until `close()`)."""
        self._ctr("tasks", "kill", "--all", "--signal", "SIGKILL", container.id, check=False)
        _wait_gone(container.pid, 10.0)

    def alive(self, container: RealContainer) -> bool:
        return self.task_status(container) == "RUNNING"

    def task_status(self, container: RealContainer) -> str:
        """RUNNING, STOPPED, ... as `ctr tasks ls` shows it; "" when it has no task."""
        for line in self._ctr("tasks", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container.id:
                return fields[-1]
        return ""

    def exec(
        self,
        container: RealContainer,
        argv: Sequence[str],
        *,
        user: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the container (its namespaces, its root) as `user`, by default
        the container's own; not checked."""
        self._exec_ids += 1
        flags = ["--exec-id", f"exec-{self._exec_ids}", "--fifo-dir", str(self.dir / "fifo")]
        argv = _as_user(user or container.options.user, argv)
        return self._ctr_run(["tasks", "exec", *flags, container.id, *argv])

    def output(
        self,
        container: RealContainer,
        argv: Sequence[str],
        *,
        user: tuple[int, int] | None = None,
    ) -> str:
        """What `argv`, a command that only reads, prints in the container (`exec`);
        ContainerdError when it fails.

        On a loaded machine `ctr tasks exec` (1.6) now and then exits 0 with none
        or part of the output (about 2 % of quick commands here, with both cores
        busy): `argv` runs again until its output ends with a marker printed after it.
        """
        script = f'"$@" && printf %s {OUTPUT_END}'
        for _ in range(OUTPUT_ATTEMPTS):
            done = self.exec(container, ["sh", "-c", script, "sh", *argv], user=user)
            if done.returncode != 0:
                raise ContainerdError(
                    f"{list(argv)} in container {container.name} failed "
                    f"(exit {done.returncode}): {done.stderr.strip()}"
                )
            if done.stdout.endswith(OUTPUT_END):
                return done.stdout[: -len(OUTPUT_END)]
        raise ContainerdError(f"ctr lost the output of {list(argv)} {OUTPUT_ATTEMPTS} times")

    def pod(
        self,
        name: str,
        namespace: str,
        node: str,
        containers: Sequence[RealContainer],
        annotations: Mapping[str, str] | None = None,
        *,
        waiting: Sequence[str] = (),
        limits: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The Pod as the kubelet reports it Running (`hack.containers.kubelet_pod`)."""
        qos = {c.options.qos for c in containers}
        return kubelet_pod(
            name,
            namespace,
            node,
            containers,
            annotations,
            waiting=waiting,
            image=self.image,
            qos_class=QOS_CLASS[qos.pop()] if len(qos) == 1 else "",
            limits=limits,
        )

    def _run(self, pod_uid: str, name: str, options: RunOptions, restarts: int) -> RealContainer:
        container_id = new_container_id()
        cgroup = cgroup_path(pod_uid, container_id, options.qos, options.cgroup_style)
        self._note_cgroups(cgroup)
        output = [f"--log-uri=file://{options.log}"] if options.log else ["--null-io"]
        flags = [*output, "--runc-root", str(self.dir / "runc")]
        runc = shutil.which("runc")
        if runc:
            flags += ["--runc-binary", runc]
        # runc's systemd driver needs systemd on D-Bus, which a test machine may not
        # run: runc's cgroupfs driver is given the path the systemd driver would
        # make (cgroup_path()), so /proc/<pid>/cgroup reads as on a systemd node.
        flags += ["--cgroup", cgroup, "--label", f"io.kubernetes.pod.uid={pod_uid}"]
        flags += ["--label", f"io.kubernetes.container.name={name}"]
        if options.read_only:
            flags.append("--read-only")
        if options.tmpfs_tmp:
            flags += ["--mount", "type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev:mode=1777"]
        for bind in options.mounts:
            mode = ":".join(
                filter(None, ("rbind", "ro" if bind.read_only else "rw", bind.propagation))
            )
            flags += ["--mount", f"type=bind,src={bind.source},dst={bind.destination}"]
            flags[-1] += f",options={mode}"
        if options.rootfs_propagation:
            flags += ["--rootfs-propagation", options.rootfs_propagation]
        if options.privileged:
            flags.append("--privileged")
        if options.host_pid:
            flags += ["--with-ns", "pid:/proc/1/ns/pid"]
        if options.host_network:
            flags.append("--net-host")
        for variable in options.env:
            flags += ["--env", variable]
        if options.rootfs:
            flags.append("--rootfs")
        image = str(options.rootfs) if options.rootfs else self.image
        argv = _as_user(options.user, options.argv)
        self._containers[container_id] = RealContainer(pod_uid, name, container_id, 0, 0, cgroup)
        self._ctr("run", "-d", *flags, image, container_id, *argv)
        bundle = self.dir / "state" / "io.containerd.runtime.v2.task" / NAMESPACE / container_id
        pid = int((bundle / "init.pid").read_text())
        shim_pid = _parent(pid)  # runc's init is the shim's child (it is the subreaper)
        container = RealContainer(
            pod_uid, name, container_id, pid, shim_pid, cgroup, options, restarts
        )
        self._containers[container_id] = container
        return container

    def _remove(self, container: RealContainer) -> None:
        self._remove_id(container.id)
        _wait_gone(container.pid, 10.0)

    def _remove_id(self, container_id: str) -> None:
        self._containers.pop(container_id, None)
        self._ctr("tasks", "kill", "--all", "--signal", "SIGKILL", container_id, check=False)
        # ctr tasks delete waits for the task to exit (it is killed: at once).
        self._ctr("tasks", "delete", "--force", container_id, check=False)
        self._ctr("containers", "delete", container_id, check=False)

    def _note_cgroups(self, cgroup: str) -> None:
        """Remember the levels of `cgroup` that runc will make (absent now)."""
        parts = cgroup.strip("/").split("/")
        for hierarchy in mounted_hierarchies():
            for depth in range(1, len(parts) + 1):
                directory = str(hierarchy.mountpoint.joinpath(*parts[:depth]))
                if directory not in self._cgroups and not os.path.exists(directory):
                    self._cgroups.add(directory)
                    with (self.dir / "cgroups").open("a") as made:  # for _reap_orphans
                        made.write(directory + "\n")

    def _ctr_run(
        self, args: Sequence[str], timeout: float = CTR_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", self.address, "--namespace", NAMESPACE, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = self._ctr_run(args)
        if check and done.returncode != 0:
            raise ContainerdError(
                f"ctr {' '.join(args[:2])} failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}\n"
                f"containerd's log:\n{_tail(self.dir / 'containerd.log')}"
            )
        return done


def _as_user(user: tuple[int, int] | None, argv: Sequence[str]) -> list[str]:
    """`argv` run as `user` (uid, gid): ctr 1.6 run has no --user, so the process
    drops to it with setpriv (util-linux, in the base) before it execs, as a
    runAsUser container's process runs with no capabilities and no other groups."""
    if user is None:
        return list(argv)
    uid, gid = user
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv]


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _descriptor(media_type: str, blob: bytes) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": f"sha256:{hashlib.sha256(blob).hexdigest()}",
        "size": len(blob),
    }


def _add_bytes(out: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    out.addfile(info, io.BytesIO(data))


def _tail(log: Path, size: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-size:]
    except FileNotFoundError:
        return "(no log)"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _stop(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout`, through a pidfd (pid held, not reused)."""
    if pid <= 0:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
            if _wait_gone(pid, wait):
                return
    finally:
        os.close(pidfd)


def _shutdown(directory: Path, cgroups: Iterable[str]) -> list[str]:
    """Stop what the harness in `directory` started, remove what it made; returns the
    cgroups that could not be removed."""
    marker = str(directory).encode() + b"/"
    for pid in _pids():
        # containerd (--config <dir>/...) and its shims (-address <dir>/...).
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                _stop(pid, 5.0)
    # A runc container outlives a killed shim: kill what is left in the pods' cgroups
    # (never in a QoS level, which other pods on this machine may share).
    for made in cgroups:
        if _pod_level(made):
            with contextlib.suppress(OSError):
                for pid in map(int, Path(made, "cgroup.procs").read_text().split()):
                    _stop(pid, 0.0)
    _teardown_dir(directory)
    return _remove_cgroups(cgroups)


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _teardown_dir(directory: Path) -> None:
    """Unmount what containerd left mounted below `directory` (rootfs, snapshots), remove it."""
    prefix = str(directory) + "/"
    for _ in range(5):
        mounted = [
            m.mountpoint for m in read_mount_table().mounts if m.mountpoint.startswith(prefix)
        ]
        if not mounted:
            break
        for mountpoint in sorted(set(mounted), key=lambda p: p.count("/"), reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
    shutil.rmtree(directory, ignore_errors=True)


def _pod_level(directory: str) -> bool:
    """A pod's cgroup or one below it (`pod<uid>`, `kubepods-<qos>-pod<uid_>.slice`)."""
    return any(s.startswith("pod") or "-pod" in s for s in directory.split("/"))


def _remove_cgroups(directories: Iterable[str], timeout: float = 5.0) -> list[str]:
    """rmdir `directories` deepest first; a QoS level that other pods (other tests on
    this machine) now use too stays."""
    failures = []
    for directory in sorted(directories, key=lambda d: d.count("/"), reverse=True):
        if not _pod_level(directory) and has_children(Path(directory)):
            continue
        failure = remove_cgroup(directory, timeout)
        if failure:
            failures.append(failure)
    return failures


def _reap_orphans() -> None:
    """Stop the containerd (and its shims) of a harness whose owner process is gone."""
    for directory in Path("/tmp").glob(f"{TEMP_PREFIX}*"):
        try:
            owner = int((directory / "owner.pid").read_text())
        except (FileNotFoundError, ValueError):
            continue
        if _alive(owner):
            continue
        try:
            made = (directory / "cgroups").read_text().split()
        except FileNotFoundError:
            made = []
        _shutdown(directory, made)
