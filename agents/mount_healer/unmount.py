"""The one destructive call of the healer: `umount2(2)` of a pinned mount, through libc.

A severed mount is unmounted in the autofs root, never rmdir'ed: the directory
belongs to autofs, and the next access through it mounts the volume again.

The mount is pinned first: an `O_PATH|O_NOFOLLOW` descriptor of its mount
point holds a reference on that very mount, so its mount ID and device cannot
be reused while it is open (fs/namespace.c frees both only with the last
reference), and `umount2("/proc/self/fd/N")` reaches exactly that mount: the
kernel resolves the magic link to the descriptor's (mount, dentry), not by
name. If automount expired it and mounted the volume again meanwhile, the
pinned mount is no longer attached and umount2 fails with EINVAL; the new
mount is never touched.

The pin is itself a reference, so a plain umount2 through it always fails with
EBUSY (`propagate_mount_busy` allows only the caller's lookup and the parent's
reference; measured on 6.1 and 6.18). The healer therefore detaches
(`MNT_DETACH`): the mount leaves the tree at once and is freed with the last
reference, the pin's or a process's that still holds a file on it. For a
severed mount that loses nothing: its connection is gone, every request on it
fails with ENOTCONN, and no dirty data can reach the daemon any more.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8  # for a plain path: never follow a symlink planted at the mount point

AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_STATX_DONT_SYNC = 0x4000  # a FUSE getattr answers from its cache: no request to the daemon
STATX_MNT_ID = 0x1000  # since Linux 5.8

Umount2 = Callable[[str, int], None]


class PinError(OSError):
    """The mount point could not be pinned: nothing was unmounted."""


@dataclass(frozen=True)
class PinnedMount:
    """The mount a descriptor of a mount point holds, as the kernel names it."""

    path: str
    """`/proc/self/fd/N`: umount2 of it reaches this mount and no other."""
    mount_id: int
    device: str
    """`major:minor` of its superblock, as in mountinfo."""


Pin = Callable[[str], contextlib.AbstractContextManager[PinnedMount]]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def umount2(path: str, flags: int) -> None:
    """Call umount2(path, flags); raise OSError with the kernel's errno.

    The healer passes a `PinnedMount.path`, a magic link the kernel must
    follow (UMOUNT_NOFOLLOW would make it EINVAL), so no flag is added here.
    """
    if _libc().umount2(os.fsencode(path), ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


@contextlib.contextmanager
def pin_mount(path: str) -> Iterator[PinnedMount]:
    """Hold the mount a walk to `path` reaches; say which it is (statx, no FUSE request).

    Opening walks the path, which refreshes an autofs expiry stamp
    (fs/autofs/root.c): only pin a mount a probe already found severed.
    `O_PATH` opens nothing in the filesystem and does not trigger an
    automount; `O_NOFOLLOW` pins a symlink planted there as itself (a
    different mount ID), never its target.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise PinError(err.errno, f"cannot pin {path}: {err.strerror}") from err
    try:
        mount_id, device = _statx_mount(fd)
        yield PinnedMount(f"/proc/self/fd/{fd}", mount_id, device)
    finally:
        os.close(fd)


def _statx_mount(fd: int) -> tuple[int, str]:
    # struct statx (include/uapi/linux/stat.h): stx_mask at 0, stx_dev_major at
    # 136, stx_dev_minor at 140, stx_mnt_id at 144; 256 bytes in all.
    buf = (ctypes.c_uint8 * 256)()
    try:
        statx = _libc().statx
    except AttributeError:  # glibc before 2.28
        return fdinfo_mount(fd)
    flags = AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW | AT_STATX_DONT_SYNC
    if statx(fd, b"", flags, STATX_MNT_ID, buf) != 0:
        code = ctypes.get_errno()
        raise PinError(code, f"statx of a pinned mount point: {os.strerror(code)}")
    raw = bytes(buf)
    if not int.from_bytes(raw[0:4], "little") & STATX_MNT_ID:
        return fdinfo_mount(fd)  # kernels before 5.8 (RHEL 8's 4.18)
    major = int.from_bytes(raw[136:140], "little")
    minor = int.from_bytes(raw[140:144], "little")
    return int.from_bytes(raw[144:152], "little"), f"{major}:{minor}"


def fdinfo_mount(fd: int, proc_root: str = "/proc") -> tuple[int, str]:
    """Mount ID and device of a descriptor without statx's STATX_MNT_ID.

    `/proc/self/fdinfo/N` has said `mnt_id:` since Linux 3.15; the device is
    that mount's in mountinfo. Neither asks the filesystem (an fstat would ask
    the FUSE daemon, which may be dead or hung).
    """
    try:
        with open(f"{proc_root}/self/fdinfo/{fd}", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        mount_id = int(fields["mnt_id"])
        with open(f"{proc_root}/self/mountinfo", "rb") as f:
            for line in f.read().split(b"\n"):
                parts = line.split(b" ", 3)
                if len(parts) == 4 and parts[0] == str(mount_id).encode():
                    return mount_id, parts[2].decode()
    except (OSError, KeyError, ValueError) as err:
        raise PinError(errno.ENOSYS, f"no mount ID for a pinned mount point: {err}") from err
    raise PinError(errno.ENOENT, f"mount {mount_id} of a pinned mount point is not in mountinfo")
