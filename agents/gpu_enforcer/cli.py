"""`gpu-mem-enforcer`: flags and env vars, wiring, and `main(argv) -> int`.

Production boundaries (NVML, procfs, Kubernetes, the clock) are created here
and nowhere else; tests call `main` with their own argv and a stop event.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Any

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
    int_between,
    non_negative_float,
    positive_float,
    redacted,
)
from agents.gpu_enforcer.config import ACTIONS, EnforcerConfig
from agents.gpu_enforcer.enforcer import Enforcer, Evictor, Notify, PodDirectory
from agents.gpu_enforcer.limits import (
    PEER_SCHEDULERS,
    LimitError,
    LimitsFile,
    parse_quantity,
    replicas_from_device_plugin_config,
)
from agents.gpu_enforcer.metrics import PREFIX, EnforcerMetrics, SampleCollector
from agents.gpu_enforcer.nvml import Nvml
from agents.gpu_enforcer.pods import KubeEvictor, KubePods, LocalPods
from agents.gpu_enforcer.policy import PolicyConfig

PROG = "gpu-mem-enforcer"
# `--once` exit codes (2, bad configuration, is every agent's EXIT_BAD_CONFIG).
EXIT_CHECKED = 0  # every card sampled and judged
EXIT_NOT_CHECKED = 1  # NVML unavailable, a card in error or untrusted, or the tick failed
log = logging.getLogger("agents.gpu_enforcer")


def _quantity(text: str) -> int:
    try:
        return parse_quantity(text)
    except LimitError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text!r}")
    return value


def build_parser(environ: Mapping[str, str] | None = None) -> AgentArgumentParser:
    defaults = EnforcerConfig()
    policy = PolicyConfig()
    parser = AgentArgumentParser(
        prog=PROG,
        description="Stop pods whose GPU memory exceeds their share of a time-sliced card.",
        env_prefix="GPU_MEM_ENFORCER",
        environ=environ,
    )
    add_common_flags(parser, interval=defaults.interval, metrics_address=":9102")
    parser.add_argument(
        "--action",
        choices=ACTIONS,
        default=defaults.action,
        env="ACTION",
        help="what to do with a pod over its limit",
    )
    parser.add_argument(
        "--grace",
        type=non_negative_float,
        default=defaults.grace,
        env="GRACE",
        help="seconds between SIGTERM and SIGKILL",
    )
    parser.add_argument(
        "--hold",
        type=non_negative_float,
        default=policy.hold,
        env="HOLD",
        help="seconds a pod must stay over its limit before the action",
    )
    parser.add_argument(
        "--ceiling",
        type=positive_float,
        default=policy.ceiling_factor,
        env="CEILING",
        help="act at once above this multiple of the limit",
    )
    parser.add_argument(
        "--pressure-aware",
        action="store_true",
        env="PRESSURE_AWARE",
        help="let pods borrow above their share while the card has free memory",
    )
    parser.add_argument(
        "--free-threshold",
        type=_fraction,
        default=policy.free_threshold,
        env="FREE_THRESHOLD",
        help="pressure-aware: fraction of card memory that must stay free",
    )
    parser.add_argument(
        "--replicas",
        type=int_between(1),
        default=None,
        env="REPLICAS",
        help="time-slicing replicas per card (default: device-plugin config, "
        "else node label nvidia.com/gpu.replicas)",
    )
    parser.add_argument(
        "--peer-scheduler",
        action="append",
        default=[],
        env="PEER_SCHEDULER",
        help=f"a GPU-memory scheduler in use ({'|'.join(PEER_SCHEDULERS)}; repeat or "
        "comma-separate): its pod quantities become the admin's limit",
    )
    parser.add_argument(
        "--soft-fraction",
        type=_fraction,
        default=defaults.soft_fraction,
        env="SOFT_FRACTION",
        help="soft limit as a fraction of the hard limit",
    )
    parser.add_argument(
        "--host-limit",
        type=_quantity,
        default=None,
        env="HOST_LIMIT",
        help="limit per GPU for processes in no pod (default: ignore them)",
    )
    parser.add_argument(
        "--limits-file",
        default="",
        env="LIMITS_FILE",
        help='local mode: {"default": "<qty>", "pods": {"<uid>": "<qty>"}}',
    )
    parser.add_argument(
        "--device-plugin-config",
        default="",
        env="DEVICE_PLUGIN_CONFIG",
        help="NVIDIA device plugin config file (time-slicing replicas)",
    )
    parser.add_argument(
        "--proc-root",
        default=defaults.proc_root,
        env="PROC_ROOT",
        help="procfs of the host PID namespace",
    )
    add_kube_flags(parser, node_help="this node: its pods are watched, Events name it")
    parser.add_argument(
        "--local", action="store_true", env="LOCAL", help="ignore any Kubernetes config: local mode"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def _replicas_from_file(path: str) -> int | None:
    """Replicas from the device plugin's config; None (node label next) when absent.

    The ConfigMap is optional in the manifest: without it the kubelet mounts an
    empty directory, and the node label nvidia.com/gpu.replicas must still work.
    A file that exists but cannot be understood is a configuration error.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        logging.getLogger(__name__).warning("%s not found; replicas from the node label", path)
        return None
    except OSError as err:
        raise ConfigError(f"--device-plugin-config {path}: {err.strerror}") from err
    try:
        return replicas_from_device_plugin_config(text)
    except (LimitError, ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"--device-plugin-config {path}: {err}") from err


def _peer_schedulers(values: Sequence[str]) -> tuple[str, ...]:
    names = [n.strip() for value in values for n in value.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PEER_SCHEDULERS))
    if unknown:
        raise ConfigError(
            f"--peer-scheduler {','.join(unknown)}: not one of {', '.join(PEER_SCHEDULERS)}"
        )
    return tuple(dict.fromkeys(names))


