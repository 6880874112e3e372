"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containers import build_init
from tests.support.token_cluster import Cluster, token_cluster


@pytest.fixture(scope="session")
def container_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake containers' init (hack/container_init.c), compiled once per session."""
    return build_init(tmp_path_factory)


@pytest.fixture
def cluster(container_init: Path, tmp_path: Path) -> Iterator[Cluster]:
    """The token-delivery cluster (tests/support/token_cluster.py); modules with a
    cluster of their own (test_gpu_enforcer.py) override it."""
    with token_cluster(container_init, tmp_path) as cluster:
        yield cluster
