"""Files written into a container's root filesystem from the node, with no exec.

The node agent reaches a container through `/proc/<pid>/root` of one of its
processes: a magic link to the root of that process's mount namespace. Every
path below it belongs to the container, which may be hostile: it can plant
`/tmp/oauthtk_0 -> /etc/shadow`, make `/tmp` a symlink to `/etc`, or swap
either in while we work. A plain `open("/proc/<pid>/root/tmp/oauthtk_0")`
would resolve an absolute symlink (and `..`) against the *host's* root, with
the agent's privileges.

So paths are never resolved by the host's rules:
- The parent directory is opened with openat2(2) relative to the pinned root,
  `RESOLVE_IN_ROOT` (`/` and `..` stop at the container's root) plus
  `RESOLVE_NO_SYMLINKS` (a parent reached through any symlink is refused and
  reported, not followed, even one that would stay inside) and
  `RESOLVE_NO_MAGICLINKS` (no `/proc/self/root` tricks). There is no fallback
  without openat2 (Linux < 5.6, or a seccomp profile that hides it): it fails.
- The file itself is only ever named relative to that directory fd. A symlink
  or anything but a regular file at the target is refused and left in place.
- The new content goes to a fresh temp file in the same directory, renamed
  over the target: readers see the old or the new token, never half of one,
  and nothing is ever written into an inode the container may have linked
  elsewhere.

A tenant's write (`confined`, as the injector asks) is also held to what
the file's owner could do and to filesystems that answer:
- It runs with the owner's rights: the writing thread alone takes the
  owner's fsuid/fsgid, no supplementary group, and no capability that
  bypasses file permissions; so the kernel's own checks (search and write
  permission, the sticky bit) apply as to that user. Restored afterwards,
  and checked. A file owned by another uid is never replaced.
- The path is walked one component at a time, each mount's filesystem type
  read from the mount tables in /proc before anything is looked up in it:
  a FUSE or network filesystem (whose server may be stopped) is refused
  without being asked anything.

Owners are host IDs: a container in a user namespace needs them mapped first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import posixpath
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

log = logging.getLogger(__name__)

Root = str | os.PathLike[str] | int

# openat2(2) is 437 on x86_64 (arch/x86/entry/syscalls/syscall_64.tbl) and on
# arm64 (include/uapi/asm-generic/unistd.h). Elsewhere we refuse rather than guess.
SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}

# include/uapi/linux/openat2.h
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
PARENT_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS
# One component of a confined walk: no symlink, and no mount crossed unseen
# (EXDEV instead, so the mount's type is looked up before entering it).
STEP_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV

# Per-thread credential syscalls, called raw: glibc's setgroups() (like
# setuid()) is broadcast to every thread of the process (nptl's setxid), the
# raw syscall changes the calling thread's credentials only. Numbers from
# arch/x86/entry/syscalls/syscall_64.tbl and include/uapi/asm-generic/unistd.h.
SYS_SETFSUID = {"x86_64": 122, "aarch64": 151}
SYS_SETFSGID = {"x86_64": 123, "aarch64": 152}
SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159}
SYS_CAPGET = {"x86_64": 125, "aarch64": 90}
SYS_CAPSET = {"x86_64": 126, "aarch64": 91}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# The capabilities a change of fsuid from 0 clears (capabilities(7), "Effect of
# user ID changes on capabilities"): CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH,
# FOWNER, FSETID, LINUX_IMMUTABLE, MKNOD, MAC_OVERRIDE. Dropped explicitly
# too, so that a file owned by uid 0 is written without them as well.
FS_CAPABILITIES = sum(1 << bit for bit in (0, 1, 2, 3, 4, 9, 27, 32))

REFUSED_FSTYPES = frozenset(
    {
        # FUSE: its daemon answers every lookup, and may be stopped or the tenant's.
        "fuse",
        "fuseblk",
        "virtiofs",
        # Network and cluster filesystems: a server that stops answering hangs the call.
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "9p",
        "afs",
        "coda",
        "lustre",
        "gpfs",
        "glusterfs",
        "beegfs",
        "orangefs",
        "pvfs2",
        "ocfs2",
        "gfs2",
        "vboxsf",
        "wekafs",
        # A trigger mount: entering it may wait for the automount daemon.
        "autofs",
    }
)
"""Filesystem types a confined write never enters (`fuse.<subtype>` and
`fuseblk.<subtype>` included)."""

MAX_MOUNTINFO_BYTES = 1 << 20
"""A container's mount table is read up to this size (about 8,000 mounts)."""

