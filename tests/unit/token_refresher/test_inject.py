"""Files written into container roots: real directory trees stand in for containers.

A "container" is a directory with /tmp and /etc; the "host" is whatever lies
outside it, with a canary file that no write may ever reach. One test goes
through a real process's `/proc/<pid>/root` in a mount namespace of its own.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from agents.token_refresher.inject import (
    FS_CAPABILITIES,
    TEMP_PREFIX,
    Confined,
    ForeignOwner,
    InjectError,
    NoSuchDirectory,
    PermissionDenied,
    ReadOnly,
    RefusedFilesystem,
    UnsafePath,
    WriteResult,
    _owner_rights,
    _parse_mountinfo,
    container_root,
    open_root,
    path_allowed,
    write_file,
)
from tests.conftest import IS_ROOT

REPO = Path(__file__).resolve().parents[3]
TOKEN = b"oauth2:AT-secret:https://auth.example/userinfo"
HOST_SECRET = b"host secret: never overwritten\n"
CONTAINER_SHADOW = b"root:*:19000:0:99999:7:::\n"
# Owner of the token file as the pod asks for it (a non-root user in the container).
OWNER = {"uid": 1000, "gid": 1000}
ME = {"uid": os.getuid(), "gid": os.getgid()}

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: chown to another user, mounts")


@dataclass(frozen=True)
class Node:
    """A node's view: a container root with /tmp and /etc, and host files outside it."""

    root: Path
    host_secret: Path
    escape: Path
    """A host directory next to the root, where a `../escape` link would lead."""

    def at(self, path: str) -> Path:
        """Where a container path lies on the node (for the test to look, never to write)."""
        return self.root / path.lstrip("/")

    def temp_files(self, directory: str = "/tmp") -> list[str]:
        return [n for n in os.listdir(self.at(directory)) if n.startswith(TEMP_PREFIX)]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    root = tmp_path / "root"
    (root / "tmp").mkdir(parents=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc").mkdir()
    (root / "etc" / "shadow").write_bytes(CONTAINER_SHADOW)
    (root / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "secret").write_bytes(HOST_SECRET)
    (tmp_path / "escape").mkdir()
    return Node(root, tmp_path / "host" / "secret", tmp_path / "escape")


def assert_untouched(node: Node) -> None:
    """Neither the host canary, nor the container's own files, nor a host directory changed."""
    assert node.host_secret.read_bytes() == HOST_SECRET
    assert node.at("/etc/shadow").read_bytes() == CONTAINER_SHADOW
    assert os.listdir(node.escape) == []
    assert os.listdir(node.host_secret.parent) == ["secret"]


@contextmanager
def mounted(target: Path, *mount_args: str) -> Iterator[None]:
    subprocess.run(["mount", *mount_args, str(target)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_container_root_is_the_proc_root_link() -> None:
    assert container_root(42, "/host/proc") == Path("/host/proc/42/root")
    with pytest.raises(ValueError):
        container_root(0)


@needs_root
def test_writes_content_mode_and_owner(node: Node) -> None:
    result = write_file(node.root, "/tmp/oauthtk_1000", TOKEN, **OWNER)

    assert result == WriteResult(
        "/tmp/oauthtk_1000", written=True, unchanged=False, bytes=len(TOKEN)
    )
    st = node.at("/tmp/oauthtk_1000").stat()
    assert node.at("/tmp/oauthtk_1000").read_bytes() == TOKEN
    assert (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)) == (stat.S_IFREG, 0o400)
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert node.temp_files() == []


def test_replaces_atomically_with_a_new_inode(node: Node) -> None:
    write_file(node.root, "/tmp/oauthtk_0", b"old token", **ME)
    before = node.at("/tmp/oauthtk_0").stat()

    result = write_file(node.root, "/tmp/oauthtk_0", b"new token, longer", mode=0o440, **ME)

    after = node.at("/tmp/oauthtk_0").stat()
    assert (result.written, result.bytes) == (True, 17)
    assert node.at("/tmp/oauthtk_0").read_bytes() == b"new token, longer"
    # rename(2) put a new file in place; the old inode was never written to
    assert after.st_ino != before.st_ino
    assert stat.S_IMODE(after.st_mode) == 0o440
    assert node.temp_files() == []


def test_unchanged_file_is_not_rewritten(node: Node) -> None:
    write_file(node.root, "/tmp/oauthtk_0", TOKEN, **ME)
    before = node.at("/tmp/oauthtk_0").stat()

    result = write_file(node.root, "/tmp/oauthtk_0", TOKEN, **ME)

    after = node.at("/tmp/oauthtk_0").stat()
    assert result == WriteResult("/tmp/oauthtk_0", written=False, unchanged=True, bytes=0)
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_ctime_ns,
    )


@needs_root
@pytest.mark.parametrize(
    "drift",
    [
        pytest.param(lambda p: p.chmod(0o644), id="mode"),
        pytest.param(lambda p: os.chown(p, 0, 0), id="owner"),
        pytest.param(lambda p: os.chown(p, 1000, 0), id="group"),
        pytest.param(lambda p: (p.chmod(0o600), p.write_bytes(TOKEN.upper())), id="same-size"),
        pytest.param(lambda p: (p.chmod(0o600), p.write_bytes(b"x")), id="size"),
    ],
)
def test_drift_is_fixed(node: Node, drift: Callable[[Path], object]) -> None:
    target = node.at("/tmp/oauthtk_1000")
    write_file(node.root, "/tmp/oauthtk_1000", TOKEN, **OWNER)
    drift(target)

    result = write_file(node.root, "/tmp/oauthtk_1000", TOKEN, **OWNER)

    st = target.stat()
    assert result.written
    assert target.read_bytes() == TOKEN
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o400, 1000, 1000)


