"""Fake containers for tests (hack/containers.py), skipping cleanly where they cannot run."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hack.base_image import BaseImageError
from hack.cgroups import CgroupsUnavailable
from hack.containerd import Containerd, ContainerdError
from hack.containers import ContainersUnavailable, ContainerWorld, build
from tests.conftest import IN_CI, IS_ROOT


def need(condition: bool, reason: str) -> None:
    """Skip without `condition`, or fail in CI, where every test must run."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def build_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`container_init`, compiled once per session (a session fixture calls this)."""
    need(IS_ROOT, "needs root: cgroups and chroot")
    try:
        return build(tmp_path_factory.mktemp("container-init"))
    except ContainersUnavailable as err:
        need(False, str(err))
        raise


@contextlib.contextmanager
def container_world(base: Path, init: Path) -> Iterator[ContainerWorld]:
    need(IS_ROOT, "needs root: cgroups and chroot")
    try:
        world = ContainerWorld(base, init=init).start()
    except (ContainersUnavailable, CgroupsUnavailable) as err:
        need(False, f"needs fake containers: {err}")
        raise
    try:
        yield world
    finally:
        world.close()


def need_tools(*tools: str) -> None:
    """Skip without root or without one of `tools` on PATH (fail in CI: hack/setup.sh
    installs them all)."""
    need(IS_ROOT, "needs root: real containers (containerd, runc)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    need(not missing, f"needs {', '.join(missing)} on PATH (hack/setup.sh installs it)")


@contextlib.contextmanager
def real_node(*, import_base: bool = True) -> Iterator[Containerd]:
    """A started `Containerd`, with the base imported unless told not to (skipped
    without root, containerd, ctr or runc; failed in CI)."""
    need_tools("containerd", "ctr", "runc")
    try:
        node = Containerd(import_base=import_base).start()
    except (ContainerdError, BaseImageError) as err:
        need(False, f"needs a real node: {err}")
        raise
    try:
        yield node
    finally:
        node.close()