TEMP_PREFIX = ".oauthtk."
TEMP_SUFFIX = ".tmp"
# openat2 with RESOLVE_IN_ROOT answers EAGAIN when a rename or mount raced
# with a `..` step (openat2(2)); the container controls both, so retry boundedly.
_RESOLVE_ATTEMPTS = 8
_TEMP_ATTEMPTS = 8


class InjectError(OSError):
    """A file could not be written into a container; `reason` labels it for metrics."""

    reason: ClassVar[str] = "error"


class UnsafePath(InjectError):
    """The path is not one we will write: a symlink at the target or in the parent
    path, a target that is not a regular file, or a path that names no file."""

    reason: ClassVar[str] = "unsafe_path"


class ReadOnly(InjectError):
    """The container's filesystem at that path is read-only (EROFS)."""

    reason: ClassVar[str] = "read_only"


class NoSuchDirectory(InjectError):
    """The parent directory does not exist in the container (an image without /tmp?)."""

    reason: ClassVar[str] = "no_directory"


class PathNotAllowed(InjectError):
    """The path lies outside the prefixes the node's admin allows for token files."""

    reason: ClassVar[str] = "path_not_allowed"


class ForeignOwner(InjectError):
    """A file owned by another uid than the requested owner is at the path: left in place."""

    reason: ClassVar[str] = "foreign_owner"


class PermissionDenied(InjectError):
    """The owner may not search a directory of the path, or create files in the last one."""

    reason: ClassVar[str] = "permission_denied"


class RefusedFilesystem(InjectError):
    """The path crosses into a FUSE or network filesystem (or one not in the mount table)."""

    reason: ClassVar[str] = "refused_filesystem"


class CredentialsNotRestored(InjectError):
    """The writing thread's credentials could not be put back: the thread must retire."""

    reason: ClassVar[str] = "internal"


@dataclass(frozen=True)
class Confined:
    """How a write for a tenant is held in (see the module docstring)."""

    mountinfo: str
    """The container's mount table, `/proc/<pid>/mountinfo` of the process whose root
    is written under: mount points in it are paths as the container sees them."""
    fallback_mountinfo: str = "/proc/self/mountinfo"
    """Where a mount ID missing from it is looked up too (mount IDs are unique on
    the host): a process chrooted without a mount namespace of its own does not
    list the mount of its root directory."""
    refused_fstypes: frozenset[str] = field(default=REFUSED_FSTYPES)


@dataclass(frozen=True)
class _Wanted:
    """The file as it should be."""

    content: bytes
    mode: int
    uid: int
    gid: int
    confined: bool = False


@dataclass(frozen=True)
class WriteResult:
    """What write_file did to `path` (as the container sees it)."""

    path: str
    written: bool
    unchanged: bool
    """Content, mode and owner were already right: nothing was touched."""
    bytes: int
    """Bytes written: the content's size, or 0 when unchanged."""


def container_root(pid: int, proc_root: str | os.PathLike[str] = "/proc") -> Path:
    """`/proc/<pid>/root` of a process of the container: its mount namespace's root.

    Reading the link gives a useless string; *opening* it (`open_root`) gives
    the container's root directory, as long as the process lives.
    """
    if pid < 1:
        raise ValueError(f"not a process ID: {pid}")
    return Path(proc_root) / str(pid) / "root"


def open_root(root: str | os.PathLike[str]) -> int:
    """An O_PATH fd on `root`, pinning it for several writes; the caller closes it.

    `root` is trusted (a host path such as `container_root(pid)`), so the magic
    link is followed here, and only here. The fd keeps naming that container's
    root even if the process exits and its PID is reused. Opening another
    process's `/proc/<pid>/root` needs ptrace read access (CAP_SYS_PTRACE).
    """
    try:
        return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as err:
        raise InjectError(err.errno, f"container root {root} is gone") from err
    except OSError as err:
        raise InjectError(err.errno, f"cannot open container root {root}: {err.strerror}") from err


