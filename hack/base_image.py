"""The base root filesystem of the real-node tests and of the image build: minimal Debian.

No image registry is reachable from the test machines, so the base every real
container starts from (and the `PYTHON_IMAGE` the image build starts from) is a
minimal Debian made here with debootstrap, from the Debian mirror apt uses:

    python -m hack.base_image          # build it if needed; print the tarball's path

The result is one tarball of the root filesystem, cached under
`$NODE_AGENTS_CACHE` (default /var/cache/node-agents-tests), named by a hash of
its recipe (this module's constants and the host's local CA certificates), so a
changed recipe builds a new one and an unchanged one is built once per machine.
A lock file lets parallel builders wait for the first one.

The host's local CA certificates (the ones `update-ca-certificates` installs
from /usr/local/share/ca-certificates) are added to the base: HTTPS from inside
a build (pip during the image build) goes through the same CA as the host.
Needs root (debootstrap, chroot).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
VARIANT = "minbase"
# python3 and its venv module (ensurepip's wheels): the image build's base
# interpreter, as python:3.11-slim-bookworm would give it; ca-certificates for pip.
PACKAGES = ("python3", "python3-venv", "ca-certificates")
# What a root filesystem for containers need not carry (apt's caches and lists).
PRUNED = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man")
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
CACHE_ENV = "NODE_AGENTS_CACHE"
DEFAULT_CACHE = Path("/var/cache/node-agents-tests")


class BaseImageError(RuntimeError):
    """The base could not be built (no debootstrap, no mirror, not root)."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def local_ca_certificates(directory: Path = LOCAL_CA_DIR) -> list[Path]:
    return sorted(directory.rglob("*.crt")) if directory.is_dir() else []


def recipe_hash() -> str:
    """Changes with anything that changes the built base."""
    digest = hashlib.sha256()
    digest.update(repr((SUITE, MIRROR, VARIANT, PACKAGES, PRUNED)).encode())
    digest.update(Path(__file__).read_bytes())
    for cert in local_ca_certificates():
        digest.update(cert.name.encode() + b"\0" + cert.read_bytes())
    return digest.hexdigest()[:16]


def tarball_path() -> Path:
    return cache_dir() / f"debian-{SUITE}-{recipe_hash()}.tar"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(argv: list[str], log: Path) -> None:
    with log.open("ab") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise BaseImageError(f"{argv[0]} failed (exit {done.returncode}):\n{tail}")


def build(root: Path, log: Path) -> None:
    """debootstrap into `root` (empty), with the host's CAs, pruned."""
    if shutil.which("debootstrap") is None:
        raise BaseImageError("debootstrap is not installed (hack/setup.sh installs it)")
    _run(
        [
            "debootstrap",
            f"--variant={VARIANT}",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(root),
            MIRROR,
        ],
        log,
    )
    certs = local_ca_certificates()
    if certs:
        target = root / LOCAL_CA_DIR.relative_to("/")
        target.mkdir(parents=True, exist_ok=True)
        for cert in certs:
            shutil.copy2(cert, target / cert.name)
        _run(["chroot", str(root), "update-ca-certificates"], log)
    for rel in PRUNED:
        for child in (root / rel).glob("*"):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def base_tarball() -> Path:
    """The cached tarball of the base root filesystem, built first if missing."""
    tarball = tarball_path()
    if tarball.exists():
        return tarball
    if os.geteuid() != 0:
        raise BaseImageError("building the base needs root (debootstrap, chroot)")
    with _locked(tarball.with_suffix(".lock")):
        if tarball.exists():  # another builder finished while we waited
            return tarball
        with tempfile.TemporaryDirectory(dir=tarball.parent, prefix="build-") as tmp:
            root = Path(tmp) / "root"
            log = tarball.with_suffix(".log")
            log.write_text("")
            build(root, log)
            partial = Path(tmp) / "base.tar"
            _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], log)
            partial.rename(tarball)
        for old in tarball.parent.glob(f"debian-{SUITE}-*.tar"):
            if old != tarball:
                old.unlink()
    return tarball


if __name__ == "__main__":
    try:
        print(base_tarball())
    except BaseImageError as exc:
        sys.exit(f"hack.base_image: {exc}")
