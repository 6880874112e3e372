"""Build images/Containerfile with buildah on this machine, in a container storage of its own.

No image registry is reachable from the test machines, so the `PYTHON_IMAGE` the
Containerfile starts from is hack/base_image.py's debootstrapped Debian bookworm
(python3, python3-venv, ca-certificates and the host's local CAs), imported as
`localhost/node-agents-base:<its recipe hash>`:

    python -m hack.image                      # build in a fresh storage, print the report
    python -m hack.image --export-rootfs      # also unpack the root filesystem (ctr run --rootfs)
    python -m hack.image --prebuild DIR       # hack/test.sh: one build for both test passes

Every podman and buildah call runs on a storage under one directory (`--root`,
`--runroot`, podman's `--tmpdir`), never the machine's default one: a test session
builds from nothing (a fresh storage, `buildah build` without `--layers`), so a CI
build is a real build, pip downloads included; only the base tarball (the
debootstrap) stays cached. The flags this machine needs, and why:

- `--runtime runc`: crun refuses to start containers on this hybrid cgroups v1 host;
- `--ulimit nofile=20000:20000 --ulimit nproc=32768:32768`: the runtimes' default
  limits are higher than the host's hard limits, and root here lacks
  CAP_SYS_RESOURCE to raise them;
- `--network host` for the build (pip reaches PyPI through the host's CA, which the
  base trusts; no bridge or firewall set-up), `--network none` to run the image;
- `--pull=never`: the base is local, and there is no registry to ask.

The exported root filesystem is named by `inputs_hash()`, a hash
of everything the build copies or reads (Containerfile, build context, base recipe,
version), so that a later test (a VM with containerd) finds them by the same name.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from hack import base_image

ROOT = Path(__file__).resolve().parents[1]
CONTAINERFILE = ROOT / "images" / "Containerfile"
# What images/Containerfile reads and copies from the build context (and
# .containerignore, which shapes that context); not images/README.md.
CONTEXT_INPUTS = (
    "images/Containerfile",
    "images/build-venv.sh",
    "images/prune.py",
    ".containerignore",
    "pyproject.toml",
    "README.md",
    "agents",
)
IMAGE_NAME = "localhost/node-agents"
BASE_NAME = "localhost/node-agents-base"
RUNTIME = "runc"
# Below this host's hard limits (root lacks CAP_SYS_RESOURCE to raise its own).
ULIMITS = ("nofile=20000:20000", "nproc=32768:32768")
# The base's configuration: debootstrap leaves none, the python:*-slim images set these.
BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
# pip downloads everything in the build (PIP_NO_CACHE_DIR=1 in the Containerfile).
BUILD_TIMEOUT = 900.0
RESULTS = ROOT / "hack" / "results"
RUNROOT_PARENT = Path("/run/node-agents-image")


class ImageError(RuntimeError):
    """A podman or buildah step failed; the message carries its output's tail."""


def project_version() -> str:
    """The version in pyproject.toml, which the image's label and console scripts carry."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return str(project["version"])


def _context_files() -> list[Path]:
    files: list[Path] = []
    for name in CONTEXT_INPUTS:
        path = ROOT / name
        if path.is_dir():
            files.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            )
        elif path.is_file():
            files.append(path)
    return files


def inputs_hash() -> str:
    """Changes with anything that changes the image, except what pip resolves from PyPI."""
    digest = hashlib.sha256()
    digest.update(base_image.recipe_hash().encode() + b"\0" + project_version().encode())
    for path in _context_files():
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def rootfs_path(cache: Path | None = None) -> Path:
    """Where `export_rootfs` puts the image's root filesystem for a later `ctr run --rootfs`."""
    return (cache or base_image.cache_dir()) / f"node-agents-rootfs-{inputs_hash()}"


@dataclass(frozen=True)
class Build:
    """One build of the image, as `python -m hack.image` reports it."""

    image: str
    image_id: str
    version: str
    inputs_hash: str
    base: str
    build_seconds: float
    image_bytes: int
    """The size podman reports (`podman image inspect`, the uncompressed layer)."""
    rootfs_bytes: int
    """The regular files of the unpacked root filesystem (apparent sizes)."""
    rootfs_files: int


# A build made once for the whole run by hack/test.sh (`--prebuild DIR`), before
# its two pytest passes: the host pass tests that image (tests/integration/
# test_image_build.py) and the VM pass runs its root filesystem with containerd
# (test_real_node_healer.py), instead of building it twice.
PREBUILT_ENV = "NODE_AGENTS_IMAGE_DIR"


@dataclass(frozen=True)
class Prebuilt:
    """`--prebuild DIR`'s layout: DIR/storage, DIR/build.json, DIR/config.json (the
    image's configuration: Env, Cmd, User), DIR/rootfs."""

    directory: Path

    @property
    def storage(self) -> Path:
        return self.directory / "storage"

    @property
    def report(self) -> Path:
        return self.directory / "build.json"

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"

    @property
    def config(self) -> Path:
        return self.directory / "config.json"

    def build(self) -> Build:
        return Build(**json.loads(self.report.read_text()))

    def image_config(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.config.read_text())
        return loaded


