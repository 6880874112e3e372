"""The README's first command works and leaves nothing behind (root)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agents.mount_healer.mountinfo import read_mount_table
from tests.conftest import require_root_tools

pytestmark = pytest.mark.root


def test_demo_heals_live_and_cleans_up() -> None:
    require_root_tools()
    done = subprocess.run(
        [sys.executable, "-m", "hack.demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "severed\twould-unmount" in done.stdout
    assert "unmounted in the root" in done.stdout
    assert 'automount_healer_heals_total{method="umount"} 2.0' in done.stdout
    assert not [m for m in read_mount_table().mounts if "healer-demo-" in m.mountpoint]
