"""PyPI for the tests that pip install (the image's venv, the image build)."""

from __future__ import annotations

import socket

from tests.support.containers import need


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


def need_pypi(what: str) -> None:
    """Skip without PyPI (pypi.org:443), or fail in CI, where every test must run."""
    need(pypi_reachable(), f"needs PyPI (pypi.org:443) to {what}")
