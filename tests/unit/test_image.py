"""The image's virtual environment, built the way images/Containerfile builds it, without a
container runtime: no packaging tools, no kubernetes.aio, every console script and kube
path still working, and its bytecode kept.

The build stage runs images/build-venv.sh (pip install, then images/prune.py); this test
copies what that stage copies and runs the same script, so the two cannot drift. It pip
installs from PyPI (pip's cache is reused): slow the first time, marked `network`.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.network import need_pypi

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "images" / "Containerfile"
BUILD_STEP = "RUN sh images/build-venv.sh /opt/venv /src"
PACKAGING_TOOLS = ("pip", "setuptools", "wheel", "pkg_resources", "_distutils_hack")
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])

pytestmark = [pytest.mark.network, pytest.mark.timeout(900)]


def build_stage() -> list[str]:
    """The instructions of the Containerfile's build stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.endswith(" AS build"))
    end = next(i for i, line in enumerate(lines) if i > start and line.startswith("FROM "))
    return lines[start + 1 : end]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """/opt/venv of the image, built in a temporary directory."""
    stage = build_stage()
    assert BUILD_STEP in stage, f"the Containerfile's build stage must {BUILD_STEP!r}"
    need_pypi("pip install the image's venv")
    work = tmp_path_factory.mktemp("image")
    src = work / "src"
    # The build stage's COPY lines, relative to WORKDIR /src.
    for line in stage:
        if line.startswith("COPY "):
            *sources, dest = line.split()[1:]
            target = src / dest
            for name in sources:
                if name.endswith("/"):
                    shutil.copytree(
                        ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / name, target)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_NO_CACHE", "VIRTUAL_ENV"))}
    # The base interpreter, as in the image (not this test's venv).
    env["PYTHON"] = getattr(sys, "_base_executable", sys.executable)
    venv = work / "venv"
    subprocess.run(
        ["sh", "images/build-venv.sh", str(venv), str(src)], cwd=src, env=env, check=True
    )
    yield venv


def site_packages(venv: Path) -> Path:
    (site,) = venv.glob("lib/python3*/site-packages")
    return site


def run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=60)


def test_no_packaging_tools(venv: Path) -> None:
    site = site_packages(venv)
    left = [p.name for name in PACKAGING_TOOLS for p in site.glob(f"{name}*")]
    left += [
        p.name for p in (venv / "bin").glob("*") if p.name.startswith(("pip", "wheel", "easy"))
    ]
    assert not left, f"packaging tools in the image's venv: {left}"
    assert not list(site.glob("distutils-precedence.pth"))
    for name in PACKAGING_TOOLS:
        assert run(venv, "python", "-c", f"import {name}").returncode != 0, name


def test_unused_parts_pruned(venv: Path) -> None:
    site = site_packages(venv)
    assert not (site / "kubernetes" / "aio").exists()
    assert not list(site.glob("kubernetes/**/*_test.py"))
    assert not [p for p in site.rglob("tests") if p.is_dir()]
    assert run(venv, "python", "-c", "import aiohttp").returncode != 0


def test_agents_never_import_kubernetes_aio() -> None:
    """What makes pruning kubernetes.aio (and aiohttp) safe."""
    users = [p for p in (ROOT / "agents").rglob("*.py") if "kubernetes.aio" in p.read_text()]
    users += [p for p in (ROOT / "agents").rglob("*.py") if "aiohttp" in p.read_text()]
    assert not users


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_answers_version(venv: Path, script: str) -> None:
    proc = run(venv, script, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{script} "), proc.stdout


def kube_imports() -> list[str]:
    """Every `import kubernetes...` / `from kubernetes... import ...` in agents/, as source."""
    found = set()
    for path in (ROOT / "agents").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kubernetes"):
                names = ", ".join(alias.name for alias in node.names)
                found.add(f"from {node.module} import {names}")
            elif isinstance(node, ast.Import):
                found.update(
                    f"import {a.name}" for a in node.names if a.name.startswith("kubernetes")
                )
    return sorted(found)


def test_kube_paths_import(venv: Path) -> None:
    statements = kube_imports()
    assert statements, "agents/ imports kubernetes somewhere"
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "agents").rglob("*.py")
        if "kubernetes" in p.read_text()
    )
    # What the agents call on the client: the client's models and APIs load lazily.
    code = "\n".join(
        [
            *statements,
            *(f"import {m}" for m in modules),
            "import kubernetes.client as c",
            "c.CoreV1Api, c.CoordinationV1Api, c.EventsV1Api, c.V1Pod, c.CoreV1Event",
        ]
    )
    proc = run(venv, "python", "-c", code)
    assert proc.returncode == 0, proc.stderr


def test_bytecode_kept(venv: Path) -> None:
    """The root is read-only: without .pyc files each start compiles every import again."""
    site = site_packages(venv)
    sources = [p for p in site.rglob("*.py") if "__pycache__" not in p.parts]
    tag = sys.implementation.cache_tag
    missing = [
        p for p in sources if not (p.parent / "__pycache__" / f"{p.stem}.{tag}.pyc").exists()
    ]
    assert not missing[:5], f"{len(missing)} of {len(sources)} modules have no bytecode"


def test_venv_size(venv: Path, record_property: pytest.RecordProperty) -> None:
    """Reported (-rA, junit property); bounded well above today's ~91 MB (was 197 MB)."""
    size = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink())
    kube = sum(
        p.stat().st_size for p in (site_packages(venv) / "kubernetes").rglob("*") if p.is_file()
    )
    record_property("venv_bytes", size)
    print(f"image venv: {size / 1e6:.0f} MB, of which kubernetes {kube / 1e6:.0f} MB")
    assert size < 140e6
