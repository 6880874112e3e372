"""Metric names: the ones the agents export, and the ones PromQL expressions query.

The dashboard and the alert rules name metrics in strings that nothing checks
at deploy time: a renamed metric makes a panel go blank and an alert go
silent. `unknown_metrics` finds such names; `agent_registries` builds the
agents' real registries (every metric family with a sample) to compare with,
and to hand to `promtool check metrics`.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Mapping

import pytest
from prometheus_client import CollectorRegistry

from agents.common.metrics import LoopMetrics
from agents.gpu_enforcer import metrics as gpu_metrics
from agents.gpu_enforcer.enforcer import GpuReport, PodUsage, TickReport
from agents.gpu_enforcer.limits import Limit
from agents.gpu_enforcer.nvml import Gpu
from agents.gpu_enforcer.policy import Verdict as GpuVerdict
from agents.mount_healer import metrics as healer_metrics
from agents.mount_healer.healer import MountReport, Verdict
from agents.token_refresher import metrics as token_metrics
from tests.conftest import IN_CI

PROMTOOL = "/usr/bin/promtool"

MADE_BY_PROMETHEUS = frozenset({"up"})
"""Series Prometheus writes itself for every target."""

GIB = 1 << 30


def need_tool(path: str, package: str) -> str:
    """`path` if installed; else skip, or fail in CI (`CI` set), where every test runs."""
    found = shutil.which(path)
    if found is None:
        reason = f"needs {path} ({package})"
        if IN_CI:
            pytest.fail(f"CI must run this test: {reason}")
        pytest.skip(reason)
    return found


# --- what the agents export ----------------------------------------------------------


def _healer() -> CollectorRegistry:
    registry = CollectorRegistry()
    LoopMetrics(registry, healer_metrics.PREFIX, "0.0.0-test")
    metrics = healer_metrics.HealerMetrics(registry)
    metrics.heal_failures.labels("EBUSY").inc()
    severed = MountReport(
        root="/cvmfs",
        mountpoint="/cvmfs/atlas.cern.ch",
        fstype="fuse.cvmfs2",
        mount_id=812,
        conn_id=73,
        verdict=Verdict.SEVERED,
    )
    in_slave_copy = MountReport(
        root="/var/lib/kubelet/pods/x/volumes/cvmfs",
        mountpoint="/var/lib/kubelet/pods/x/volumes/cvmfs/lhcb.cern.ch",
        fstype="fuse.cvmfs2",
        mount_id=813,
        conn_id=74,
        verdict=Verdict.SEVERED,
        skip_reason="mount_propagation",
    )
    metrics.mountinfo_malformed_lines.set(1)
    registry.register(
        healer_metrics.SweepStateCollector(
            lambda: [severed, in_slave_copy],
            lambda: ["/cvmfs"],
            lambda: {("/cvmfs", "/cvmfs/atlas.cern.ch"): 3},
        )
    )
    return registry


def _gpu_enforcer() -> CollectorRegistry:
    registry = CollectorRegistry()
    LoopMetrics(registry, gpu_metrics.PREFIX, "0.0.0-test")
    metrics = gpu_metrics.EnforcerMetrics(registry)
    metrics.actions.labels("kill", "hold").inc()
    metrics.nvml_errors.labels("GPU_IS_LOST").inc()
    gpu = Gpu(index=0, uuid="GPU-0a1b", total_bytes=16 * GIB, used_bytes=12 * GIB)
    greedy = PodUsage(
        gpu=gpu,
        owner="4f5e-uid",
        pod={"metadata": {"namespace": "ml", "name": "train-0"}},
        used_bytes=10 * GIB,
        limit=Limit(hard_bytes=8 * GIB, soft_bytes=7 * GIB, source="share"),
        processes=[],
        verdict=GpuVerdict.OVER,
    )
    report = TickReport(gpus=[GpuReport(gpu=gpu, usages=[greedy], unattributed_bytes=GIB)])
    registry.register(gpu_metrics.SampleCollector(lambda: report))
    return registry


def _token_local() -> CollectorRegistry:
    registry = CollectorRegistry()
    LoopMetrics(registry, token_metrics.PREFIX, "0.0.0-test")
    metrics = token_metrics.RefresherMetrics(registry)
    metrics.expiries.access.labels("token.json").set(900)
    metrics.expiries.refresh.labels("token.json", "true").set(30 * 86400)
    metrics.injection_failures.labels("token_file").inc()
    return registry


def _token_controller() -> CollectorRegistry:
    registry = CollectorRegistry()
    LoopMetrics(registry, token_metrics.PREFIX, "0.0.0-test")
    metrics = token_metrics.ControllerMetrics(registry)
    metrics.expiries.access.labels("users/alice-token").set(900)
    metrics.expiries.refresh.labels("users/alice-token", "false").set(1800)
    metrics.api_call("update", "secrets")
    metrics.token_secrets.labels("stopped").set(1)
    files = token_metrics.FilesMetrics(registry)
    files.streams.set(1)
    files.snapshots_sent.inc()
    token_metrics.TlsExpiry(registry, lambda: {"serving": 864000.0, "ca": 2.5e7})
    return registry


def _token_injector() -> CollectorRegistry:
    registry = CollectorRegistry()
    LoopMetrics(registry, token_metrics.PREFIX, "0.0.0-test")
    metrics = token_metrics.InjectorMetrics(registry)
    metrics.injection_failures.labels("symlink").inc()
    metrics.api_call("list", "pods")
    metrics.files.labels("failing").set(1)
    metrics.controller_errors.labels("unauthenticated").inc()
    metrics.snapshot_age_from(lambda: 12.0)
    return registry


def agent_registries() -> dict[str, CollectorRegistry]:
    """A fresh registry per agent (per role for the token refresher), as its `cli.py`
    fills it, with a sample in every family (label values set where needed)."""
    return {
        "automount-healer": _healer(),
        "gpu-mem-enforcer": _gpu_enforcer(),
        "token-refresher local": _token_local(),
        "token-refresher controller": _token_controller(),
        "token-refresher injector": _token_injector(),
    }


# The series a family of each type puts in Prometheus (a counter `x` is `x_total`,
# never `x`).
_SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def exported_names(registries: Iterable[CollectorRegistry]) -> set[str]:
    """Every series name the registries expose: sample names, and what each family's
    type makes of its name (so a counter family contributes `_total`, not itself)."""
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.update(sample.name for sample in family.samples)
            names.update(family.name + s for s in _SERIES_SUFFIXES.get(family.type, ("",)))
    return names


# --- what PromQL queries -------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "atan2", "inf", "nan", "start", "end"}
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count"}
_AGGREGATIONS |= {"count_values", "bottomk", "topk", "quantile"}
_FUNCTIONS = {
    "abs",
    "absent",
    "absent_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "ln",
    "log2",
    "log10",
    "minute",
    "month",
    "predict_linear",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sqrt",
    "time",
    "timestamp",
    "vector",
    "year",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "quantile_over_time",
    "stddev_over_time",
    "stdvar_over_time",
    "last_over_time",
    "present_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "cos",
    "cosh",
    "sin",
    "sinh",
    "tan",
    "tanh",
    "deg",
    "pi",
    "rad",
    "label_values",
    "label_names",
    "query_result",
    "metrics",
}
NOT_METRICS = frozenset(_KEYWORDS | _AGGREGATIONS | _FUNCTIONS)
"""PromQL keywords, aggregations and functions, and Grafana's variable functions."""

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r"\b__name__\s*[=!]")
# Grafana: label_values(<series selector>, <label>) queries the selector only.
_LABEL_VALUES = re.compile(r"\blabel_values\s*\(\s*(?:(.*),\s*)?[A-Za-z_]\w*\s*\)", re.DOTALL)
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+")
# Not preceded by a word character or `.`: `5m` and `1e3` hold no identifier.
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")


