"""The healer's resolved configuration (flags and env vars land here)."""

from __future__ import annotations

from dataclasses import dataclass

from agents.common.settings import Address


@dataclass(frozen=True)
class HealerConfig:
    """Every field has a default an operator can run with."""

    roots: tuple[str, ...] = ()
    """autofs mount points to heal under. Empty: every autofs mount in
    mountinfo that is not a slave copy of another (consumers' bind copies are
    healed through their root, never on their own)."""

    interval: float = 2.0
    """Seconds between sweeps. A sweep reads only mountinfo and fusectl, so a
    short interval costs little (see README, benchmark) and bounds the time a
    severed mount stays broken."""

    once: bool = False
    """One sweep, one line per FUSE mount on stdout, then exit."""

    dry_run: bool = False
    """Probe and report, never unmount or abort."""

    probe_timeout: float = 2.0
    """Seconds a confirming statvfs may take before the mount is called hung.
    A healthy CVMFS/EOS daemon answers statfs in milliseconds; a slow network
    fetch does not block statfs."""

    hung_after: float = 6.0
    """Seconds a connection must keep unanswered requests (fusectl `waiting` >
    0) before it is probed as possibly hung. Busy but live daemons have waiting
    requests for a moment all the time; three sweeps is a sign. `--once` has
    no history to wait for: it probes every connection with waiting requests."""

    abort_hung_after: float | None = None
    """Off by default. When set, a connection hung this many seconds is
    aborted through fusectl and then healed: this fails every request blocked
    in it, so it is the operator's call."""

    event_driven: bool = True
    """Wake a sweep when a process exits (kernel process-event connector).
    Needs the host PID and network namespaces and CAP_NET_ADMIN; falls back to
    the interval alone when unavailable."""

    event_min_gap: float = 0.1
    """Minimum seconds between event-woken sweeps: process exits are frequent
    on a busy node, a sweep per exit would be waste."""

    fusectl_root: str = "/sys/fs/fuse/connections"
    """Where fusectl is (or is mounted by the healer)."""

    proc_root: str = "/proc"
    """procfs to read mountinfo and fdinfo from."""

    metrics_address: Address | None = None
    """HOST:PORT for /metrics, /healthz, /readyz; None disables the server."""

    log_level: str = "info"
    log_format: str = "text"

    node_name: str = ""
    """The Node to post Events on (downward API `spec.nodeName`); empty: no Events."""

    kubeconfig: str = ""
    """Explicit kubeconfig; empty: in-cluster config, else $KUBECONFIG, else none."""
