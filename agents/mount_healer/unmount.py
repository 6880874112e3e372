"""`umount2(2)` through libc, the one destructive call of the healer.

A severed mount is unmounted in the autofs root, never rmdir'ed: the directory
belongs to autofs, and the next access through it mounts the volume again.
`MNT_DETACH` is the fallback when a process still holds a file on the dead
mount (EBUSY): the mount leaves the tree at once and is freed when the last
file closes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8  # never follow a symlink planted at the mount point

Umount2 = Callable[[str, int], None]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def umount2(path: str, flags: int) -> None:
    """Call umount2(path, flags); raise OSError with the kernel's errno."""
    if _libc().umount2(os.fsencode(path), ctypes.c_int(flags | UMOUNT_NOFOLLOW)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