@pytest.mark.parametrize(
    "link",
    [
        pytest.param(lambda n: "/etc/shadow", id="absolute-container"),
        pytest.param(lambda n: "../../../../etc/passwd", id="relative-dotdot"),
        pytest.param(lambda n: str(n.host_secret), id="absolute-host"),
        pytest.param(lambda n: os.path.relpath(n.host_secret, n.at("/tmp")), id="relative-to-host"),
        pytest.param(lambda n: "oauthtk_missing", id="dangling"),
    ],
)
def test_symlink_at_target_is_refused_and_left(node: Node, link: Callable[[Node], str]) -> None:
    target = node.at("/tmp/oauthtk_0")
    os.symlink(link(node), target)

    with pytest.raises(UnsafePath, match="symlink") as caught:
        write_file(node.root, "/tmp/oauthtk_0", TOKEN, **ME)

    assert caught.value.reason == "unsafe_path"
    assert os.readlink(target) == link(node)
    assert not node.at("/tmp/oauthtk_missing").exists()
    assert_untouched(node)
    assert node.temp_files() == []


@pytest.mark.parametrize(
    ("link", "path"),
    [
        pytest.param(lambda n: "/etc", "/tmp/oauthtk_0", id="tmp-to-etc"),
        pytest.param(lambda n: "../escape", "/tmp/oauthtk_0", id="tmp-to-dotdot"),
        pytest.param(lambda n: str(n.host_secret.parent), "/tmp/secret", id="tmp-to-host"),
        pytest.param(lambda n: "/tmp", "/tmp/oauthtk_0", id="tmp-to-itself"),
    ],
)
def test_symlinked_parent_is_refused(node: Node, link: Callable[[Node], str], path: str) -> None:
    node.at("/tmp").rmdir()
    os.symlink(link(node), node.at("/tmp"))

    with pytest.raises(UnsafePath, match="through a symlink") as caught:
        write_file(node.root, path, TOKEN, **ME)

    assert caught.value.reason == "unsafe_path"
    assert os.readlink(node.at("/tmp")) == link(node)
    assert sorted(os.listdir(node.at("/etc"))) == ["passwd", "shadow"]
    assert_untouched(node)


def test_symlink_higher_up_the_parent_path_is_refused(node: Node) -> None:
    """`/var/run -> /run` would stay inside the root, but any symlink in the path is refused."""
    node.at("/run").mkdir()
    node.at("/var").mkdir()
    os.symlink("/run", node.at("/var/run"))

    with pytest.raises(UnsafePath):
        write_file(node.root, "/var/run/oauthtk_0", TOKEN, **ME)

    assert os.listdir(node.at("/run")) == []


