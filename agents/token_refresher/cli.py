"""`token-refresher`: roles, flags and env vars, wiring, and `main(argv) -> int`.

Roles:
- `controller`: one active replica (a coordination.k8s.io Lease elects it)
  refreshes every token Secret and writes the result back to it;
- `injector`: one per node (DaemonSet), writes the access tokens into the
  containers of the pods on its node that ask for them;
- `local`: one token file on one node, no Kubernetes (debugging, the demo).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry

from agents import __version__
from agents.common.agent import serving
from agents.common.kube import KubeConfigError, load_api_client
from agents.common.logs import setup_logging
from agents.common.loop import Heartbeat, run_loop
from agents.common.metrics import LoopMetrics
from agents.common.settings import (
    EXIT_BAD_CONFIG,
    Address,
    AgentArgumentParser,
    ConfigError,
    add_common_flags,
    add_kube_flags,
    address,
    int_between,
    label_selector,
    positive_float,
    redacted,
)
from agents.token_refresher.config import (
    OFFLINE_IDLE,
    ControllerConfig,
    ControllerLinkConfig,
    FilesConfig,
    IdPConfig,
    InjectorConfig,
    LeaseConfig,
)
from agents.token_refresher.local import (
    LocalConfig,
    LocalRefresher,
    out_directory_problem,
    refresher_for,
)
from agents.token_refresher.metrics import (
    PREFIX,
    ControllerMetrics,
    FilesMetrics,
    InjectorMetrics,
    RefresherMetrics,
    TlsExpiry,
)
from agents.token_refresher.oauth import (
    InsecureURLError,
    check_token_url,
    quiet_token_loggers,
    refresh,
)
from agents.token_refresher.spec import SpecError, parse_mode

PROG = "token-refresher"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
log = logging.getLogger("agents.token_refresher")
AUTH_METHODS = ("client_secret_basic", "client_secret_post")


def _uid(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a uid/gid: {text!r}") from None
    if not 0 <= value < 2**32 - 1:
        raise argparse.ArgumentTypeError(f"not a uid/gid: {text!r}")
    return value


def _octal_mode(text: str) -> int:
    try:
        return parse_mode("--mode", text)
    except SpecError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _url_list(text: str) -> tuple[str, ...]:
    """Comma-separated URL prefixes (URLs hold colons: no colon splitting here)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _path_prefixes(text: str) -> tuple[str, ...]:
    """Comma-separated absolute directories (an injector's --allowed-path-prefixes)."""
    prefixes = tuple(part.strip() for part in text.split(",") if part.strip())
    if not prefixes:
        raise argparse.ArgumentTypeError("no path prefix given")
    for prefix in prefixes:
        if not prefix.startswith("/"):
            raise argparse.ArgumentTypeError(f"not an absolute path: {prefix!r}")
    return prefixes


