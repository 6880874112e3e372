"""The Grafana dashboard (manifests/monitoring/node-agents.json) queries what the agents
export, and `kubectl kustomize manifests/monitoring` turns it into the ConfigMap the
Grafana sidecar loads.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.metric_names import (
    MADE_BY_PROMETHEUS,
    agent_registries,
    exported_names,
    need_tool,
    queried_metrics,
    unknown_metrics,
)

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "manifests" / "monitoring"
DASHBOARD = MONITORING / "node-agents.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PREFIXES = ("automount_healer_", "gpu_mem_enforcer_", "token_refresher_")

# Exported but deliberately not drawn: `<family>_created` (when a counter was
# made), and these, which other panels make redundant.
NOT_DRAWN = {
    # The loop's last_success_timestamp_seconds is drawn; a sweep is the loop's tick.
    "automount_healer_last_sweep_timestamp_seconds",
    # Used to draw the p99: the other series of the same histograms.
    "automount_healer_probe_duration_seconds_count",
    "automount_healer_probe_duration_seconds_sum",
    "automount_healer_sweep_duration_seconds_count",
    "automount_healer_sweep_duration_seconds_sum",
    "gpu_mem_enforcer_scan_duration_seconds_count",
    "gpu_mem_enforcer_scan_duration_seconds_sum",
}
NOT_DRAWN |= {
    f"{prefix}tick_duration_seconds_{part}" for prefix in PREFIXES for part in ("count", "sum")
}

Doc = dict[str, Any]


def dashboard() -> Doc:
    return dict(json.loads(DASHBOARD.read_text()))


def all_panels(board: Doc) -> Iterator[Doc]:
    """Every panel, those inside collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(board: Doc) -> dict[str, str]:
    """Every PromQL expression, by where it is: panel targets and variable queries."""
    found = {}
    for panel in all_panels(board):
        for target in panel.get("targets", []):
            found[f"panel {panel['title']!r} query {target['refId']}"] = target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found[f"variable {variable['name']}"] = (
                query["query"] if isinstance(query, dict) else query
            )
    return found


def test_the_dashboard_is_json_grafana_loads() -> None:
    board = dashboard()
    assert board["uid"] == "node-agents"
    assert 36 <= board["schemaVersion"] <= 41
    ids = [panel["id"] for panel in all_panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(board):
        assert panel["type"] in {"row", "timeseries", "stat", "table"}, panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_the_data_source_and_the_node_are_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    source = variables["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    node = variables["node"]
    assert node["type"] == "query" and node["datasource"] == DATASOURCE
    assert node["includeAll"] and node["multi"] and node["allValue"] == ".*"


def test_every_panel_queries_the_chosen_data_source() -> None:
    for panel in all_panels(dashboard()):
        if panel["type"] == "row":
            assert not panel.get("targets"), f"row {panel['title']!r} has queries"
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_a_row_per_agent_and_one_for_their_loops() -> None:
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert len(rows) == 4
    for prefix, row in zip(PREFIXES, rows, strict=False):
        assert f"({prefix}*)" in row
    assert rows[-1].startswith("Loop health")


def test_every_queried_metric_is_exported() -> None:
    assert unknown_metrics(expressions(dashboard()), known=MADE_BY_PROMETHEUS) == {}


def test_a_renamed_metric_is_reported_where_it_is_queried() -> None:
    board = copy.deepcopy(dashboard())
    panel = next(p for p in all_panels(board) if p["title"] == "Heals, failed heals and aborts")
    target = panel["targets"][0]
    name = "automount_healer_heals_total"
    assert name in queried_metrics(target["expr"])
    target["expr"] = target["expr"].replace(name, f"{name}_renamed")
    where = f"panel {panel['title']!r} query {target['refId']}"
    assert unknown_metrics(expressions(board), known=MADE_BY_PROMETHEUS) == {
        where: {f"{name}_renamed"}
    }


def test_every_exported_metric_is_drawn() -> None:
    """A new metric gets a panel, or a line in NOT_DRAWN saying why not."""
    drawn = set().union(*(queried_metrics(e) for e in expressions(dashboard()).values()))
    exported = exported_names(agent_registries().values())
    undrawn = {n for n in exported - drawn - NOT_DRAWN if not n.endswith("_created")}
    assert undrawn == set()
    assert exported >= NOT_DRAWN, "NOT_DRAWN names a metric nobody exports"


def test_kustomize_renders_the_rules_and_the_dashboard_configmap() -> None:
    kubectl = need_tool("/usr/bin/kubectl", "kubectl with kustomize")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(MONITORING)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered.stdout) if d}
    assert sorted(docs) == ["ConfigMap", "PrometheusRule"]
    config_map = docs["ConfigMap"]
    assert config_map["metadata"]["name"] == "node-agents-dashboard"  # no hash suffix
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["node-agents.json"]) == dashboard()
    for doc in docs.values():
        assert doc["metadata"]["namespace"] == "node-agents"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "node-agents"


@pytest.mark.parametrize(
    ("expr", "metrics"),
    [
        (
            'sum by (node, reason) (increase(a_total{node=~"$node"}[$__rate_interval])) > 0',
            {"a_total"},
        ),
        ("histogram_quantile(0.99, sum by (le) (rate(b_bucket[5m])))", {"b_bucket"}),
        ("time() - c_seconds > 300 or d offset 5m * 1e3", {"c_seconds", "d"}),
        ("max_over_time(sum by (x) (e)[1h:5m]) and on (job) f unless g", {"e", "f", "g"}),
        ('label_values(up{job=~"(.*/)?(a|b)"}, node)', {"up"}),
        ("count(h == 0) or vector(0)", {"h"}),
    ],
)
def test_queried_metrics_leaves_out_labels_functions_and_durations(
    expr: str, metrics: set[str]
) -> None:
    assert queried_metrics(expr) == metrics
