"""The image, really built from images/Containerfile with buildah (hack/image.py) and run
with podman: every console script answers, no compiler or packaging tool is left, it runs
as the Containerfile says, and its size is reported and bounded.

Built once for the module, from nothing: a fresh container storage, so that CI builds
(pip downloads included) instead of reusing an image; only the debootstrapped base
tarball (hack/base_image.py) is cached. About a minute on 2 cores. hack/test.sh builds
it so once per run, before its passes (`python -m hack.image --prebuild`,
`$NODE_AGENTS_IMAGE_DIR`), and this module then tests that build.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hack import image as hack_image
from tests.support.containers import need_tools
from tests.support.network import need_pypi

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
VERSION = hack_image.project_version()
PYTHONS = ("/opt/venv/bin/python", "/usr/bin/python3")
# Compilers, assemblers, linkers and build tools: none may be on the image's PATH.
COMPILERS = (
    "gcc",
    "cc",
    "c++",
    "g++",
    "cpp",
    "clang",
    "tcc",
    "ld",
    "ld.bfd",
    "ld.gold",
    "as",
    "make",
    "x86_64-linux-gnu-gcc",
    "x86_64-linux-gnu-ld",
)
PACKAGING_MODULES = ("pip", "setuptools", "wheel", "pkg_resources", "_distutils_hack", "ensurepip")
PACKAGING_SCRIPTS = ("pip", "pip3", "pip3.11", "easy_install", "wheel")
# Debian packages that would bring either back (dpkg's database is what scanners read).
FORBIDDEN_PACKAGES = re.compile(
    r"(gcc|g\+\+|cpp|clang|tcc|binutils|make)(-[0-9.]+)?"
    r"|python3(\.[0-9]+)?-(pip|pip-whl|setuptools|setuptools-whl|venv|wheel)"
)
# Measured here: 263 MB (images/README.md). Before the prune it was 367 MB; the aiohttp
# stack and kubernetes.aio alone are about 70 MB.
MAX_IMAGE_BYTES = 300e6

pytestmark = [
    pytest.mark.realnode,
    pytest.mark.root,
    pytest.mark.network,
    # The module's fixture builds the image (about a minute, pip downloads included).
    pytest.mark.timeout(900),
]


@dataclass(frozen=True)
class Built:
    store: hack_image.Store
    build: hack_image.Build

    def run(self, *argv: str) -> str:
        """stdout of `argv` in the image, which must exit 0."""
        proc = self.store.run(self.build.image, argv)
        assert proc.returncode == 0, f"{argv} exited {proc.returncode}: {proc.stderr}"
        return proc.stdout


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    """The image, built once in a fresh storage that goes with the module (or the one
    hack/test.sh built for this run, before both of its passes)."""
    need_tools("podman", "buildah", "runc")
    done = hack_image.prebuilt()
    if done is not None:
        with hack_image.Store(done.storage) as store:
            yield Built(store, done.build())
        return
    need_pypi("pip install the image's venv during the build")
    with hack_image.Store.temporary() as store:
        build = store.build(store.import_base(), log=hack_image.RESULTS / "image-build.log")
        hack_image.write_report(build)
        yield Built(store, build)


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_answers_version(built: Built, script: str) -> None:
    assert built.run(script, "--version") == f"{script} {VERSION}\n"


def which(built: Built, names: tuple[str, ...]) -> list[str]:
    """The paths of `names` on the image's PATH."""
    code = f"import shutil; print('\\n'.join(filter(None, map(shutil.which, {names!r}))))"
    return built.run("/usr/bin/python3", "-c", code).split()


def test_no_compiler(built: Built) -> None:
    assert which(built, COMPILERS) == [], "a compiler or linker is in the image"


@pytest.mark.parametrize("python", PYTHONS)
def test_no_packaging_module(built: Built, python: str) -> None:
    code = (
        "import importlib.util, json; "
        f"print(json.dumps([m for m in {PACKAGING_MODULES!r} if importlib.util.find_spec(m)]))"
    )
    assert json.loads(built.run(python, "-c", code)) == [], f"importable by {python}"


def test_no_packaging_scripts_or_wheels(built: Built) -> None:
    assert which(built, PACKAGING_SCRIPTS) == []
    wheels = built.run(
        "find", "/", "-xdev", "(", "-name", "*.whl", "-o", "-name", "python-wheels", ")"
    )
    assert wheels == "", f"bundled wheels in the image: {wheels}"


def test_dpkg_agrees(built: Built) -> None:
    """The purged packages are gone from dpkg's database too, and no toolchain is in it."""
    listed = built.run("dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n").splitlines()
    installed = [line.split()[0] for line in listed if line.endswith(" installed")]
    assert "python3" in installed
    forbidden = [name for name in installed if FORBIDDEN_PACKAGES.fullmatch(name)]
    assert forbidden == [], "dpkg lists a toolchain or packaging package"


def test_runs_as_the_containerfile_says(built: Built) -> None:
    config = json.loads(
        built.store.podman("image", "inspect", "--format", "{{json .Config}}", built.build.image)
    )
    assert config["User"] == "0"
    assert config["Cmd"] == ["automount-healer", "--help"]
    assert config.get("Entrypoint") in (None, [])
    assert config["Labels"]["org.opencontainers.image.version"] == VERSION
    assert built.run("id", "-u") == "0\n"
    assert built.run().startswith("usage: automount-healer"), "CMD prints the healer's help"


def test_size(built: Built, record_property: Callable[[str, object], None]) -> None:
    """Reported (-s, -rA, junit properties, hack/results/image.json) and bounded."""
    build = built.build
    record_property("image_bytes", build.image_bytes)
    record_property("rootfs_bytes", build.rootfs_bytes)
    record_property("build_seconds", build.build_seconds)
    print(f"\nimage: {hack_image.describe(build)}")
    assert build.image_bytes < MAX_IMAGE_BYTES, (
        f"the image is {build.image_bytes / 1e6:.0f} MB, over {MAX_IMAGE_BYTES / 1e6:.0f} MB "
        "(263 MB measured, images/README.md): what did images/prune.py stop removing?"
    )
