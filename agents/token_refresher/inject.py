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

Owners are host IDs: a container in a user namespace needs them mapped first.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

log = logging.getLogger(__name__)

Root = str | os.PathLike[str] | int

# openat2(2) is 437 on x86_64 (arch/x86/entry/syscalls/syscall_64.tbl) and on
# arm64 (include/uapi/asm-generic/unistd.h). Elsewhere we refuse rather than guess.
SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}

# include/uapi/linux/openat2.h
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10
PARENT_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS

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


@dataclass(frozen=True)
class _Wanted:
    """The file as it should be."""

    content: bytes
    mode: int
    uid: int
    gid: int


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
) -> WriteResult:
    """Make `path` inside the container a regular file with this content, mode and owner.

    `root` is the container's root: a path (opened here) or an fd from
    `open_root` (left open). `path` is absolute as the container sees it.
    Skips the write when the file is already exactly right. `durable` also
    syncs the directory after the rename (a token file that must survive a
    crash: a rotated refresh token); files rewritten on every refresh and
    every start skip it. Raises UnsafePath, ReadOnly, NoSuchDirectory or
    InjectError; messages never hold the content.
    """
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"not a file mode: {mode:o}")
    if uid < 0 or gid < 0:
        raise ValueError(f"not an owner: {uid}:{gid}")
    parent, name = _split(path)
    borrowed = isinstance(root, int)
    rootfd = root if isinstance(root, int) else open_root(root)
    try:
        dirfd = _open_parent(rootfd, parent, path)
    finally:
        if not borrowed:
            os.close(rootfd)
    wanted = _Wanted(content, mode, uid, gid)
    try:
        if _in_place(dirfd, name, path, wanted):
            log.debug("%s: already up to date", path)
            return WriteResult(path, written=False, unchanged=True, bytes=0)
        _replace(dirfd, name, path, wanted, durable=durable)
    finally:
        os.close(dirfd)
    log.debug("%s: wrote %d bytes", path, len(content))
    return WriteResult(path, written=True, unchanged=False, bytes=len(content))


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
        pathfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except FileNotFoundError:
        return False
    except OSError as err:
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
    tmpfd, tmpname = _create_temp(dirfd, path)
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
            raise _wrap(failure, path, "cannot write") from failure
        raise
    if not durable:
        return
    try:
        os.fsync(dirfd)  # the rename itself survives a crash
    except OSError as err:
        if err.errno != errno.EINVAL:  # EINVAL: this filesystem cannot sync directories
            raise _wrap(err, path, "written, but cannot sync its directory") from err


def _create_temp(dirfd: int, path: str) -> tuple[int, str]:
    """A new file with a random name in the directory; O_EXCL never follows a symlink."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_TEMP_ATTEMPTS):
        tmpname = f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
        try:
            return os.open(tmpname, flags, 0o600, dir_fd=dirfd), tmpname
        except FileExistsError:
            continue  # planted or a collision: a new name
        except OSError as err:
            raise _wrap(err, path, "cannot create a temp file for it") from err
    raise InjectError(errno.EEXIST, f"{path}: no free temp file name")


def _wrap(err: OSError, path: str, what: str) -> InjectError:
    if err.errno == errno.EROFS:
        return ReadOnly(errno.EROFS, f"{path}: {what}: read-only filesystem")
    return InjectError(err.errno, f"{path}: {what}: {err.strerror}")
