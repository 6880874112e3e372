"""The healer's flags and their env-var equivalents resolve to one HealerConfig."""

from __future__ import annotations

import pytest

from agents.common.settings import Address, ConfigError
from agents.mount_healer.cli import config_from_args, main
from agents.mount_healer.config import HealerConfig


def test_defaults_are_the_documented_ones() -> None:
    config = config_from_args([], {})
    assert config == HealerConfig(metrics_address=Address("0.0.0.0", 9101))


def test_env_configures_what_flags_do() -> None:
    config = config_from_args(
        [],
        {
            "AUTOMOUNT_HEALER_ROOTS": "/cvmfs,/eos/",
            "AUTOMOUNT_HEALER_INTERVAL": "0.5",
            "AUTOMOUNT_HEALER_DRY_RUN": "true",
            "AUTOMOUNT_HEALER_EVENT_DRIVEN": "false",
            "AUTOMOUNT_HEALER_ABORT_HUNG_AFTER": "30",
            "AUTOMOUNT_HEALER_METRICS_ADDRESS": "off",
            "NODE_NAME": "node-a",
        },
    )
    assert config.roots == ("/cvmfs", "/eos")
    assert config.interval == 0.5
    assert config.dry_run and not config.event_driven
    assert config.abort_hung_after == 30.0
    assert config.metrics_address is None
    assert config.node_name == "node-a"


def test_flags_override_env() -> None:
    config = config_from_args(
        ["--root", "/data", "--event-driven", "--interval", "3"],
        {
            "AUTOMOUNT_HEALER_ROOTS": "/cvmfs",
            "AUTOMOUNT_HEALER_EVENT_DRIVEN": "0",
            "AUTOMOUNT_HEALER_INTERVAL": "1",
        },
    )
    assert config.roots == ("/data",)
    assert config.event_driven
    assert config.interval == 3.0


def test_relative_root_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        config_from_args(["--root", "cvmfs"], {})


@pytest.mark.parametrize(
    "environ",
    [
        {"AUTOMOUNT_HEALER_EVENT_DRIVEN": "maybe"},
        {"AUTOMOUNT_HEALER_INTERVAL": "-1"},
        {"AUTOMOUNT_HEALER_LOG_FORMAT": "xml"},
        {"AUTOMOUNT_HEALER_METRICS_ADDRESS": "localhost"},
    ],
)
def test_bad_env_exits_2_with_one_line(
    environ: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--once"], environ=environ) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("automount-healer: error: AUTOMOUNT_HEALER_")
