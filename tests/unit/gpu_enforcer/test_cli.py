"""The enforcer's command line: config errors, and a node with no GPU library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents.gpu_enforcer.cli import config_from_args, main


def test_env_and_flags_resolve_to_one_config(tmp_path: Path) -> None:
    plugin = tmp_path / "config.yaml"
    plugin.write_text(
        "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
        "    - name: nvidia.com/gpu\n      replicas: 4\n"
    )
    config, local = config_from_args(
        ["--hold", "30", "--pressure-aware"],
        {
            "GPU_MEM_ENFORCER_ACTION": "evict",
            "GPU_MEM_ENFORCER_DEVICE_PLUGIN_CONFIG": str(plugin),
            "GPU_MEM_ENFORCER_HOST_LIMIT": "2Gi",
            "GPU_MEM_ENFORCER_LOCAL": "true",
            "NODE_NAME": "gpu-1",
        },
    )
    assert local
    assert config.action == "evict" and config.replicas == 4
    assert config.policy.hold == 30 and config.policy.pressure_aware
    assert config.host_limit == 2 * 1024**3 and config.node_name == "gpu-1"


def test_a_missing_device_plugin_config_falls_back_to_the_node_label(tmp_path: Path) -> None:
    config, _ = config_from_args(["--device-plugin-config", str(tmp_path / "nope")], {})
    assert config.replicas is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--action", "shoot"],
        ["--host-limit", "lots"],
        ["--free-threshold", "2"],
        ["--replicas", "0"],
        ["--limits-file", "/nonexistent/limits.json"],
    ],
)
def test_bad_config_exits_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--once", "--local"], environ={}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu-mem-enforcer: error:")


def test_no_gpu_library_on_the_node_is_reported_and_not_fatal(tmp_path: Path) -> None:
    # No fake on the library path: pynvml finds no libnvidia-ml.so.1 at all.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "FAKE_NVML_STATE")}
    done = subprocess.run(
        [sys.executable, "-m", "agents.gpu_enforcer", "--once", "--local"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    # Issue 9.8: nothing was checked, so not 0; the agent itself stays up in a loop.
    assert done.returncode == 1, done.stderr
    assert "NVML unavailable" in done.stdout and "LIBRARY_NOT_FOUND" in done.stdout


def test_peer_schedulers_from_flags_and_env() -> None:
    config, _ = config_from_args(
        ["--peer-scheduler", "hami,gpushare", "--peer-scheduler", "hami"], {}
    )
    assert config.peer_schedulers == ("hami", "gpushare")
    config, _ = config_from_args([], {"GPU_MEM_ENFORCER_PEER_SCHEDULER": "gpushare"})
    assert config.peer_schedulers == ("gpushare",)
    assert config_from_args([], {})[0].peer_schedulers == ()


def test_an_unknown_peer_scheduler_is_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--peer-scheduler", "volcano", "--once", "--local"], environ={}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "volcano" in err[0]
