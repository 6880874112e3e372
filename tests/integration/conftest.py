"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hack.containerd import Containerd
from hack.containers import ContainerWorld
from hack.fake_nvml import FakeNvmlWorld, build, find_compiler
from tests.support.containers import build_init, container_world, need, real_node
from tests.support.gpu_enforcer import fake_card
from tests.support.token_cluster import Cluster, token_cluster


@pytest.fixture(scope="session")
def container_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake containers' init (hack/container_init.c), compiled once per session."""
    return build_init(tmp_path_factory)


@pytest.fixture
def cluster(container_init: Path, tmp_path: Path) -> Iterator[Cluster[ContainerWorld]]:
    """The token-delivery cluster on fake containers (tests/support/token_cluster.py);
    test_real_node_tokens.py overrides it with one on real containers."""
    with (
        container_world(tmp_path / "containers", container_init) as containers,
        token_cluster(containers, tmp_path) as cluster,
    ):
        yield cluster


@pytest.fixture(scope="session")
def nvml_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake libnvidia-ml (hack/fake_nvml), built once per session."""
    need(find_compiler() is not None, "needs a C compiler for the fake libnvidia-ml")
    return build(tmp_path_factory.mktemp("fake-nvml"))


@pytest.fixture
def card(nvml_library: Path, tmp_path: Path) -> Iterator[FakeNvmlWorld]:
    """One 16 GiB card, no processes yet; this process's pynvml reads it."""
    with fake_card(nvml_library, tmp_path) as world:
        yield world


@pytest.fixture(scope="session")
def containerd_session() -> Iterator[Containerd]:
    """One private containerd with the base imported, for the session (it runs
    detached: no test sees it as its child)."""
    with real_node() as node:
        yield node


@pytest.fixture
def containerd(containerd_session: Containerd) -> Iterator[Containerd]:
    """The session's containerd, emptied after the test: no container, shim or pod
    cgroup of it outlives the test."""
    yield containerd_session
    containerd_session.clear()
