"""Static checks: manifests/gpu-enforcer agrees with the code of `gpu-mem-enforcer`.

Like test_manifests.py for the mount healer: an env var the CLI does not read,
a command that is no console script, a probe on the wrong port or a wider RBAC
rule deploys fine and fails (or over-grants) on the node; these tests catch it
in CI instead.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from agents.gpu_enforcer.cli import build_parser, config_from_args
from agents.gpu_enforcer.limits import replicas_from_device_plugin_config
from tests.unit.test_manifests import (
    EVENT_GROUPS,
    EVENT_VERBS,
    NAMESPACE,
    REPO,
    Doc,
    base_objects,
    console_scripts,
    kustomize,
    load_docs,
    only,
    plain_env,
)

BASE = REPO / "manifests" / "gpu-enforcer"
SAMPLE = "time-slicing-config.yaml"
ENV_PREFIX = "GPU_MEM_ENFORCER_"
CONTAINER = "gpu-mem-enforcer"
DEFAULT_METRICS_PORT = 9102
DEVICE_PLUGIN_ENV = f"{ENV_PREFIX}DEVICE_PLUGIN_CONFIG"

# (apiGroup, resource) -> verbs: everything the enforcer may do, and no more.
# kill and observe need nothing more; evict is the opt-in component evict/.
ALLOWED_RULES = {
    ("", "pods"): {"get", "list", "watch"},
    ("", "namespaces"): {"get"},
    ("", "nodes"): {"get"},
    **{(group, "events"): EVENT_VERBS for group in EVENT_GROUPS},
}
# What the component evict/ adds, cluster-wide (nothing narrower exists in RBAC).
EVICT_RULES = {("", "pods/eviction"): {"create"}}
EVICT_COMPONENT = BASE / "evict"


def pod_spec() -> Doc:
    spec: Doc = only("DaemonSet", base_objects(BASE))["spec"]["template"]["spec"]
    return spec


def container() -> Doc:
    found: list[Doc] = [c for c in pod_spec()["containers"] if c["name"] == CONTAINER]
    assert len(found) == 1, f"expected one container {CONTAINER}"
    return found[0]


def agent_env() -> dict[str, str]:
    return {k: v for k, v in plain_env(container()).items() if k.startswith(ENV_PREFIX)}


def sample_config_map() -> Doc:
    return only("ConfigMap", load_docs(BASE / SAMPLE))


def device_plugin_volume() -> tuple[Doc, Doc]:
    """(volumeMount, volume) of the directory that holds the device-plugin config."""
    directory = str(PurePosixPath(agent_env()[DEVICE_PLUGIN_ENV]).parent)
    (mount,) = [m for m in container()["volumeMounts"] if m["mountPath"] == directory]
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def env_with_sample_config(tmp_path: Path) -> dict[str, str]:
    """The manifest's agent env, the device-plugin file replaced by the sample's key."""
    env = agent_env()
    key = PurePosixPath(env[DEVICE_PLUGIN_ENV]).name
    path = tmp_path / key
    path.write_text(sample_config_map()["data"][key], encoding="utf-8")
    return {**env, DEVICE_PLUGIN_ENV: str(path)}


# --- (a) the YAML as written ---------------------------------------------------------


def test_command_is_a_console_script() -> None:
    assert CONTAINER in console_scripts()
    command = container()["command"]
    assert command == [CONTAINER], "the agent is PID 1 of its container, no wrapper"


def test_env_vars_are_flags_of_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Wide help so that no env var name is wrapped across lines.
    monkeypatch.setenv("COLUMNS", "1000")
    env = agent_env()
    assert {f"{ENV_PREFIX}ACTION", DEVICE_PLUGIN_ENV, f"{ENV_PREFIX}LOG_FORMAT"} <= set(env)
    for name, value in env.items():
        parser = build_parser(environ={name: value})
        try:
            parser.parse_args([])
        except SystemExit:
            pytest.fail(f"the CLI rejects {name}={value!r}")
        assert name in parser.format_help(), f"{name} is not an env var of any flag"
    # All together, through the same validation as `main`; the device-plugin
    # file is the sample's, so its time-slicing replicas are read as well.
    config, local = config_from_args([], env_with_sample_config(tmp_path))
    assert not local
    assert config.action == "kill"
    assert config.log_format == "json"
    assert config.replicas == 4


def test_node_name_comes_from_the_downward_api() -> None:
    env = {e["name"]: e for e in container()["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_nvidia_runtime_injects_nvml_for_all_gpus() -> None:
    spec = pod_spec()
    assert spec["runtimeClassName"] == "nvidia"
    env = plain_env(container())
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    # The enforcer must not take a time slice of the cards it watches.
    resources = container()["resources"]
    for section in ("requests", "limits"):
        gpu = [r for r in resources.get(section, {}) if r.startswith("nvidia.com/")]
        assert not gpu, f"{section} asks for {gpu}"


def test_runs_on_gpu_nodes_only() -> None:
    spec = pod_spec()
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]


def test_device_plugin_config_is_the_optional_config_map(tmp_path: Path) -> None:
    mount, volume = device_plugin_volume()
    assert mount.get("readOnly") is True
    sample = sample_config_map()
    assert volume["configMap"] == {"name": sample["metadata"]["name"], "optional": True}
    # Pods mount ConfigMaps of their own namespace only.
    assert sample["metadata"]["namespace"] == NAMESPACE
    # The file the env var names is a key of the sample, and a device-plugin config.
    key = PurePosixPath(agent_env()[DEVICE_PLUGIN_ENV]).name
    assert key in sample["data"], f"{key} is not a profile of {SAMPLE}"
    assert replicas_from_device_plugin_config(sample["data"][key]) == 4


def test_missing_device_plugin_config_falls_back_to_the_node_label(tmp_path: Path) -> None:
    # What the kubelet mounts for an absent optional ConfigMap: an empty directory.
    env = {**agent_env(), DEVICE_PLUGIN_ENV: str(tmp_path / "any")}
    config, _local = config_from_args([], env)  # `main` exits 2 on ConfigError
    assert config.replicas is None  # left to the node label


def test_security_context_is_least_privilege() -> None:
    spec = pod_spec()
    # NVML reports host PIDs; /proc/<pid>/cgroup and pidfds must see the same ones.
    assert spec["hostPID"] is True
    assert not spec.get("hostNetwork", False)
    assert not spec.get("hostIPC", False)
    context = container()["securityContext"]
    assert context.get("privileged", False) is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    # Capabilities in Kubernetes' `add` are effective for uid 0 only.
    assert context["runAsUser"] == 0
    assert context["capabilities"]["drop"] == ["ALL"]
    added = set(context["capabilities"]["add"])
    assert "KILL" in added, "signalling other users' processes needs CAP_KILL"
    assert added <= {"KILL", "SYS_PTRACE"}, f"more capabilities than needed: {added}"
    assert not any("hostPath" in v for v in spec.get("volumes", []))


def test_scheduling_and_resources() -> None:
    spec = pod_spec()
    assert spec["priorityClassName"] == "system-node-critical"
    # A kill in progress (SIGTERM, --grace, SIGKILL) fits in the termination grace.
    grace = build_parser(environ=plain_env(container())).parse_args([]).grace
    assert spec["terminationGracePeriodSeconds"] > grace
    resources = container()["resources"]
    assert resources["requests"] == {"cpu": "20m", "memory": "64Mi"}
    assert resources["limits"] == {"memory": "160Mi"}, "no CPU limit (throttling delays actions)"


def test_probes_use_the_health_endpoints_on_the_metrics_port() -> None:
    c = container()
    (metrics,) = [p for p in c["ports"] if p["name"] == "metrics"]
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ("metrics", metrics["containerPort"]), probe


def test_metrics_port_is_the_port_the_agent_listens_on() -> None:
    env = plain_env(container())
    expected = build_parser(environ=env).parse_args([]).metrics_address.port
    if f"{ENV_PREFIX}METRICS_ADDRESS" not in env:
        assert expected == DEFAULT_METRICS_PORT
    (metrics,) = [p for p in container()["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == expected
    assert "hostPort" not in metrics


def test_rbac_is_exactly_what_the_enforcer_uses() -> None:
    docs = load_docs(BASE / "rbac.yaml")
    assert {d["kind"] for d in docs} == {"ClusterRole", "ClusterRoleBinding"}
    role = only("ClusterRole", docs)
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no nonResourceURLs
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], f"wildcard in {key}: {rule}"
            assert not any("*" in item for item in rule[key]), f"wildcard in {key}: {rule}"
        assert "pods/exec" not in rule["resources"]
        assert "secrets" not in rule["resources"]
        assert "pods/eviction" not in rule["resources"], "evict is the opt-in component"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == ALLOWED_RULES

    binding = only("ClusterRoleBinding", docs)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    account = only("ServiceAccount", base_objects(BASE))["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    assert pod_spec()["serviceAccountName"] == account


def test_podmonitor_scrapes_the_metrics_port() -> None:
    monitor = only("PodMonitor", base_objects(BASE))
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    node_label = {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}
    assert endpoint == {
        "port": "metrics",
        "path": "/metrics",
        "interval": "15s",
        # The per-pod series' namespace and pod are the GPU user's, not exported_*.
        "honorLabels": True,
        "relabelings": [node_label],  # alerts and the dashboard name the node
    }


# --- (b) the rendered kustomization --------------------------------------------------


def test_kustomize_renders_the_base() -> None:
    # Labels, namespace and selectors: test_manifests checks them for every base.
    kinds = sorted(d["kind"] for d in kustomize(BASE))
    assert kinds == sorted(
        ["DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "PodMonitor"]
    )


def test_evict_component_grants_eviction_and_sets_the_action() -> None:
    (kust,) = load_docs(EVICT_COMPONENT / "kustomization.yaml")
    assert kust["kind"] == "Component"
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    docs = [doc for name in kust["resources"] for doc in load_docs(EVICT_COMPONENT / name)]
    role = only("ClusterRole", docs)
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]}
    ]
    binding = only("ClusterRoleBinding", docs)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = only("ServiceAccount", base_objects(BASE))["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    # The blast radius is written next to the grant.
    comments = (EVICT_COMPONENT / "kustomization.yaml").read_text(encoding="utf-8").lower()
    for words in ("cluster-wide", "poddisruptionbudget", "any pod", "components:"):
        assert words in comments, words
    # The base does not include it.
    assert "components" not in load_docs(BASE / "kustomization.yaml")[0]
