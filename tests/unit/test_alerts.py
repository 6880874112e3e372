"""The alert rules (manifests/monitoring/prometheusrule.yaml) run in promtool.

`promtool check rules` checks the syntax; `promtool test rules` evaluates every
alert over made-up series, as the PodMonitors label them, once where it must
fire and once where it must stay quiet. The annotations are compared too: the
expected text is rendered here from the rule's own templates, and a template
naming a label the alert does not have fails the test.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.metric_names import MADE_BY_PROMETHEUS, PROMTOOL, need_tool, unknown_metrics

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "manifests" / "monitoring" / "prometheusrule.yaml"
SEVERITIES = {"warning", "critical"}

Doc = dict[str, Any]
Labels = Mapping[str, str]


def groups() -> list[Doc]:
    (doc,) = [d for d in yaml.safe_load_all(RULES.read_text()) if d]
    assert doc["kind"] == "PrometheusRule"
    return list(doc["spec"]["groups"])


def alerts() -> dict[str, Doc]:
    found: dict[str, Doc] = {}
    for group in groups():
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] not in found, f"alert {rule['alert']} defined twice"
                found[rule["alert"]] = rule
    return found


def write_rules(directory: Path) -> Path:
    """The PrometheusRule's `spec` is a Prometheus rule file: what promtool reads."""
    (doc,) = [d for d in yaml.safe_load_all(RULES.read_text()) if d]
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump(doc["spec"], sort_keys=False))
    return path


# --- the series, labelled as the PodMonitors label them ------------------------------

TARGET = {"endpoint": "metrics"}
HEALER = TARGET | {
    "namespace": "node-agents",
    "pod": "automount-healer-x7k2p",
    "container": "automount-healer",
    "node": "node-1",
    "instance": "10.0.0.1:9101",
    "job": "node-agents/automount-healer",
}
GPU = TARGET | {
    "namespace": "node-agents",
    "pod": "gpu-mem-enforcer-q9z8w",
    "container": "gpu-mem-enforcer",
    "node": "gpu-1",
    "instance": "10.1.2.3:9102",
    "job": "node-agents/gpu-mem-enforcer",
}
# honorLabels: a per-pod series keeps the GPU user's namespace and pod.
GPU_USER = GPU | {"namespace": "ml", "pod": "train-0"}
CONTROLLER = TARGET | {
    "namespace": "node-agents",
    "pod": "token-refresher-controller-5d8f9-abcde",
    "container": "token-refresher",
    "node": "node-2",
    "instance": "10.1.0.7:9103",
    "job": "node-agents/token-refresher",
    "app_kubernetes_io_component": "controller",
}
STANDBY = CONTROLLER | {"pod": "token-refresher-controller-5d8f9-fghij", "node": "node-3"}
INJECTOR = CONTROLLER | {
    "pod": "token-refresher-injector-m3n4b",
    "node": "node-1",
    "instance": "10.1.0.9:9103",
    "app_kubernetes_io_component": "injector",
}


def s(name: str, labels: Labels, **extra: str) -> str:
    """A promtool series: `name{label="value",...}`."""
    body = ",".join(f'{k}="{v}"' for k, v in sorted({**labels, **extra}.items()))
    return f"{name}{{{body}}}"


def keep(labels: Labels, *names: str, **extra: str) -> dict[str, str]:
    """The labels an aggregation `by (names)` leaves, plus `extra`."""
    return {name: labels[name] for name in names} | extra


@dataclass(frozen=True)
class Firing:
    labels: Labels
    """The alert's labels, without alertname and the rule's own labels."""
    value: float | None = None
    """`$value` when the annotations use it."""


@dataclass(frozen=True)
class Case:
    alert: str
    situation: str
    series: Mapping[str, str]
    """Series -> promtool's expanding notation, one value a minute from 0m."""
    at: tuple[str, ...]
    firing: tuple[Firing, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.alert}: {self.situation}"


# What `by (namespace, pod, node)` keeps: the agent's pod and its node.
AGENT_POD = ("namespace", "pod", "node")

