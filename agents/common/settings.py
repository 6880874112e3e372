"""Command-line flags with environment-variable defaults, shared by every agent.

Manifests configure agents through env vars, operators on a node through flags;
both go through argparse so that a bad value from either gives the same one-line
error and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, NoReturn

EXIT_BAD_CONFIG = 2

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A configuration value is invalid; the agent exits with code 2."""


def secret(default: Any = None) -> Any:
    """A dataclass field whose value is never logged (see `redacted`)."""
    return field(default=default, metadata={"secret": True})


def redacted(config: Any) -> dict[str, Any]:
    """The config dataclass as a dict, secret fields replaced by '<redacted>'."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("secret") and value:
            value = "<redacted>"
        elif isinstance(value, tuple):
            value = list(value)
        elif is_dataclass(value) and not isinstance(value, type):
            value = redacted(value)
        out[f.name] = value
    return out


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        # time.sleep/Event.wait overflow on inf: refuse it at the door.
        raise argparse.ArgumentTypeError(f"must be a finite number: {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number of seconds >= 0."""
    value = _finite(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def int_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number in [low, high] (no upper bound when high is None)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}: {text!r}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}: {text!r}")
        return value

    return convert


# The label selector grammar of k8s.io/apimachinery/pkg/labels (selector.go):
# comma-separated terms `key`, `!key`, `key=value`, `key==value`, `key!=value`,
# `key in (v1,v2)`, `key notin (v1,v2)`; a key may have a DNS-subdomain prefix.
_LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = rf"(?:[a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}"
_LABEL_VALUE = rf"(?:{_LABEL_NAME})?"
_VALUE_SET = rf"\(\s*{_LABEL_VALUE}(?:\s*,\s*{_LABEL_VALUE})*\s*\)"
_LABEL_TERM = (
    rf"\s*(?:!\s*{_LABEL_KEY}|{_LABEL_KEY}"
    rf"(?:\s*(?:==?|!=)\s*{_LABEL_VALUE}|\s+(?:in|notin)\s*{_VALUE_SET})?)\s*"
)
_LABEL_SELECTOR = re.compile(rf"{_LABEL_TERM}(?:,{_LABEL_TERM})*")


def label_selector(text: str) -> str:
    """argparse type: a Kubernetes label selector, checked here rather than by a 400 later."""
    if text.strip() and not _LABEL_SELECTOR.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a label selector: {text!r}")
    return text.strip()


def boolean(text: str) -> bool:
    """argparse type for env values: true/false, yes/no, 1/0, on/off."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Address:
    """A HOST:PORT to listen on; port 0 picks a free one (tests)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def address(text: str) -> Address | None:
    """argparse type: HOST:PORT, [IPv6]:PORT, :PORT (all addresses), or 'off'."""
    if text.strip().lower() in ("off", "none", ""):
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"write an IPv6 address as [ADDRESS]:PORT, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return Address(host, port)


class _AppendReplacingDefault(argparse._AppendAction):
    """`append`, except that the first flag given drops the default list."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        seen = f"_{self.dest}_given"
        if not getattr(namespace, seen, False):
            setattr(namespace, self.dest, [])
            setattr(namespace, seen, True)
        super().__call__(parser, namespace, values, option_string)


class AgentArgumentParser(argparse.ArgumentParser):
    """argparse with env-var defaults: `add_argument(..., env="NAME")`.

    The env var is looked up as PREFIX_NAME; its value goes through the same
    `type` as the flag, and the help text names it.
    """

    def __init__(
        self, *args: Any, env_prefix: str, environ: Mapping[str, str] | None = None, **kw: Any
    ) -> None:
        kw.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kw)
        self.env_prefix = env_prefix
        self.environ = os.environ if environ is None else environ

    def error(self, message: str) -> NoReturn:
        """One clear line and exit code 2 (argparse would print the usage too)."""
        self.exit(EXIT_BAD_CONFIG, f"{self.prog}: error: {message}\n")

    def add_argument(self, *args: Any, env: str | None = None, **kw: Any) -> argparse.Action:
        if kw.get("action") == "append":
            # A flag given on the command line replaces the default (or env)
            # list instead of adding to it, as single-value flags do.
            kw["action"] = _AppendReplacingDefault
        if env is not None:
            var = f"{self.env_prefix}_{env}"
            if var in self.environ:
                kw["default"] = self._from_env(var, kw)
            kw["help"] = f"{kw.get('help', '')} [env {var}]".strip()
        return super().add_argument(*args, **kw)

    def _from_env(self, var: str, kw: dict[str, Any]) -> Any:
        raw = self.environ[var]
        action = kw.get("action")
        if action in ("store_true", "store_false", argparse.BooleanOptionalAction):
            try:
                return boolean(raw)
            except argparse.ArgumentTypeError as err:
                self.error(f"{var}: {err}")
        if action is _AppendReplacingDefault:
            # Lists come from env as a comma- or colon-separated string.
            items = [p.strip() for p in raw.replace(":", ",").split(",") if p.strip()]
            return [self._checked(var, kw, item) for item in items]
        return self._checked(var, kw, raw)

    def _checked(self, var: str, kw: dict[str, Any], raw: str) -> Any:
        value = self._convert(var, kw.get("type", str), raw)
        if "choices" in kw and value not in kw["choices"]:
            self.error(f"{var}: {raw!r} is not one of {', '.join(map(str, kw['choices']))}")
        return value

    def _convert(self, var: str, convert: Any, raw: str) -> Any:
        try:
            return convert(raw)
        except (argparse.ArgumentTypeError, ValueError) as err:
            self.error(f"{var}: {err}")


def add_common_flags(parser: AgentArgumentParser, *, interval: float, metrics_address: str) -> None:
    """The flags every agent has (design.md, "Shared behaviour of every agent")."""
    parser.add_argument(
        "--once", action="store_true", env="ONCE", help="run one pass, print what was done, exit"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        env="DRY_RUN",
        help="decide and report, but change nothing on the node",
    )
    parser.add_argument(
        "--interval",
        type=positive_float,
        default=interval,
        env="INTERVAL",
        help="seconds between passes",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", env="LOG_LEVEL", help="log level"
    )
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", env="LOG_FORMAT", help="log format"
    )
    parser.add_argument(
        "--metrics-address",
        type=address,
        default=address(metrics_address),
        env="METRICS_ADDRESS",
        help="HOST:PORT for /metrics, /healthz and /readyz ('off' to disable)",
    )


def add_kube_flags(parser: AgentArgumentParser, *, node_help: str) -> None:
    """`--node-name` and `--kubeconfig`, for agents that talk to Kubernetes.

    The node name also comes from a bare `NODE_NAME`, the name manifests give
    the downward API's spec.nodeName; the prefixed variable wins.
    """
    parser.add_argument(
        "--node-name",
        default=parser.environ.get("NODE_NAME", ""),
        env="NODE_NAME",
        help=f"{node_help} (env NODE_NAME works too)",
    )
    parser.add_argument(
        "--kubeconfig",
        default="",
        env="KUBECONFIG",
        help="kubeconfig file; default: in-cluster config, else $KUBECONFIG, else none",
    )
