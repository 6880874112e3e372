"""Host PID -> pod UID and container ID, from `/proc/<pid>/cgroup`.

NVML names GPU processes by host PID only; the kubelet's cgroup layout is what
ties a PID to a pod. Each line of the file is `hierarchy-id:controllers:path`
(cgroup v1: one line per mounted hierarchy; v2: the single line `0::/path`;
hybrid hosts: both). Documentation/admin-guide/cgroup-v2.rst, "Processes".

The kubelet names the pod cgroup after the pod UID, and the runtime names the
container cgroup after the container ID:

- systemd driver: `/kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid with _ for ->.slice/cri-containerd-<id>.scope`
  (Guaranteed pods have no QoS level: `kubepods-pod<uid>.slice`; the slice name
  repeats its parents, so one segment says pod and QoS);
- cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>` (Guaranteed:
  `/kubepods/pod<uid>/<id>`);
- container cgroups: `cri-containerd-<id>.scope` (containerd), `crio-<id>.scope`
  or `crio-<id>` (CRI-O), `docker-<id>.scope` (dockershim, cri-dockerd), and a
  bare `<id>` under cgroupfs (runtime unknown);
- the systemd `slice:prefix:id` form as one segment,
  `kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`: the cgroupsPath
  containerd passes with `SystemdCgroup = true`, which runc on cgroup v1 takes
  as a cgroupfs path when it does not drive systemd itself, below
  containerd's own cgroup (`/system.slice/containerd.service/...`; Kubernetes
  1.24, containerd 1.6).

A reader in a cgroup namespace sees paths outside its namespace root relative
to that root, as `/../` steps (cgroup-v2.rst, "Namespace"): an enforcer pod
without the host cgroup namespace reads `0::/../../kubepods-besteffort-pod<uid>
.slice/cri-containerd-<id>.scope`. The leading levels are gone then, so the pod
is found by its own segment, and a cgroupfs pod read that way may not show its
QoS class (`qos == ""`).
"""

from __future__ import annotations

import errno
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

# Kubernetes pod UIDs are RFC 4122 UUIDs in lower case; static (file) pods get
# the md5 of their manifest instead, 32 hex digits with no dashes
# (pkg/kubelet/config/common.go `applyDefaults`). The systemd driver escapes
# "-", the slice-hierarchy separator, as "_" (pkg/kubelet/cm/cgroup_manager_linux.go).
_UUID_UNDERSCORED = r"[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}"
_UUID_DASHED = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_STATIC_POD_UID = r"[0-9a-f]{32}"

# `kubepods-burstable-pod<uid>.slice`, `kubepods-pod<uid>.slice`, and the same
# under a kubelet `--cgroup-root` (kind: `kubelet-kubepods-...-pod<uid>.slice`).
_SYSTEMD_POD = re.compile(
    r"/(?:[^/]*-)?kubepods(?:-(burstable|besteffort))?"
    rf"-pod({_UUID_UNDERSCORED}|{_STATIC_POD_UID})\.slice(?=/|:|$)"
)
# `/kubepods[/qos]/pod<uid>`, or `/..[/..]*[/qos]/pod<uid>` when the reader's
# cgroup namespace hides the levels above. A bare `pod<uid>` anywhere else is
# not a kubelet pod.
_CGROUPFS_POD = re.compile(
    r"(?:/kubepods|^(?:/\.\.)+)(?:/(burstable|besteffort))?"
    rf"/pod({_UUID_DASHED}|{_STATIC_POD_UID})(?=/|$)"
)
_CONTAINER = re.compile(r"(?:(cri-containerd|crio|docker)-)?([0-9a-f]{64})(?:\.scope)?")
# The rest of `<pod>.slice:<prefix>:<id>`: runc's systemd cgroupsPath, read as a path.
_COLON_CONTAINER = re.compile(r":(?:(cri-containerd|crio|docker):)?([0-9a-f]{64})")
# CRI-O's conmon, in the pod cgroup when `conmon_cgroup = "pod"` (the default
# with the systemd driver): `crio-conmon-<id>.scope`, `crio-conmon-<id>` under cgroupfs.
_CONMON = re.compile(r"crio-conmon-[0-9a-f]{64}(?:\.scope)?")
_RUNTIMES = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker", None: ""}
# proc_cgroup_show() in kernel/cgroup/cgroup.c marks a v2 cgroup removed while
# a (zombie) task still points at it.
_DELETED = " (deleted)"


