"""Remove from the image what the agents never run: packaging tools, kubernetes.aio, tests.

Run by images/Containerfile and tests/unit/test_image.py, each with the interpreter whose
files it prunes:

    /opt/venv/bin/python images/prune.py venv   # build stage: the agents' venv
    python3 images/prune.py base                # runtime stage: the base image's Python

Every item says why it can go. A removal that would break something still installed (a
distribution another one needs) stops the build instead of going ahead; tests/unit/
test_image.py then checks that every console script and the agents' kube paths import.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

# Packaging tools: the agents install nothing at run time, and image scanners report
# these (pip, setuptools and their vendored copies carry CVEs of their own).
# `pkg_resources` and `_distutils_hack` (with its `distutils-precedence.pth`, which runs
# at every start) come with setuptools.
PACKAGING_TOOLS = ("pip", "setuptools", "wheel", "pkg_resources", "_distutils_hack")
PACKAGING_FILES = ("distutils-precedence.pth",)
# Their console scripts (bin/pip3.11 ...).
PACKAGING_SCRIPTS = ("pip", "pip3", "pip3.*", "wheel", "easy_install", "easy_install-*")

# Distributions that only `kubernetes.aio` (the asyncio client, 68 MB, pruned below)
# needs: kubernetes >= 35 requires aiohttp for it, the synchronous client the agents
# use (`from kubernetes import client`) does not import it. prometheus_client's
# optional `prometheus_client.aiohttp` exposition imports aiohttp too, only when asked.
AIO_ONLY = (
    "aiohttp",
    "aiohttp-retry",
    "aiohappyeyeballs",
    "aiosignal",
    "attrs",
    "frozenlist",
    "multidict",
    "propcache",
    "yarl",
    "async-timeout",
)
# May require an AIO_ONLY distribution and stay: they need it for a part pruned here.
AIO_REQUIRERS = ("kubernetes",)

# Directories (relative to site-packages) the agents never import.
UNUSED_TREES = (
    # The asyncio client: the agents use the synchronous one (grep agents/ for
    # `kubernetes.aio`: nothing).
    "kubernetes/aio",
    # Test suites shipped inside dependencies.
    "websocket/tests",
    "certifi/tests",
)
# Test modules next to the code, e.g. kubernetes/config/kube_config_test.py.
UNUSED_GLOBS = ("kubernetes/**/*_test.py",)

# Debian's packages of ensurepip and its bundled wheels (a Debian-built base; the
# python:*-slim images install Python under /usr/local, outside dpkg), and of the
# packaging tools themselves in /usr/lib/python3/dist-packages, should a base have
# them. Purged through dpkg rather than deleted so that dpkg's database, which
# scanners read, agrees; dpkg refuses (and the build stops) if another installed
# package depends on one.
DEBIAN_PACKAGING = (
    "python3-venv",
    "python3.11-venv",
    "python3-pip-whl",
    "python3-setuptools-whl",
    "python3-pip",
    "python3-setuptools",
    "python3-wheel",
    "python3-pkg-resources",
)


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        print(f"prune: removed {path}/")
    elif path.exists() or path.is_symlink():
        path.unlink()
        print(f"prune: removed {path}")


def site_dirs() -> list[Path]:
    """This interpreter's site-packages (venv or system, Debian's dist-packages too)."""
    import site

    dirs = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    dirs.update(site.getsitepackages())
    return sorted(Path(d) for d in dirs if Path(d).is_dir())


def prune_packaging(site: Path, bindir: Path) -> None:
    for name in PACKAGING_TOOLS:
        remove(site / name)
        for meta in site.glob(f"{name}-*.*-info"):
            remove(meta)
    for name in PACKAGING_FILES:
        remove(site / name)
    for pattern in PACKAGING_SCRIPTS:
        for script in bindir.glob(pattern):
            remove(script)


def remove_distribution(dist: importlib.metadata.Distribution, site: Path) -> None:
    """Delete the files a distribution's RECORD lists, then its emptied directories."""
    label = f"{dist.metadata['Name']} {dist.version}"
    files = [Path(str(dist.locate_file(f))) for f in dist.files or ()]
    dirs = set()
    for path in files:
        if path.is_file() or path.is_symlink():
            path.unlink()
        dirs.add(path.parent)
    for parent in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        if (parent / "__pycache__").is_dir():
            shutil.rmtree(parent / "__pycache__")
        d = parent
        while d != site and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent
    print(f"prune: removed distribution {label}")


def prune_aio_only(site: Path) -> None:
    found = importlib.metadata.distributions(path=[str(site)])
    dists = {canonical(d.metadata["Name"]): d for d in found}
    going = {canonical(n) for n in AIO_ONLY} & dists.keys()
    allowed = going | {canonical(n) for n in AIO_REQUIRERS}
    for name, dist in dists.items():
        for req in dist.requires or ():
            if "extra ==" in req:
                continue
            needed = canonical(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
            if needed in going and name not in allowed:
                sys.exit(f"prune: {name} requires {needed}; not removing the aiohttp stack")
    for name in sorted(going):
        remove_distribution(dists[name], site)


def prune_venv() -> None:
    if sys.prefix == sys.base_prefix:
        sys.exit("prune venv: run it with the venv's python (bin/python images/prune.py venv)")
    site = Path(sysconfig.get_path("purelib"))
    prune_packaging(site, Path(sys.prefix) / "bin")
    prune_aio_only(site)
    for tree in UNUSED_TREES:
        remove(site / tree)
    for pattern in UNUSED_GLOBS:
        for path in site.glob(pattern):
            remove(path)


def prune_base() -> None:
    if sys.prefix != sys.base_prefix:
        sys.exit("prune base: run it with the base image's python3, not a venv's")
    if shutil.which("dpkg-query"):
        query = ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *DEBIAN_PACKAGING]
        listed = subprocess.run(query, capture_output=True, text=True, check=False).stdout
        installed = [line.split()[0] for line in listed.splitlines() if line.endswith(" installed")]
        if installed:
            subprocess.run(["dpkg", "--purge", *installed], check=True)
    for site in site_dirs():
        prune_packaging(site, Path(sys.prefix) / "bin")
    # ensurepip: the stdlib's installer of pip, with pip's and setuptools' wheels
    # bundled (python:*-slim); `python -m venv` would put pip back with it.
    remove(Path(sysconfig.get_path("stdlib")) / "ensurepip")
    # Debian's copies of those wheels (python3-pip-whl, python3-setuptools-whl).
    remove(Path("/usr/share/python-wheels"))


def main(argv: list[str]) -> int:
    if argv not in (["venv"], ["base"]):
        print(__doc__, file=sys.stderr)
        return 2
    if argv == ["venv"]:
        prune_venv()
    else:
        prune_base()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