def test_dotdot_stays_inside_the_root(node: Node) -> None:
    path = "/tmp/../../../../host/secret"
    # Resolved in the root, `..` stops at it: /host, which this container lacks.
    with pytest.raises(NoSuchDirectory):
        write_file(node.root, path, TOKEN, **ME)
    assert_untouched(node)

    node.at("/host").mkdir()
    assert write_file(node.root, path, TOKEN, **ME).written
    assert node.at("/host/secret").read_bytes() == TOKEN
    assert_untouched(node)


@pytest.mark.parametrize(
    "path", ["tmp/oauthtk_0", "", "/", "/tmp/", "/tmp/.", "/tmp/..", "/..", "/tmp/x\0y"]
)
def test_path_that_names_no_file_is_refused(node: Node, path: str) -> None:
    with pytest.raises(UnsafePath):
        write_file(node.root, path, TOKEN, **ME)
    assert_untouched(node)


def test_missing_parent_directory(node: Node) -> None:
    with pytest.raises(NoSuchDirectory) as caught:
        write_file(node.root, "/scratch/oauthtk_0", TOKEN, **ME)
    assert caught.value.reason == "no_directory"
    assert caught.value.errno == errno.ENOENT


def test_parent_that_is_a_file(node: Node) -> None:
    with pytest.raises(NoSuchDirectory):
        write_file(node.root, "/etc/passwd/oauthtk_0", TOKEN, **ME)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(os.mkdir, id="directory"),
        # a FIFO would block a plain open(2) for reading; it is never opened
        pytest.param(os.mkfifo, id="fifo"),
    ],
)
def test_target_that_is_not_a_regular_file_is_refused(
    node: Node, make: Callable[[Path], None]
) -> None:
    target = node.at("/tmp/oauthtk_0")
    make(target)
    before = os.lstat(target)

    with pytest.raises(UnsafePath, match="not a regular file"):
        write_file(node.root, "/tmp/oauthtk_0", TOKEN, **ME)

    after = os.lstat(target)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert node.temp_files() == []


def test_hard_link_target_loses_its_name_not_its_content(node: Node) -> None:
    """A container may hard-link the target to a file of its own: that file is not written."""
    os.link(node.host_secret, node.at("/tmp/oauthtk_0"))

    assert write_file(node.root, "/tmp/oauthtk_0", TOKEN, **ME).written

    assert node.at("/tmp/oauthtk_0").read_bytes() == TOKEN
    assert node.host_secret.read_bytes() == HOST_SECRET
    assert node.host_secret.stat().st_nlink == 1


def test_root_given_as_a_pinned_fd_stays_open(node: Node) -> None:
    rootfd = open_root(node.root)
    try:
        write_file(rootfd, "/tmp/oauthtk_0", b"one", **ME)
        assert write_file(rootfd, "/tmp/oauthtk_0", b"two", **ME).written
        os.fstat(rootfd)  # still ours
    finally:
        os.close(rootfd)
    assert node.at("/tmp/oauthtk_0").read_bytes() == b"two"


def test_gone_root(tmp_path: Path) -> None:
    with pytest.raises(InjectError, match="gone") as caught:
        write_file(tmp_path / "no-such-container", "/tmp/oauthtk_0", TOKEN, **ME)
    assert caught.value.reason == "error"


@needs_root
def test_read_only_root(node: Node) -> None:
    write_file(node.root, "/tmp/oauthtk_0", b"old token", **ME)
    with mounted(node.root, "--bind", str(node.root)):
        subprocess.run(["mount", "-o", "remount,ro,bind", str(node.root)], check=True)

        # already right: nothing to write, so read-only is no failure
        assert write_file(node.root, "/tmp/oauthtk_0", b"old token", **ME).unchanged
        with pytest.raises(ReadOnly) as caught:
            write_file(node.root, "/tmp/oauthtk_0", b"new token", **ME)

    assert caught.value.reason == "read_only"
    assert node.at("/tmp/oauthtk_0").read_bytes() == b"old token"
    assert node.temp_files() == []


@needs_root
def test_full_filesystem_leaves_no_temp_file(node: Node) -> None:
    with mounted(node.at("/tmp"), "-t", "tmpfs", "-o", "size=4k", "tmpfs"):
        with pytest.raises(InjectError) as caught:
            write_file(node.root, "/tmp/oauthtk_0", b"x" * 65536, **ME)

        assert type(caught.value) is InjectError
        assert (caught.value.reason, caught.value.errno) == ("error", errno.ENOSPC)
        assert os.listdir(node.at("/tmp")) == []