def write_file(
    root: Root,
    path: str,
    content: bytes,
    *,
    mode: int = 0o400,
    uid: int,
    gid: int,
    durable: bool = False,
    confined: Confined | None = None,
) -> WriteResult:
    """Make `path` inside the container a regular file with this content, mode and owner.

    `root` is the container's root: a path (opened here) or an fd from
    `open_root` (left open). `path` is absolute as the container sees it.
    Skips the write when the file is already exactly right. `durable` also
    syncs the directory after the rename (a token file that must survive a
    crash: a rotated refresh token); files rewritten on every refresh and
    every start skip it. `confined` (a tenant's file) writes with the owner's
    rights, never replaces another uid's file and refuses FUSE and network
    filesystems (module docstring). Raises UnsafePath, ReadOnly,
    NoSuchDirectory, PermissionDenied, ForeignOwner, RefusedFilesystem or
    InjectError; messages never hold the content.
    """
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"not a file mode: {mode:o}")
    if uid < 0 or gid < 0:
        raise ValueError(f"not an owner: {uid}:{gid}")
    parent, name = _split(path)
    borrowed = isinstance(root, int)
    rootfd = root if isinstance(root, int) else open_root(root)
    wanted = _Wanted(content, mode, uid, gid, confined=confined is not None)
    try:
        if confined is None:
            rights: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        else:
            # Read with the injector's own rights: the tables are its, not the tenant's.
            tables = _MountTables(confined).load()
            rights = _owner_rights(uid, gid)
        with rights:
            if confined is None:
                dirfd = _open_parent(rootfd, parent, path)
            else:
                dirfd = _walk_parent(rootfd, parent, path, tables, uid=uid)
            try:
                if _in_place(dirfd, name, path, wanted):
                    log.debug("%s: already up to date", path)
                    return WriteResult(path, written=False, unchanged=True, bytes=0)
                _replace(dirfd, name, path, wanted, durable=durable)
            finally:
                os.close(dirfd)
    finally:
        if not borrowed:
            os.close(rootfd)
    log.debug("%s: wrote %d bytes", path, len(content))
    return WriteResult(path, written=True, unchanged=False, bytes=len(content))


def normal_path(path: str) -> str:
    """`path` as resolved in a root with no symlink followed: `.`, `..` and repeated
    slashes folded (`..` stops at `/`, as RESOLVE_IN_ROOT does)."""
    return posixpath.normpath("/" + path.lstrip("/"))


def path_allowed(path: str, prefixes: Sequence[str]) -> bool:
    """Whether `path` (normalised) lies under one of `prefixes`, on component
    boundaries: `/tmp/` allows `/tmp/x` and `/tmp/a/b`, never `/tmpfoo/x`."""
    normal = normal_path(path)
    for prefix in prefixes:
        allowed = normal_path(prefix)
        if allowed in ("/", normal) or normal.startswith(allowed + "/"):
            return True
    return False


def _split(path: str) -> tuple[str, str]:
    """(parent, name) of an absolute file path; UnsafePath if it names no file."""
    if not path.startswith("/") or "\0" in path:
        raise UnsafePath(errno.EINVAL, f"{path!r}: not an absolute path")
    parent, _, name = path.rpartition("/")
    # "." and ".." would name the directory itself or one outside the fd we
    # resolved safely: *at() calls take ".." from the dirfd, with no root to stop at.
    if name in ("", ".", ".."):
        raise UnsafePath(errno.EINVAL, f"{path!r}: does not name a file")
    return parent or "/", name


@functools.cache
def _syscall() -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    syscall: Callable[..., int] = libc.syscall
    syscall.restype = ctypes.c_long  # type: ignore[attr-defined]
    return syscall


@functools.cache
def _machine() -> str:
    return os.uname().machine