def queried_metrics(expr: str) -> set[str]:
    """The metric names an expression (PromQL, or a Grafana variable query) reads.

    Label names, label values, durations, keywords and functions are left out:
    strings, `{...}`, `[...]` and grouping clauses are blanked first, then every
    identifier not called like a function is a metric name.
    """
    text = _STRINGS.sub('""', expr)
    if _NAME_MATCHER.search(text):
        raise ValueError(f"name the metric, not a __name__ matcher: {expr}")
    text = _LABEL_VALUES.sub(lambda m: m.group(1) or "", text)
    text = _MATCHERS.sub("{}", text)
    text = _GROUPING.sub(" ", text)
    text = _RANGES.sub("[]", text)
    text = _VARIABLES.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(0)
        if text[match.end() :].lstrip().startswith("(") or name.lower() in NOT_METRICS:
            continue
        names.add(name)
    return names


def unknown_metrics(
    exprs: Mapping[str, str],
    known: Iterable[str] = (),
    registries: Iterable[CollectorRegistry] = (),
) -> dict[str, set[str]]:
    """For each named expression, the metrics it queries that nobody exports.

    `known`: names made elsewhere (`up`, recording rules); `registries`: the
    agents' registries (default: `agent_registries()`).
    """
    registries = list(registries) or list(agent_registries().values())
    exported = exported_names(registries) | set(known)
    unknown = {where: queried_metrics(expr) - exported for where, expr in exprs.items()}
    return {where: names for where, names in unknown.items() if names}