def prebuilt() -> Prebuilt | None:
    """The run's prebuilt image, when hack/test.sh made one (`$NODE_AGENTS_IMAGE_DIR`)."""
    directory = os.environ.get(PREBUILT_ENV)
    return Prebuilt(Path(directory)) if directory else None


class Store:
    """A container storage of its own under `directory` (podman and buildah share it)."""

    def __init__(self, directory: Path, *, remove: bool = False) -> None:
        self.directory = directory
        self.remove = remove
        self.root = directory / "root"
        self.tmpdir = directory / "libpod-tmp"
        for path in (self.root, self.tmpdir):
            path.mkdir(parents=True, exist_ok=True)
        # containers/storage refuses a runroot longer than 50 characters; it holds
        # only run-time state (locks, mount counts), so it goes under /run, by
        # the directory's name, and with it.
        self.runroot = RUNROOT_PARENT / hashlib.sha256(str(directory).encode()).hexdigest()[:12]
        self.runroot.mkdir(parents=True, exist_ok=True)

    @classmethod
    def temporary(cls, parent: Path | None = None) -> Store:
        """A fresh, empty storage, removed by `close()` (on the cache's disk, not /tmp:
        a build holds about 1 GB)."""
        parent = parent or base_image.cache_dir()
        parent.mkdir(parents=True, exist_ok=True)
        return cls(Path(tempfile.mkdtemp(prefix="image-storage-", dir=parent)), remove=True)

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def podman_argv(self, *args: str) -> list[str]:
        # --tmpdir: libpod's state (container and lock files, the events log) stays
        # here too, not in the machine's /run/libpod.
        return [
            "podman",
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--tmpdir",
            str(self.tmpdir),
            "--storage-driver",
            "overlay",
            "--cgroup-manager",
            "cgroupfs",  # no systemd on these machines
            "--events-backend",
            "file",
            *args,
        ]

    def buildah_argv(self, *args: str) -> list[str]:
        return [
            "buildah",
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "overlay",
            *args,
        ]

    def podman(self, *args: str, timeout: float = 120.0) -> str:
        """Run podman on this storage; its stdout, or ImageError with its output."""
        return _check(self.podman_argv(*args), timeout)

    def image_exists(self, image: str) -> bool:
        argv = self.podman_argv("image", "exists", image)
        return subprocess.run(argv, capture_output=True, check=False, timeout=60).returncode == 0

    def import_base(self, tarball: Path | None = None) -> str:
        """hack/base_image.py's tarball as a local image, tagged by its recipe hash."""
        tag = f"{BASE_NAME}:{base_image.recipe_hash()}"
        if self.image_exists(tag):
            return tag
        tarball = tarball or base_image.base_tarball()
        changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
        self.podman("import", *changes, str(tarball), tag)
        return tag

    def build(
        self,
        base: str,
        tag: str | None = None,
        *,
        log: Path | None = None,
        rootfs: Path | None = None,
    ) -> Build:
        """Build images/Containerfile from the repository root on `base`, and measure it;
        with `rootfs`, also unpack its root filesystem there (`export_rootfs`)."""
        version = project_version()
        key = inputs_hash()
        tag = tag or f"{IMAGE_NAME}:{version}-{key}"
        argv = self.buildah_argv(
            "build",
            "--runtime",
            RUNTIME,
            *(arg for limit in ULIMITS for arg in ("--ulimit", limit)),
            "--network",
            "host",
            "--pull=never",
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            "--build-arg",
            f"VERSION={version}",
            "--tag",
            tag,
            "--file",
            str(CONTAINERFILE),
            str(ROOT),
        )
        started = time.monotonic()
        output = _check(argv, BUILD_TIMEOUT, log=log)
        seconds = time.monotonic() - started
        image_id = output.strip().splitlines()[-1]
        size = int(self.podman("image", "inspect", "--format", "{{.Size}}", tag).strip())
        # One export either way: measured as it streams, or measured where unpacked.
        if rootfs is None:
            files, rootfs_bytes = self.rootfs_size(tag)
        else:
            files, rootfs_bytes = _tree_size(self.export_rootfs(tag, rootfs))
        return Build(
            image=tag,
            image_id=image_id,
            version=version,
            inputs_hash=key,
            base=base,
            build_seconds=round(seconds, 1),
            image_bytes=size,
            rootfs_bytes=rootfs_bytes,
            rootfs_files=files,
        )

    @contextlib.contextmanager
    def _exported(self, image: str) -> Iterator[IO[bytes]]:
        """`podman export` of a created (never started) container of `image`, as a tar
        stream; the container is removed after."""
        name = self.podman("create", "--runtime", RUNTIME, image, "true").strip()
        try:
            argv = self.podman_argv("export", name)
            with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
                assert proc.stdout is not None and proc.stderr is not None
                try:
                    yield proc.stdout
                finally:
                    proc.stdout.read()  # to the end, so that export never blocks on the pipe
                    err = proc.stderr.read()
                    proc.wait(timeout=120)
            if proc.returncode != 0:
                raise ImageError(f"podman export failed: {err.decode(errors='replace')[-2000:]}")
        finally:
            self.podman("rm", "--force", name)

    def rootfs_size(self, image: str) -> tuple[int, int]:
        """(regular files, their bytes) in `image`'s root filesystem, read from its export."""
        files = size = 0
        with self._exported(image) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.isreg():
                    files += 1
                    size += member.size
        return files, size

    def export_rootfs(self, image: str, dest: Path) -> Path:
        """Unpack `image`'s root filesystem into `dest` (replaced), for `ctr run --rootfs`."""
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with self._exported(image) as stream:
            untar = subprocess.run(
                ["tar", "-C", str(partial), "--numeric-owner", "-xpf", "-"],
                stdin=stream,
                capture_output=True,
                check=False,
                timeout=300,
            )
        if untar.returncode != 0:
            raise ImageError(f"tar -x failed: {untar.stderr.decode(errors='replace')[-2000:]}")
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
        return dest

    def run(
        self, image: str, argv: Sequence[str] = (), *, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """`argv` (the image's CMD if empty) in a container of `image`: read-only root, as
        the manifests run it, no network; the result whatever its exit status."""
        command = self.podman_argv(
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            *(arg for limit in ULIMITS for arg in ("--ulimit", limit)),
            "--network",
            "none",
            "--read-only",
            image,
            *argv,
        )
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)

    def close(self) -> None:
        """Remove every container of this storage and, if temporary, the storage itself."""
        for argv in (
            self.podman_argv("rm", "--all", "--force"),
            self.buildah_argv("rm", "--all"),
        ):
            subprocess.run(argv, capture_output=True, check=False, timeout=120)
        if self.remove:
            # Layers mounted for a container are unmounted by `rm`; `system reset` also
            # unmounts what storage itself keeps mounted before deleting the tree.
            subprocess.run(
                self.podman_argv("system", "reset", "--force"),
                capture_output=True,
                check=False,
                timeout=300,
            )
            shutil.rmtree(self.directory, ignore_errors=True)
            shutil.rmtree(self.runroot, ignore_errors=True)


