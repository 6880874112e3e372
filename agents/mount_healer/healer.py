"""One sweep: find severed FUSE mounts under autofs roots and unmount them in the root.

Detection touches no healthy mount. A sweep reads mountinfo and fusectl only;
a path walk (stat, statvfs, listdir) through an autofs dentry refreshes its
expiry stamp (fs/autofs/root.c `autofs_mount_wait`), so a healer that probed
every mount would keep them all mounted forever. Only a mount that fusectl
flags (connection aborted, or requests unanswered for `hung_after` seconds) is
probed, in a child process with a timeout, and only a probe that answers with
a dead-endpoint error leads to an unmount.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from agents.mount_healer.config import HealerConfig
from agents.mount_healer.fusectl import (
    ABORTED_MAX_BACKGROUND,
    Connection,
    Fusectl,
    FusectlError,
    FuseFdScan,
    connection_id,
    scan_fuse_fds,
)
from agents.mount_healer.metrics import HealerMetrics
from agents.mount_healer.mountinfo import Mount, MountTable
from agents.mount_healer.probe import Prober, ProbeResult
from agents.mount_healer.unmount import (
    MNT_DETACH,
    Pin,
    PinError,
    PinnedMount,
    Umount2,
    pin_mount,
)

log = logging.getLogger(__name__)

Notify = Callable[[str, str, str], None]
"""(type, reason, message) -> posts a Kubernetes Event; no-op in local mode."""

MOUNT_PROPAGATION = "mount_propagation"
"""Skip reason: the mount is in a slave copy whose master is not visible here."""

REPEAT_WINDOW = 3600.0
"""Seconds over which heals of one mount point are counted (`recent_heals`)."""


class Verdict(StrEnum):
    HEALTHY = "healthy"
    SEVERED = "severed"
    HUNG = "hung"
    SKIPPED = "skipped"


class Action(StrEnum):
    NONE = "none"
    UNMOUNTED = "unmounted"
    DETACHED = "detached"
    WOULD_UNMOUNT = "would-unmount"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass(frozen=True)
class MountReport:
    """What one sweep concluded about one FUSE mount."""

    root: str
    mountpoint: str
    fstype: str
    mount_id: int
    conn_id: int
    verdict: Verdict
    action: Action = Action.NONE
    detail: str = ""
    skip_reason: str = ""
    """Why a `skipped` mount cannot be acted on, as a metric label; empty otherwise."""

    def line(self) -> str:
        """The `--once` output line: path, verdict, action, detail."""
        return "\t".join(
            [_escape(self.mountpoint), str(self.verdict), str(self.action), _escape(self.detail)]
        ).rstrip("\t")


def _escape(text: str) -> str:
    """Octal-escape what would break a tab-separated line, as mountinfo does."""
    return text.replace("\\", "\\134").replace("\t", "\\011").replace("\n", "\\012")


@dataclass
class _Watch:
    """What the healer remembers about one connection between sweeps."""

    waiting_since: float | None = None
    hung_since: float | None = None
    hung_detail: str = ""


@dataclass
class _Candidate:
    root: Mount
    mount: Mount
    conn_id: int
    verdict: Verdict = Verdict.HEALTHY
    action: Action = Action.NONE
    details: list[str] = field(default_factory=list)
    skip_reason: str = ""

    def report(self) -> MountReport:
        return MountReport(
            root=self.root.mountpoint,
            mountpoint=self.mount.mountpoint,
            fstype=self.mount.fstype,
            mount_id=self.mount.mount_id,
            conn_id=self.conn_id,
            verdict=self.verdict,
            action=self.action,
            detail="; ".join(self.details),
            skip_reason=self.skip_reason,
        )


class Healer:
    """The sweep and the state it keeps between sweeps. Every boundary is injected."""

    def __init__(
        self,
        config: HealerConfig,
        *,
        read_table: Callable[[], MountTable],
        fusectl: Fusectl,
        prober: Prober,
        umount2: Umount2,
        metrics: HealerMetrics,
        pin: Pin = pin_mount,
        notify: Notify | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._read_table = read_table
        self._fusectl = fusectl
        self._prober = prober
        self._umount2 = umount2
        self._pin = pin
        self._metrics = metrics
        self._notify = notify
        self._clock = clock
        self._wall_clock = wall_clock
        self._watches: dict[tuple[int, int], _Watch] = {}
        self._warned: set[str] = set()
        self.last_reports: tuple[MountReport, ...] = ()
        self.last_roots: tuple[str, ...] = ()
        self.fusectl_ok = False
        self._fd_scan: FuseFdScan | None = None
        self._layout: list[tuple[Mount, Mount, int, str]] = []
        self.slave_copies: tuple[str, ...] = ()
        """autofs slave copies found when no root was: the manifest's propagation is wrong."""
        self._layout_of: MountTable | None = None
        # (root, mount point) -> monotonic times of its heals within REPEAT_WINDOW.
        # A mount point healed again and again is a FUSE daemon that dies after
        # every remount; mount points come from the autofs maps, so few keys.
        self._heal_times: dict[tuple[str, str], deque[float]] = {}
        self._heal_times_lock = threading.Lock()  # the scrape thread reads them

    # -- the sweep -------------------------------------------------------

    def sweep(self) -> list[MountReport]:
        """One pass over every FUSE mount under the roots; returns a report per mount."""
        started = self._clock()
        table = self._read_table()
        candidates = self._candidates(table)
        self._check_fusectl()
        self._fd_scan = (
            None if self.fusectl_ok or not candidates else scan_fuse_fds(self.config.proc_root)
        )
        now = self._clock()
        to_probe: list[_Candidate] = []
        for cand in candidates:
            # Mounts in a slave copy that cannot be healed are not even read:
            # nothing would be done about them.
            if not cand.skip_reason and self._assess(cand, now):
                to_probe.append(cand)
        if to_probe:
            self._confirm(to_probe, now)
        severed = [c for c in candidates if c.verdict is Verdict.SEVERED]
        if severed:
            self._heal(severed)
        live = {(c.mount.mount_id, c.conn_id) for c in candidates}
        self._watches = {k: w for k, w in self._watches.items() if k in live}
        reports = [c.report() for c in candidates]
        self.last_reports = tuple(reports)
        self._metrics.sweep_duration.observe(self._clock() - started)
        self._metrics.last_sweep.set(self._wall_clock())
        return reports

    def _candidates(self, table: MountTable) -> list[_Candidate]:
        if table is not self._layout_of:
            # The table source returns the same object while the kernel
            # reports no mount change: the selection is still valid.
            self._layout = self._select(table)
            self._layout_of = table
            self._metrics.mountinfo_malformed_lines.set(len(table.malformed))
        return [
            _Candidate(root, mount, conn)
            if not note
            else _Candidate(
                root, mount, conn, Verdict.SKIPPED, details=[note], skip_reason=MOUNT_PROPAGATION
            )
            for root, mount, conn, note in self._layout
        ]

    def _select(self, table: MountTable) -> list[tuple[Mount, Mount, int, str]]:
        """(root, FUSE mount, connection, skip note) for every FUSE mount under the roots.

        A root that is a slave copy (`master:N`) never has its mounts unmounted
        in it: an unmount there does not propagate to the real root, which stays
        severed while the copy caches ENOENT. Its mounts are healed in the
        master (`shared:N`) when that is visible here, else skipped with a note.
        """
        roots, missing = table.autofs_roots(self.config.roots)
        for path in missing:
            self._warn_once(f"missing:{path}", "root %s is not an autofs mount; skipped", path)
        self.slave_copies = ()
        if not roots and not self.config.roots:
            self.slave_copies = tuple(m.mountpoint for m in table.mounts if m.is_autofs)
            if self.slave_copies:
                self._warn_once("only-slaves", "%s", self.only_slaves_message())
        resolved: list[Mount] = []
        seen: set[int] = set()
        layout = []
        for root in roots:
            master = table.master_of(root) if root.is_slave else None
            if root.is_slave:
                self._warn_once(
                    f"slave:{root.mountpoint}",
                    "root %s is a slave copy (%s): %s",
                    root.mountpoint,
                    f"master:{root.master_group}",
                    f"healing in its master {master.mountpoint}"
                    if master is not None
                    else "its master is not visible here, nothing is unmounted; " + PROPAGATION_FIX,
                )
            home = master or root
            if home not in resolved:
                resolved.append(home)
            for seen_here in table.fuse_under(root):
                mount, note = seen_here, ""
                if root.is_slave:
                    twin = table.twin_in(master, root, seen_here) if master is not None else None
                    if twin is None:
                        note = _slave_note(root, master)
                    else:
                        mount = twin
                if mount.mount_id in seen:
                    continue
                seen.add(mount.mount_id)
                layout.append(
                    (root if note else home, mount, connection_id(mount.major, mount.minor), note)
                )
        self.last_roots = tuple(r.mountpoint for r in resolved)
        return layout

    def only_slaves_message(self) -> str:
        """What to tell an operator when the only autofs mounts here are slave copies."""
        return (
            "only slave copies of autofs roots are mounted here ("
            + ", ".join(self.slave_copies)
            + "): an unmount in them would not reach the real roots, so nothing is healed; "
            + PROPAGATION_FIX
        )

    def _check_fusectl(self) -> None:
        try:
            self._fusectl.ensure_mounted()
        except FusectlError as err:
            self.fusectl_ok = False
            self._warn_once("fusectl", "fusectl unavailable, falling back to fdinfo: %s", err)
        else:
            self.fusectl_ok = True
        self._metrics.fusectl_available.set(1 if self.fusectl_ok else 0)

    def _assess(self, cand: _Candidate, now: float) -> bool:
        """Zero-touch verdict from fusectl; True if the mount must be probed."""
        watch = self._watches.setdefault((cand.mount.mount_id, cand.conn_id), _Watch())
        try:
            conn = self._connection(cand)
        except FusectlError as err:
            # E.g. a connection being torn down as automount expires the
            # mount: this mount is unknown this sweep, the others are not.
            cand.verdict = Verdict.SKIPPED
            cand.details.append(str(err))
            return False
        if conn is None:
            cand.verdict = Verdict.SKIPPED
            cand.details.append(
                f"no fusectl connection {cand.conn_id}"
                if self.fusectl_ok
                else "fusectl unavailable and fdinfo names no connections"
            )
            return False
        if conn.aborted:
            cand.details.append("connection aborted (daemon gone)")
            return True
        if conn.waiting == 0:
            if watch.hung_since is not None:
                log.info("%s answers again", cand.mount.mountpoint)
            watch.waiting_since = watch.hung_since = None
            return False
        if watch.waiting_since is None:
            watch.waiting_since = now
        if watch.hung_since is not None:
            # Known hung: report it from memory; another probe would only
            # block another process in the kernel.
            cand.verdict = Verdict.HUNG
            cand.details.append(watch.hung_detail)
            self._maybe_abort(cand, watch, now)
            return False
        if self.config.once:
            # One sweep has no waiting history to wait `hung_after` for: probe
            # now (bounded by the probe timeout) so that the verdict is true. A
            # busy but live daemon answers the probe and stays healthy.
            cand.details.append(f"{conn.waiting} request(s) unanswered")
            return True
        if now - watch.waiting_since >= self.config.hung_after:
            cand.details.append(
                f"{conn.waiting} request(s) unanswered for {now - watch.waiting_since:.1f}s"
            )
            return True
        return False

    def _connection(self, cand: _Candidate) -> Connection | None:
        if self.fusectl_ok:
            return self._fusectl.read(cand.conn_id)
        # Without fusectl, a connection that no process serves is as good as
        # aborted (the probe confirms). Older kernels do not name connections
        # in fdinfo: then nothing can be told.
        scan = self._fd_scan
        if scan is None or scan.unnamed:
            return None
        served = cand.conn_id in scan.holders
        return Connection(cand.conn_id, 0 if served else ABORTED_MAX_BACKGROUND, 0)

    def _confirm(self, cands: Sequence[_Candidate], now: float) -> None:
        results = self._prober.probe(c.mount.mountpoint for c in cands)
        for cand in cands:
            result = results[cand.mount.mountpoint]
            self._metrics.probe_duration.observe(result.seconds)
            self._judge(cand, result, now)
            self._metrics.probes.labels(str(cand.verdict)).inc()

    def _judge(self, cand: _Candidate, result: ProbeResult, now: float) -> None:
        cand.details.append(result.describe())
        if result.dead_endpoint:
            cand.verdict = Verdict.SEVERED
            log.warning("%s is severed (%s)", cand.mount.mountpoint, result.describe())
        elif result.timed_out:
            cand.verdict = Verdict.HUNG
            watch = self._watches[(cand.mount.mount_id, cand.conn_id)]
            watch.hung_since = now
            daemons = scan_fuse_fds(self.config.proc_root).holders.get(cand.conn_id, [])
            watch.hung_detail = (
                "daemon " + ", ".join(map(str, daemons)) if daemons else "daemon not found"
            )
            cand.details.append(watch.hung_detail)
            log.warning("%s is hung: %s", cand.mount.mountpoint, "; ".join(cand.details))
            self._event(
                "Warning",
                "FuseMountHung",
                f"FUSE mount {cand.mount.mountpoint} does not answer: {'; '.join(cand.details)}",
            )
            self._maybe_abort(cand, watch, now)
        elif result.error == 0:
            cand.verdict = Verdict.HEALTHY
        else:
            # Flagged, but the error is not a dead endpoint: not sure enough to act.
            cand.verdict = Verdict.SKIPPED
            log.warning("%s flagged but %s; left alone", cand.mount.mountpoint, result.describe())

    def _maybe_abort(self, cand: _Candidate, watch: _Watch, now: float) -> None:
        limit = self.config.abort_hung_after
        if limit is None or watch.hung_since is None or now - watch.hung_since < limit:
            return
        if self.config.dry_run:
            cand.details.append("would abort")
            return
        try:
            self._fusectl.abort(cand.conn_id)
        except FusectlError as err:
            cand.action = Action.FAILED
            cand.details.append(str(err))
            log.error("cannot abort %s: %s", cand.mount.mountpoint, err)
            return
        self._metrics.aborts.inc()
        log.warning("aborted hung connection %d of %s", cand.conn_id, cand.mount.mountpoint)
        cand.action = Action.ABORTED
        cand.details.append(f"aborted connection {cand.conn_id}")
        # The abort fails every request at once; confirm before healing.
        result = self._prober.probe([cand.mount.mountpoint])[cand.mount.mountpoint]
        self._metrics.probe_duration.observe(result.seconds)
        cand.details.append(result.describe())
        if result.dead_endpoint:
            cand.verdict = Verdict.SEVERED
            watch.hung_since = watch.waiting_since = None
        self._metrics.probes.labels(str(cand.verdict)).inc()

    # -- healing ---------------------------------------------------------

    def _heal(self, severed: list[_Candidate]) -> None:
        """Unmount severed mounts in the root, innermost and topmost first.

        Each mount is pinned (a descriptor of its mount point), then mountinfo
        is read again: the pinned mount, the one a walk reaches at that point,
        must be the probed one (same mount ID and device) and still be the top
        there; only then is it unmounted, through the pin. Never unmount on
        stale data, and never a mount that replaced the probed one.
        """
        pending = sorted(
            severed, key=lambda c: (c.mount.mountpoint.count("/"), c.mount.mount_id), reverse=True
        )
        # A dry run unmounts nothing; it takes what it would unmount out of its
        # view, so that it reports what a real run would do with stacked mounts.
        would_unmount: dict[int, Mount] = {}
        while pending:
            table = self._view(self._read_table(), would_unmount)
            # The table says which one is on top now: only that one is pinned,
            # so that the walk of the pin never reaches a mount not yet judged.
            cand = next((c for c in pending if _is_top(table, c.mount)), None)
            if cand is None:
                break
            pending.remove(cand)
            covered = any(m.mountpoint == cand.mount.mountpoint for m in would_unmount.values())
            if covered:
                # Dry run: a walk would reach the mount stacked on it, which a
                # real run unmounts first; the table is all that can be checked.
                self._unmount(cand, None)
            else:
                self._pin_and_unmount(cand, would_unmount)
            if self.config.dry_run and cand.action is Action.WOULD_UNMOUNT:
                would_unmount[cand.mount.mount_id] = cand.mount
        for cand in pending:
            cand.details.append("mount changed or is covered by another mount; left alone")

    @staticmethod
    def _view(table: MountTable, would_unmount: dict[int, Mount]) -> MountTable:
        if not would_unmount:
            return table
        return MountTable(tuple(m for m in table.mounts if m.mount_id not in would_unmount))

    def _pin_and_unmount(self, cand: _Candidate, would_unmount: dict[int, Mount]) -> None:
        path = cand.mount.mountpoint
        try:
            with self._pin(path) as pinned:
                # Read after the pin: from here on the pinned mount's ID and
                # device cannot be reused by another mount (the pin holds it).
                fresh = self._view(self._read_table(), would_unmount)
                if (
                    pinned.mount_id != cand.mount.mount_id
                    or pinned.device != cand.mount.device
                    or not _is_top(fresh, cand.mount)
                ):
                    cand.details.append(
                        "mount changed before the unmount (a walk reaches mount "
                        f"{pinned.mount_id}, device {pinned.device}); left alone"
                    )
                    return
                self._unmount(cand, pinned)
        except PinError as err:
            self._failed(cand, err, "pin")
            return
        if cand.action is Action.UNMOUNTED and not self._freed(cand):
            # The pin is gone: if the connection lives on, a process still
            # holds a file on the detached mount; it is freed when that closes.
            cand.action = Action.DETACHED
        if cand.action in (Action.UNMOUNTED, Action.DETACHED):
            self._healed(cand)

    def _unmount(self, cand: _Candidate, pinned: PinnedMount | None) -> None:
        path = cand.mount.mountpoint
        if self.config.dry_run:
            cand.action = Action.WOULD_UNMOUNT
            self._metrics.dry_run_heals.inc()
            log.warning("dry run: would unmount severed %s", path)
            return
        assert pinned is not None  # only a dry run gets here without a pin
        try:
            # MNT_DETACH: a plain umount2 fails with EBUSY while the pin holds
            # the mount (fs/namespace.c propagate_mount_busy); see unmount.py.
            self._umount2(pinned.path, MNT_DETACH)
        except OSError as err:
            if err.errno == errno.EINVAL and pinned.mount_id not in self._read_table().by_id:
                # No longer attached: expired or unmounted by someone else
                # after the re-check. Whatever is mounted there now is new.
                cand.details.append("unmounted by someone else before the unmount; left alone")
                log.info("%s went away before the unmount", path)
                return
            self._failed(cand, err, "umount")
            return
        cand.action = Action.UNMOUNTED

    def _freed(self, cand: _Candidate) -> bool:
        """After the pin closed: True if the dead connection is gone (nothing held the mount).

        The kernel frees the superblock, and fusectl removes the connection's
        directory, with the mount's last reference (fs/fuse/inode.c
        `fuse_conn_destroy`). A connection of that number that is not aborted
        is a new mount reusing it. Without fusectl nothing can be told: the
        mount left the tree, which is reported as unmounted.
        """
        if not self.fusectl_ok:
            return True
        try:
            conn = self._fusectl.read(cand.conn_id)
        except FusectlError:
            return False
        return conn is None or not conn.aborted

    def _failed(self, cand: _Candidate, err: OSError, step: str) -> None:
        path = cand.mount.mountpoint
        reason = errno.errorcode.get(err.errno or 0, "unknown")
        cand.action = Action.FAILED
        cand.details.append(f"{step}: {reason}")
        self._metrics.heal_failures.labels(reason).inc()
        log.error("cannot unmount severed %s: %s", path, err)
        self._event("Warning", "FuseMountHealFailed", f"cannot unmount {path}: {err}")

    def _healed(self, cand: _Candidate) -> None:
        path = cand.mount.mountpoint
        method = "umount" if cand.action is Action.UNMOUNTED else "detach"
        self._metrics.heals.labels(method).inc()
        if any(d.startswith("aborted connection") for d in cand.details):
            cand.details.append("aborted then healed")
        times = self._count_heal(cand)
        again = f"; healed {times} times in the last hour" if times > 1 else ""
        log.warning("healed severed %s (%s)%s", path, cand.action, again)
        self._event(
            "Normal", "FuseMountHealed", f"unmounted severed FUSE mount {path} ({method}){again}"
        )

    def recent_heals(self) -> dict[tuple[str, str], int]:
        """Heals per (root, mount point) in the last REPEAT_WINDOW seconds; only healed ones."""
        with self._heal_times_lock:
            self._forget_old_heals()
            return {key: len(times) for key, times in self._heal_times.items()}

    def _count_heal(self, cand: _Candidate) -> int:
        """Remember a heal of this mount point; how many it had in the window, this one too."""
        with self._heal_times_lock:
            key = (cand.root.mountpoint, cand.mount.mountpoint)
            self._heal_times.setdefault(key, deque()).append(self._clock())
            self._forget_old_heals()
            return len(self._heal_times[key])

    def _forget_old_heals(self) -> None:
        horizon = self._clock() - REPEAT_WINDOW
        for key in list(self._heal_times):
            times = self._heal_times[key]
            while times and times[0] <= horizon:
                times.popleft()
            if not times:
                del self._heal_times[key]

    # -- helpers ---------------------------------------------------------

    def _event(self, type_: str, reason: str, message: str) -> None:
        if self._notify is not None:
            self._notify(type_, reason, message)

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)


def _is_top(table: MountTable, mount: Mount) -> bool:
    """`mount` is still the one a walk to its mount point reaches (same ID and device)."""
    top = table.top_at(mount.mountpoint)
    return top is not None and top.mount_id == mount.mount_id and top.device == mount.device


PROPAGATION_FIX = (
    "mount the autofs root into the healer with mountPropagation: Bidirectional "
    "(rshared), not HostToContainer (rslave)"
)


def _slave_note(copy: Mount, master: Mount | None) -> str:
    if master is None:
        return (
            f"in slave copy {copy.mountpoint} (master:{copy.master_group} not visible here): "
            "not unmounted, an unmount here would not reach the real root (mount propagation)"
        )
    return (
        f"in slave copy {copy.mountpoint} but not in its master {master.mountpoint}: "
        "not unmounted (mount propagation)"
    )
