"""A real autofs world: squashfs images, a real automount daemon, squashfuse mounts.

The map line is the one from design.md:
`repo1 -fstype=fuse,ro,allow_other :squashfuse\\#/path/repo1.sqfs`. automount
is started with `setsid`: processes in automount's own process group never
trigger mounts (fs/autofs/root.c `autofs_oz_mode`), and the test process must.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from agents.mount_healer.mountinfo import Mount, MountTable, read_mount_table
from hack.vm import time_scale

TOOLS = ("automount", "squashfuse", "mksquashfs")


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def scaled(seconds: float) -> float:
    """A time bound stretched for a slow machine (the TCG guest of hack/vm.py; 1x elsewhere)."""
    return seconds * time_scale()


def wait_for(predicate: object, timeout: float, interval: float = 0.01) -> float:
    """Poll until `predicate()` is truthy; returns the seconds it took (raises on timeout).

    `timeout` is the host's figure: it is `scaled` for a slow machine.
    """
    started = time.monotonic()
    deadline = started + scaled(timeout)
    while True:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {scaled(timeout):g}s")
        time.sleep(interval)


def mounts_under(path: Path | str) -> list[Mount]:
    prefix = str(path).rstrip("/") + "/"
    return [m for m in read_mount_table().mounts if m.mountpoint.startswith(prefix)]


def force_unmount_under(path: Path | str) -> None:
    """Lazy-unmount everything below `path`, deepest first (test cleanup only)."""
    for mount in sorted(mounts_under(path), key=lambda m: m.mountpoint.count("/"), reverse=True):
        subprocess.run(["umount", "-l", mount.mountpoint], capture_output=True, check=False)


def make_image(workdir: Path, name: str) -> Path:
    """A squashfs image holding `README` with the repo's name."""
    src = workdir / "src" / name
    src.mkdir(parents=True, exist_ok=True)
    (src / "README").write_text(f"this is {name}\n")
    image = workdir / "images" / f"{name}.sqfs"
    image.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mksquashfs", str(src), str(image), "-quiet", "-noappend", "-no-progress"],
        check=True,
        capture_output=True,
    )
    return image


class AutofsWorld:
    """An autofs root served by a real automount daemon with squashfuse mounts."""

    def __init__(
        self,
        workdir: Path,
        repos: tuple[str, ...] = ("repo1", "repo2"),
        *,
        timeout: int = 60,
        negative_timeout: int = 1,
        name: str = "root",
    ) -> None:
        self.workdir = workdir
        self.repos = repos
        self.timeout = timeout
        self.negative_timeout = negative_timeout
        self.root = workdir / name
        self.images = {repo: make_image(workdir, repo) for repo in repos}
        self._automount: subprocess.Popen[bytes] | None = None
        self._log = workdir / f"automount-{name}.log"

    # -- life cycle --------------------------------------------------------

    def start(self) -> AutofsWorld:
        self.root.mkdir(parents=True, exist_ok=True)
        map_file = self.workdir / f"auto.{self.root.name}"
        map_file.write_text(
            "".join(
                f"{repo} -fstype=fuse,ro,allow_other :squashfuse\\#{image}\n"
                for repo, image in self.images.items()
            )
        )
        master = self.workdir / f"auto.master.{self.root.name}"
        master.write_text(f"{self.root} {map_file} --timeout={self.timeout}\n")
        with open(self._log, "wb") as log:
            self._automount = subprocess.Popen(
                [
                    "automount",
                    "-f",
                    "-C",  # several test daemons may run; skip the "already running" check
                    "-t",
                    str(self.timeout),
                    "-n",
                    str(self.negative_timeout),
                    "-p",
                    str(self.workdir / f"automount-{self.root.name}.pid"),
                    str(master),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for(lambda: self.autofs_root() is not None, 10)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"automount did not mount {self.root}: {self._log.read_text()}"
            ) from None
        return self

    def stop(self) -> None:
        for repo in self.repos:
            for proc in self.daemons(repo):
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGCONT)
        if self._automount is not None and self._automount.poll() is None:
            # automount does not exit on SIGTERM while a severed mount (its
            # daemon dead) is below the root: it cannot unmount it, and would
            # hold stop() for the full wait. Detach what is below the root first.
            force_unmount_under(self.root)
            # SIGTERM: automount unmounts the autofs root.
            self._automount.terminate()
            try:
                self._automount.wait(10)
            except subprocess.TimeoutExpired:
                self._automount.kill()
                self._automount.wait(5)
        force_unmount_under(self.workdir)
        if self.root.is_mount():
            subprocess.run(["umount", "-l", str(self.root)], check=False, capture_output=True)
        for repo in self.repos:
            for proc in self.daemons(repo):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
                    proc.wait(5)

    # -- looking ------------------------------------------------------------

    def path(self, repo: str) -> Path:
        return self.root / repo

    def autofs_root(self) -> Mount | None:
        return next(
            (
                m
                for m in read_mount_table().mounts
                if m.is_autofs and m.mountpoint == str(self.root)
            ),
            None,
        )

    def mount(self, repo: str, table: MountTable | None = None) -> Mount | None:
        """The FUSE mount a walk to the repo reaches now, if any."""
        top = (table or read_mount_table()).top_at(str(self.path(repo)))
        return top if top is not None and top.is_fuse else None

    def access(self, repo: str) -> list[str]:
        """What a consumer does: list the repo (mounts it if needed)."""
        return sorted(os.listdir(self.path(repo)))

    def daemons(self, repo: str) -> list[psutil.Process]:
        """squashfuse processes serving this repo's image (live or stopped)."""
        image = str(self.images[repo])
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if cmdline and os.path.basename(cmdline[0]) == "squashfuse" and image in cmdline:
                found.append(proc)
        return found

    def daemon(self, repo: str) -> psutil.Process:
        procs = [p for p in self.daemons(repo) if p.status() != psutil.STATUS_ZOMBIE]
        assert len(procs) == 1, f"expected one daemon for {repo}, found {procs}"
        return procs[0]

    def kill_daemon(self, repo: str) -> int:
        """kill -9 the repo's FUSE daemon, as a CSI node plugin restart does; returns its pid."""
        proc = self.daemon(repo)
        proc.kill()
        proc.wait(5)
        return proc.pid


@contextlib.contextmanager
def autofs_world(workdir: Path, **kwargs: object) -> Iterator[AutofsWorld]:
    world = AutofsWorld(workdir, **kwargs)  # type: ignore[arg-type]
    world.start()
    try:
        yield world
    finally:
        world.stop()
