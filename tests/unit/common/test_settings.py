"""Flags with env-var defaults: what an operator or a manifest gets for each input."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from agents.common.settings import (
    EXIT_BAD_CONFIG,
    Address,
    AgentArgumentParser,
    add_common_flags,
    address,
    label_selector,
    non_negative_float,
    positive_float,
    redacted,
    secret,
)

PROG = "demo-agent"
PREFIX = "DEMO"


def build_parser(environ: Mapping[str, str]) -> AgentArgumentParser:
    """The common flags plus a list flag, as an agent's `cli.py` builds them."""
    parser = AgentArgumentParser(prog=PROG, env_prefix=PREFIX, environ=environ)
    add_common_flags(parser, interval=30.0, metrics_address=":9100")
    parser.add_argument("--root", dest="roots", action="append", default=[], env="ROOTS")
    return parser


def parse(environ: Mapping[str, str], argv: Sequence[str] = ()) -> argparse.Namespace:
    return build_parser(environ).parse_args(list(argv))


def assert_one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """stderr holds exactly one `prog: error: ...` line naming every needle; stdout is empty."""
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROG}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- defaults and env-var defaults -------------------------------------------


def test_defaults_without_env() -> None:
    args = parse({})
    assert args.interval == 30.0
    assert args.once is False
    assert args.dry_run is False
    assert args.log_level == "info"
    assert args.log_format == "text"
    assert args.metrics_address == Address("0.0.0.0", 9100)
    assert args.roots == []


def test_env_values_become_defaults_through_the_flag_type() -> None:
    args = parse(
        {
            "DEMO_INTERVAL": "5",
            "DEMO_LOG_LEVEL": "debug",
            "DEMO_LOG_FORMAT": "json",
            "DEMO_METRICS_ADDRESS": "127.0.0.1:9200",
        }
    )
    assert args.interval == 5.0
    assert isinstance(args.interval, float)
    assert args.log_level == "debug"
    assert args.log_format == "json"
    assert args.metrics_address == Address("127.0.0.1", 9200)


def test_env_var_without_the_prefix_is_ignored() -> None:
    assert parse({"INTERVAL": "5", "OTHER_INTERVAL": "6"}).interval == 30.0


def test_env_can_turn_the_metrics_server_off() -> None:
    assert parse({"DEMO_METRICS_ADDRESS": "off"}).metrics_address is None


def test_flag_overrides_env() -> None:
    args = parse({"DEMO_INTERVAL": "5", "DEMO_LOG_LEVEL": "debug"}, ["--interval", "7"])
    assert args.interval == 7.0
    assert args.log_level == "debug"


def test_help_names_the_env_var() -> None:
    text = build_parser({}).format_help()
    assert "DEMO_INTERVAL" in text
    assert "DEMO_ROOTS" in text


# --- lists from env ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/cvmfs,/data", ["/cvmfs", "/data"]),
        ("/cvmfs:/data", ["/cvmfs", "/data"]),
        ("/cvmfs,/data:/home", ["/cvmfs", "/data", "/home"]),
        (" /cvmfs , ,/data: ", ["/cvmfs", "/data"]),
        ("/cvmfs", ["/cvmfs"]),
        ("", []),
    ],
)
def test_append_list_from_env(raw: str, expected: list[str]) -> None:
    assert parse({"DEMO_ROOTS": raw}).roots == expected


def test_append_list_from_env_goes_through_the_type() -> None:
    parser = AgentArgumentParser(prog=PROG, env_prefix=PREFIX, environ={"DEMO_GAPS": "1,2.5"})
    parser.add_argument("--gap", dest="gaps", action="append", type=positive_float, env="GAPS")
    assert parser.parse_args([]).gaps == [1.0, 2.5]


