"""`/proc/<pid>/mountinfo`: parsing, and which FUSE mounts lie under which autofs root.

Reading mountinfo touches no mount: it never refreshes an autofs expiry stamp
(design.md, "Hard facts"). Format: Documentation/filesystems/proc.rst, 3.5.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import re
import select
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """Decode the kernel's octal escapes (`\\040` space, `\\011` tab, `\\012`, `\\134`)."""
    if "\\" not in field:  # the common case, and a sweep parses ~1,000 lines
        return field
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


class MountinfoError(OSError):
    """mountinfo cannot be read at all."""


class Mount(NamedTuple):
    """One line of mountinfo (a tuple: cheap to build a thousand times a sweep)."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mountpoint: str
    options: str
    optional: tuple[str, ...]
    fstype: str
    source: str
    super_options: str

    @property
    def device(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def is_fuse(self) -> bool:
        """fuse, fuseblk and their subtypes (`fuse.squashfuse`, `fuse.cvmfs2`, ...)."""
        base = self.fstype.split(".", 1)[0]
        return base in ("fuse", "fuseblk")

    @property
    def is_autofs(self) -> bool:
        return self.fstype == "autofs"

    @property
    def is_slave(self) -> bool:
        """A `master:N` propagation tag: a one-way copy of another mount."""
        return any(tag.startswith("master:") for tag in self.optional)

    def _tag(self, name: str) -> int | None:
        for tag in self.optional:
            key, _, value = tag.partition(":")
            if key == name and value.isdigit():
                return int(value)
        return None

    @property
    def peer_group(self) -> int | None:
        """N of `shared:N`: mounts and unmounts here propagate to the peers and slaves."""
        return self._tag("shared")

    @property
    def master_group(self) -> int | None:
        """N of `master:N`: this mount receives from peer group N and sends nothing back."""
        return self._tag("master")


def parse_line(line: str) -> Mount:
    """Parse one mountinfo line; ValueError if it is malformed.

    Optional fields (`shared:N`, `master:N`, `propagate_from:N`, `unbindable`,
    and any future ones) run up to the `-` separator, so there may be none.
    After it come exactly three: filesystem type, source, super options.
    """
    # Fields are separated by single spaces; a space inside a field is escaped
    # as \\040, so " - " can only be the separator and an empty source shows
    # as two spaces in a row. Other characters, \r included, are printed raw.
    left, sep, right = line.removesuffix("\n").partition(" - ")
    fields = left.split(" ")
    fs = right.split(" ")
    if not sep or len(fields) < 6 or len(fs) != 3:
        raise ValueError(f"malformed mountinfo line: {line!r}")
    major_text, colon, minor_text = fields[2].partition(":")
    if not colon:
        raise ValueError(f"bad major:minor {fields[2]!r}")
    # Positional: a sweep may parse a thousand lines.
    return Mount(
        int(fields[0]),
        int(fields[1]),
        int(major_text),
        int(minor_text),
        unescape(fields[3]),
        unescape(fields[4]),
        fields[5],
        tuple(fields[6:]),
        unescape(fs[0]),
        unescape(fs[1]),
        fs[2],
    )


def split_lines(text: str) -> list[str]:
    """mountinfo lines: split at \\n only, the one line break the kernel escapes.

    `str.splitlines()` also breaks at \\r, \\x0b, \\x0c, \\x1c-\\x1e, \\x85,
    U+2028 and U+2029, which the kernel prints raw inside a path
    (fs/proc_namespace.c `mangle`, `seq_path(..., " \\t\\n\\\\")`), so a mount
    named with one would vanish from the table.
    """
    lines = text.split("\n")
    if lines and not lines[-1]:
        lines.pop()  # the text ends with a newline
    return lines


@dataclass(frozen=True)
class MountTable:
    """The mounts of one read of mountinfo, in kernel order, and lines that did not parse."""

    mounts: tuple[Mount, ...]
    malformed: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, known: dict[str, Mount] | None = None) -> MountTable:
        """Parse mountinfo text; malformed lines are kept aside, not fatal.

        `known` maps lines of an earlier read to their parse; it is refilled
        with this read's lines. The kernel prints an unchanged mount the same
        way every time, so after a change only the new lines are parsed.
        """
        earlier = dict(known) if known else {}
        if known is not None:
            known.clear()
        mounts: list[Mount] = []
        malformed: list[str] = []
        for line in split_lines(text):
            mount = earlier.get(line)
            if mount is None:
                if not line:
                    continue
                try:
                    mount = parse_line(line)
                except ValueError:
                    malformed.append(line)
                    continue
            if known is not None:
                known[line] = mount
            mounts.append(mount)
        return cls(tuple(mounts), tuple(malformed))

    @functools.cached_property
    def by_id(self) -> dict[int, Mount]:
        return {m.mount_id: m for m in self.mounts}

    def top_at(self, mountpoint: str) -> Mount | None:
        """The mount that a path walk to `mountpoint` reaches (the last stacked one).

        A mount stacked on the same path has the lower one as its parent, so the
        top is the one no other mount at that path names as parent.
        """
        here = [m for m in self.mounts if m.mountpoint == mountpoint]
        parents = {m.parent_id for m in here}
        tops = [m for m in here if m.mount_id not in parents]
        return tops[-1] if tops else None

    def autofs_roots(self, wanted: Iterable[str] = ()) -> tuple[list[Mount], list[str]]:
        """The autofs mounts to heal under, and the wanted paths that are not autofs.

        With no `wanted` paths: every autofs mount that is not a slave copy of
        another (consumers' `--rbind --make-slave` copies must not be healed
        separately: unmounting only a copy leaves the root broken). One root
        per autofs superblock (device), the first in mount order.
        """
        autofs = [m for m in self.mounts if m.is_autofs]
        wanted = [p.rstrip("/") or "/" for p in wanted]
        if wanted:
            roots = []
            missing = []
            for path in wanted:
                match = [m for m in autofs if m.mountpoint == path]
                if match:
                    roots.append(match[-1])
                else:
                    missing.append(path)
            return roots, missing
        seen: set[str] = set()
        roots = []
        for m in autofs:
            if m.is_slave or m.device in seen:
                continue
            seen.add(m.device)
            roots.append(m)
        return roots, []

    def master_of(self, copy: Mount) -> Mount | None:
        """The mount a slave copy receives from, if visible here: `shared:N` = its `master:N`.

        Same superblock (device) too; of several peers, the first in mount order
        (an unmount in one propagates to every peer).
        """
        group = copy.master_group
        if group is None:
            return None
        return next(
            (m for m in self.mounts if m.peer_group == group and m.device == copy.device), None
        )

    def twin_in(self, master: Mount, copy: Mount, mount: Mount) -> Mount | None:
        """The mount under `master` that `mount` (under its slave `copy`) is a copy of.

        At the same path relative to the two roots (their `root` fields taken
        into account) and with the same device, so the same FUSE connection.
        """
        if not mount.mountpoint.startswith(copy.mountpoint.rstrip("/") + "/"):
            return None
        inside = posixpath.join(copy.root, mount.mountpoint[len(copy.mountpoint) :].lstrip("/"))
        if inside != master.root and not inside.startswith(master.root.rstrip("/") + "/"):
            return None  # the copy shows a part of the filesystem the master does not
        path = posixpath.join(master.mountpoint, inside[len(master.root) :].lstrip("/"))
        here = [m for m in self.fuse_under(master) if m.mountpoint == path]
        return next((m for m in reversed(here) if m.device == mount.device), None)

    def fuse_under(self, root: Mount) -> list[Mount]:
        """FUSE mounts whose chain of parents reaches `root` (stacked ones included)."""
        by_id = self.by_id
        found = []
        for m in self.mounts:
            if not m.is_fuse:
                continue
            parent = by_id.get(m.parent_id)
            hops = 0
            while parent is not None and parent.mount_id != root.mount_id and hops < 64:
                if parent.parent_id == parent.mount_id:
                    parent = None
                    break
                parent = by_id.get(parent.parent_id)
                hops += 1
            if parent is not None and parent.mount_id == root.mount_id:
                found.append(m)
        return found


def read_mount_table(proc_root: Path | str = "/proc") -> MountTable:
    """Read `<proc_root>/self/mountinfo` (the mount namespace the agent acts in)."""
    path = Path(proc_root) / "self" / "mountinfo"
    try:
        # newline="": no universal newlines, which would turn a \r in a path into \n.
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            text = f.read()
    except OSError as err:
        raise MountinfoError(err.errno, f"cannot read {path}: {err.strerror}") from err
    return _logged(MountTable.parse(text))


def _logged(table: MountTable) -> MountTable:
    for line in table.malformed:
        log.warning("skipping malformed mountinfo line: %r", line)
    return table


class MountinfoSource:
    """The mount table, parsed again only when the kernel says it changed.

    A poller of mountinfo gets POLLPRI|POLLERR after any mount or unmount in
    its namespace, propagated ones included (fs/proc_namespace.c
    `mounts_poll`; systemd and libmount rely on it). Parsing 1,000 lines
    costs more than the rest of a sweep, so an unchanged table is reused; it
    is still re-read every `max_age` seconds, in case.
    """

    def __init__(
        self,
        proc_root: Path | str = "/proc",
        *,
        max_age: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(proc_root) / "self" / "mountinfo"
        self.max_age = max_age
        self._clock = clock
        self._fd: int | None = None
        self._poller = select.poll()
        self._table: MountTable | None = None
        self._known: dict[str, Mount] = {}
        self._read_at = 0.0
        self.reads = 0

    def __call__(self) -> MountTable:
        if self._table is None or self._changed() or self._clock() - self._read_at > self.max_age:
            self._table = _logged(MountTable.parse(self._read(), self._known))
            self._read_at = self._clock()
            self.reads += 1
        return self._table

    def _changed(self) -> bool:
        return any(mask & (select.POLLPRI | select.POLLERR) for _, mask in self._poller.poll(0))

    def _read(self) -> str:
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                self._poller.register(self._fd, select.POLLPRI | select.POLLERR)
            self._changed()  # consume a pending change: this read sees it
            os.lseek(self._fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(self._fd, 1 << 16):
                chunks.append(chunk)
        except OSError as err:
            self.close()
            raise MountinfoError(err.errno, f"cannot read {self.path}: {err.strerror}") from err
        return b"".join(chunks).decode("utf-8", errors="surrogateescape")

    def close(self) -> None:
        if self._fd is not None:
            self._poller.unregister(self._fd)
            os.close(self._fd)
            self._fd = None
        self._table = None