CASES = [
    # -- automount-healer
    Case(
        "AutomountHealerHealFailing",
        "umount2 fails with EBUSY at every sweep",
        {s("automount_healer_heal_failures_total", HEALER, reason="EBUSY"): "0+30x30"},
        ("20m",),
        (Firing(keep(HEALER, *AGENT_POD, reason="EBUSY")),),
    ),
    Case(
        "AutomountHealerHealFailing",
        "one failure, then the next sweep unmounts it",
        {s("automount_healer_heal_failures_total", HEALER, reason="EBUSY"): "0 1x30"},
        ("4m", "20m"),
    ),
    Case(
        "AutomountHealerSeveredMountsNotHealed",
        "two severed mounts stay (dry run)",
        {
            s("automount_healer_mounts", HEALER, root="/cvmfs", verdict="severed"): "2x30",
            s("automount_healer_mounts", HEALER, root="/cvmfs", verdict="healthy"): "5x30",
        },
        ("15m",),
        (Firing(keep(HEALER, *AGENT_POD, root="/cvmfs"), 2),),
    ),
    Case(
        "AutomountHealerSeveredMountsNotHealed",
        "severed in one sweep, healed by the next",
        {s("automount_healer_mounts", HEALER, root="/cvmfs", verdict="severed"): "0 1 0x30"},
        ("15m",),
    ),
    Case(
        "AutomountHealerHealsRepeating",
        "one mount is severed again after every remount",
        {
            s(
                "automount_healer_recent_heals", HEALER, root="/cvmfs", mountpoint="/cvmfs/a"
            ): "1x10 2x10 3x10",
            s(
                "automount_healer_recent_heals", HEALER, root="/cvmfs", mountpoint="/cvmfs/b"
            ): "1x30",
        },
        ("25m",),
        (Firing(keep(HEALER, *AGENT_POD, root="/cvmfs", mountpoint="/cvmfs/a"), 3),),
    ),
    Case(
        "AutomountHealerHealsRepeating",
        "a CSI plugin restart severs all 20 mounts once",
        {
            s(
                "automount_healer_recent_heals", HEALER, root="/cvmfs", mountpoint=f"/cvmfs/r{i}"
            ): "1x30"
            for i in range(20)
        },
        ("5m", "25m"),
    ),
    Case(
        "AutomountHealerHungMounts",
        "a FUSE daemon is stopped",
        {s("automount_healer_mounts", HEALER, root="/eos", verdict="hung"): "1x20"},
        ("10m",),
        (Firing(keep(HEALER, *AGENT_POD, root="/eos"), 1),),
    ),
    Case(
        "AutomountHealerHungMounts",
        "a slow daemon catches up",
        {s("automount_healer_mounts", HEALER, root="/eos", verdict="hung"): "0 1 1 0x20"},
        ("10m",),
    ),
    Case(
        "AutomountHealerBlind",
        "fusectl is not readable",
        {s("automount_healer_up", HEALER): "0x20"},
        ("15m",),
        (Firing(HEALER),),
    ),
    Case(
        "AutomountHealerBlind",
        "fusectl is readable",
        {s("automount_healer_up", HEALER): "1x20"},
        ("15m",),
    ),
    # -- gpu-mem-enforcer
    Case(
        "GpuMemEnforcerNvmlUnavailable",
        "no NVML library on the node",
        {s("gpu_mem_enforcer_up", GPU): "0x20"},
        ("15m",),
        (Firing(GPU),),
    ),
    Case(
        "GpuMemEnforcerNvmlUnavailable",
        "NVML works",
        {s("gpu_mem_enforcer_up", GPU): "1x20"},
        ("15m",),
    ),
    Case(
        "GpuMemEnforcerGpuUntrusted",
        "GPU 1 answers with errors, GPU 0 is fine",
        {
            s("gpu_mem_enforcer_gpu_trusted", GPU, gpu="GPU-5c3e", index="1", status="error"): (
                "0x30"
            ),
            s("gpu_mem_enforcer_gpu_trusted", GPU, gpu="GPU-0a1b", index="0", status="ok"): "1x30",
        },
        ("20m",),
        (Firing(GPU | {"gpu": "GPU-5c3e", "index": "1", "status": "error"}),),
    ),
    Case(
        "GpuMemEnforcerGpuUntrusted",
        "a MIG card is left alone on purpose",
        {s("gpu_mem_enforcer_gpu_trusted", GPU, gpu="GPU-77aa", index="0", status="mig"): "0x30"},
        ("20m",),
    ),
    Case(
        "GpuMemEnforcerKillsHigh",
        "a kill a minute",
        {
            s("gpu_mem_enforcer_actions_total", GPU, action="kill", reason="hold"): "0+1x90",
            s("gpu_mem_enforcer_actions_total", GPU, action="evict", reason="ceiling"): "0x90",
        },
        ("70m",),
        (Firing(keep(GPU, *AGENT_POD)),),
    ),
    Case(
        "GpuMemEnforcerKillsHigh",
        "6 kills an hour, and a dry run would kill more",
        {
            s("gpu_mem_enforcer_actions_total", GPU, action="kill", reason="hold"): "0+0.1x90",
            s("gpu_mem_enforcer_actions_total", GPU, action="would-kill", reason="hold"): (
                "0+1x90"
            ),
        },
        ("70m",),
    ),
    Case(
        "GpuMemEnforcerPodOverLimit",
        "observe mode: the pod stays over its limit",
        {s("gpu_mem_enforcer_pod_over_limit", GPU_USER, gpu="GPU-5c3e"): "1x30"},
        ("20m",),
        (Firing(keep(GPU_USER, *AGENT_POD, gpu="GPU-5c3e")),),
    ),
    Case(
        "GpuMemEnforcerPodOverLimit",
        "killed once the hold is over",
        {s("gpu_mem_enforcer_pod_over_limit", GPU_USER, gpu="GPU-5c3e"): "0 1 1 0x30"},
        ("20m",),
    ),
    # -- token-refresher
    Case(
        "TokenRefresherTokenExpiringRefreshFailing",
        "the IdP times out while the token runs out",
        {
            s("token_refresher_time_to_expiry_seconds", CONTROLLER, token="users/alice"): (
                "1200-60x25"
            ),
            s("token_refresher_time_to_expiry_seconds", STANDBY, token="users/alice"): (
                "1200-60x25"
            ),
            s("token_refresher_refreshes_total", CONTROLLER, result="ok"): "0x25",
            s("token_refresher_refreshes_total", CONTROLLER, result="timeout"): "0+1x25",
        },
        ("18m",),
        (Firing(keep(CONTROLLER, "namespace", "job", token="users/alice"), 120),),
    ),
    Case(
        "TokenRefresherTokenExpiringRefreshFailing",
        "the token runs out but no refresh failed (not due yet)",
        {
            s("token_refresher_time_to_expiry_seconds", CONTROLLER, token="users/alice"): (
                "1200-60x25"
            ),
            s("token_refresher_refreshes_total", CONTROLLER, result="ok"): "0x25",
            s("token_refresher_refreshes_total", CONTROLLER, result="timeout"): "0x25",
        },
        ("18m",),
    ),
    Case(
        "TokenRefresherTokenExpiringRefreshFailing",
        "refreshes fail but the token has an hour left",
        {
            s("token_refresher_time_to_expiry_seconds", CONTROLLER, token="users/alice"): "3600x25",
            s("token_refresher_refreshes_total", CONTROLLER, result="timeout"): "0+1x25",
        },
        ("18m",),
    ),
    Case(
        "TokenRefresherTokenExpired",
        "nobody refreshed it",
        {
            s("token_refresher_time_to_expiry_seconds", CONTROLLER, token="users/alice"): (
                "60-60x10"
            ),
            s("token_refresher_time_to_expiry_seconds", STANDBY, token="users/alice"): "60-60x10",
        },
        ("5m",),
        (Firing(keep(CONTROLLER, "namespace", "job", token="users/alice"), -240),),
    ),
    Case(
        "TokenRefresherTokenExpired",
        "refreshed with minutes to spare",
        {
            s("token_refresher_time_to_expiry_seconds", CONTROLLER, token="users/alice"): (
                "300-60x4 3600x10"
            ),
        },
        ("8m",),
    ),
    Case(
        "TokenRefresherOfflineTokenLapsing",
        "refreshes stopped weeks ago: six days left and falling",
        {
            s(
                "token_refresher_refresh_token_time_to_expiry_seconds",
                CONTROLLER,
                token="users/alice",
                offline="true",
            ): "518400-60x90",
        },
        ("80m",),
        (Firing(keep(CONTROLLER, "namespace", "job", token="users/alice"), 518400 - 80 * 60),),
    ),
    Case(
        "TokenRefresherOfflineTokenLapsing",
        "refreshed every few minutes: 30 days left",
        {
            s(
                "token_refresher_refresh_token_time_to_expiry_seconds",
                CONTROLLER,
                token="users/alice",
                offline="true",
            ): "2592000x90",
            s(
                "token_refresher_refresh_token_time_to_expiry_seconds",
                CONTROLLER,
                token="users/bob",
                offline="false",
            ): "3600x90",
        },
        ("80m",),
    ),
    Case(
        "TokenRefresherSecretsStopped",
        "invalid_grant: the refresh token was revoked",
        {
            s("token_refresher_token_secrets", CONTROLLER, state="ok"): "5x20",
            s("token_refresher_token_secrets", CONTROLLER, state="stopped"): "1x20",
            s("token_refresher_token_secrets", CONTROLLER, state="invalid"): "0x20",
            s("token_refresher_token_secrets", STANDBY, state="stopped"): "1x20",
        },
        ("10m",),
        (Firing(keep(CONTROLLER, "namespace", "job", state="stopped"), 1),),
    ),
    Case(
        "TokenRefresherSecretsStopped",
        "transient failures are retried",
        {
            s("token_refresher_token_secrets", CONTROLLER, state="retrying"): "2x20",
            s("token_refresher_token_secrets", CONTROLLER, state="stopped"): "0x20",
            s("token_refresher_token_secrets", CONTROLLER, state="invalid"): "0x20",
        },
        ("10m",),
    ),
    Case(
        "TokenRefresherUnpersistedTokens",
        "the Secret update keeps failing",
        {s("token_refresher_unpersisted_tokens", CONTROLLER): "1x20"},
        ("15m",),
        (Firing(keep(CONTROLLER, *AGENT_POD), 1),),
    ),
    Case(
        "TokenRefresherUnpersistedTokens",
        "a 409 Conflict, written at the next pass",
        {s("token_refresher_unpersisted_tokens", CONTROLLER): "0 1 0x20"},
        ("15m",),
    ),
    Case(
        "TokenRefresherNoLeader",
        "neither replica holds the Lease",
        {
            s("token_refresher_leader", CONTROLLER): "0x20",
            s("token_refresher_leader", STANDBY): "0x20",
        },
        ("15m",),
        (Firing(keep(CONTROLLER, "namespace", "job")),),
    ),
    Case(
        "TokenRefresherNoLeader",
        "the standby takes over",
        {
            s("token_refresher_leader", CONTROLLER): "1x5 0x15",
            s("token_refresher_leader", STANDBY): "0x6 1x14",
        },
        ("15m",),
    ),
    Case(
        "TokenRefresherInjectionFailing",
        "a container planted a symlink",
        {
            s("token_refresher_files", INJECTOR, state="ok"): "10x30",
            s("token_refresher_files", INJECTOR, state="failing"): "1x30",
        },
        ("20m",),
        (Firing(keep(INJECTOR, *AGENT_POD), 1),),
    ),
    Case(
        "TokenRefresherInjectionFailing",
        "containers not started yet are waiting, not failing",
        {
            s("token_refresher_files", INJECTOR, state="failing"): "0x30",
            s("token_refresher_files", INJECTOR, state="waiting"): "3x30",
        },
        ("20m",),
    ),
    Case(
        "TokenRefresherInjectorCutOff",
        "no controller replica answers the injector",
        {s("token_refresher_injector_snapshot_age_seconds", INJECTOR): "0x5 60+60x20"},
        ("25m",),
        (Firing(keep(INJECTOR, *AGENT_POD), 1200),),
    ),
    Case(
        "TokenRefresherInjectorCutOff",
        "a controller restart: the injector is back within minutes",
        {s("token_refresher_injector_snapshot_age_seconds", INJECTOR): "0x5 60+60x4 0x15"},
        ("25m",),
    ),
    Case(
        "TokenRefresherCertificateNotRenewed",
        "no replica renewed the serving certificate",
        {
            s(
                "token_refresher_tls_certificate_expiry_seconds", CONTROLLER, certificate="serving"
            ): "518400-60x90",
        },
        ("80m",),
        (Firing(keep(CONTROLLER, "namespace", "job", certificate="serving"), 513600),),
    ),
    Case(
        "TokenRefresherCertificateNotRenewed",
        "renewed with ten days left",
        {
            s(
                "token_refresher_tls_certificate_expiry_seconds", CONTROLLER, certificate="serving"
            ): "864000-60x30 2592000-60x60",
        },
        ("80m",),
    ),
    Case(
        "TokenRefresherBlind",
        "the injector cannot list its node's pods",
        {s("token_refresher_up", INJECTOR): "0x20"},
        ("15m",),
        (Firing(INJECTOR),),
    ),
    Case(
        "TokenRefresherBlind",
        "pods listed",
        {s("token_refresher_up", INJECTOR): "1x20"},
        ("15m",),
    ),
    # -- all agents
    Case(
        "NodeAgentDown",
        "the healer's target is down (another job's is not ours)",
        {
            s("up", HEALER): "0x10",
            s("up", {"job": "kubelet", "instance": "10.0.0.1:10250"}): "0x10",
        },
        ("8m",),
        (Firing(HEALER),),
    ),
    Case(
        "NodeAgentDown",
        "scraped",
        {s("up", HEALER): "1x10", s("up", GPU): "1x10", s("up", INJECTOR): "1x10"},
        ("8m",),
    ),
    Case(
        "NodeAgentNotTicking",
        "the healer's passes fail since 1m, the enforcer's succeed",
        {
            s("automount_healer_last_success_timestamp_seconds", HEALER): "60x20",
            s("gpu_mem_enforcer_last_success_timestamp_seconds", GPU): "0+60x20",
        },
        ("15m",),
        (Firing(HEALER, 840),),
    ),
    Case(
        "NodeAgentNotTicking",
        "every agent completes its passes",
        {
            s("automount_healer_last_success_timestamp_seconds", HEALER): "0+60x20",
            s("gpu_mem_enforcer_last_success_timestamp_seconds", GPU): "0+60x20",
            s("token_refresher_last_success_timestamp_seconds", INJECTOR): "0+60x20",
        },
        ("15m",),
    ),
]