class _OpenHow(ctypes.Structure):
    """struct open_how (include/uapi/linux/openat2.h)."""

    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2) with no mode (so no O_CREAT); raises OSError with the kernel's errno.

    ENOSYS also when the machine has no known syscall number: never a guess.
    """
    number = SYS_OPENAT2.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"openat2 number unknown on {os.uname().machine}")
    how = _OpenHow(flags=flags, mode=0, resolve=resolve)
    fd = _syscall()(
        ctypes.c_long(number),
        ctypes.c_long(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def _open_parent(rootfd: int, parent: str, path: str) -> int:
    """A directory fd for `parent`, resolved inside the root and through no symlink."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # O_RDONLY, not O_PATH: fsync needs it
    for _ in range(_RESOLVE_ATTEMPTS):
        try:
            return openat2(rootfd, parent, flags, PARENT_RESOLVE)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EINTR):
                continue
            if err.errno == errno.ENOSYS:
                raise InjectError(
                    errno.ENOSYS,
                    "openat2 unavailable (Linux >= 5.6 needed, or seccomp blocks it): "
                    "refusing to resolve container paths without it",
                ) from err
            if err.errno == errno.ELOOP:
                raise UnsafePath(
                    errno.ELOOP, f"{path}: parent directory {parent} is reached through a symlink"
                ) from err
            if err.errno == errno.EXDEV:
                raise UnsafePath(errno.EXDEV, f"{path}: {parent} leaves the container") from err
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NoSuchDirectory(
                    err.errno, f"{path}: no directory {parent} in the container"
                ) from err
            raise InjectError(err.errno, f"{path}: cannot open {parent}: {err.strerror}") from err
    raise InjectError(errno.EAGAIN, f"{path}: {parent} kept changing while resolving it")


def _walk_parent(rootfd: int, parent: str, path: str, tables: _MountTables, *, uid: int) -> int:
    """An O_PATH fd for `parent`, walked one component at a time from the root.

    Each step is an openat2 of one name with RESOLVE_NO_XDEV: a step onto a
    mount point fails with EXDEV instead of entering the mount, so the
    mount's filesystem type is looked up (in the mount tables, by the kernel's
    mount ID) before anything is looked up inside it. A FUSE or network
    filesystem is so refused without ever being asked: even fstatfs(2) on it
    would wait for its server.
    """
    fd = os.dup(rootfd)
    try:
        mount = tables.by_id(_mount_id(fd))
        _check_mount(mount, "/", path, tables.refused)
        assert mount is not None
        where = ""
        for component in normal_path(parent).strip("/").split("/") if parent != "/" else []:
            at = f"{where}/{component}"
            try:
                step = _step(fd, component, STEP_RESOLVE)
            except OSError as err:
                if err.errno != errno.EXDEV:
                    raise _walk_error(err, path, parent, at, uid) from err
                # A mount point: its mount is the one on top at this path, mounted
                # (maybe stacked) on the mount we are in.
                mount = tables.top_at(mount.id, at)
                _check_mount(mount, at, path, tables.refused)
                assert mount is not None
                try:
                    step = _step(fd, component, STEP_RESOLVE & ~RESOLVE_NO_XDEV)
                except OSError as err2:
                    raise _walk_error(err2, path, parent, at, uid) from err2
                if _mount_id(step) != mount.id:
                    os.close(step)
                    raise RefusedFilesystem(
                        errno.EAGAIN, f"{path}: the mounts at {at} changed while resolving it"
                    ) from err
            os.close(fd)
            fd, where = step, at
        return fd
    except BaseException:
        os.close(fd)
        raise


def _step(dirfd: int, name: str, resolve: int) -> int:
    flags = os.O_PATH | os.O_CLOEXEC
    for _ in range(_RESOLVE_ATTEMPTS):
        try:
            return openat2(dirfd, name, flags, resolve)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EINTR):
                raise
    raise OSError(errno.EAGAIN, "kept changing while resolving it", name)


def _walk_error(err: OSError, path: str, parent: str, at: str, uid: int) -> InjectError:
    if err.errno == errno.ENOSYS:
        return InjectError(
            errno.ENOSYS,
            "openat2 unavailable (Linux >= 5.6 needed, or seccomp blocks it): "
            "refusing to resolve container paths without it",
        )
    if err.errno == errno.ELOOP:
        return UnsafePath(
            errno.ELOOP, f"{path}: parent directory {parent} is reached through a symlink ({at})"
        )
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return NoSuchDirectory(err.errno, f"{path}: no directory {parent} in the container")
    if err.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(
            err.errno, f"{path}: uid {uid} may not search {at}: refused (its permissions)"
        )
    return InjectError(err.errno, f"{path}: cannot open {at}: {err.strerror}")