class AttributionError(ValueError):
    """The cgroup file cannot be read or is not in /proc/<pid>/cgroup format."""


class ProcessGone(LookupError):
    """The process exited before its cgroup could be read."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"process {pid} is gone")
        self.pid = pid


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """The pod, and the container in it, that a process belongs to."""

    pod_uid: str
    """Canonical UID, as in the pod's `metadata.uid` (dashes, lower case)."""
    container_id: str
    """64 hex digits, as in `status.containerStatuses[].containerID` after `://`.

    Empty for a process of the pod that is in no container: CRI-O's conmon
    (`crio-conmon-<id>.scope`), or a process placed in the pod cgroup itself.
    Such a process counts towards the pod but must never be signalled: killing
    conmon orphans the container and CRI-O reports it as exited.
    """
    runtime: str
    """"containerd", "cri-o", "docker", or "" when the path does not say."""
    qos: str
    """"guaranteed", "burstable", "besteffort", or "" when the path does not say
    (a cgroupfs path seen through `/../` from another QoS level)."""

    @property
    def in_container(self) -> bool:
        """True when the process is in a container, the only kind the enforcer may signal."""
        return bool(self.container_id)


@functools.lru_cache(maxsize=1024)
def parse_cgroup(text: str) -> ContainerRef | None:
    """The pod and container named by the content of `/proc/<pid>/cgroup`.

    None when no line names a pod (a host process, a system slice, the
    kubepods slice itself). On hybrid hosts the v2 line wins when it names a
    pod, else the first v1 line that does; every other line naming a pod must
    agree on pod and container, otherwise the data is not trusted
    (AttributionError): the enforcer never acts on uncertain data.

    Cached by text: from one tick to the next most GPU processes stay in the
    same cgroup, and the processes of one container read the same text
    (8 GPUs x 64 processes fit the cache; errors are not cached).
    """
    if not text.strip():
        raise AttributionError("empty cgroup file")
    chosen: ContainerRef | None = None
    chosen_is_v2 = False
    others: list[ContainerRef] = []
    seen: set[str] = set()
    # "\n" only: the kernel ends each line with it, and a cgroup name may hold
    # \r, \x0b, \x1c... that str.splitlines() would take for line ends.
    for line in text.split("\n"):
        hierarchy, _, rest = line.partition(":")
        controllers, sep, path = rest.partition(":")
        if not (sep and hierarchy.isdigit() and path[:1] == "/"):
            if not line:
                continue
            raise AttributionError(f"not a /proc/<pid>/cgroup line: {line!r}")
        if path in seen:
            continue  # v1 repeats one path for every hierarchy the runtime joined
        seen.add(path)
        ref = _parse_path(path)
        if ref is None:
            continue
        is_v2 = hierarchy == "0" and not controllers
        if chosen is None or (is_v2 and not chosen_is_v2):
            if chosen is not None:
                others.append(chosen)
            chosen, chosen_is_v2 = ref, is_v2
        else:
            others.append(ref)
    if chosen is not None:
        for ref in others:
            if ref.pod_uid != chosen.pod_uid or ref.container_id != chosen.container_id:
                raise AttributionError(
                    f"cgroup lines disagree: {_describe(chosen)} and {_describe(ref)}"
                )
    return chosen


