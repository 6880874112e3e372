"""`automount-healer`: flags and env vars, wiring, and `main(argv) -> int`.

Production boundaries (procfs, fusectl, libc umount2, the clock, Kubernetes)
are created here and nowhere else; tests call `main` with their own argv and a
stop event.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import IO

from prometheus_client import CollectorRegistry

from agents import __version__
from agents.common.agent import serving
from agents.common.kube import EventRecorder, KubeConfigError, ObjectRef, load_api_client
from agents.common.logs import setup_logging
from agents.common.loop import Heartbeat, run_loop
from agents.common.metrics import LoopMetrics
from agents.common.settings import (
    EXIT_BAD_CONFIG,
    AgentArgumentParser,
    ConfigError,
    add_common_flags,
    add_kube_flags,
    non_negative_float,
    positive_float,
    redacted,
)
from agents.mount_healer.config import HealerConfig
from agents.mount_healer.fusectl import Fusectl
from agents.mount_healer.healer import Healer, Notify
from agents.mount_healer.metrics import PREFIX, HealerMetrics, SweepStateCollector
from agents.mount_healer.mountinfo import MountinfoError, MountinfoSource
from agents.mount_healer.probe import Prober
from agents.mount_healer.procevents import ExitWatcher
from agents.mount_healer.unmount import pin_mount, umount2

PROG = "automount-healer"
log = logging.getLogger("agents.mount_healer")


def build_parser(environ: Mapping[str, str] | None = None) -> AgentArgumentParser:
    defaults = HealerConfig()
    parser = AgentArgumentParser(
        prog=PROG,
        description="Unmount severed FUSE mounts under autofs roots so that the next "
        "access mounts them again.",
        env_prefix="AUTOMOUNT_HEALER",
        environ=environ,
    )
    add_common_flags(parser, interval=defaults.interval, metrics_address=":9101")
    parser.add_argument(
        "--root",
        dest="roots",
        action="append",
        default=[],
        env="ROOTS",
        help="autofs mount point to heal under (repeatable; env: comma-separated); "
        "default: every autofs root in mountinfo",
    )
    parser.add_argument(
        "--probe-timeout",
        type=positive_float,
        default=defaults.probe_timeout,
        env="PROBE_TIMEOUT",
        help="seconds a confirming statvfs may take before the mount is called hung",
    )
    parser.add_argument(
        "--hung-after",
        type=non_negative_float,
        default=defaults.hung_after,
        env="HUNG_AFTER",
        help="seconds of unanswered FUSE requests before a mount is probed as hung",
    )
    parser.add_argument(
        "--abort-hung-after",
        type=non_negative_float,
        default=defaults.abort_hung_after,
        env="ABORT_HUNG_AFTER",
        help="abort a connection hung this many seconds through fusectl, then heal it "
        "(0: as soon as it is found hung; off by default)",
    )
    parser.add_argument(
        "--event-driven",
        action=argparse.BooleanOptionalAction,
        default=defaults.event_driven,
        env="EVENT_DRIVEN",
        help="wake a sweep when a process exits (needs host PID and network namespaces); "
        "--no-event-driven: sweep on the interval only",
    )
    parser.add_argument(
        "--event-min-gap",
        type=non_negative_float,
        default=defaults.event_min_gap,
        env="EVENT_MIN_GAP",
        help="minimum seconds between sweeps woken by process exits",
    )
    parser.add_argument(
        "--fusectl-root",
        default=defaults.fusectl_root,
        env="FUSECTL_ROOT",
        help="fusectl mount point",
    )
    parser.add_argument(
        "--proc-root", default=defaults.proc_root, env="PROC_ROOT", help="procfs mount point"
    )
    add_kube_flags(parser, node_help="Node to post Kubernetes Events on; empty: no Events")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def config_from_args(argv: Sequence[str] | None, environ: Mapping[str, str] | None) -> HealerConfig:
    args = build_parser(environ).parse_args(argv)
    for root in args.roots:
        if not os.path.isabs(root):
            raise ConfigError(f"--root must be an absolute path: {root!r}")
    return HealerConfig(
        roots=tuple(r.rstrip("/") or "/" for r in args.roots),
        interval=args.interval,
        once=args.once,
        dry_run=args.dry_run,
        probe_timeout=args.probe_timeout,
        hung_after=args.hung_after,
        abort_hung_after=args.abort_hung_after,
        event_driven=args.event_driven,
        event_min_gap=args.event_min_gap,
        fusectl_root=args.fusectl_root,
        proc_root=args.proc_root,
        metrics_address=args.metrics_address,
        log_level=args.log_level,
        log_format=args.log_format,
        node_name=args.node_name,
        kubeconfig=args.kubeconfig,
    )


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stop: threading.Event | None = None,
    iterations: int | None = None,
    stdout: IO[str] | None = None,
    registry: CollectorRegistry | None = None,
) -> int:
    """Run the healer; returns the process exit code (2 on bad configuration)."""
    try:
        config = config_from_args(argv, environ)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_CONFIG
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    setup_logging(config.log_level, config.log_format)
    log.info("%s %s starting with %s", PROG, __version__, json.dumps(redacted(config), default=str))
    out = stdout or sys.stdout

    registry = registry or CollectorRegistry()
    loop_metrics = LoopMetrics(registry, PREFIX, __version__)
    try:
        notify = _event_notifier(config, loop_metrics)
    except KubeConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    metrics = HealerMetrics(registry)
    prober = Prober(config.probe_timeout)
    healer = Healer(
        config,
        read_table=(mount_table := MountinfoSource(config.proc_root)),
        fusectl=Fusectl(config.fusectl_root),
        prober=prober,
        umount2=umount2,
        pin=pin_mount,
        metrics=metrics,
        notify=notify,
    )
    registry.register(
        SweepStateCollector(
            lambda: healer.last_reports, lambda: healer.last_roots, healer.recent_heals
        )
    )

    if config.once:
        try:
            reports = healer.sweep()
        except MountinfoError as err:
            log.error("%s", err)
            return 1
        finally:
            prober.close()
            mount_table.close()
        for report in reports:
            print(report.line(), file=out)
        if healer.slave_copies:
            print(healer.only_slaves_message(), file=out)
        elif not reports:
            print(
                f"no FUSE mounts under {', '.join(healer.last_roots) or 'any autofs root'}",
                file=out,
            )
        return 0

    wake = threading.Event()
    # Long enough for a sweep whose probes all time out, plus the wait.
    heartbeat = Heartbeat(max_age=3 * config.interval + 2 * config.probe_timeout + 5)
    watcher = ExitWatcher(wake)

    def tick() -> None:
        try:
            healer.sweep()
        except MountinfoError:
            loop_metrics.up.set(0)
            heartbeat.set_ready(False, "mountinfo unreadable")
            raise
        loop_metrics.up.set(1 if healer.fusectl_ok else 0)
        heartbeat.set_ready(healer.fusectl_ok, "" if healer.fusectl_ok else "fusectl unavailable")

    try:
        with serving(
            PROG, registry, heartbeat, config.metrics_address, stop=stop, wake=wake
        ) as stop_event:
            event_driven = config.event_driven and watcher.start()
            metrics.event_driven.set(1 if event_driven else 0)
            run_loop(
                tick,
                interval=config.interval,
                stop=stop_event,
                wake=wake if event_driven else None,
                min_gap=config.event_min_gap,
                iterations=iterations,
                metrics=loop_metrics,
                heartbeat=heartbeat,
            )
    finally:
        watcher.stop()
        prober.close()
        mount_table.close()
    return 0


def _event_notifier(config: HealerConfig, loop_metrics: LoopMetrics) -> Notify | None:
    """Events go on the Node the healer runs on, when a cluster and a node name are known."""
    if not config.node_name:
        return None
    api = load_api_client(config.kubeconfig or None)
    if api is None:
        log.info("no Kubernetes config found: local mode, no Events")
        return None
    recorder = EventRecorder(
        api, PROG, host=config.node_name, on_suppressed=loop_metrics.event_suppressed
    )
    node = ObjectRef(kind="Node", name=config.node_name, uid=config.node_name)

    def notify(type_: str, reason: str, message: str) -> None:
        recorder.emit(node, type_, reason, message)

    return notify