# Runs in a child: a seccomp filter makes openat2 answer ENOSYS, as on a kernel
# before 5.6 or under a container runtime's profile that does not know it.
_WITHOUT_OPENAT2 = r"""
import ctypes, errno, json, sys
from agents.token_refresher.inject import InjectError, write_file

class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]

class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

program = (SockFilter * 4)(
    SockFilter(0x20, 0, 0, 0),  # BPF_LD|BPF_W|BPF_ABS: seccomp_data.nr
    SockFilter(0x15, 0, 1, 437),  # BPF_JMP|BPF_JEQ|BPF_K: openat2?
    SockFilter(0x06, 0, 0, 0x00050000 | errno.ENOSYS),  # SECCOMP_RET_ERRNO
    SockFilter(0x06, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
)
fprog = SockFprog(len(program), program)
libc = ctypes.CDLL(None, use_errno=True)
ulong = ctypes.c_ulong
assert libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0)) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, ulong(2), ctypes.byref(fprog), ulong(0), ulong(0)) == 0  # PR_SET_SECCOMP
try:
    write_file(sys.argv[1], "/tmp/oauthtk_0", b"token", uid=0, gid=0)
except InjectError as err:
    print(json.dumps({"type": type(err).__name__, "reason": err.reason, "errno": err.errno}))
"""


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="seccomp filter")
def test_without_openat2_nothing_is_written(node: Node) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPENAT2, str(node.root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(child.stdout) == {
        "type": "InjectError",
        "reason": "error",
        "errno": errno.ENOSYS,
    }
    assert os.listdir(node.at("/tmp")) == []


@needs_root
def test_writes_into_a_live_mount_namespace(tmp_path: Path) -> None:
    """A process with its own tmpfs at `mnt`: the file appears in its namespace only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    container = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs -o mode=1777 none "$0" && touch "$0/ready" && exec sleep 60',
            str(mnt),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        inside = Path(f"/proc/{container.pid}/root{mnt}")
        deadline = time.monotonic() + 10
        while not (inside / "ready").exists():
            assert container.poll() is None, container.stderr.read() if container.stderr else ""
            assert time.monotonic() < deadline, "the namespace never got ready"
            time.sleep(0.02)

        result = write_file(container_root(container.pid), f"{mnt}/oauthtk_1000", TOKEN, **OWNER)

        assert result.written
        seen = subprocess.run(
            ["nsenter", "-t", str(container.pid), "-m", "cat", f"{mnt}/oauthtk_1000"],
            capture_output=True,
            check=True,
        )
        assert seen.stdout == TOKEN
        st = (inside / "oauthtk_1000").stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o400, 1000, 1000)
        assert os.listdir(mnt) == []  # the host's directory under the tmpfs: nothing
        assert not os.path.ismount(mnt)
    finally:
        container.kill()
        container.communicate()


# -- confined writes (issue 11, points 5 and 6): the owner's rights, filesystems that answer


def confined() -> Confined:
    """The host's own mount table: these roots are directories of the host."""
    return Confined("/proc/self/mountinfo")


def thread_status(tid: int) -> dict[str, str]:
    lines = Path(f"/proc/self/task/{tid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def fs_identity(tid: int) -> tuple[str, str, str, int]:
    """(fsuid, fsgid, groups, effective capabilities) of one thread of this process."""
    status = thread_status(tid)
    return (
        status["Uid"].split()[3],
        status["Gid"].split()[3],
        status["Groups"].strip(),
        int(status["CapEff"], 16),
    )


@needs_root
def test_owner_rights_are_taken_by_the_writing_thread_alone_and_given_back() -> None:
    """fsuid, fsgid, groups and capabilities are per-thread; glibc's setgroups() would
    have changed every thread's groups (nptl broadcasts it), the raw syscall does not."""
    main = threading.get_native_id()
    before = fs_identity(main)
    seen: dict[str, tuple[str, str, str, int]] = {}
    inside = threading.Event()
    resume = threading.Event()

    def writer() -> None:
        with _owner_rights(1000, 2000):
            seen["writer"] = fs_identity(threading.get_native_id())
            inside.set()
            resume.wait(10)
        seen["writer after"] = fs_identity(threading.get_native_id())

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert inside.wait(10)
        seen["main meanwhile"] = fs_identity(main)
    finally:
        resume.set()
        thread.join(10)

    fsuid, fsgid, groups, caps = seen["writer"]
    assert (fsuid, fsgid, groups) == ("1000", "2000", "")
    assert caps & FS_CAPABILITIES == 0
    assert seen["main meanwhile"] == before
    assert seen["writer after"] == before


@needs_root
def test_a_mode_0400_file_of_the_owner_is_replaced_by_rename(node: Node) -> None:
    target = node.at("/tmp/oauthtk_1000")
    target.write_bytes(b"old")
    os.chown(target, 1000, 1000)
    target.chmod(0o400)

    assert write_file(node.root, "/tmp/oauthtk_1000", TOKEN, **OWNER, confined=confined()).written

    st = target.stat()
    assert target.read_bytes() == TOKEN
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o400)


@needs_root
@pytest.mark.parametrize("sticky", [True, False], ids=["sticky-tmp", "world-writable"])
def test_a_file_of_another_uid_is_never_replaced(node: Node, sticky: bool) -> None:
    node.at("/tmp").chmod(0o1777 if sticky else 0o777)
    theirs = node.at("/tmp/oauthtk_1000")
    theirs.write_bytes(b"uid 2000's file\n")
    os.chown(theirs, 2000, 2000)
    before = theirs.stat()

    with pytest.raises(ForeignOwner, match="owned by uid 2000, not by the file's owner 1000"):
        write_file(node.root, "/tmp/oauthtk_1000", TOKEN, **OWNER, confined=confined())

    after = theirs.stat()
    assert theirs.read_bytes() == b"uid 2000's file\n"
    assert (after.st_ino, after.st_uid) == (before.st_ino, 2000)
    assert node.temp_files() == []


@needs_root
def test_owner_zero_gets_no_capability_over_other_files(node: Node) -> None:
    """uid 0 keeps its fsuid, so its capabilities are dropped explicitly: in a sticky
    /tmp it cannot even create a temp file over... it just never replaces uid 2000's."""
    theirs = node.at("/tmp/oauthtk_0")
    theirs.write_bytes(b"uid 2000's file\n")
    os.chown(theirs, 2000, 2000)
    with pytest.raises(ForeignOwner):
        write_file(node.root, "/tmp/oauthtk_0", TOKEN, uid=0, gid=0, confined=confined())
    # A directory only uid 2000 may write: uid 0 without CAP_DAC_OVERRIDE may not either.
    node.at("/tmp/theirs").mkdir(mode=0o755)
    os.chown(node.at("/tmp/theirs"), 2000, 2000)
    with pytest.raises(PermissionDenied, match="uid 0 may not write"):
        write_file(node.root, "/tmp/theirs/oauthtk_0", TOKEN, uid=0, gid=0, confined=confined())
    assert os.listdir(node.at("/tmp/theirs")) == []


@needs_root
def test_a_directory_the_owner_cannot_write_is_refused(node: Node) -> None:
    with pytest.raises(PermissionDenied, match="uid 1000 may not write in its directory") as caught:
        write_file(node.root, "/etc/oauthtk_1000", TOKEN, **OWNER, confined=confined())
    assert caught.value.reason == "permission_denied"
    assert sorted(os.listdir(node.at("/etc"))) == ["passwd", "shadow"]
    # Root's own file there is not replaced either, whatever the prefix allowed.
    with pytest.raises(ForeignOwner):
        write_file(node.root, "/etc/passwd", TOKEN, **OWNER, confined=confined())
    assert node.at("/etc/passwd").read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
    # Unconfined (the local role, trusted), the same call would have written it.
    assert write_file(node.root, "/etc/oauthtk_1000", TOKEN, **OWNER).written


@needs_root
def test_a_directory_the_owner_cannot_search_is_refused(node: Node) -> None:
    """A world-writable directory under one the owner cannot enter stays out of reach."""
    node.at("/root/drop").mkdir(parents=True)
    node.at("/root").chmod(0o700)
    node.at("/root/drop").chmod(0o777)
    with pytest.raises(PermissionDenied, match="uid 1000 may not search /root"):
        write_file(node.root, "/root/drop/oauthtk_1000", TOKEN, **OWNER, confined=confined())
    assert os.listdir(node.at("/root/drop")) == []


@needs_root
def test_a_file_bind_mounted_over_the_target_is_refused(node: Node, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"someone's file\n")
    target = node.at("/tmp/oauthtk_0")
    target.write_bytes(b"")
    with mounted(target, "--bind", str(elsewhere)), pytest.raises(UnsafePath, match="mount point"):
        write_file(node.root, "/tmp/oauthtk_0", TOKEN, **ME)
    assert elsewhere.read_bytes() == b"someone's file\n"


@needs_root
def test_a_mount_missing_from_the_container_table_is_refused(node: Node) -> None:
    """The container's table is the only one that says what is mounted where in it."""
    with mounted(node.at("/tmp"), "-t", "tmpfs", "-o", "mode=1777", "tmpfs"):
        empty = node.root.parent / "mountinfo-without-tmp"
        empty.write_text("")
        with pytest.raises(RefusedFilesystem, match="not in the container's mount table"):
            write_file(
                node.root, "/tmp/oauthtk_1000", TOKEN, **OWNER, confined=Confined(str(empty))
            )
        assert os.listdir(node.at("/tmp")) == []


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/tmp/oauthtk_1000", True),
        ("/tmp/a/b/token", True),
        ("/tmp//oauthtk_1000", True),
        ("/tmpfoo/token", False),
        ("/tmp/../etc/passwd", False),
        ("/tmp/./../etc/passwd", False),
        ("//etc/passwd", False),
        ("/../tmp/token", True),
        ("/etc/passwd", False),
    ],
)
def test_path_prefixes_match_whole_components_after_normalisation(path: str, allowed: bool) -> None:
    assert path_allowed(path, ("/tmp/",)) is allowed
    assert path_allowed(path, ("/tmp",)) is allowed
    assert path_allowed(path, ("/",))


