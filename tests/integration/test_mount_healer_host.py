"""The healer's kernel boundaries on real mounts that need no autofs (root).

Plain tmpfs and squashfuse mounts in a temporary directory: they run on any
kernel with FUSE, also where autofs is missing.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.mount_healer.mountinfo import MountinfoSource, read_mount_table
from hack.autofs_world import force_unmount_under, make_image
from tests.conftest import require_root_tools

pytestmark = pytest.mark.root


@pytest.fixture
def mounts(workdir: Path) -> Iterator[Path]:
    """A directory to mount in; everything below it is unmounted at the end."""
    require_root_tools()
    base = workdir / "mnt"
    base.mkdir()
    yield base
    force_unmount_under(base)


# -- issue 9, point 3: a mount point with a character str.splitlines() breaks at ---------


@pytest.mark.parametrize("char", ["\r", "\x0c", "\u2028"], ids=["CR", "FF", "U+2028"])
def test_a_real_mount_point_with_a_line_break_character_is_one_mount(
    mounts: Path, char: str
) -> None:
    # The kernel prints it raw: it escapes only " \t\n\\" (fs/proc_namespace.c).
    target = mounts / f"foo{char}bar"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    table = read_mount_table()
    mount = table.top_at(str(target))
    assert mount is not None and mount.fstype == "tmpfs"
    assert not [line for line in table.malformed if "foo" in line]
    source = MountinfoSource()
    try:
        assert source().top_at(str(target)) == mount
    finally:
        source.close()


def test_a_real_fuse_mount_with_a_carriage_return_is_seen_with_its_connection(
    mounts: Path, workdir: Path
) -> None:
    image = make_image(workdir, "repo1")
    target = mounts / "repo\r1"
    target.mkdir()
    subprocess.run(["squashfuse", str(image), str(target)], check=True)
    mount = read_mount_table().top_at(str(target))
    assert mount is not None and mount.is_fuse
    assert Path(f"/sys/fs/fuse/connections/{mount.minor}").is_dir()
