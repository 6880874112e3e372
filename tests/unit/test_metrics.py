"""The agents' metrics follow Prometheus' naming rules and survive being scraped.

Each agent's registry is rendered as `/metrics` renders it and checked by
`promtool check metrics` (the live endpoints are checked by the integration
tests of the healer and the enforcer); the names are checked for what promtool
does not see, and the labels against the target labels the PodMonitors add.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from tests.support.metric_names import PROMTOOL, agent_registries, need_tool

REPO = Path(__file__).resolve().parents[2]
PREFIX = {
    "automount-healer": "automount_healer_",
    "gpu-mem-enforcer": "gpu_mem_enforcer_",
    "token-refresher": "token_refresher_",
}
PODMONITOR = {
    "automount-healer": REPO / "manifests" / "mount-healer" / "podmonitor.yaml",
    "gpu-mem-enforcer": REPO / "manifests" / "gpu-enforcer" / "podmonitor.yaml",
    "token-refresher": REPO / "manifests" / "token-refresher" / "podmonitor.yaml",
}
# What the Prometheus Operator puts on every target of a PodMonitor, plus our
# relabelled node and the token refresher's component.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "node"}
TARGET_LABELS |= {"app_kubernetes_io_component"}
UNITS = ("seconds", "bytes")

REGISTRIES = agent_registries()


def agent(role: str) -> str:
    return role.split(maxsplit=1)[0]


@pytest.mark.parametrize("role", sorted(REGISTRIES))
def test_metrics_pass_promtool(role: str) -> None:
    promtool = need_tool(PROMTOOL, "Debian package prometheus")
    body = generate_latest(REGISTRIES[role])
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    problems = (checked.stdout + checked.stderr).decode()
    assert checked.returncode == 0, problems
    assert problems.strip() == ""


def families(registry: CollectorRegistry) -> list[tuple[str, str, set[str]]]:
    """(name, type, label names) of each family, as scraped."""
    found = []
    for family in registry.collect():
        labels = set().union(*(set(s.labels) for s in family.samples)) - {"le"}
        found.append((family.name, family.type, labels))
    return found


@pytest.mark.parametrize("role", sorted(REGISTRIES))
def test_every_family_has_the_agent_prefix_and_its_unit_last(role: str) -> None:
    for name, kind, _ in families(REGISTRIES[role]):
        assert name.startswith(PREFIX[agent(role)]), name
        # The base unit is the name's last word (`..._seconds_to_expiry` is not).
        words = name.split("_")
        for unit in UNITS:
            assert unit not in words[:-1], f"{name}: the unit {unit} must end the name"
        assert not re.search(r"(milli|micro|nano|kilo|mega|giga)", name), f"{name}: base units"
        if kind == "counter":
            assert not name.endswith("_total"), f"{name}: the client adds _total"


@pytest.mark.parametrize("role", sorted(REGISTRIES))
def test_every_family_has_a_sample(role: str) -> None:
    """So that promtool above and the dashboard checks see every family."""
    for family in REGISTRIES[role].collect():
        assert family.samples, f"{family.name}: set a label value in tests/support"


@pytest.mark.parametrize("role", sorted(REGISTRIES))
def test_labels_clash_with_target_labels_only_where_the_podmonitor_honours_them(
    role: str,
) -> None:
    """Prometheus renames a scraped `pod` to `exported_pod` unless honorLabels is set."""
    (monitor,) = [d for d in yaml.safe_load_all(PODMONITOR[agent(role)].read_text()) if d]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for name, _, labels in families(REGISTRIES[role]):
        clash = labels & TARGET_LABELS
        if clash:
            assert clash <= {"namespace", "pod"}, f"{name}: {clash} would be overwritten"
            assert endpoint.get("honorLabels") is True, f"{name}: {clash} would be exported_*"
