"""mountinfo parsing and which FUSE mounts lie under which autofs root.

Lines are in the format of Documentation/filesystems/proc.rst, 3.5, as a node
with CVMFS under autofs shows them.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from agents.mount_healer.mountinfo import (
    Mount,
    MountinfoError,
    MountTable,
    parse_line,
    read_mount_table,
    unescape,
)

EXT4_ROOT = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro"
CVMFS_AUTOFS = (
    "42 27 0:39 / /cvmfs rw,relatime shared:300 - autofs /etc/auto.cvmfs "
    "rw,fd=5,pgrp=2991,timeout=5,minproto=5,maxproto=5,indirect,pipe_ino=7400"
)
CVMFS_ATLAS = (
    "43 42 0:40 / /cvmfs/atlas.cern.ch ro,relatime shared:301 - fuse cvmfs2 "
    "ro,user_id=0,group_id=0,default_permissions,allow_other"
)
SQUASHFUSE = (
    "46 43 0:43 / /cvmfs/atlas.cern.ch/images ro,nosuid,nodev,relatime shared:304 "
    "- fuse.squashfuse /cvmfs/atlas.cern.ch/img.sqfs ro,user_id=0,group_id=0"
)
CONSUMER_COPY = (
    "80 22 0:39 / /var/lib/kubelet/pods/abc/volumes/cvmfs rw,relatime master:300 "
    "- autofs /etc/auto.cvmfs rw,fd=5,pgrp=2991,timeout=5,minproto=5,maxproto=5,indirect"
)
NO_OPTIONAL = "22 27 0:21 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw"
MANY_OPTIONAL = (
    "90 22 0:90 / /srv/shared rw,relatime shared:5 master:3 propagate_from:2 unbindable "
    "- tmpfs tmpfs rw,size=1024k"
)

# A node with two autofs roots (/cvmfs and /data), a consumer pod's slave copy
# of /cvmfs, FUSE mounts stacked on and nested in each other, and FUSE mounts
# outside every root.
CVMFS_NODE = "\n".join(
    [
        EXT4_ROOT,
        "27 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw",
        "28 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw",
        "29 28 0:44 / /sys/fs/fuse/connections rw,nosuid,nodev,noexec,relatime shared:13 "
        "- fusectl fusectl rw",
        "42 22 0:39 / /cvmfs rw,relatime shared:300 - autofs /etc/auto.cvmfs "
        "rw,fd=5,pgrp=2991,timeout=5,minproto=5,maxproto=5,indirect,pipe_ino=7400",
        CVMFS_ATLAS,
        "44 42 0:41 / /cvmfs/cms.cern.ch ro,relatime shared:302 - fuse cvmfs2 "
        "ro,user_id=0,group_id=0,default_permissions,allow_other",
        # A second cvmfs2 mounted on top of the first at the same path.
        "45 44 0:42 / /cvmfs/cms.cern.ch ro,relatime shared:303 - fuse cvmfs2 "
        "ro,user_id=0,group_id=0,default_permissions,allow_other",
        SQUASHFUSE,
        "50 22 0:50 / /data rw,relatime shared:400 - autofs /etc/auto.data "
        "rw,fd=11,pgrp=2991,timeout=300,minproto=5,maxproto=5,indirect,pipe_ino=7401",
        "51 50 0:51 / /data/home rw,nosuid,nodev,relatime shared:401 - fuse.sshfs "
        "user@fileserver:/home rw,user_id=0,group_id=0",
        "60 22 0:60 / /mnt/outside rw,nosuid,nodev,relatime shared:500 - fuse.sshfs "
        "user@fileserver:/scratch rw,user_id=0,group_id=0",
        "61 22 8:17 / /mnt/usb rw,nosuid,nodev,relatime shared:501 - fuseblk /dev/sdb1 "
        "rw,user_id=0,group_id=0,allow_other,blksize=4096",
        CONSUMER_COPY,
        "81 80 0:40 / /var/lib/kubelet/pods/abc/volumes/cvmfs/atlas.cern.ch ro,relatime "
        "master:301 - fuse cvmfs2 ro,user_id=0,group_id=0,default_permissions,allow_other",
    ]
)


@pytest.fixture
def cvmfs_node() -> MountTable:
    table = MountTable.parse(CVMFS_NODE)
    assert table.malformed == ()
    return table


def mount_at(table: MountTable, mountpoint: str) -> Mount:
    (mount,) = [m for m in table.mounts if m.mountpoint == mountpoint]
    return mount


def ids(mounts: list[Mount]) -> list[int]:
    return [m.mount_id for m in mounts]


# --- parse_line ------------------------------------------------------------------


def test_parse_ext4_root() -> None:
    assert parse_line(EXT4_ROOT) == Mount(
        mount_id=22,
        parent_id=1,
        major=8,
        minor=1,
        root="/",
        mountpoint="/",
        options="rw,relatime",
        optional=("shared:1",),
        fstype="ext4",
        source="/dev/sda1",
        super_options="rw,errors=remount-ro",
    )


def test_parse_autofs_root() -> None:
    mount = parse_line(CVMFS_AUTOFS)
    assert (mount.mount_id, mount.parent_id, mount.device) == (42, 27, "0:39")
    assert mount.mountpoint == "/cvmfs"
    assert mount.optional == ("shared:300",)
    assert mount.fstype == "autofs"
    assert mount.source == "/etc/auto.cvmfs"
    assert mount.super_options.startswith("rw,fd=5,pgrp=2991,timeout=5,")
    assert mount.super_options.endswith(",indirect,pipe_ino=7400")
    assert mount.is_autofs
    assert not mount.is_fuse
    assert not mount.is_slave


def test_parse_fuse_under_autofs() -> None:
    mount = parse_line(CVMFS_ATLAS)
    assert (mount.mount_id, mount.parent_id, mount.device) == (43, 42, "0:40")
    assert mount.mountpoint == "/cvmfs/atlas.cern.ch"
    assert mount.options == "ro,relatime"
    assert mount.fstype == "fuse"
    assert mount.source == "cvmfs2"
    assert mount.super_options == "ro,user_id=0,group_id=0,default_permissions,allow_other"
    assert mount.is_fuse
    assert not mount.is_autofs


def test_parse_fuse_subtype() -> None:
    mount = parse_line(SQUASHFUSE)
    assert mount.fstype == "fuse.squashfuse"
    assert mount.source == "/cvmfs/atlas.cern.ch/img.sqfs"
    assert mount.is_fuse


def test_parse_consumer_copy_is_slave() -> None:
    mount = parse_line(CONSUMER_COPY)
    assert mount.optional == ("master:300",)
    assert mount.is_autofs
    assert mount.is_slave
    assert mount.device == "0:39"


def test_parse_line_without_optional_fields() -> None:
    mount = parse_line(NO_OPTIONAL)
    assert mount.optional == ()
    assert mount.options == "rw,nosuid,nodev,noexec,relatime"
    assert (mount.fstype, mount.source, mount.super_options) == ("proc", "proc", "rw")
    assert not mount.is_slave


def test_parse_line_with_several_optional_fields() -> None:
    mount = parse_line(MANY_OPTIONAL)
    assert mount.optional == ("shared:5", "master:3", "propagate_from:2", "unbindable")
    assert mount.is_slave
    assert (mount.fstype, mount.source, mount.super_options) == ("tmpfs", "tmpfs", "rw,size=1024k")


def test_parse_unknown_future_optional_field() -> None:
    mount = parse_line("91 22 0:91 / /x rw shared:9 newtag:7 - tmpfs tmpfs rw")
    assert mount.optional == ("shared:9", "newtag:7")
    assert mount.fstype == "tmpfs"


def test_parse_escapes_in_root_mountpoint_and_source() -> None:
    line = (
        r"70 22 0:70 /sub\040dir /mnt/My\040Disk\011tab\012nl\134bs rw,relatime shared:7 "
        r"- fuse.sshfs user@host:/home/a\040b rw,user_id=0,group_id=0"
    )
    mount = parse_line(line)
    assert mount.root == "/sub dir"
    assert mount.mountpoint == "/mnt/My Disk\ttab\nnl\\bs"
    assert mount.source == "user@host:/home/a b"
    assert mount.fstype == "fuse.sshfs"


def test_escaped_backslash_before_digits_is_decoded_once() -> None:
    # A path with a literal backslash followed by "040": the kernel writes "\134040".
    assert unescape(r"/mnt/a\134040b") == "/mnt/a\\040b"
    assert parse_line(r"70 22 0:70 / /mnt/a\134040b rw - tmpfs tmpfs rw").mountpoint == (
        "/mnt/a\\040b"
    )


def test_unescape_leaves_other_backslashes() -> None:
    assert unescape(r"/mnt/a\9b\04") == r"/mnt/a\9b\04"


def test_parse_empty_super_options() -> None:
    mount = parse_line("72 22 0:72 / /mnt/bare rw,relatime - fuse.bare bare ")
    assert mount.source == "bare"
    assert mount.super_options == ""


def test_parse_empty_source() -> None:
    mount = parse_line("73 22 0:73 / /mnt/nosource rw,relatime shared:9 - tmpfs  rw,size=1024k")
    assert mount.source == ""
    assert mount.super_options == "rw,size=1024k"


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("22 1 8:1 / / rw,relatime shared:1 ext4 /dev/sda1 rw", id="no-separator"),
        pytest.param("x 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw", id="non-numeric-id"),
        pytest.param("22 y 8:1 / / rw,relatime - ext4 /dev/sda1 rw", id="non-numeric-parent"),
        pytest.param("22 1 8-1 / / rw,relatime - ext4 /dev/sda1 rw", id="bad-major-minor"),
        pytest.param("22 1 8:z / / rw,relatime - ext4 /dev/sda1 rw", id="non-numeric-minor"),
        pytest.param("22 1 8:1 / / rw,relatime - ext4", id="no-source"),
        pytest.param("22 1 8:1 / / rw,relatime - ext4 /dev/sda1", id="no-super-options"),
        pytest.param("22 1 8:1 / / rw - ext4 /dev/sda1 rw extra", id="too-many-after-separator"),
        pytest.param("22 1 8:1 / - ext4 /dev/sda1 rw", id="too-few-before-separator"),
        pytest.param("22 1 8:1", id="truncated"),
    ],
)
def test_malformed_line_raises_value_error(line: str) -> None:
    with pytest.raises(ValueError):
        parse_line(line)


# --- MountTable.parse --------------------------------------------------------------


def test_malformed_lines_are_set_aside_and_the_rest_parsed() -> None:
    bad = [
        "22 1 8:1 / / rw,relatime shared:1 ext4 /dev/sda1 rw",
        "x 22 0:39 / /cvmfs rw - autofs /etc/auto.cvmfs rw",
        "43 42 0:40 / /cvmfs/x",
    ]
    text = "\n".join([EXT4_ROOT, bad[0], CVMFS_AUTOFS, "", bad[1], CVMFS_ATLAS, bad[2], "   "])
    table = MountTable.parse(text + "\n")
    assert ids(list(table.mounts)) == [22, 42, 43]
    # The kernel prints no blank lines: a line of spaces is reported, only an
    # empty one (the end of the text) is nothing.
    assert table.malformed == (*bad, "   ")


# util-linux's own sample (tests/ts/libmount/files/mountinfo): a mount point with a
# carriage return, which the kernel does not escape.
UTIL_LINUX_CR = "49 20 0:56 / /mnt/test/foo\rbar rw,relatime shared:323 - tmpfs tmpfs rw"

# Every character str.splitlines() breaks at besides \n. The kernel escapes only
# space, tab, newline and backslash in paths (fs/proc_namespace.c `mangle`,
# `seq_path(..., " \t\n\\")`), so each may appear raw inside a field.
SPLITLINES_BREAKS = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def test_util_linux_carriage_return_sample_is_one_mount() -> None:
    table = MountTable.parse(f"{EXT4_ROOT}\n{UTIL_LINUX_CR}\n{CVMFS_AUTOFS}\n")
    assert ids(list(table.mounts)) == [22, 49, 42]
    assert table.by_id[49].mountpoint == "/mnt/test/foo\rbar"
    assert table.by_id[49].fstype == "tmpfs"
    assert table.malformed == ()


@pytest.mark.parametrize("char", SPLITLINES_BREAKS, ids=lambda c: f"U+{ord(c):04X}")
def test_only_newline_ends_a_line(char: str) -> None:
    fuse = (
        f"43 42 0:40 / /cvmfs/a{char}b ro,relatime shared:301 - fuse.squashfuse "
        f"/img{char}s ro,user_id=0,group_id=0"
    )
    table = MountTable.parse(f"{EXT4_ROOT}\n{CVMFS_AUTOFS}\n{fuse}\n")
    assert table.malformed == ()
    assert [m.mountpoint for m in table.fuse_under(table.by_id[42])] == [f"/cvmfs/a{char}b"]
    assert table.by_id[43].source == f"/img{char}s"


def test_a_malformed_line_does_not_hide_its_neighbours() -> None:
    truncated = "43 42 0:40 / /cvmfs/x ro,relatime shared:301 - fuse cvmfs2"
    table = MountTable.parse(f"{CVMFS_AUTOFS}\n{truncated}\r\n{CVMFS_ATLAS}\n")
    assert ids(list(table.mounts)) == [42, 43]
    assert table.malformed == (truncated + "\r",)


def test_parse_empty_text() -> None:
    assert MountTable.parse("") == MountTable((), ())


def test_by_id(cvmfs_node: MountTable) -> None:
    by_id = cvmfs_node.by_id
    assert by_id[42].mountpoint == "/cvmfs"
    assert by_id[45].parent_id == 44
    assert len(by_id) == len(cvmfs_node.mounts)


# --- Mount.is_fuse -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fstype", "expected"),
    [
        ("fuse", True),
        ("fuseblk", True),
        ("fuse.sshfs", True),
        ("fuse.squashfuse", True),
        ("fuse.cvmfs2", True),
        ("fusectl", False),
        ("autofs", False),
        ("ext4", False),
    ],
)
def test_is_fuse(fstype: str, expected: bool) -> None:
    mount = parse_line(f"70 22 0:70 / /mnt/x rw,relatime - {fstype} src rw")
    assert mount.is_fuse is expected


# --- autofs_roots ------------------------------------------------------------------


def test_default_roots_skip_slave_copies(cvmfs_node: MountTable) -> None:
    roots, missing = cvmfs_node.autofs_roots()
    assert [m.mountpoint for m in roots] == ["/cvmfs", "/data"]
    assert missing == []


def test_default_roots_one_per_device_first_in_mount_order() -> None:
    # /srv/cvmfs is a bind of /cvmfs in the same peer group: the same autofs superblock.
    text = "\n".join(
        [
            EXT4_ROOT,
            CVMFS_AUTOFS,
            "82 22 0:39 / /srv/cvmfs rw,relatime shared:300 - autofs /etc/auto.cvmfs rw,fd=5",
            "83 22 0:52 / /opt/sw rw,relatime shared:600 - autofs /etc/auto.sw rw,fd=12",
        ]
    )
    roots, missing = MountTable.parse(text).autofs_roots()
    assert ids(roots) == [42, 83]
    assert missing == []


def test_default_roots_when_only_a_slave_copy_exists() -> None:
    table = MountTable.parse("\n".join([EXT4_ROOT, CONSUMER_COPY]))
    assert table.autofs_roots() == ([], [])


def test_default_roots_none_without_autofs() -> None:
    assert MountTable.parse("\n".join([EXT4_ROOT, NO_OPTIONAL])).autofs_roots() == ([], [])


def test_wanted_roots_trailing_slash_and_missing(cvmfs_node: MountTable) -> None:
    roots, missing = cvmfs_node.autofs_roots(["/data/", "/cvmfs", "/nope", "/proc"])
    assert ids(roots) == [50, 42]
    assert missing == ["/nope", "/proc"]


def test_wanted_root_may_be_a_slave_copy(cvmfs_node: MountTable) -> None:
    roots, missing = cvmfs_node.autofs_roots(["/var/lib/kubelet/pods/abc/volumes/cvmfs"])
    assert ids(roots) == [80]
    assert missing == []


def test_wanted_root_slash() -> None:
    table = MountTable.parse("10 1 0:10 / / rw shared:1 - autofs /etc/auto.root rw,fd=3")
    roots, missing = table.autofs_roots(["/"])
    assert ids(roots) == [10]
    assert missing == []


# --- fuse_under --------------------------------------------------------------------


def test_fuse_under_includes_stacked_and_nested(cvmfs_node: MountTable) -> None:
    under = cvmfs_node.fuse_under(mount_at(cvmfs_node, "/cvmfs"))
    # 43 atlas, 44 cms, 45 cms stacked on 44, 46 squashfuse inside atlas.
    assert ids(under) == [43, 44, 45, 46]


def test_fuse_under_excludes_other_roots_outside_and_copies(cvmfs_node: MountTable) -> None:
    under = ids(cvmfs_node.fuse_under(mount_at(cvmfs_node, "/cvmfs")))
    assert 51 not in under  # under /data
    assert 60 not in under  # outside every root
    assert 61 not in under  # fuseblk outside every root
    assert 81 not in under  # under the consumer's slave copy
    assert 29 not in under  # fusectl is not FUSE


def test_fuse_under_second_root(cvmfs_node: MountTable) -> None:
    assert ids(cvmfs_node.fuse_under(mount_at(cvmfs_node, "/data"))) == [51]


def test_fuse_under_root_without_fuse() -> None:
    table = MountTable.parse("\n".join([EXT4_ROOT, CVMFS_AUTOFS]))
    assert table.fuse_under(mount_at(table, "/cvmfs")) == []


def test_fuse_under_survives_a_parent_cycle() -> None:
    # Corrupt or racing reads must not hang the sweep.
    text = "\n".join(
        [
            CVMFS_AUTOFS,
            "100 101 0:100 / /loop/a rw - tmpfs tmpfs rw",
            "101 100 0:101 / /loop/b rw - tmpfs tmpfs rw",
            "102 100 0:102 / /loop/a/f rw - fuse f rw",
        ]
    )
    table = MountTable.parse(text)
    assert table.fuse_under(mount_at(table, "/cvmfs")) == []


# --- top_at ------------------------------------------------------------------------


def test_top_at_stacked(cvmfs_node: MountTable) -> None:
    top = cvmfs_node.top_at("/cvmfs/cms.cern.ch")
    assert top is not None
    assert top.mount_id == 45


def test_top_at_single(cvmfs_node: MountTable) -> None:
    top = cvmfs_node.top_at("/cvmfs/atlas.cern.ch")
    assert top is not None
    assert top.mount_id == 43


def test_top_at_three_high() -> None:
    text = "\n".join(
        [
            CVMFS_AUTOFS,
            "47 42 0:47 / /cvmfs/x rw - fuse a rw",
            "49 48 0:49 / /cvmfs/x rw - fuse c rw",
            "48 47 0:48 / /cvmfs/x rw - fuse b rw",
        ]
    )
    top = MountTable.parse(text).top_at("/cvmfs/x")
    assert top is not None
    assert top.source == "c"


def test_top_at_nothing_mounted(cvmfs_node: MountTable) -> None:
    assert cvmfs_node.top_at("/cvmfs/lhcb.cern.ch") is None


# --- read_mount_table --------------------------------------------------------------


def test_read_mount_table_from_proc_root(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "self").mkdir()
    bad = "not a mountinfo line"
    (tmp_path / "self" / "mountinfo").write_text(f"{CVMFS_NODE}\n{bad}\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="agents.mount_healer.mountinfo"):
        table = read_mount_table(tmp_path)
    assert table.mounts == MountTable.parse(CVMFS_NODE).mounts
    assert table.malformed == (bad,)
    assert bad in caplog.text


def test_read_mount_table_accepts_str_and_non_utf8(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    line = b"70 22 0:70 / /mnt/caf\xe9 rw - fuse.sshfs src rw\n"
    (tmp_path / "self" / "mountinfo").write_bytes(line)
    (mount,) = read_mount_table(str(tmp_path)).mounts
    assert mount.mountpoint.encode("utf-8", "surrogateescape") == b"/mnt/caf\xe9"


def test_read_mount_table_missing(tmp_path: Path) -> None:
    with pytest.raises(MountinfoError) as exc:
        read_mount_table(tmp_path)
    assert isinstance(exc.value, OSError)
    assert exc.value.errno == errno.ENOENT
    assert str(tmp_path / "self" / "mountinfo") in str(exc.value)


def test_parse_with_known_lines_reuses_unchanged_mounts_and_forgets_gone_ones() -> None:
    root = "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw"
    repo = "43 27 0:40 / /cvmfs/a ro,relatime - fuse cvmfs2 ro,user_id=0,group_id=0"
    other = "44 27 0:41 / /cvmfs/b ro,relatime - fuse cvmfs2 ro,user_id=0,group_id=0"
    known: dict[str, Mount] = {}
    first = MountTable.parse(f"{root}\n{repo}\n", known)
    assert set(known) == {root, repo}

    second = MountTable.parse(f"{root}\n{other}\nnot a mountinfo line\n", known)

    assert second.mounts[0] is first.mounts[0]  # unchanged: not parsed again
    assert [m.mountpoint for m in second.mounts] == ["/", "/cvmfs/b"]
    assert second.malformed == ("not a mountinfo line",)
    assert set(known) == {root, other}  # the gone mount is forgotten