def config_from_args(
    argv: Sequence[str] | None, environ: Mapping[str, str] | None
) -> tuple[EnforcerConfig, bool]:
    """The config, and whether local mode was forced."""
    args = build_parser(environ).parse_args(argv)
    replicas = args.replicas
    if replicas is None and args.device_plugin_config:
        replicas = _replicas_from_file(args.device_plugin_config)
    config = EnforcerConfig(
        interval=args.interval,
        once=args.once,
        dry_run=args.dry_run,
        action=args.action,
        grace=args.grace,
        policy=PolicyConfig(
            hold=args.hold,
            ceiling_factor=args.ceiling,
            pressure_aware=args.pressure_aware,
            free_threshold=args.free_threshold,
        ),
        replicas=replicas,
        peer_schedulers=_peer_schedulers(args.peer_scheduler),
        soft_fraction=args.soft_fraction,
        host_limit=args.host_limit,
        limits_file=args.limits_file,
        device_plugin_config=args.device_plugin_config,
        proc_root=args.proc_root,
        metrics_address=args.metrics_address,
        log_level=args.log_level,
        log_format=args.log_format,
        node_name=args.node_name,
        kubeconfig=args.kubeconfig,
    )
    return config, args.local


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stop: threading.Event | None = None,
    iterations: int | None = None,
    stdout: IO[str] | None = None,
    registry: CollectorRegistry | None = None,
    nvml: Nvml | None = None,
) -> int:
    """Run the enforcer; returns the exit code: 2 bad configuration; with --once,
    0 when every card was checked and 1 when one could not be (README, "Run it")."""
    try:
        config, local = config_from_args(argv, environ)
        limits = LimitsFile.load(config.limits_file) if config.limits_file else None
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_CONFIG
    except (ConfigError, LimitError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    setup_logging(config.log_level, config.log_format)
    log.info("%s %s starting with %s", PROG, __version__, json.dumps(redacted(config), default=str))

    _raise_open_file_limit()
    registry = registry or CollectorRegistry()
    loop_metrics = LoopMetrics(registry, PREFIX, __version__)
    metrics = EnforcerMetrics(registry)
    try:
        kube = _kube(config, local)
    except (KubeConfigError, ConfigError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if kube is None:
        log.info("local mode: limits from %s", config.limits_file or "--replicas only")
        pods: PodDirectory = LocalPods(limits, config.replicas)
        evictor: Evictor | None = None
        notify: Notify | None = None
        cache = None
    else:
        api, cache = kube
        pods = KubePods(api, cache, config.node_name)
        evictor = KubeEvictor(api)
        notify = _pod_notifier(api, config.node_name, loop_metrics)
    enforcer = Enforcer(
        config, nvml=nvml or Nvml(), pods=pods, metrics=metrics, evictor=evictor, notify=notify
    )
    registry.register(SampleCollector(lambda: enforcer.last_report))
    try:
        if config.once:
            try:
                report = enforcer.tick()
            except Exception:
                log.exception("the check failed")
                return EXIT_NOT_CHECKED
            (stdout or sys.stdout).write(report.table())
            return EXIT_CHECKED if report.checked else EXIT_NOT_CHECKED
        return _run(config, enforcer, registry, loop_metrics, stop=stop, iterations=iterations)
    finally:
        enforcer.close()
        if cache is not None:
            cache.stop()


def _run(
    config: EnforcerConfig,
    enforcer: Enforcer,
    registry: CollectorRegistry,
    loop_metrics: LoopMetrics,
    *,
    stop: threading.Event | None,
    iterations: int | None,
) -> int:
    heartbeat = Heartbeat(max_age=3 * config.interval + 10)

    def tick() -> None:
        report = enforcer.tick()
        loop_metrics.up.set(0 if report.error else 1)
        heartbeat.set_ready(report.error is None, f"NVML: {report.error}")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("sample:\n%s", report.table())

    with serving(PROG, registry, heartbeat, config.metrics_address, stop=stop) as stop_event:
        run_loop(
            tick,
            interval=config.interval,
            stop=stop_event,
            iterations=iterations,
            metrics=loop_metrics,
            heartbeat=heartbeat,
        )
    return 0


def _raise_open_file_limit() -> None:
    """The enforcer holds a pidfd per GPU process: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as err:
            log.warning("open file limit stays at %d: %s", soft, err)


def _kube(config: EnforcerConfig, local: bool) -> tuple[Any, Any] | None:
    """(ApiClient, started pod cache) with a cluster, None in local mode."""
    if local:
        return None
    api = load_api_client(config.kubeconfig or None)
    if api is None:
        return None
    if not config.node_name:
        raise ConfigError("--node-name (or NODE_NAME) is required with Kubernetes")
    from agents.common.watchcache import NodePodCache

    cache = NodePodCache(api, config.node_name)
    cache.start()
    if not cache.wait_synced(30):
        log.warning(
            "pods of node %s not listed yet; no pod is acted on until they are", config.node_name
        )
    return api, cache


def _pod_notifier(api: Any, node_name: str, loop_metrics: LoopMetrics) -> Notify:
    recorder = EventRecorder(api, PROG, host=node_name, on_suppressed=loop_metrics.event_suppressed)

    def notify(pod: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = pod.get("metadata", {})
        ref = ObjectRef(
            kind="Pod",
            name=meta.get("name", ""),
            namespace=meta.get("namespace", ""),
            uid=meta.get("uid", ""),
        )
        recorder.emit(ref, type_, reason, message)

    return notify