def test_mount_table_lines_are_unescaped_and_malformed_ones_skipped() -> None:
    text = (
        b"36 35 98:0 / /a\\040b rw - ext4 /dev/root rw\n"
        b"37 36 0:40 / /a\\040b/c rw shared:3 - fuse.squashfuse x rw\n"
        b"garbage\n"
        b"x 36 0:41 / /d rw - tmpfs t rw\n"
    )
    assert [(m.id, m.parent, m.mountpoint, m.fstype) for m in _parse_mountinfo(text)] == [
        (36, 35, "/a b", "ext4"),
        (37, 36, "/a b/c", "fuse.squashfuse"),
    ]


# The injector's manifest adds SYS_PTRACE, SETUID and SETGID to uid 0, nothing else.
_WITH_THE_MANIFESTS_CAPABILITIES = r"""
import json, sys
from agents.token_refresher.inject import Confined, InjectError, write_file

root = sys.argv[1]
said = {}
for path in ("/tmp/oauthtk_1000", "/home/oauthtk_1000"):
    try:
        said[path] = write_file(
            root, path, b"token", uid=1000, gid=1000, confined=Confined("/proc/self/mountinfo")
        ).written
    except InjectError as err:
        said[path] = err.reason
print(json.dumps(said))
"""


@needs_root
def test_the_manifests_capabilities_are_enough_for_a_confined_write(node: Node) -> None:
    """setfsuid/setfsgid need CAP_SETUID/CAP_SETGID; nothing overrides file permissions."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux)")
    node.at("/home").mkdir()
    node.at("/home").chmod(0o700)
    node.at("/tmp/oauthtk_1000").write_bytes(b"old")
    os.chown(node.at("/tmp/oauthtk_1000"), 1000, 1000)
    child = subprocess.run(
        [
            setpriv,
            "--inh-caps=-all",
            "--bounding-set=-all,+sys_ptrace,+setuid,+setgid",
            sys.executable,
            "-c",
            _WITH_THE_MANIFESTS_CAPABILITIES,
            str(node.root),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(child.stdout) == {
        "/tmp/oauthtk_1000": True,
        "/home/oauthtk_1000": "permission_denied",
    }
    st = node.at("/tmp/oauthtk_1000").stat()
    assert node.at("/tmp/oauthtk_1000").read_bytes() == b"token"
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o400)
    assert os.listdir(node.at("/home")) == []