def _parse_path(path: str) -> ContainerRef | None:
    """The pod and container one cgroup path names."""
    if "pod" not in path:  # host processes, the common case on a busy node
        return None
    if path.endswith(_DELETED):
        path = path[: -len(_DELETED)]
    # The substring tests only spare a regex search that cannot match.
    systemd = _SYSTEMD_POD.search(path) if ".slice" in path else None
    cgroupfs = (
        _CGROUPFS_POD.search(path) if "/kubepods/" in path or path.startswith("/..") else None
    )
    # Both may match in nested clusters (kind in a pod): the outermost pod is
    # the one this node's kubelet knows.
    if systemd is not None and (cgroupfs is None or systemd.start() <= cgroupfs.start()):
        pod_uid = systemd.group(2).replace("_", "-")
        qos = systemd.group(1) or "guaranteed"
        end = systemd.end()
    elif cgroupfs is not None:
        pod_uid = cgroupfs.group(2)
        if cgroupfs.group(1):
            qos = cgroupfs.group(1)
        elif cgroupfs.group(0).startswith("/kubepods/"):
            qos = "guaranteed"
        else:
            qos = ""  # `/../pod<uid>`: the QoS level is above the namespace root
        end = cgroupfs.end()
    else:
        return None
    if path[end : end + 1] == ":":
        colon = _COLON_CONTAINER.fullmatch(path[end:].split("/", 1)[0])
        if colon is None:
            return ContainerRef(pod_uid, "", "", qos)
        return ContainerRef(pod_uid, colon.group(2), _RUNTIMES[colon.group(1)], qos)
    # The segment right below the pod is the container; anything deeper
    # (`init.scope`, a systemd-in-container slice, crun's `container`, a
    # docker-in-docker daemon's containers) belongs to that container.
    below = path[end + 1 :].split("/", 1)[0]
    container = _CONTAINER.fullmatch(below)
    if container is None:
        runtime = "cri-o" if _CONMON.fullmatch(below) else ""
        return ContainerRef(pod_uid, "", runtime, qos)
    return ContainerRef(pod_uid, container.group(2), _RUNTIMES[container.group(1)], qos)


def _describe(ref: ContainerRef) -> str:
    return f"pod {ref.pod_uid} container {ref.container_id or '-'}"


def read_cgroup(pid: int, proc_root: str | Path = "/proc") -> ContainerRef | None:
    """Read and parse `<proc_root>/<pid>/cgroup`.

    ProcessGone when the process exited (ENOENT before open, ESRCH on a read
    racing its exit); AttributionError for any other failure.
    """
    path = f"{proc_root}/{pid}/cgroup"
    try:
        # os.open/os.read: one read of a small proc file, no text layer; the
        # enforcer reads hundreds per tick.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ESRCH):
            raise ProcessGone(pid) from err
        raise AttributionError(f"cannot read {path}: {err.strerror}") from err
    return parse_cgroup(b"".join(chunks).decode("utf-8", errors="surrogateescape"))


def container_processes(container_id: str, proc_root: str | Path = "/proc") -> list[int]:
    """PIDs of the processes in one container, by scanning `<proc_root>/*/cgroup`.

    `container_id` may carry the runtime scheme a pod's status shows
    (`containerd://<id>`, `cri-o://<id>`, `docker://<id>`). The token
    refresher uses a PID to reach the container's root (`/proc/<pid>/root`).
    One scan reads every process's cgroup file: callers keep what they find.
    """
    wanted = bare_container_id(container_id)
    return processes_of_containers({wanted}, proc_root).get(wanted, [])


def bare_container_id(container_id: str) -> str:
    """`containerd://<id>` (a pod status's form) -> `<id>`; ValueError when empty."""
    bare = container_id.rpartition("://")[2]
    if not bare:
        raise ValueError("empty container ID")
    return bare


def processes_of_containers(
    container_ids: set[str], proc_root: str | Path = "/proc"
) -> dict[str, list[int]]:
    """Bare container ID -> sorted PIDs in it, for every wanted ID that has any.

    One pass over `<proc_root>`, however many containers are wanted.
    """
    found: dict[str, list[int]] = {}
    if not container_ids:
        return found
    for entry in os.scandir(proc_root):
        if not entry.name.isdigit():
            continue
        try:
            ref = read_cgroup(int(entry.name), proc_root)
        except (ProcessGone, AttributionError):
            continue  # exited, or not a cgroup we understand: not a wanted container
        if ref is not None and ref.container_id in container_ids:
            found.setdefault(ref.container_id, []).append(int(entry.name))
    for pids in found.values():
        pids.sort()
    return found
