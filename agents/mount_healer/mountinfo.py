"""`/proc/<pid>/mountinfo`: parsing, and which FUSE mounts lie under which autofs root.

Reading mountinfo touches no mount: it never refreshes an autofs expiry stamp
(design.md, "Hard facts"). Format: Documentation/filesystems/proc.rst, 3.5.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """Decode the kernel's octal escapes (`\\040` space, `\\011` tab, `\\012`, `\\134`)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


class MountinfoError(OSError):
    """mountinfo cannot be read at all."""


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo."""

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


def parse_line(line: str) -> Mount:
    """Parse one mountinfo line; ValueError if it is malformed.

    Optional fields (`shared:N`, `master:N`, `propagate_from:N`, `unbindable`,
    and any future ones) run up to the `-` separator, so there may be none.
    """
    fields = line.split()
    try:
        sep = fields.index("-", 6)
    except ValueError:
        raise ValueError(f"no '-' separator: {line!r}") from None
    if len(fields) < sep + 3 or sep < 6:
        raise ValueError(f"too few fields: {line!r}")
    major_text, colon, minor_text = fields[2].partition(":")
    if not colon:
        raise ValueError(f"bad major:minor {fields[2]!r}")
    return Mount(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        major=int(major_text),
        minor=int(minor_text),
        root=unescape(fields[3]),
        mountpoint=unescape(fields[4]),
        options=fields[5],
        optional=tuple(fields[6:sep]),
        fstype=unescape(fields[sep + 1]),
        source=unescape(fields[sep + 2]),
        super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
    )


@dataclass(frozen=True)
class MountTable:
    """The mounts of one read of mountinfo, in kernel order, and lines that did not parse."""

    mounts: tuple[Mount, ...]
    malformed: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> MountTable:
        mounts: list[Mount] = []
        malformed: list[str] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                mounts.append(parse_line(line))
            except ValueError:
                malformed.append(line)
        return cls(tuple(mounts), tuple(malformed))

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

    def fuse_under(self, root: Mount) -> list[Mount]:
        """FUSE mounts whose chain of parents reaches `root` (stacked ones included)."""
        by_id = self.by_id()
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
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as err:
        raise MountinfoError(err.errno, f"cannot read {path}: {err.strerror}") from err
    table = MountTable.parse(text)
    for line in table.malformed:
        log.warning("skipping malformed mountinfo line: %r", line)
    return table