def test_append_list_item_of_wrong_type_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    parser = AgentArgumentParser(prog=PROG, env_prefix=PREFIX, environ={"DEMO_GAPS": "1,-2"})
    with pytest.raises(SystemExit) as exc:
        parser.add_argument("--gap", dest="gaps", action="append", type=positive_float, env="GAPS")
        parser.parse_args([])
    assert exc.value.code == EXIT_BAD_CONFIG
    assert_one_error_line(capsys, "DEMO_GAPS", "-2")


def test_append_flags_without_env() -> None:
    assert parse({}, ["--root", "/a", "--root", "/b"]).roots == ["/a", "/b"]


def test_append_flag_replaces_the_env_list() -> None:
    assert parse({"DEMO_ROOTS": "/cvmfs"}, ["--root", "/data"]).roots == ["/data"]


def test_append_list_from_env_checks_choices(capsys: pytest.CaptureFixture[str]) -> None:
    parser = AgentArgumentParser(
        prog=PROG, env_prefix=PREFIX, environ={"DEMO_SOURCES": "nvml,bogus"}
    )
    with pytest.raises(SystemExit) as exc:
        parser.add_argument(
            "--source", dest="sources", action="append", choices=["nvml", "procfs"], env="SOURCES"
        )
        parser.parse_args([])
    assert exc.value.code == EXIT_BAD_CONFIG
    assert_one_error_line(capsys, "DEMO_SOURCES", "bogus")


# --- booleans from env -----------------------------------------------------------


@pytest.mark.parametrize("raw", ["1", "true", "True", "YES", "on", " yes "])
def test_true_env_sets_store_true_flag(raw: str) -> None:
    args = parse({"DEMO_ONCE": raw, "DEMO_DRY_RUN": raw})
    assert args.once is True
    assert args.dry_run is True


@pytest.mark.parametrize("raw", ["0", "false", "No", "OFF", ""])
def test_false_env_leaves_store_true_flag_off(raw: str) -> None:
    assert parse({"DEMO_ONCE": raw}).once is False


def test_store_true_flag_wins_over_false_env() -> None:
    assert parse({"DEMO_ONCE": "false"}, ["--once"]).once is True


def test_store_false_flag_from_env() -> None:
    parser = AgentArgumentParser(prog=PROG, env_prefix=PREFIX, environ={"DEMO_EVENTS": "no"})
    parser.add_argument("--no-events", dest="events", action="store_false", env="EVENTS")
    assert parser.parse_args([]).events is False


# --- bad values: exit 2, one line ------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "needles"),
    [
        ({"DEMO_ONCE": "maybe"}, ("DEMO_ONCE", "maybe")),
        ({"DEMO_INTERVAL": "soon"}, ("DEMO_INTERVAL", "soon")),
        ({"DEMO_INTERVAL": "-1"}, ("DEMO_INTERVAL", "-1")),
        ({"DEMO_INTERVAL": "0"}, ("DEMO_INTERVAL",)),
        ({"DEMO_METRICS_ADDRESS": "localhost"}, ("DEMO_METRICS_ADDRESS", "localhost")),
        ({"DEMO_METRICS_ADDRESS": ":99999"}, ("DEMO_METRICS_ADDRESS", "99999")),
    ],
)
def test_bad_env_value_exits_2_with_one_line(
    environ: dict[str, str], needles: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(environ)
    assert exc.value.code == EXIT_BAD_CONFIG
    assert_one_error_line(capsys, *needles)


@pytest.mark.parametrize(
    ("variable", "raw", "choices"),
    [
        ("DEMO_LOG_LEVEL", "verbose", ("debug", "info", "warning", "error")),
        ("DEMO_LOG_FORMAT", "xml", ("text", "json")),
    ],
)
def test_env_value_outside_choices_exits_2(
    variable: str, raw: str, choices: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse({variable: raw})
    assert exc.value.code == EXIT_BAD_CONFIG
    assert_one_error_line(capsys, variable, raw, *choices)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--bogus"], "--bogus"),
        (["--interval", "0"], "--interval"),
        (["--interval", "soon"], "soon"),
        (["--log-level", "verbose"], "verbose"),
        (["--metrics-address", "host:port"], "host:port"),
        (["--interval"], "--interval"),
    ],
)
def test_bad_flag_exits_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser({})
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(argv)
    assert exc.value.code == EXIT_BAD_CONFIG
    assert_one_error_line(capsys, needle)


