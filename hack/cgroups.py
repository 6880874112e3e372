"""Real cgroups laid out as the kubelet and the runtimes lay them out, to put test
processes in "pods".

Tests of the GPU enforcer need host PIDs whose `/proc/<pid>/cgroup` looks like
a pod's. `FakePodCgroups` makes the directories (systemd driver on the v2
hierarchy, cgroupfs driver on the v1 hierarchies), moves processes in through
`cgroup.procs`, and removes everything it made. Membership is all it needs: no
controller is enabled and no limit is set, and nothing it creates is left
behind. Needs root and the cgroup hierarchies mounted at their root
(Documentation/admin-guide/cgroup-v1/cgroups.rst, cgroup-v2.rst).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from agents.mount_healer.mountinfo import read_mount_table

# layout -> (cgroup version, runtime scope prefix, fixed QoS or None)
LAYOUTS: dict[str, tuple[int, str, str | None]] = {
    "systemd-v2-containerd": (2, "cri-containerd-", None),
    "systemd-v2-crio": (2, "crio-", None),
    "systemd-v2-docker": (2, "docker-", None),
    "cgroupfs-v1-containerd": (1, "", None),
    "cgroupfs-v1-guaranteed": (1, "", "guaranteed"),
}
QOS_CLASSES = ("guaranteed", "burstable", "besteffort")


class CgroupsUnavailable(RuntimeError):
    """This machine cannot hold the layout (no such hierarchy mounted, not root)."""


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy."""

    mountpoint: Path
    version: int
    controllers: frozenset[str]
    """v1: the controllers and `name=` of the hierarchy (`{"cpu", "cpuacct"}`,
    `{"name=systemd"}`); v2: empty."""

    def line_matches(self, hierarchy_id: str, controllers: str) -> bool:
        """Whether a `/proc/<pid>/cgroup` line is this hierarchy's."""
        if self.version == 2:
            return hierarchy_id == "0" and not controllers
        return bool(controllers) and set(controllers.split(",")) <= self.controllers


def mounted_hierarchies(proc_root: str | Path = "/proc") -> list[Hierarchy]:
    """Cgroup hierarchies mounted at their root, one mount each, in mount order.

    A mount of a sub-cgroup (inside a container) would shift every path, so it
    is left out.
    """
    found: list[Hierarchy] = []
    devices: set[str] = set()
    for mount in read_mount_table(proc_root).mounts:
        if mount.fstype not in ("cgroup", "cgroup2") or mount.root != "/":
            continue
        if mount.device in devices:
            continue
        devices.add(mount.device)
        if mount.fstype == "cgroup2":
            found.append(Hierarchy(Path(mount.mountpoint), 2, frozenset()))
        else:
            options = frozenset(mount.super_options.split(","))
            found.append(Hierarchy(Path(mount.mountpoint), 1, options))
    return found


def own_cgroups(
    pid: int | str = "self", proc_root: str | Path = "/proc"
) -> list[tuple[str, str, str]]:
    """`(hierarchy id, controllers, path)` of each line of `/proc/<pid>/cgroup`."""
    lines = Path(f"{proc_root}/{pid}/cgroup").read_text().splitlines()
    return [(h, c, p) for h, c, p in (line.split(":", 2) for line in lines if line)]


def cgroup_in(
    hierarchy: Hierarchy, pid: int | str = "self", proc_root: str | Path = "/proc"
) -> str:
    """The cgroup path of `pid` in `hierarchy` ("" when the file has no line for it)."""
    for hierarchy_id, controllers, path in own_cgroups(pid, proc_root):
        if hierarchy.line_matches(hierarchy_id, controllers):
            return path
    return ""


def pod_uid_underscored(pod_uid: str) -> str:
    """The UID as the kubelet's systemd driver writes it ("-" separates slice levels)."""
    return pod_uid.replace("-", "_")