def _mount_id(fd: int) -> int:
    """The kernel's ID of the mount `fd` is on, from /proc/self/fdinfo: no filesystem asked."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
        for line in info.read(4096).splitlines():
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise InjectError(errno.ENOTSUP, "no mnt_id in /proc/self/fdinfo (Linux >= 3.15 needed)")


def _check_mount(mount: _Mount | None, at: str, path: str, refused: frozenset[str]) -> None:
    if mount is None:
        raise RefusedFilesystem(
            errno.ENOENT, f"{path}: the mount at {at} is not in the container's mount table"
        )
    if _refused(mount.fstype, refused):
        raise RefusedFilesystem(
            errno.EREMOTE,
            f"{path}: {at} is on a {mount.fstype} filesystem; FUSE and network filesystems "
            "are refused (a server that stops answering would hang the write)",
        )


def _refused(fstype: str, refused: frozenset[str]) -> bool:
    # mountinfo names a FUSE filesystem "fuse.<subtype>" (fuse.squashfuse, fuse.cvmfs2).
    return fstype in refused or fstype.partition(".")[0] in refused


@dataclass(frozen=True)
class _Mount:
    id: int
    parent: int
    mountpoint: str
    fstype: str


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _parse_mountinfo(text: bytes) -> list[_Mount]:
    """The fields a walk needs from proc_pid_mountinfo(5) lines; malformed lines skipped."""
    mounts = []
    for line in text.split(b"\n"):
        fields, sep, rest = line.partition(b" - ")
        head, tail = fields.split(b" "), rest.split(b" ")
        if not sep or len(head) < 6 or not tail[0]:
            continue
        try:
            mount_id, parent = int(head[0]), int(head[1])
        except ValueError:
            continue
        # The kernel escapes space, tab, newline and backslash as \ooo (fs/proc_namespace.c).
        point = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), head[4])
        mounts.append(_Mount(mount_id, parent, os.fsdecode(point), os.fsdecode(tail[0])))
    return mounts


class _MountTables:
    """The mount tables one confined write looks at, each read once, when first needed."""

    def __init__(self, confined: Confined) -> None:
        self._confined = confined
        self._read: dict[str, list[_Mount]] = {}

    def _table(self, source: str) -> list[_Mount]:
        if source not in self._read:
            try:
                with open(source, "rb") as table:
                    text = table.read(MAX_MOUNTINFO_BYTES + 1)
            except OSError as err:
                raise InjectError(
                    err.errno, f"cannot read the mount table {source}: {err.strerror}"
                ) from err
            if len(text) > MAX_MOUNTINFO_BYTES:
                raise RefusedFilesystem(
                    errno.E2BIG,
                    f"the container's mount table is over {MAX_MOUNTINFO_BYTES} bytes; refused",
                )
            self._read[source] = _parse_mountinfo(text)
        return self._read[source]

    @property
    def refused(self) -> frozenset[str]:
        return self._confined.refused_fstypes

    def load(self) -> _MountTables:
        """Read the container's table now (the fallback, /proc/self's, only if needed:
        /proc/<pid>/mountinfo files are readable by every uid)."""
        self._table(self._confined.mountinfo)
        return self

    def by_id(self, mount_id: int) -> _Mount | None:
        for source in (self._confined.mountinfo, self._confined.fallback_mountinfo):
            for mount in self._table(source):
                if mount.id == mount_id:
                    return mount
        return None

    def top_at(self, parent: int, mountpoint: str) -> _Mount | None:
        """The mount a lookup of `mountpoint` in mount `parent` lands on (the top of a stack)."""
        table = self._table(self._confined.mountinfo)
        found = None
        while True:
            above = next(
                (m for m in table if m.parent == parent and m.mountpoint == mountpoint), None
            )
            if above is None or above is found:
                return found
            found, parent = above, above.id


# -- the owner's rights, for the calling thread only


class _CapHeader(ctypes.Structure):
    """struct __user_cap_header_struct (include/uapi/linux/capability.h)."""

    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    """struct __user_cap_data_struct; version 3 takes two (capabilities 0-31, 32-63)."""

    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


@dataclass(frozen=True)
class _Credentials:
    fsuid: int
    fsgid: int
    groups: tuple[int, ...]
    effective: int
    permitted: int
    inheritable: int


def _raw(table: dict[str, int], *args: object) -> int:
    """A raw syscall by per-architecture number; OSError on failure."""
    number = table.get(_machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"syscall number unknown on {_machine()}")
    result = _syscall()(ctypes.c_long(number), *args)
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _setfsuid(uid: int) -> int:
    """setfsuid(2): returns the previous fsuid; an invalid uid (2**32 - 1) only reads it."""
    return _raw(SYS_SETFSUID, ctypes.c_long(uid))


def _setfsgid(gid: int) -> int:
    return _raw(SYS_SETFSGID, ctypes.c_long(gid))


def _setgroups(groups: tuple[int, ...]) -> None:
    array = (ctypes.c_uint32 * max(len(groups), 1))(*groups)
    _raw(SYS_SETGROUPS, ctypes.c_long(len(groups)), array)


def _capabilities() -> tuple[int, int, int]:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)  # pid 0: the calling thread
    data = (_CapData * 2)()
    _raw(SYS_CAPGET, ctypes.byref(header), data)
    return tuple(
        getattr(data[0], name) | getattr(data[1], name) << 32
        for name in ("effective", "permitted", "inheritable")
    )


def _set_capabilities(effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for half in (0, 1):
        shift = 32 * half
        data[half].effective = (effective >> shift) & 0xFFFFFFFF
        data[half].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[half].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _raw(SYS_CAPSET, ctypes.byref(header), data)


_NO_ID = 2**32 - 1


def _credentials() -> _Credentials:
    """The calling thread's filesystem credentials (getgroups(2) reads the thread's own)."""
    effective, permitted, inheritable = _capabilities()
    return _Credentials(
        _setfsuid(_NO_ID),
        _setfsgid(_NO_ID),
        tuple(sorted(os.getgroups())),
        effective,
        permitted,
        inheritable,
    )


@contextlib.contextmanager
def _owner_rights(uid: int, gid: int) -> Iterator[None]:
    """The calling thread acts on files as uid:gid, with no supplementary group and
    no capability that overrides file permissions; restored after, and checked.

    fsuid, fsgid, groups and capabilities are per-thread credentials in the
    kernel: the other threads keep root's meanwhile.
    """
    saved = _credentials()
    try:
        try:
            _set_capabilities(
                saved.effective & ~FS_CAPABILITIES, saved.permitted, saved.inheritable
            )
            _setgroups(())
            _setfsgid(gid)
            _setfsuid(uid)
        except OSError as err:
            raise InjectError(
                err.errno, f"cannot take the rights of uid {uid}: {err.strerror}"
            ) from err
        now = _credentials()
        if (now.fsuid, now.fsgid, now.groups) != (uid, gid, ()) or (
            now.effective & FS_CAPABILITIES
        ):
            # setfsuid(2) reports no failure: without CAP_SETUID it just does nothing.
            raise InjectError(
                errno.EPERM,
                f"cannot take the rights of uid {uid} gid {gid} (CAP_SETUID and CAP_SETGID "
                "needed): refusing to write with the injector's own",
            )
        yield
    finally:
        _restore(saved)


def _restore(saved: _Credentials) -> None:
    with contextlib.suppress(OSError):
        _setfsuid(saved.fsuid)  # back to 0 re-raises the capabilities dropped
        _setfsgid(saved.fsgid)
        _setgroups(saved.groups)
        _set_capabilities(saved.effective, saved.permitted, saved.inheritable)
    now = _credentials()
    if now != saved:
        log.critical("write thread credentials not restored: %s, wanted %s", now, saved)
        raise CredentialsNotRestored(
            errno.EPERM, "the write thread's credentials could not be restored"
        )


def _in_place(dirfd: int, name: str, path: str, wanted: _Wanted) -> bool:
    """Whether `name` is already a regular file with this content, mode and owner.

    Looked at through O_PATH|O_NOFOLLOW: that opens a symlink itself instead of
    its target, and opens no device or FIFO (open(2): with O_PATH "the file
    itself is not opened"), so nothing the container planted is followed or
    triggered before fstat says what it is. A regular file is then read by
    reopening that very inode through `/proc/self/fd/<fd>`, leaving no window
    to swap in another file between the check and the read.
    """
    try:
        # RESOLVE_NO_XDEV: a file bind-mounted over the name (from anywhere, a FUSE
        # filesystem included) is refused before it is looked at.
        pathfd = openat2(
            dirfd,
            name,
            os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
            RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV,
        )
    except FileNotFoundError:
        return False
    except OSError as err:
        if err.errno == errno.EXDEV:
            raise UnsafePath(errno.EXDEV, f"{path}: is a mount point; refused") from err
        if err.errno in (errno.EACCES, errno.EPERM) and wanted.confined:
            raise PermissionDenied(
                err.errno, f"{path}: uid {wanted.uid} may not look at it: refused"
            ) from err
        raise InjectError(err.errno, f"{path}: cannot look at it: {err.strerror}") from err
    try:
        st = os.fstat(pathfd)
        if stat.S_ISLNK(st.st_mode):
            # Never followed and never replaced: the container planted it.
            raise UnsafePath(errno.ELOOP, f"{path}: is a symlink; refused, left in place")
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(
                errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
                f"{path}: is not a regular file ({stat.filemode(st.st_mode)})",
            )
        if wanted.confined and st.st_uid != wanted.uid:
            # The sticky bit would stop the rename too, but not in a directory
            # others may write without it: never take over someone else's file.
            raise ForeignOwner(
                errno.EPERM,
                f"{path}: is owned by uid {st.st_uid}, not by the file's owner {wanted.uid}; "
                "a file of another uid is never replaced, left in place",
            )
        found = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size)
        if found != (wanted.mode, wanted.uid, wanted.gid, len(wanted.content)):
            return False
        try:
            readfd = os.open(f"/proc/self/fd/{pathfd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise InjectError(err.errno, f"{path}: cannot read it: {err.strerror}") from err
    finally:
        os.close(pathfd)
    try:
        return _read_up_to(readfd, len(wanted.content) + 1) == wanted.content
    except OSError as err:
        raise InjectError(err.errno, f"{path}: cannot read it: {err.strerror}") from err
    finally:
        os.close(readfd)


def _read_up_to(fd: int, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.read(fd, size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _replace(dirfd: int, name: str, path: str, wanted: _Wanted, *, durable: bool) -> None:
    """Write a temp file next to `name` and rename it over `name`.

    The temp file is fsynced before the rename, so the name never points at
    an empty file after a crash; with `durable` the directory is synced too,
    so the rename itself survives one.

    rename(2) replaces the directory entry atomically and never follows a
    symlink at the destination: one swapped in after `_in_place` looked is
    replaced itself, its target untouched (the check before is what turns a
    planted link into a refusal that is reported). A hard link to another
    file loses only its name here; that file's content is never written.
    """
    tmpfd, tmpname = _create_temp(dirfd, path, wanted)
    try:
        try:
            view = memoryview(wanted.content)
            while view:
                view = view[os.write(tmpfd, view) :]
            os.fchown(tmpfd, wanted.uid, wanted.gid)
            os.fchmod(tmpfd, wanted.mode)  # after fchown, which clears set-id bits
            os.fsync(tmpfd)
        finally:
            os.close(tmpfd)
        os.rename(tmpname, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException as failure:
        try:
            os.unlink(tmpname, dir_fd=dirfd)
        except OSError as err:
            log.warning("%s: cannot remove temp file %s: %s", path, tmpname, err.strerror)
        if isinstance(failure, OSError):
            raise _wrap(failure, path, "cannot write", wanted) from failure
        raise
    if not durable:
        return
    try:
        # dirfd may be O_PATH (a confined walk): fsync needs the directory opened.
        syncfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            os.fsync(syncfd)  # the rename itself survives a crash
        finally:
            os.close(syncfd)
    except OSError as err:
        if err.errno != errno.EINVAL:  # EINVAL: this filesystem cannot sync directories
            raise _wrap(err, path, "written, but cannot sync its directory", wanted) from err


def _create_temp(dirfd: int, path: str, wanted: _Wanted) -> tuple[int, str]:
    """A new file with a random name in the directory; O_EXCL never follows a symlink."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_TEMP_ATTEMPTS):
        tmpname = f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
        try:
            return os.open(tmpname, flags, 0o600, dir_fd=dirfd), tmpname
        except FileExistsError:
            continue  # planted or a collision: a new name
        except OSError as err:
            raise _wrap(err, path, "cannot create a temp file for it", wanted) from err
    raise InjectError(errno.EEXIST, f"{path}: no free temp file name")


def _wrap(err: OSError, path: str, what: str, wanted: _Wanted) -> InjectError:
    if err.errno == errno.EROFS:
        return ReadOnly(errno.EROFS, f"{path}: {what}: read-only filesystem")
    if wanted.confined and err.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(
            err.errno,
            f"{path}: {what}: uid {wanted.uid} may not write in its directory "
            "(its permissions, or a sticky directory); refused",
        )
    return InjectError(err.errno, f"{path}: {what}: {err.strerror}")
