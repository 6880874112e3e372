"""Fixtures shared by all tests: root-only skipping, leak checks, the fake API server."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agents.common.kube import load_api_client
from agents.mount_healer.mountinfo import read_mount_table
from hack.autofs_world import AutofsWorld, missing_tools
from hack.vm import kernel_has_autofs
from tests.support import rbac
from tests.support.fake_kube import FakeKube

IS_ROOT = os.geteuid() == 0
IN_CI = bool(os.environ.get("CI"))
# Set by hack/test.sh when this kernel has no autofs: the tests marked `autofs`
# are not lost, they run next in a VM whose kernel has it (hack/vm.py).
AUTOFS_IN_VM = bool(os.environ.get("NODE_AGENTS_AUTOFS_IN_VM"))
NO_AUTOFS = (
    "this kernel has no autofs (CONFIG_AUTOFS_FS): hack/test.sh runs the tests marked "
    "`autofs` in a VM whose kernel has it (python -m hack.vm -- .venv/bin/pytest -m autofs)"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on the `world` fixture needs autofs, marked or not."""
    for item in items:
        if "world" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.autofs)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("autofs") is None or not IS_ROOT or kernel_has_autofs():
        return
    if IN_CI and not AUTOFS_IN_VM:
        pytest.fail(f"CI must run this test: {NO_AUTOFS}")
    pytest.skip(NO_AUTOFS)


def require_root_tools(*, autofs: bool = True) -> None:
    """Skip (or fail in CI, where everything must run) without root or the autofs tools.

    `autofs=False`: the test mounts FUSE and squashfs itself, with no automount.
    """
    reason = None
    if not IS_ROOT:
        reason = "needs root: real autofs, FUSE mounts and umount2"
    elif missing := missing_tools():
        reason = f"needs {', '.join(missing)} (apt-get install autofs squashfuse squashfs-tools)"
    elif autofs and not kernel_has_autofs():
        # Marked tests were skipped before they started (pytest_runtest_setup);
        # an unmarked one would be skipped here and then run nowhere.
        pytest.fail(f"this test needs autofs: mark it `@pytest.mark.autofs` ({NO_AUTOFS})")
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    # autofs map entries and squashfuse paths must not contain spaces.
    assert " " not in str(tmp_path)
    return tmp_path


@pytest.fixture
def world(workdir: Path) -> Iterator[AutofsWorld]:
    """An autofs root `workdir/root` with repo1 and repo2 (60 s expiry)."""
    require_root_tools()
    w = AutofsWorld(workdir).start()
    try:
        yield w
    finally:
        w.stop()


def _settle(check: object, timeout: float = 3.0) -> object:
    """Re-evaluate `check()` until it is empty or the time is up (threads and children
    of a stopped agent take a moment to go)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()  # type: ignore[operator]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    """Each test starts with the logging set-up the previous one found.

    An agent's `main` configures logging for its process (root handler and
    level, quiet third-party loggers), and the test IdP (Canaille) adds
    filters; in-process tests must not inherit either.
    """
    root = logging.getLogger()
    handlers, level, filters = list(root.handlers), root.level, list(root.filters)
    handler_filters = {h: list(h.filters) for h in handlers}
    levels = {
        name: logger.level
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    root.handlers[:] = handlers
    root.filters[:] = filters
    for handler, saved in handler_filters.items():
        handler.filters[:] = saved
    root.setLevel(level)
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            logger.setLevel(levels.get(name, logging.NOTSET))


@pytest.fixture(autouse=True)
def no_leaks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No thread, child process or mount may outlive the test that made it.

    Mounts are checked below pytest's temporary directory, where tests make
    them: another run on the same machine (a benchmark, a second session)
    must not fail this one.
    """
    base = str(tmp_path_factory.getbasetemp()) + "/"
    threads = set(threading.enumerate())
    yield
    leaked_threads = _settle(
        lambda: [t for t in threading.enumerate() if t not in threads and t.is_alive()]
    )
    children = _settle(lambda: psutil.Process().children(recursive=True))
    leaked_mounts = [
        m.mountpoint for m in read_mount_table().mounts if m.mountpoint.startswith(base)
    ]
    assert not leaked_threads, f"threads leaked: {leaked_threads}"
    assert not children, f"child processes leaked: {children}"
    assert not leaked_mounts, f"mounts leaked: {leaked_mounts}"


@pytest.fixture(scope="session", autouse=True)
def fusectl_mounted() -> None:
    """fusectl mounted once per session, as systemd does on a real node.

    The healer mounts it itself when missing (tested on its own in a private
    mount namespace); mounting it here keeps the per-test mount leak check exact.
    """
    if not IS_ROOT or not Path("/sys/fs/fuse/connections").is_dir():
        return
    if not os.path.ismount("/sys/fs/fuse/connections"):
        subprocess.run(
            ["mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"], check=True
        )


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    """A fresh fake Kubernetes API server on loopback (tests/support/fake_kube.py)."""
    with FakeKube() as server:
        yield server


@pytest.fixture
def bundle_rbac() -> list[dict[str, Any]]:
    """The ServiceAccounts and RBAC `manifests/all` renders, for `kube.enforce_rbac`
    (skipped without kubectl, failed in CI; rendered once per session)."""
    return rbac.bundle_rbac()


@pytest.fixture
def api(kube: FakeKube, tmp_path: Path) -> Iterator[Any]:
    """A real ApiClient for `kube`, loaded from the kubeconfig it writes, as the agents load one."""
    api_client = load_api_client(str(kube.kubeconfig(tmp_path / "kubeconfig")))
    assert api_client is not None
    try:
        yield api_client
    finally:
        api_client.close()