def build_parser(environ: Mapping[str, str] | None = None) -> AgentArgumentParser:
    parser = AgentArgumentParser(
        prog=PROG,
        description="Keep OAuth2 access tokens fresh and written where they are used.",
        env_prefix="TOKEN_REFRESHER",
        environ=environ,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    roles = parser.add_subparsers(dest="role", required=True, metavar="ROLE")

    controller = _role(
        roles,
        "controller",
        "refresh every token Secret (one active replica, elected through a Lease)",
        interval=5.0,
        environ=environ,
    )
    add_kube_flags(controller, node_help="unused by the controller")
    _add_own_namespace(controller)
    controller.add_argument(
        "--token-url",
        default="",
        env="TOKEN_URL",
        help="default token endpoint; a Secret may name its own (<prefix>/token-url) "
        "if this URL or one of --allowed-token-urls covers it",
    )
    controller.add_argument(
        "--allowed-token-urls",
        type=_url_list,
        default=(),
        env="ALLOWED_TOKEN_URLS",
        help="comma-separated further URLs a Secret's own token URL may be at or below "
        "(same scheme, host and port; path equal or under theirs on a '/' boundary); "
        "default: none, only --token-url",
    )
    defaults = ControllerConfig()
    controller.add_argument(
        "--refresh-workers",
        type=int_between(1, 256),
        default=defaults.refresh_workers,
        env="REFRESH_WORKERS",
        help="IdP requests in flight at once",
    )
    controller.add_argument(
        "--refresh-per-host",
        type=int_between(1, 256),
        default=defaults.refresh_per_host,
        env="REFRESH_PER_HOST",
        help="IdP requests in flight to one host:port at once: a slow IdP holds no more "
        "workers than this",
    )
    controller.add_argument(
        "--stall-limit",
        type=positive_float,
        default=defaults.stall_limit,
        env="STALL_LIMIT",
        help="seconds the refresh pass or a worker may go without progress before this "
        "replica stops renewing its Lease (a standby takes over) and reports not ready",
    )
    controller.add_argument(
        "--namespace",
        dest="namespaces",
        action="append",
        default=[],
        env="NAMESPACES",
        help="refresh token Secrets in this namespace only (repeatable; default: all)",
    )
    controller.add_argument(
        "--lease-name", default="token-refresher", env="LEASE_NAME", help="leader election Lease"
    )
    controller.add_argument(
        "--lease-namespace",
        default="",
        env="LEASE_NAMESPACE",
        help="namespace of the Lease (default: --own-namespace)",
    )
    controller.add_argument(
        "--identity",
        default="",
        env="IDENTITY",
        help="this replica's name in the Lease (default: the host name)",
    )
    controller.add_argument(
        "--lease-duration",
        type=positive_float,
        default=30.0,
        env="LEASE_DURATION",
        help="seconds a silent leader keeps the Lease",
    )
    controller.add_argument(
        "--renew-interval",
        type=positive_float,
        default=5.0,
        env="RENEW_INTERVAL",
        help="seconds between Lease renewals (and candidates' attempts)",
    )
    _add_secret_selector(controller)
    _add_idp_flags(controller)
    _add_files_flags(controller)

    injector = _role(
        roles,
        "injector",
        "write access tokens into the containers of this node's pods",
        interval=60.0,
        environ=environ,
    )
    add_kube_flags(injector, node_help="this node's name: only its pods get files")
    _add_own_namespace(injector)
    injector.add_argument(
        "--proc-root",
        default="/proc",
        env="PROC_ROOT",
        help="the host's /proc (the pod needs hostPID)",
    )
    injector.add_argument(
        "--workers",
        type=int_between(1, 64),
        default=8,
        env="WORKERS",
        help="files written in parallel",
    )
    injector.add_argument(
        "--allowed-path-prefixes",
        type=_path_prefixes,
        default=InjectorConfig.allowed_path_prefixes,
        env="ALLOWED_PATH_PREFIXES",
        help="comma-separated directories of a container where token files may be "
        "written, matched on whole path components (default: /tmp/)",
    )
    injector.add_argument(
        "--write-timeout",
        type=positive_float,
        default=InjectorConfig.write_timeout,
        env="WRITE_TIMEOUT",
        help="seconds one file's write may take; past it the file is reported and its "
        "thread left behind",
    )
    injector.add_argument(
        "--max-stuck-writes",
        type=int_between(1, 1024),
        default=InjectorConfig.max_stuck_writes,
        env="MAX_STUCK_WRITES",
        help="write threads left blocked in the kernel at most (then not ready)",
    )
    _add_controller_link_flags(injector)

    local = _role(
        roles,
        "local",
        "refresh one token file in place and render it to one output file",
        interval=30.0,
        environ=environ,
    )
    local.add_argument(
        "--token-file",
        required=True,
        env="TOKEN_FILE",
        help="token JSON, refreshed in place (rotated refresh tokens kept)",
    )
    local.add_argument(
        "--token-url", required=True, env="TOKEN_URL", help="the IdP's token endpoint"
    )
    local.add_argument("--client-id", required=True, env="CLIENT_ID", help="OAuth2 client ID")
    local.add_argument(
        "--client-secret-file",
        required=True,
        env="CLIENT_SECRET_FILE",
        help="file holding the client secret (never on the command line)",
    )
    local.add_argument("--out", required=True, env="OUT", help="rendered output file")
    local.add_argument(
        "--template",
        default=None,
        env="TEMPLATE",
        help="output template; default: $(ACCESS_TOKEN) alone",
    )
    local.add_argument("--owner", type=_uid, default=0, env="OWNER", help="output file uid")
    local.add_argument(
        "--group", type=_uid, default=None, env="GROUP", help="output file gid (default: --owner)"
    )
    local.add_argument(
        "--mode", type=_octal_mode, default=0o400, env="MODE", help="output file mode, octal"
    )
    _add_idp_flags(local)
    return parser


def _role(
    roles: Any, name: str, help: str, *, interval: float, environ: Mapping[str, str] | None
) -> AgentArgumentParser:
    """A role's subcommand with the flags every agent has; metrics on :9103 for all."""
    role: AgentArgumentParser = roles.add_parser(
        name, help=help, env_prefix="TOKEN_REFRESHER", environ=environ
    )
    add_common_flags(role, interval=interval, metrics_address=":9103")
    return role


def _add_controller_link_flags(parser: AgentArgumentParser) -> None:
    """Where the injector gets its files: the controller's file stream (no Secret read)."""
    link = ControllerLinkConfig()
    parser.add_argument(
        "--controller-url",
        type=_url_list,
        default=link.urls,
        env="CONTROLLER_URL",
        help="comma-separated https:// URLs of the controller; each host is resolved to all "
        "its addresses (a headless Service: one per replica), tried in turn",
    )
    parser.add_argument(
        "--controller-server-name",
        default="",
        env="CONTROLLER_SERVER_NAME",
        help="name the controller's certificate must carry (default: each URL's host)",
    )
    parser.add_argument(
        "--controller-token-file",
        default=link.token_file,
        env="CONTROLLER_TOKEN_FILE",
        help="projected ServiceAccount token presented to the controller (audience "
        "node-agents.io/token-files); read again at every connection",
    )
    parser.add_argument(
        "--ca-configmap",
        default=link.ca_configmap,
        env="CA_CONFIGMAP",
        help="ConfigMap (key ca.crt) in this pod's namespace with the CA the controller's "
        "certificate must chain to",
    )
    parser.add_argument(
        "--ca-file",
        default="",
        env="CA_FILE",
        help="a mounted CA bundle instead of --ca-configmap (cert-manager, trust-manager)",
    )
    parser.add_argument(
        "--state-file",
        default=link.state_file,
        env="STATE_FILE",
        help="the last files received, rewritten after a container restart while the "
        "controller is unreachable (an emptyDir); empty: none",
    )


def _add_own_namespace(parser: AgentArgumentParser) -> None:
    # In a pod the ServiceAccount mount says it; by hand on a node (or in a test)
    # nothing does, and "default" would be the wrong place to look.
    parser.add_argument(
        "--own-namespace",
        default="",
        env="OWN_NAMESPACE",
        help="the namespace the token refresher runs in: the controller's TLS Secret, CA "
        "ConfigMap and Lease, and the injector pods (default: the pod's own, from its "
        "ServiceAccount mount; outside a pod 'default')",
    )


def _add_secret_selector(parser: AgentArgumentParser) -> None:
    # Token Secrets are found by annotation, which the API server cannot
    # filter on: without a selector every Secret is listed, then dropped.
    parser.add_argument(
        "--secret-selector",
        type=label_selector,
        default="",
        env="SECRET_SELECTOR",
        help="list and watch only the Secrets with these labels (a label selector such as "
        "token-refresher.node-agents.io/token=true); the is-token annotation is still "
        "required (default: every Secret)",
    )


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_files_flags(parser: AgentArgumentParser) -> None:
    """The file server every controller replica runs for the injectors."""
    defaults = FilesConfig()
    parser.add_argument(
        "--files-address",
        type=address,
        default=address(f":{defaults.port}"),
        env="FILES_ADDRESS",
        help="HOST:PORT serving the injectors their token files over TLS ('off': none)",
    )
    parser.add_argument(
        "--files-audience",
        default=defaults.audience,
        env="FILES_AUDIENCE",
        help="audience of the injectors' projected ServiceAccount tokens",
    )
    parser.add_argument(
        "--tls-secret",
        default=defaults.tls_secret,
        env="TLS_SECRET",
        help="Secret (kubernetes.io/tls, own namespace) with the serving certificate and CA",
    )
    parser.add_argument(
        "--ca-configmap",
        default=defaults.ca_configmap,
        env="CA_CONFIGMAP",
        help="ConfigMap (own namespace) publishing the CA bundle injectors trust (key ca.crt)",
    )
    parser.add_argument(
        "--tls-names",
        type=_name_list,
        default=(),
        env="TLS_NAMES",
        help="comma-separated DNS names / IPs of the serving certificate (default: the "
        "token-refresher-controller Service's names in the own namespace)",
    )
    parser.add_argument(
        "--tls-external",
        action="store_true",
        env="TLS_EXTERNAL",
        help="the TLS Secret and CA ConfigMap are managed by someone else (cert-manager, "
        "trust-manager): read them only",
    )
    parser.add_argument(
        "--injector-service-account",
        default=defaults.injector_service_account,
        env="INJECTOR_SERVICE_ACCOUNT",
        help="ServiceAccount (own namespace) whose pod-bound tokens get files",
    )
    parser.add_argument(
        "--injector-selector",
        type=label_selector,
        default=defaults.injector_selector,
        env="INJECTOR_SELECTOR",
        help="labels the caller's pod must have",
    )


def _add_idp_flags(parser: AgentArgumentParser) -> None:
    parser.add_argument(
        "--ca-bundle",
        default="",
        env="CA_BUNDLE",
        help="CA bundle for the IdP's TLS (default: system store, or REQUESTS_CA_BUNDLE)",
    )
    parser.add_argument(
        "--allow-http",
        action="store_true",
        env="ALLOW_HTTP",
        help="allow a plain http:// token endpoint (tests, never production)",
    )
    parser.add_argument(
        "--auth-method",
        choices=AUTH_METHODS,
        default="client_secret_basic",
        env="AUTH_METHOD",
        help="how the client authenticates to the IdP",
    )
    parser.add_argument(
        "--request-timeout",
        type=positive_float,
        default=10.0,
        env="REQUEST_TIMEOUT",
        help="seconds for a whole IdP request: connect, TLS, headers and body (a server "
        "that trickles its answer is cut off then)",
    )
    parser.add_argument(
        "--refresh-fraction",
        type=float,
        default=0.8,
        env="REFRESH_FRACTION",
        help="refresh at this share of the token lifetime",
    )
    parser.add_argument(
        "--min-refresh-interval",
        type=positive_float,
        default=10.0,
        env="MIN_REFRESH_INTERVAL",
        help="never refresh one token sooner than this after it was issued (seconds)",
    )
    parser.add_argument(
        "--idle-window",
        type=positive_float,
        default=3600.0,
        env="IDLE_WINDOW",
        help="refresh tokens without expiry at least this often (seconds)",
    )
    parser.add_argument(
        "--offline-idle-timeout",
        type=positive_float,
        default=OFFLINE_IDLE,
        env="OFFLINE_IDLE_TIMEOUT",
        help="an offline token (refresh_expires_in 0) ends once unused this long: the "
        "realm's Offline Session Idle, for its time-to-expiry metric (seconds; default "
        "30 days, Keycloak's)",
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
    """Run a role; returns the process exit code (2 on bad configuration)."""
    try:
        args = build_parser(environ).parse_args(argv)
        # 10 % jitter either way must keep the refresh inside the lifetime.
        if args.role != "injector" and not 0.15 <= args.refresh_fraction <= 0.85:
            raise ConfigError("--refresh-fraction must be between 0.15 and 0.85")
        if args.role == "local":
            check_token_url(args.token_url, allow_http=args.allow_http, what="--token-url")
            client_secret = _read_secret(args.client_secret_file)
            if problem := out_directory_problem(args.out):
                raise ConfigError(problem)
        elif args.role == "controller":
            if args.token_url:
                check_token_url(args.token_url, allow_http=args.allow_http, what="--token-url")
            for entry in args.allowed_token_urls:
                check_token_url(
                    entry, allow_http=args.allow_http, what="--allowed-token-urls entry"
                )
            # The longest a worker legitimately goes without progress: one IdP
            # request, or one API request (10 s).
            if args.stall_limit <= max(args.request_timeout, 10.0):
                raise ConfigError(
                    f"--stall-limit ({args.stall_limit:g} s) must exceed --request-timeout "
                    f"({args.request_timeout:g} s) and 10 s (an API request)"
                )
            # The leader calls an IdP only while its Lease outlasts the request by
            # 5 s, and the Lease may be one renewal old.
            needed = args.request_timeout + 5 + args.renew_interval
            if args.lease_duration <= needed:
                raise ConfigError(
                    f"--lease-duration must exceed --request-timeout + 5 s + --renew-interval "
                    f"({needed:g} s): the leader would never refresh"
                )
        elif not args.node_name:
            raise ConfigError("--node-name (or NODE_NAME) is required: only its pods get files")
        else:
            _check_controller_urls(args.controller_url)
        api_client = None if args.role == "local" else _cluster(args.kubeconfig)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_CONFIG
    except (ConfigError, InsecureURLError, KubeConfigError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    setup_logging(args.log_level, args.log_format)
    quiet_token_loggers()
    registry = registry or CollectorRegistry()
    run = _Run(registry, LoopMetrics(registry, PREFIX, __version__), stop, iterations)
    if api_client is None:
        return _local(args, client_secret, run)
    try:
        if args.role == "controller":
            return _controller(args, api_client, run)
        return _injector(args, api_client, run)
    finally:
        api_client.close()


@dataclass(frozen=True)
class _Run:
    """How main() was asked to run a role (tests pass stop, iterations, registry)."""

    registry: CollectorRegistry
    loop_metrics: LoopMetrics
    stop: threading.Event | None
    iterations: int | None


def _cluster(kubeconfig: str) -> Any:
    api_client = load_api_client(kubeconfig or None)
    if api_client is None:
        raise ConfigError(
            "this role needs a cluster: no --kubeconfig, no in-cluster config and no "
            "$KUBECONFIG (use `local` on a node without Kubernetes)"
        )
    return api_client


def _local(
    args: argparse.Namespace,
    client_secret: str,
    run: _Run,
) -> int:
    config = LocalConfig(
        token_file=args.token_file,
        out=args.out,
        template=args.template,
        owner=args.owner,
        group=args.owner if args.group is None else args.group,
        mode=args.mode,
        refresh_fraction=args.refresh_fraction,
        idle_window=args.idle_window,
        min_refresh_interval=args.min_refresh_interval,
        offline_idle=args.offline_idle_timeout,
    )
    log.info(
        "%s %s local starting with %s", PROG, __version__, json.dumps(redacted(config), default=str)
    )
    refresher = LocalRefresher(
        config,
        refresh_fn=refresher_for(
            args.token_url,
            args.client_id,
            client_secret,
            auth_method=args.auth_method,
            verify=args.ca_bundle or True,
            allow_http=args.allow_http,
            timeout=args.request_timeout,
        ),
        metrics=RefresherMetrics(run.registry, offline_idle=config.offline_idle),
    )
    if args.once:
        refresher.tick()
        return 0
    heartbeat = Heartbeat(max_age=3 * args.interval + 2 * args.request_timeout + 10)
    heartbeat.set_ready(True)

    def tick() -> None:
        refresher.tick()
        run.loop_metrics.up.set(1 if refresher.token_file_readable else 0)

    with serving(PROG, run.registry, heartbeat, args.metrics_address, stop=run.stop) as stop_event:
        run_loop(
            tick,
            interval=args.interval,
            stop=stop_event,
            next_due=refresher.next_due,
            min_gap=0.05,
            iterations=run.iterations,
            metrics=run.loop_metrics,
            heartbeat=heartbeat,
        )
    return 0


def _controller_config(args: argparse.Namespace) -> ControllerConfig:
    return ControllerConfig(
        idp=IdPConfig(
            token_url=args.token_url,
            allowed_token_urls=tuple(args.allowed_token_urls),
            ca_bundle=args.ca_bundle,
            allow_http=args.allow_http,
            auth_method=args.auth_method,
            request_timeout=args.request_timeout,
            refresh_fraction=args.refresh_fraction,
            idle_window=args.idle_window,
            min_refresh_interval=args.min_refresh_interval,
            offline_idle=args.offline_idle_timeout,
        ),
        lease=LeaseConfig(
            name=args.lease_name,
            namespace=args.lease_namespace or _own_namespace(args),
            identity=args.identity or socket.gethostname(),
            duration=args.lease_duration,
            renew_interval=args.renew_interval,
        ),
        namespaces=tuple(args.namespaces),
        secret_selector=args.secret_selector,
        interval=args.interval,
        dry_run=args.dry_run,
        refresh_workers=args.refresh_workers,
        refresh_per_host=args.refresh_per_host,
        stall_limit=args.stall_limit,
        files=_files_config(args),
    )


def _files_config(args: argparse.Namespace) -> FilesConfig:
    files_address: Address | None = args.files_address
    return FilesConfig(
        enabled=files_address is not None,
        host=files_address.host if files_address is not None else "",
        port=files_address.port if files_address is not None else 0,
        namespace=_own_namespace(args),
        audience=args.files_audience,
        tls_secret=args.tls_secret,
        ca_configmap=args.ca_configmap,
        tls_names=tuple(args.tls_names),
        tls_external=args.tls_external,
        injector_service_account=args.injector_service_account,
        injector_selector=args.injector_selector,
    )


def _check_controller_urls(urls: Sequence[str]) -> None:
    from agents.token_refresher.fileclient import parse_url

    if not urls:
        raise ConfigError("--controller-url names no URL")
    for url in urls:
        try:
            parse_url(url)
        except ValueError as err:
            raise ConfigError(f"--controller-url: {err}") from None


def _own_namespace(args: argparse.Namespace) -> str:
    """--own-namespace, else the pod's namespace from its service account mount,
    else "default"."""
    if args.own_namespace:
        return str(args.own_namespace)
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def _controller(
    args: argparse.Namespace,
    api_client: Any,
    run: _Run,
) -> int:
    from agents.common.kube import EventRecorder
    from agents.common.leader import LeaderElector
    from agents.token_refresher.controller import COMPONENT, Controller
    from agents.token_refresher.fileserver import FileService, WatchedSecrets
    from agents.token_refresher.tls import TlsKeeper

    config = _controller_config(args)
    log.info(
        "%s %s controller starting with %s",
        PROG,
        __version__,
        json.dumps(redacted(config), default=str),
    )
    metrics = ControllerMetrics(run.registry, offline_idle=config.idp.offline_idle)

    def lead() -> None:
        # Due Secrets are refreshed as soon as this replica leads, not at its
        # next pass (`controller` is made below, before the Lease is sought).
        controller.wake.set()

    heartbeat = Heartbeat(max_age=3 * args.interval + 2 * config.idp.request_timeout + 30)
    readiness = _Readiness(heartbeat)

    def health() -> str | None:
        # Asked by the elector before each round: a stuck pass or worker gives
        # up the Lease (by not renewing it), and readiness says why.
        problem = controller.stalled()
        readiness.stalled(problem)
        return problem

    elector = LeaderElector(
        api_client,
        name=config.lease.name,
        namespace=config.lease.namespace,
        identity=config.lease.identity,
        lease_duration=config.lease.duration,
        renew_interval=config.lease.renew_interval,
        on_api_call=metrics.api_call,
        on_leading=lead,
        health=health,
    )
    idp = config.idp
    controller = Controller(
        api_client,
        config,
        refresh_fn=functools.partial(
            refresh,
            auth_method=idp.auth_method,
            verify=idp.ca_bundle or True,
            allow_http=idp.allow_http,
            timeout=idp.request_timeout,
        ),
        metrics=metrics,
        elector=elector,
        recorder=EventRecorder(
            api_client,
            COMPONENT,
            config.lease.identity,
            on_suppressed=run.loop_metrics.event_suppressed,
        ),
    )
    files: FileService | None = None
    if config.files.enabled and not args.once:
        keeper = TlsKeeper(
            api_client,
            config.files.namespace,
            secret_name=config.files.tls_secret,
            configmap_name=config.files.ca_configmap,
            names=config.files.tls_names,
            external=config.files.tls_external,
        )
        TlsExpiry(run.registry, keeper.seconds_left)
        files = FileService(
            api_client,
            config.files,
            namespace=config.files.namespace,
            secrets=WatchedSecrets(controller.caches),
            secret_selector=config.secret_selector,
            metrics=FilesMetrics(run.registry),
            keeper=keeper,
        )
        # Every replica serves files, standbys too: they watch the same Secrets.
        controller.add_listener(files.secret_changed)

    def tick() -> None:
        controller.tick()
        # Blind until the token Secrets are listed (a standby is not blind).
        run.loop_metrics.up.set(1 if controller.synced else 0)

    controller.start()
    try:
        if args.once:
            # By hand on a cluster: one pass, with the Lease (or not at all).
            if not controller.wait_synced(30):
                log.error("the token Secrets could not be listed within 30 s")
                return 1
            if not elector.try_acquire_or_renew():
                log.warning("another replica holds Lease %s: nothing done", config.lease.name)
                return 0
            controller.tick()
            # The refreshes run on workers; each ends within its deadlines.
            controller.drain(idp.request_timeout + 60)
            elector.stop()
            return 0
        elector.start()
        with serving(
            PROG, run.registry, heartbeat, args.metrics_address, stop=run.stop
        ) as stop_event:
            files_thread = None
            if files is not None:
                files_thread = threading.Thread(
                    target=files.run, args=(stop_event,), name="files", daemon=True
                )
                files_thread.start()

            def ready() -> bool:
                # Ready once the Secrets are listed (a standby replica is ready too)
                # and the file server listens: the headless Service then gives
                # injectors this replica's address.
                if not controller.wait_synced(3600):
                    return False
                return files is None or files.serving.wait(3600)

            threading.Thread(
                target=lambda: readiness.listed(ready()), name="ready", daemon=True
            ).start()
            run_loop(
                tick,
                interval=args.interval,
                stop=stop_event,
                wake=controller.wake,
                min_gap=0.05,
                next_due=controller.next_due,
                iterations=run.iterations,
                metrics=run.loop_metrics,
                heartbeat=heartbeat,
            )
            if files_thread is not None:
                files_thread.join(15)
        return 0
    finally:
        elector.stop()
        controller.stop()


class _Readiness:
    """The controller's readiness: its Secrets listed and file server up, and
    neither the pass nor a worker stuck (`Controller.stalled`)."""

    def __init__(self, heartbeat: Heartbeat) -> None:
        self._heartbeat = heartbeat
        self._lock = threading.Lock()
        self._listed = False
        self._stalled: str | None = None

    def listed(self, ready: bool) -> None:
        with self._lock:
            self._listed = ready
            self._publish()

    def stalled(self, problem: str | None) -> None:
        with self._lock:
            if problem == self._stalled:
                return
            self._stalled = problem
            self._publish()

    def _publish(self) -> None:
        if self._stalled:
            self._heartbeat.set_ready(False, f"not leading: {self._stalled}")
        elif self._listed:
            self._heartbeat.set_ready(True)
        else:
            self._heartbeat.set_ready(False, "token Secrets not listed yet")


def _injector(
    args: argparse.Namespace,
    api_client: Any,
    run: _Run,
) -> int:
    from agents.common.kube import EventRecorder
    from agents.token_refresher.injector import COMPONENT, Injector

    config = InjectorConfig(
        node_name=args.node_name,
        proc_root=args.proc_root,
        interval=args.interval,
        dry_run=args.dry_run,
        workers=args.workers,
        allowed_path_prefixes=args.allowed_path_prefixes,
        write_timeout=args.write_timeout,
        max_stuck_writes=args.max_stuck_writes,
        controller=ControllerLinkConfig(
            urls=tuple(args.controller_url),
            server_name=args.controller_server_name,
            token_file=args.controller_token_file,
            ca_configmap=args.ca_configmap,
            ca_file=args.ca_file,
            namespace=_own_namespace(args),
            state_file=args.state_file,
        ),
    )
    log.info(
        "%s %s injector starting with %s",
        PROG,
        __version__,
        json.dumps(redacted(config), default=str),
    )
    injector = Injector(
        api_client,
        config,
        metrics=InjectorMetrics(run.registry),
        recorder=EventRecorder(
            api_client, COMPONENT, config.node_name, on_suppressed=run.loop_metrics.event_suppressed
        ),
    )
    heartbeat = Heartbeat(max_age=3 * args.interval + 60)

    def tick() -> None:
        injector.tick()
        # Blind until this node's pods are listed.
        run.loop_metrics.up.set(1 if injector.pods.synced else 0)
        heartbeat.set_ready(*injector.ready())

    injector.start()
    try:
        if args.once:
            if not injector.pods.wait_synced(30):
                log.error("this node's pods could not be listed within 30 s")
                return 1
            if not injector.files.wait_current(30):
                log.warning("no files from the controller within 30 s; using those kept")
            injector.tick()
            injector.flush_events()
            return 0
        with serving(
            PROG, run.registry, heartbeat, args.metrics_address, stop=run.stop
        ) as stop_event:
            run_loop(
                tick,
                interval=min(args.interval, 5.0),
                stop=stop_event,
                wake=injector.wake,
                min_gap=0.05,
                iterations=run.iterations,
                metrics=run.loop_metrics,
                heartbeat=heartbeat,
            )
        return 0
    finally:
        injector.stop()


def _read_secret(path: str) -> str:
    try:
        secret = Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"cannot read --client-secret-file {path}: {err.strerror}") from err
    if not secret:
        raise ConfigError(f"--client-secret-file {path} is empty")
    return secret