# --- expected annotations: the rule's templates, rendered ----------------------------

_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_LABEL = re.compile(r"\$labels\.(\w+)")


def render(template: str, labels: Labels, value: float | None) -> str:
    """The subset of Prometheus templating the rules use, strictly: an unknown
    label or construct fails here instead of rendering empty in production."""

    def action(match: re.Match[str]) -> str:
        text = match.group(1)
        if label := _LABEL.fullmatch(text):
            assert label.group(1) in labels, f"{template!r}: the alert has no {text}"
            return labels[label.group(1)]
        if text == 'printf "%.0f" $value':
            assert value is not None, f"{template!r} uses $value: give the case's value"
            return f"{value:.0f}"
        raise AssertionError(f"this test does not render {{{{ {text} }}}}: extend render()")

    return _ACTION.sub(action, template)


def promtool_test(case: Case, rule: Doc) -> Doc:
    expected = []
    for firing in case.firing:
        labels = {**firing.labels, **rule["labels"]}
        annotations = {k: render(v, labels, firing.value) for k, v in rule["annotations"].items()}
        expected.append({"exp_labels": labels, "exp_annotations": annotations})
    return {
        "name": case.id,
        "interval": "1m",
        "input_series": [{"series": k, "values": v} for k, v in case.series.items()],
        "alert_rule_test": [
            {"eval_time": at, "alertname": case.alert, "exp_alerts": expected} for at in case.at
        ],
    }