def _tree_size(root: Path) -> tuple[int, int]:
    """(regular files, their bytes) below `root`, a hard link counted once, as
    `rootfs_size` counts the export's members."""
    seen: set[int] = set()
    size = 0
    for directory, _, names in os.walk(root):
        for name in names:
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(info.st_mode) and info.st_ino not in seen:
                seen.add(info.st_ino)
                size += info.st_size
    return len(seen), size


def _check(argv: list[str], timeout: float, *, log: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise ImageError(f"{' '.join(argv[:1] + argv[-3:])} timed out after {timeout} s") from err
    except FileNotFoundError as err:
        raise ImageError(f"{argv[0]} is not installed (hack/setup.sh installs it)") from err
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise ImageError(f"{' '.join(argv)[:400]} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def write_report(build: Build, path: Path = RESULTS / "image.json") -> Path:
    """The measurement as JSON, where images/README.md's numbers come from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(build), indent=2) + "\n")
    return path


def describe(build: Build) -> str:
    return (
        f"{build.image}: {build.image_bytes / 1e6:.0f} MB (podman), root filesystem "
        f"{build.rootfs_bytes / 1e6:.0f} MB in {build.rootfs_files} files; "
        f"built in {build.build_seconds:.0f} s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hack.image", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--storage",
        type=Path,
        help="container storage directory, kept (default: a fresh one, removed at the end)",
    )
    parser.add_argument(
        "--export-rootfs",
        nargs="?",
        const=rootfs_path(),
        type=Path,
        help=f"unpack the root filesystem here (default {rootfs_path()})",
    )
    parser.add_argument("--log", type=Path, default=RESULTS / "image-build.log")
    parser.add_argument(
        "--prebuild",
        type=Path,
        metavar="DIR",
        help=f"build into DIR (storage, build.json, rootfs) for the tests (${PREBUILT_ENV})",
    )
    parser.add_argument("--remove", type=Path, metavar="DIR", help="remove a --prebuild DIR")
    args = parser.parse_args(argv)
    if args.remove:
        Store(Prebuilt(args.remove).storage, remove=True).close()
        shutil.rmtree(args.remove, ignore_errors=True)
        return 0
    if args.prebuild:
        done = Prebuilt(args.prebuild)
        args.storage, args.export_rootfs = done.storage, done.rootfs
    store = Store(args.storage) if args.storage else Store.temporary()
    try:
        with store:
            build = store.build(store.import_base(), log=args.log, rootfs=args.export_rootfs)
            print(describe(build))
            print(f"report: {write_report(build)}; build log: {args.log}")
            if args.prebuild:
                write_report(build, Prebuilt(args.prebuild).report)
                config = store.podman(
                    "image", "inspect", "--format", "{{json .Config}}", build.image
                )
                Prebuilt(args.prebuild).config.write_text(config)
            if args.export_rootfs:
                print(f"root filesystem: {args.export_rootfs}")
    except (ImageError, base_image.BaseImageError) as err:
        print(f"hack.image: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("hack.image: needs root (podman and buildah on a storage of their own)")
    sys.exit(main())
