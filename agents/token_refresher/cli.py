"""`token-refresher`: roles, flags and env vars, wiring, and `main(argv) -> int`.

Roles: `local` (one token file on one node, no Kubernetes). The cluster roles
(the leader-elected `controller` and the per-node `injector`) come next.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from prometheus_client import CollectorRegistry

from agents import __version__
from agents.common.agent import serving
from agents.common.logs import setup_logging
from agents.common.loop import Heartbeat, run_loop
from agents.common.metrics import LoopMetrics
from agents.common.settings import (
    EXIT_BAD_CONFIG,
    AgentArgumentParser,
    ConfigError,
    add_common_flags,
    positive_float,
    redacted,
)
from agents.token_refresher.local import LocalConfig, LocalRefresher, refresher_for
from agents.token_refresher.metrics import PREFIX, RefresherMetrics
from agents.token_refresher.oauth import InsecureURLError, check_token_url, quiet_token_loggers
from agents.token_refresher.spec import SpecError, parse_mode

PROG = "token-refresher"
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


def build_parser(environ: Mapping[str, str] | None = None) -> AgentArgumentParser:
    parser = AgentArgumentParser(
        prog=PROG,
        description="Keep OAuth2 access tokens fresh and written where they are used.",
        env_prefix="TOKEN_REFRESHER",
        environ=environ,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    roles = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
    local = roles.add_parser(
        "local",
        help="refresh one token file in place and render it to one output file",
        env_prefix="TOKEN_REFRESHER",
        environ=environ,
    )
    add_common_flags(local, interval=30.0, metrics_address=":9103")
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
        help="seconds for each IdP request",
    )
    parser.add_argument(
        "--refresh-fraction",
        type=float,
        default=0.8,
        env="REFRESH_FRACTION",
        help="refresh at this share of the token lifetime",
    )
    parser.add_argument(
        "--idle-window",
        type=positive_float,
        default=3600.0,
        env="IDLE_WINDOW",
        help="refresh tokens without expiry at least this often (seconds)",
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
        check_token_url(args.token_url, allow_http=args.allow_http)
        if not 0.1 <= args.refresh_fraction <= 0.85:
            raise ConfigError("--refresh-fraction must be between 0.1 and 0.85")
        client_secret = _read_secret(args.client_secret_file)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_CONFIG
    except (ConfigError, InsecureURLError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    setup_logging(args.log_level, args.log_format)
    quiet_token_loggers()
    config = LocalConfig(
        token_file=args.token_file,
        out=args.out,
        template=args.template,
        owner=args.owner,
        group=args.owner if args.group is None else args.group,
        mode=args.mode,
        refresh_fraction=args.refresh_fraction,
        idle_window=args.idle_window,
    )
    log.info(
        "%s %s local starting with %s", PROG, __version__, json.dumps(redacted(config), default=str)
    )
    registry = registry or CollectorRegistry()
    loop_metrics = LoopMetrics(registry, PREFIX, __version__)
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
        metrics=RefresherMetrics(registry),
    )
    if args.once:
        refresher.tick()
        return 0
    heartbeat = Heartbeat(max_age=3 * args.interval + 2 * args.request_timeout + 10)
    heartbeat.set_ready(True)
    with serving(PROG, registry, heartbeat, args.metrics_address, stop=stop) as stop_event:
        run_loop(
            refresher.tick,
            interval=args.interval,
            stop=stop_event,
            iterations=iterations,
            metrics=loop_metrics,
            heartbeat=heartbeat,
        )
    return 0


def _read_secret(path: str) -> str:
    try:
        secret = Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"cannot read --client-secret-file {path}: {err.strerror}") from err
    if not secret:
        raise ConfigError(f"--client-secret-file {path} is empty")
    return secret
