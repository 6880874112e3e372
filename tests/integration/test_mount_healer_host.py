"""The healer's kernel boundaries on real mounts that need no autofs (root).

Plain tmpfs and squashfuse mounts in a temporary directory: they run on any
kernel with FUSE, also where autofs is missing.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry

from agents.mount_healer.config import HealerConfig
from agents.mount_healer.fusectl import Fusectl
from agents.mount_healer.healer import Action, Healer, Verdict
from agents.mount_healer.metrics import HealerMetrics
from agents.mount_healer.mountinfo import MountinfoSource, MountTable, read_mount_table
from agents.mount_healer.probe import Prober
from agents.mount_healer.unmount import MNT_DETACH, fdinfo_mount, pin_mount, umount2
from hack.autofs_world import force_unmount_under, make_image
from tests.conftest import require_root_tools

pytestmark = pytest.mark.root


@pytest.fixture
def mounts(workdir: Path) -> Iterator[Path]:
    """A directory to mount in; everything below it is unmounted at the end."""
    require_root_tools(autofs=False)
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


# -- issue 9, point 4: unmount the mount that was probed, through a pin -------------------


def squashfuse(image: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    subprocess.run(["squashfuse", str(image), str(target)], check=True)


def kill_daemon_of(target: Path) -> None:
    """kill -9 the squashfuse serving `target`, as a CSI node plugin restart does."""
    for proc in psutil.process_iter(["cmdline"]):
        if (proc.info.get("cmdline") or [])[-1:] == [str(target)]:
            proc.kill()
            proc.wait(5)


def test_a_pinned_severed_mount_is_detached_through_its_descriptor(
    mounts: Path, workdir: Path
) -> None:
    target = mounts / "repo1"
    squashfuse(make_image(workdir, "repo1"), target)
    os.listdir(target)
    kill_daemon_of(target)
    mount = read_mount_table().top_at(str(target))
    assert mount is not None
    with pin_mount(str(target)) as pinned:
        # statx AT_STATX_DONT_SYNC: answered without the (dead) daemon.
        assert (pinned.mount_id, pinned.device) == (mount.mount_id, mount.device)
        # Kernels before 5.8 have no STATX_MNT_ID: fdinfo + mountinfo say the same.
        fd = int(pinned.path.rsplit("/", 1)[1])
        assert fdinfo_mount(fd) == (mount.mount_id, mount.device)
        # The pin is a reference: a plain umount2 is EBUSY (propagate_mount_busy).
        with pytest.raises(OSError) as busy:
            umount2(pinned.path, 0)
        assert busy.value.errno == errno.EBUSY
        umount2(pinned.path, MNT_DETACH)
        assert read_mount_table().top_at(str(target)) is None
        assert Path(f"/sys/fs/fuse/connections/{mount.minor}").exists()  # the pin holds it
    # Closing the pin frees the superblock, and fusectl drops the connection.
    assert not Path(f"/sys/fs/fuse/connections/{mount.minor}").exists()


def test_a_pin_never_reaches_the_mount_that_replaced_the_pinned_one(
    mounts: Path, workdir: Path
) -> None:
    image = make_image(workdir, "repo1")
    target = mounts / "repo1"
    squashfuse(image, target)
    kill_daemon_of(target)
    with pin_mount(str(target)) as pinned:
        # Expired and mounted again at the same path, while pinned.
        subprocess.run(["umount", "-l", str(target)], check=True)
        squashfuse(image, target)
        fresh = read_mount_table().top_at(str(target))
        assert fresh is not None
        # The pin holds the old mount's ID and device: the new mount has others.
        assert (fresh.mount_id, fresh.device) != (pinned.mount_id, pinned.device)
        with pytest.raises(OSError) as gone:
            umount2(pinned.path, MNT_DETACH)
        assert gone.value.errno == errno.EINVAL
    assert read_mount_table().top_at(str(target)) == fresh
    assert os.listdir(target) == ["README"]


def autofs_stand_in(root: Path) -> Callable[[], MountTable]:
    """mountinfo as the healer reads it, with the tmpfs at `root` shown as autofs.

    This kernel may have no autofs; the healer only needs the root's type to
    select the FUSE mounts below it. Everything else is the real table.
    """

    def read() -> MountTable:
        table = read_mount_table()
        return MountTable(
            tuple(
                m._replace(fstype="autofs") if m.mountpoint == str(root) else m
                for m in table.mounts
            )
        )

    return read


def test_the_healer_never_unmounts_a_mount_remounted_after_its_re_check(
    mounts: Path, workdir: Path
) -> None:
    """The severed mount expires and the volume is mounted again right before the
    umount2 call: the healer must leave the new, healthy mount alone."""
    image = make_image(workdir, "repo1")
    root = mounts / "root"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "root", str(root)], check=True)
    target = root / "repo1"
    squashfuse(image, target)
    kill_daemon_of(target)

    def remount_then_umount2(path: str, flags: int) -> None:
        subprocess.run(["umount", "-l", str(target)], check=True)
        squashfuse(image, target)
        umount2(path, flags)

    prober = Prober(2.0)
    healer = Healer(
        HealerConfig(roots=(str(root),)),
        read_table=autofs_stand_in(root),
        fusectl=Fusectl(),
        prober=prober,
        umount2=remount_then_umount2,
        metrics=HealerMetrics(registry := CollectorRegistry()),
    )
    try:
        (report,) = healer.sweep()
    finally:
        prober.close()
    assert report.verdict is Verdict.SEVERED
    assert report.action is Action.NONE, report
    assert os.listdir(target) == ["README"]  # the new mount is there and answers
    assert registry.get_sample_value("automount_healer_heals_total", {"method": "detach"}) == 0