class FakePodCgroups:
    """Kubelet-like pod and container cgroups, removed again on `close()`.

    v1 layouts use, by default, every v1 hierarchy in which this process sits
    at the root cgroup: a hierarchy where it sits deeper was set up by someone
    (a session manager, a CI job) that may account or kill by it, and a child
    moved out of it would escape. Pass `v1_hierarchies` (controller names such
    as "pids", "name=systemd") to choose. `parent` nests the kubelet root
    below another cgroup, as a kind node in a docker container does
    (`/docker/<node id>/kubepods/...`).
    """

    def __init__(
        self,
        *,
        v1_hierarchies: Iterable[str] | None = None,
        parent: str = "",
        proc_root: str | Path = "/proc",
    ) -> None:
        self.proc_root = proc_root
        self.parent = parent.strip("/")
        hierarchies = mounted_hierarchies(proc_root)
        self.unified = next((h for h in hierarchies if h.version == 2), None)
        v1 = [h for h in hierarchies if h.version == 1]
        if v1_hierarchies is None:
            self.v1 = [h for h in v1 if cgroup_in(h, "self", proc_root) == "/"]
        else:
            wanted = set(v1_hierarchies)
            self.v1 = [h for h in v1 if h.controllers & wanted]
        self._created: list[tuple[Hierarchy, Path]] = []  # in creation order: parents first
        self._members: dict[Path, list[tuple[Hierarchy, Path]]] = {}
        self._origins: dict[tuple[int, Path], Path] = {}

    def __enter__(self) -> FakePodCgroups:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def create_pod_container(
        self,
        layout: str,
        pod_uid: str,
        container_id: str,
        *,
        qos: str = "burstable",
        below: str = "",
    ) -> Path:
        """Make the pod and container cgroups of `layout`; returns the container's
        directory (on the v2 hierarchy for systemd layouts, on the first chosen v1
        hierarchy for cgroupfs ones), the handle `move()` takes.

        `below` makes sub-cgroups under the container (`init.scope`, crun's
        `container`) and returns the deepest.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}, expected one of {sorted(LAYOUTS)}")
        version, scope_prefix, fixed_qos = LAYOUTS[layout]
        qos = fixed_qos or qos
        if qos not in QOS_CLASSES:
            raise ValueError(f"unknown QoS class {qos!r}")
        if version == 2:
            if self.unified is None:
                raise CgroupsUnavailable("no cgroup v2 hierarchy mounted at its root")
            hierarchies = [self.unified]
            segments = [*systemd_segments(pod_uid, qos), f"{scope_prefix}{container_id}.scope"]
        else:
            if not self.v1:
                raise CgroupsUnavailable("no usable cgroup v1 hierarchy mounted at its root")
            hierarchies = list(self.v1)
            segments = [*cgroupfs_segments(pod_uid, qos), container_id]
        if self.parent:
            segments = self.parent.split("/") + segments
        if below:
            segments += below.strip("/").split("/")
        members = [(h, self._make(h, segments)) for h in hierarchies]
        handle = members[0][1]
        self._members[handle] = members
        return handle

    def cgroup_path(self, handle: Path) -> str:
        """The container's path as `/proc/<pid>/cgroup` shows it from the root namespace."""
        hierarchy, directory = self._members[handle][0]
        return "/" + str(directory.relative_to(hierarchy.mountpoint))

    def move(self, pid: int, handle: Path) -> None:
        """Move `pid` (all its threads) into the container on every hierarchy of its layout.

        Where it was is remembered: `close()` moves it back if it is still there.
        """
        for hierarchy, directory in self._members[handle]:
            origin = cgroup_in(hierarchy, pid, self.proc_root)
            if origin:
                self._origins.setdefault(
                    (pid, hierarchy.mountpoint), hierarchy.mountpoint / origin.lstrip("/")
                )
            _write(directory / "cgroup.procs", str(pid))

    def close(self, timeout: float = 5.0) -> None:
        """Move out what is still inside (back where it came from), then remove every
        cgroup made here, deepest first; raises if one cannot be removed."""
        failures: list[str] = []
        for hierarchy, directory in reversed(self._created):
            self._evacuate(hierarchy, directory)
            if has_children(directory):
                continue  # a shared level (kubepods.slice) someone else now uses too
            failure = remove_cgroup(directory, timeout)
            if failure:
                failures.append(failure)
        self._created.clear()
        self._members.clear()
        self._origins.clear()
        if failures:
            raise OSError(errno.EBUSY, "cgroups left behind: " + "; ".join(failures))

    @property
    def created(self) -> list[Path]:
        """Every directory made here and not removed yet, parents first."""
        return [directory for _, directory in self._created]

    def _make(self, hierarchy: Hierarchy, segments: list[str]) -> Path:
        directory = hierarchy.mountpoint
        for segment in segments:
            parent, directory = directory, directory / segment
            try:
                directory.mkdir()
            except FileExistsError:
                continue  # a shared level (kubepods.slice) made by an earlier call
            self._created.append((hierarchy, directory))
            if "cpuset" in hierarchy.controllers:
                # A v1 cpuset cgroup starts with no CPUs and no memory nodes and
                # refuses tasks (ENOSPC) until given some, unless clone_children.
                for name in ("cpuset.cpus", "cpuset.mems"):
                    if value := (parent / name).read_text().strip():
                        _write(directory / name, value)
        return directory

    def _evacuate(self, hierarchy: Hierarchy, directory: Path) -> None:
        try:
            pids = (directory / "cgroup.procs").read_text().split()
        except FileNotFoundError:
            return
        for text in pids:
            origin = self._origins.get((int(text), hierarchy.mountpoint), hierarchy.mountpoint)
            try:
                _write(origin / "cgroup.procs", text)
            except ProcessLookupError:
                continue  # exited meanwhile


def systemd_segments(pod_uid: str, qos: str) -> list[str]:
    """The pod's slices, outermost first, as the kubelet's systemd driver names them."""
    # pkg/kubelet/cm: Guaranteed pods sit right under kubepods.slice.
    uid = pod_uid_underscored(pod_uid)
    if qos == "guaranteed":
        return ["kubepods.slice", f"kubepods-pod{uid}.slice"]
    return ["kubepods.slice", f"kubepods-{qos}.slice", f"kubepods-{qos}-pod{uid}.slice"]


def cgroupfs_segments(pod_uid: str, qos: str) -> list[str]:
    """The pod's cgroups, outermost first, as the kubelet's cgroupfs driver names them."""
    if qos == "guaranteed":
        return ["kubepods", f"pod{pod_uid}"]
    return ["kubepods", qos, f"pod{pod_uid}"]


def remove_cgroup(directory: str | Path, timeout: float = 5.0) -> str:
    """rmdir a cgroup (gone already is fine); "" or what kept it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(directory)
            return ""
        except FileNotFoundError:
            return ""
        except OSError as err:
            # An exiting task leaves its cgroup a moment after it is reaped.
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                return f"{directory}: {err.strerror}"
            time.sleep(0.01)


def has_children(directory: Path) -> bool:
    """Whether the cgroup has child cgroups (gone: False)."""
    try:
        return any(entry.is_dir(follow_symlinks=False) for entry in os.scandir(directory))
    except FileNotFoundError:
        return False


def _write(path: Path, text: str) -> None:
    # One write(2) per value: cgroup files take one value per write.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