# --- address ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", Address("127.0.0.1", 9100)),
        ("localhost:65535", Address("localhost", 65535)),
        (":9100", Address("0.0.0.0", 9100)),
        ("[::1]:9100", Address("::1", 9100)),
        ("[::]:0", Address("::", 0)),
        ("0.0.0.0:0", Address("0.0.0.0", 0)),
    ],
)
def test_address_parses(text: str, expected: Address) -> None:
    assert address(text) == expected


@pytest.mark.parametrize("text", ["off", "OFF", " off ", "none", ""])
def test_address_off(text: str) -> None:
    assert address(text) is None


@pytest.mark.parametrize(
    "text", ["9100", "localhost", "host:", "host:http", "host:65536", "host:-1", "[::1]"]
)
def test_bad_address_is_rejected(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        address(text)


def test_unbracketed_ipv6_without_port_is_rejected() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        address("::1")


@pytest.mark.parametrize(
    ("value", "text"),
    [(Address("127.0.0.1", 9100), "127.0.0.1:9100"), (Address("::1", 9100), "[::1]:9100")],
)
def test_address_str_round_trips(value: Address, text: str) -> None:
    assert str(value) == text
    assert address(str(value)) == value


# --- numbers ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [("1.5", 1.5), ("30", 30.0), ("1e-3", 0.001)])
def test_positive_float(text: str, expected: float) -> None:
    assert positive_float(text) == expected


@pytest.mark.parametrize("text", ["0", "0.0", "-1", "abc", "", "nan"])
def test_positive_float_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_float(text)


def test_positive_float_rejects_infinity() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_float("inf")


def test_non_negative_float() -> None:
    assert non_negative_float("0") == 0.0
    assert non_negative_float("2.5") == 2.5
    with pytest.raises(argparse.ArgumentTypeError):
        non_negative_float("-0.1")


@pytest.mark.parametrize(
    "text",
    [
        "token-refresher.node-agents.io/token=true",
        "a==b,c!=d",
        "!legacy",
        "tier",
        "env in (prod, dev)",
        "env notin (test),tier",
        "a=",
    ],
)
def test_label_selector_accepts_the_api_servers_grammar(text: str) -> None:
    assert label_selector(f" {text} ") == text


@pytest.mark.parametrize(
    "text", ["a=b,", "=b", "a b", "a in x", "-a=b", "a=(b)", "a=b=c", "a in (x y)", "a,,b"]
)
def test_label_selector_refuses_what_the_api_server_would(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a label selector"):
        label_selector(text)


# --- redacted ---------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """A config as an agent's `config.py` declares it."""

    client_id: str = "node-agent"
    client_secret: str = secret("")
    refresh_token: str | None = secret(None)
    roots: tuple[str, ...] = field(default=("/cvmfs",))
    interval: float = 30.0


def test_secret_field_keeps_its_default() -> None:
    assert DemoConfig().client_secret == ""
    assert DemoConfig().refresh_token is None


def test_redacted_hides_secret_values() -> None:
    config = DemoConfig(client_secret="CS-s3cr3t", refresh_token="RT-s3cr3t")
    out = redacted(config)
    assert out["client_secret"] == "<redacted>"
    assert out["refresh_token"] == "<redacted>"
    text = json.dumps(out)
    assert "CS-s3cr3t" not in text
    assert "RT-s3cr3t" not in text


def test_redacted_shows_plain_fields_and_unset_secrets() -> None:
    out = redacted(DemoConfig())
    assert out == {
        "client_id": "node-agent",
        "client_secret": "",
        "refresh_token": None,
        "roots": ["/cvmfs"],
        "interval": 30.0,
    }
    json.dumps(out)  # loggable as JSON as it is