# --- the tests -----------------------------------------------------------------------


def test_promtool_check_rules(tmp_path: Path) -> None:
    promtool = need_tool(PROMTOOL, "Debian package prometheus")
    checked = subprocess.run(
        [promtool, "check", "rules", str(write_rules(tmp_path))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout


def test_every_alert_says_how_bad_since_when_and_where() -> None:
    for name, rule in alerts().items():
        assert re.fullmatch(r"[A-Z][A-Za-z]+", name), name
        assert re.fullmatch(r"\d+m", str(rule.get("for", ""))), f"{name}: no `for:`"
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations.keys() >= {"summary", "description"}, name
        # Who to look at: the node, the agent's pod, or the token.
        assert re.search(r"\$labels\.(node|pod|token|job)", annotations["description"]), name


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    defined = set(alerts())
    tested = {case.alert for case in CASES}
    assert tested <= defined, f"cases for alerts that do not exist: {tested - defined}"
    assert {c.alert for c in CASES if c.firing} == defined, "alerts never seen firing"
    assert {c.alert for c in CASES if not c.firing} == defined, "alerts never seen quiet"


def test_every_metric_an_alert_reads_is_exported() -> None:
    rules = [rule for group in groups() for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    exprs = {rule.get("alert") or rule["record"]: rule["expr"] for rule in rules}
    assert unknown_metrics(exprs, known=MADE_BY_PROMETHEUS | recorded) == {}


@pytest.mark.parametrize("alert", sorted({case.alert for case in CASES}))
def test_alert_in_promtool(alert: str, tmp_path: Path) -> None:
    promtool = need_tool(PROMTOOL, "Debian package prometheus")
    rule = alerts()[alert]
    rules = write_rules(tmp_path)
    tests = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [promtool_test(case, rule) for case in CASES if case.alert == alert],
    }
    test_file = tmp_path / "test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    ran = subprocess.run(
        [promtool, "test", "rules", test_file.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
