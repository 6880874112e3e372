"""Static checks over what `kubectl kustomize` renders, for every kustomization.

- Every object of every base and of `manifests/all` validates (strict: unknown
  fields are errors) against the Kubernetes API schemas of a current release
  (kubernetes-validate); PodMonitor and PrometheusRule, which have no schema
  there, against the fields the Prometheus Operator's CRDs define.
- `manifests/all` installs every base once, into one namespace whose Pod
  Security labels admit the agents and name what they need.
- RBAC is least privilege (`rbac_violations`, shown to catch planted wildcards)
  and security contexts are as narrow as each agent allows
  (`pod_security_violations`), both over the rendered objects of `manifests/all`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes_validate import utils as schemas

from agents.gpu_enforcer.cli import config_from_args as enforcer_config
from tests.unit.test_manifests import (
    CONTAINERFILE,
    NAMESPACE,
    REPO,
    Doc,
    console_scripts,
    containerfile_instructions,
    kustomize,
    load_docs,
)
from tests.unit.test_manifests_gpu import ALLOWED_RULES as ENFORCER_RULES
from tests.unit.test_manifests_gpu import EVICT_COMPONENT, EVICT_RULES
from tests.unit.test_manifests_token import (
    CONTROLLER_RULES,
    EVENT_RULES,
    FORBIDDEN_RESOURCES,
    INJECTOR_CAPABILITIES,
    INJECTOR_RULES,
    TLS_RULES,
    Grant,
    parsed,
    resolved_env,
)

MANIFESTS = REPO / "manifests"
ALL = MANIFESTS / "all"
KUSTOMIZATIONS = sorted(p.parent for p in MANIFESTS.glob("*/kustomization.yaml"))
BASES = [k for k in KUSTOMIZATIONS if k != ALL]
# The floor of kubernetes-validate in pyproject.toml: the oldest schemas CI may use.
OLDEST_SCHEMAS = (1, 33)
PART_OF = "app.kubernetes.io/part-of"

WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job", "Pod"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}

kustomization_params = pytest.mark.parametrize(
    "directory", KUSTOMIZATIONS, ids=[k.name for k in KUSTOMIZATIONS]
)


def ref(obj: Doc) -> str:
    """`Kind namespace/name`, for messages."""
    meta = obj.get("metadata", {})
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {where}{meta.get('name')}"


def identity(obj: Doc) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def pod_template(obj: Doc) -> Doc:
    spec: Doc = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
    return spec


def pod_labels(obj: Doc) -> dict[str, str]:
    meta = obj["metadata"] if obj["kind"] == "Pod" else obj["spec"]["template"]["metadata"]
    labels: dict[str, str] = meta.get("labels", {})
    return labels


def workloads(objects: list[Doc]) -> Iterator[Doc]:
    return (o for o in objects if o["kind"] in WORKLOAD_KINDS)


def containers(pod_spec: Doc) -> Iterator[Doc]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod_spec.get(key, [])


# --- schemas ------------------------------------------------------------------------

# The Prometheus Operator's CRD fields (monitoring.coreos.com/v1, operator
# v0.82-v0.91: example/prometheus-operator-crd/ in its repository). A field
# outside these sets is a typo or needs a newer operator than we document.
PODMONITOR_SPEC = {
    "attachMetadata",
    "bodySizeLimit",
    "convertClassicHistogramsToNHCB",
    "fallbackScrapeProtocol",
    "jobLabel",
    "keepDroppedTargets",
    "labelLimit",
    "labelNameLengthLimit",
    "labelValueLengthLimit",
    "namespaceSelector",
    "nativeHistogramBucketLimit",
    "nativeHistogramMinBucketFactor",
    "podMetricsEndpoints",
    "podTargetLabels",
    "sampleLimit",
    "scrapeClass",
    "scrapeClassicHistograms",
    "scrapeNativeHistograms",
    "scrapeProtocols",
    "selector",
    "selectorMechanism",
    "targetLimit",
}
POD_METRICS_ENDPOINT = {
    "authorization",
    "basicAuth",
    "bearerTokenSecret",
    "enableHttp2",
    "filterRunning",
    "followRedirects",
    "honorLabels",
    "honorTimestamps",
    "interval",
    "metricRelabelings",
    "noProxy",
    "oauth2",
    "params",
    "path",
    "port",
    "portNumber",
    "proxyConnectHeader",
    "proxyFromEnvironment",
    "proxyUrl",
    "relabelings",
    "scheme",
    "scrapeTimeout",
    "targetPort",
    "tlsConfig",
    "trackTimestampsStaleness",
}
RELABEL_CONFIG = {
    "action",
    "modulus",
    "regex",
    "replacement",
    "separator",
    "sourceLabels",
    "targetLabel",
}
RULE_GROUP = {
    "name",
    "interval",
    "limit",
    "labels",
    "partial_response_strategy",
    "query_offset",
    "rules",
}
RULE = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
# The CRDs' pattern for durations (interval, scrapeTimeout, for, ...).
DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
# RFC 1123 subdomain, what metadata.name of these objects must be.
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MONITORING = "monitoring.coreos.com"


def is_monitoring(obj: Doc) -> bool:
    return str(obj.get("apiVersion", "")).startswith(f"{MONITORING}/")


def schema_version() -> str:
    """The newest Kubernetes release whose schemas the installed kubernetes-validate has."""
    return str(schemas.latest_version())


@functools.cache
def _schema_error(serialized: str, version: str) -> str | None:
    obj = json.loads(serialized)
    try:
        schemas.validate(obj, version, strict=True)
    except schemas.SchemaNotFoundError:
        return f"no schema for {obj['kind']} {obj['apiVersion']} in Kubernetes {version}"
    except schemas.ValidationError as err:
        path = ".".join(str(p) for p in err.path) or "(top)"
        return f"{path}: {err.message}"
    return None


def schema_violations(objects: list[Doc], version: str) -> list[str]:
    """Objects that the API server of `version` would reject (strict: unknown fields too).

    Prometheus Operator objects are left to `crd_violations`.
    """
    found = []
    for obj in objects:
        if is_monitoring(obj):
            continue
        error = _schema_error(json.dumps(obj, sort_keys=True), version)
        if error:
            found.append(f"{ref(obj)}: {error}")
    return found


def _matches(selector: Doc, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector against a label set."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op, False)
        if not ok:
            return False
    return True


def _unknown(where: str, obj: object, known: set[str]) -> list[str]:
    """Fields of `obj` (a mapping) that the CRD does not define."""
    extra = sorted(set(obj) - known) if isinstance(obj, dict) else []
    return [f"{where}: unknown field(s) {extra}"] if extra else []


def _duration(where: str, value: object) -> list[str]:
    if isinstance(value, str) and DURATION.match(value):
        return []
    return [f"{where}: {value!r} is not a Prometheus duration"]


def podmonitor_violations(monitor: Doc, objects: list[Doc]) -> list[str]:
    """A PodMonitor's fields, and that its ports exist on the pods it selects."""
    name = ref(monitor)
    spec = monitor.get("spec")
    if not isinstance(spec, dict):
        return [f"{name}: no spec"]
    found = _unknown(f"{name} spec", spec, PODMONITOR_SPEC)
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not selector:
        return [*found, f"{name}: spec.selector is required (an empty one selects every pod)"]
    found += _unknown(f"{name} spec.selector", selector, {"matchLabels", "matchExpressions"})
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return [*found, f"{name}: no podMetricsEndpoints"]

    # Pods in the PodMonitor's namespace unless namespaceSelector says otherwise.
    namespaces = spec.get("namespaceSelector", {})
    own = monitor["metadata"].get("namespace", "")

    def in_scope(obj: Doc) -> bool:
        ns = obj["metadata"].get("namespace", "")
        return bool(namespaces.get("any")) or ns in namespaces.get("matchNames", [own])

    selected = [w for w in workloads(objects) if in_scope(w) and _matches(selector, pod_labels(w))]
    if not selected:
        found.append(f"{name}: selects no pod of the bundle")
    for i, endpoint in enumerate(endpoints):
        where = f"{name} podMetricsEndpoints[{i}]"
        found += _unknown(where, endpoint, POD_METRICS_ENDPOINT)
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                found += _duration(f"{where}.{key}", endpoint[key])
        for key in ("relabelings", "metricRelabelings"):
            for j, relabel in enumerate(endpoint.get(key, [])):
                found += _unknown(f"{where}.{key}[{j}]", relabel, RELABEL_CONFIG)
        if not str(endpoint.get("path", "/")).startswith("/"):
            found.append(f"{where}: path {endpoint['path']!r} is not absolute")
        if endpoint.get("scheme", "http").lower() not in ("http", "https"):
            found.append(f"{where}: scheme {endpoint['scheme']!r}")
        port = endpoint.get("port")
        if not isinstance(port, str) or not port:
            found.append(f"{where}: no port name (Prometheus would find no target)")
            continue
        for workload in selected:
            names = {
                p.get("name")
                for c in pod_template(workload)["containers"]
                for p in c.get("ports", [])
            }
            if port not in names:
                found.append(f"{where}: port {port!r} is not a container port of {ref(workload)}")
    return found


def prometheusrule_violations(rule_object: Doc) -> list[str]:
    """A PrometheusRule's groups and rules, as the CRD and Prometheus accept them."""
    name = ref(rule_object)
    spec = rule_object.get("spec")
    if not isinstance(spec, dict):
        return [f"{name}: no spec"]
    found = _unknown(f"{name} spec", spec, {"groups"})
    groups = spec.get("groups")
    if not isinstance(groups, list) or not groups:
        return [*found, f"{name}: spec.groups is empty or not a list (no rules)"]
    seen: set[str] = set()
    for i, group in enumerate(groups):
        where = f"{name} groups[{i}]"
        if not isinstance(group, dict):
            found.append(f"{where}: not a mapping")
            continue
        found += _unknown(where, group, RULE_GROUP)
        group_name = group.get("name")
        if not isinstance(group_name, str) or not group_name:
            found.append(f"{where}: no name")
        elif group_name in seen:
            found.append(f"{where}: duplicate group name {group_name!r}")
        seen.add(str(group_name))
        for key in ("interval", "query_offset"):
            if key in group:
                found += _duration(f"{where}.{key}", group[key])
        rules = group.get("rules")
        if not isinstance(rules, list) or not rules:
            found.append(f"{where}: no rules")
            continue
        for j, rule in enumerate(rules):
            found += _rule_violations(f"{where}.rules[{j}]", rule)
    return found


def _rule_violations(where: str, rule: object) -> list[str]:
    if not isinstance(rule, dict):
        return [f"{where}: not a mapping"]
    found = _unknown(where, rule, RULE)
    expr = rule.get("expr")
    if not (isinstance(expr, int) or (isinstance(expr, str) and expr.strip())):
        found.append(f"{where}: no expr")
    kinds = [k for k in ("alert", "record") if k in rule]
    if len(kinds) != 1:
        found.append(f"{where}: exactly one of alert and record, not {kinds}")
    if "record" in rule:
        if not METRIC_NAME.match(str(rule["record"])):
            found.append(f"{where}: record {rule['record']!r} is not a metric name")
        for key in ("for", "keep_firing_for", "annotations"):
            if key in rule:
                found.append(f"{where}: {key} is for alerting rules only")
    if "alert" in rule and not str(rule["alert"]).strip():
        found.append(f"{where}: empty alert name")
    for key in ("for", "keep_firing_for"):
        if key in rule:
            found += _duration(f"{where}.{key}", rule[key])
    for key in ("labels", "annotations"):
        values = rule.get(key, {})
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            found.append(f"{where}: {key} must map names to strings")
    return found


def crd_violations(objects: list[Doc]) -> list[str]:
    """Prometheus Operator objects checked field by field (no schema in kubernetes-validate)."""
    found: list[str] = []
    checks: dict[str, Callable[[Doc], list[str]]] = {
        "PodMonitor": lambda o: podmonitor_violations(o, objects),
        "PrometheusRule": prometheusrule_violations,
    }
    for obj in filter(is_monitoring, objects):
        name = ref(obj)
        if obj["apiVersion"] != f"{MONITORING}/v1":
            found.append(f"{name}: apiVersion {obj['apiVersion']} (the operator serves v1)")
        found += _unknown(name, obj, {"apiVersion", "kind", "metadata", "spec"})
        meta = obj.get("metadata", {})
        found += _unknown(f"{name} metadata", meta, {"name", "namespace", "labels", "annotations"})
        if not DNS_SUBDOMAIN.match(str(meta.get("name", ""))):
            found.append(f"{name}: metadata.name is not a DNS subdomain")
        check = checks.get(obj.get("kind", ""))
        if check is None:
            found.append(f"{name}: no check for this kind; add one to test_bundle.py")
            continue
        found += check(obj)
    return found


@kustomization_params
def test_every_object_validates_against_the_kubernetes_api(directory: Path) -> None:
    objects = kustomize(directory)
    assert objects, f"{directory.name} renders nothing"
    version = schema_version()
    assert tuple(int(part) for part in version.split(".")[:2]) >= OLDEST_SCHEMAS
    assert schema_violations(objects, version) == []
    assert crd_violations(objects) == []
    for obj in objects:
        meta = obj["metadata"]
        assert DNS_SUBDOMAIN.match(meta["name"]), ref(obj)
        expected_namespace = None if obj["kind"] in CLUSTER_SCOPED else NAMESPACE
        assert meta.get("namespace") == expected_namespace, ref(obj)
        assert meta["labels"][PART_OF] == NAMESPACE, ref(obj)
    identities = [identity(o) for o in objects]
    assert len(identities) == len(set(identities)), "an object is rendered twice"


def test_validation_catches_what_the_api_server_would_reject() -> None:
    objects = kustomize(ALL)
    (healer,) = [o for o in objects if identity(o) == ("DaemonSet", NAMESPACE, "automount-healer")]
    typo = copy.deepcopy(healer)
    typo["spec"]["template"]["spec"]["hostNetwrok"] = True  # strict: unknown field
    wrong_type = copy.deepcopy(healer)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9101"
    (error_typo,) = schema_violations([typo], schema_version())
    assert "hostNetwrok" in error_typo
    (error_type,) = schema_violations([wrong_type], schema_version())
    assert "containerPort" in error_type


def test_crd_checks_catch_typos_and_missing_ports() -> None:
    objects = kustomize(ALL)
    monitor = next(o for o in objects if o["kind"] == "PodMonitor")
    wrong_port = copy.deepcopy(monitor)
    wrong_port["spec"]["podMetricsEndpoints"][0]["port"] = "http-metrics"
    typo = copy.deepcopy(monitor)
    typo["spec"]["podMetricEndpoints"] = typo["spec"].pop("podMetricsEndpoints")
    relabel_typo = copy.deepcopy(monitor)
    relabel_typo["spec"]["podMetricsEndpoints"][0]["relabelings"] = [
        {"source_labels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}
    ]
    nobody = copy.deepcopy(monitor)
    nobody["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/name": "nobody"}}
    rules = {
        "apiVersion": f"{MONITORING}/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "planted", "namespace": NAMESPACE},
        "spec": {
            "groups": [
                {"name": "g", "rules": [{"alert": "A", "expr": "up == 0", "for": "5 minutes"}]},
                {"name": "g", "rules": [{"record": "r", "alert": "B", "expr": ""}]},
            ]
        },
    }
    for planted, expected in (
        (wrong_port, "'http-metrics' is not a container port"),
        (typo, "unknown field(s) ['podMetricEndpoints']"),
        (relabel_typo, "relabelings[0]: unknown field(s) ['source_labels']"),
        (nobody, "selects no pod"),
        (rules, "not a Prometheus duration"),
        (rules, "duplicate group name"),
        (rules, "exactly one of alert and record"),
        (rules, "no expr"),
    ):
        others = [o for o in objects if identity(o) != identity(planted)]
        found = crd_violations([*others, planted])
        assert any(expected in v for v in found), (expected, found)


# --- manifests/all ------------------------------------------------------------------


def test_all_installs_every_base_once() -> None:
    (kust,) = load_docs(ALL / "kustomization.yaml")
    assert kust["namespace"] == NAMESPACE
    resources = kust["resources"]
    assert sorted(resources) == sorted(["namespace.yaml", *(f"../{b.name}" for b in BASES)])
    assert {b.name for b in BASES} >= {"mount-healer", "gpu-enforcer", "token-refresher"}
    # Nothing lost or changed on the way: `all` is the bases plus the Namespace.
    from_bases = {identity(o): o for base in BASES for o in kustomize(base)}
    rendered = {identity(o): o for o in kustomize(ALL)}
    (namespace,) = load_docs(ALL / "namespace.yaml")
    assert rendered == {**from_bases, identity(namespace): namespace}


# Pod Security Standards (https://kubernetes.io/docs/concepts/security/pod-security-standards/),
# the checks our workloads could fail.
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def baseline_violations(pod_spec: Doc) -> list[str]:
    """What the pod does that Pod Security "baseline" forbids."""
    found = [key for key in ("hostPID", "hostNetwork", "hostIPC") if pod_spec.get(key)]
    found += [f"hostPath {v['name']}" for v in pod_spec.get("volumes", []) if "hostPath" in v]
    for c in containers(pod_spec):
        context = c.get("securityContext", {})
        if context.get("privileged"):
            found.append(f"{c['name']}: privileged")
        added = set(context.get("capabilities", {}).get("add", [])) - BASELINE_CAPABILITIES
        found += [f"{c['name']}: CAP_{cap}" for cap in sorted(added)]
        found += [f"{c['name']}: hostPort" for p in c.get("ports", []) if p.get("hostPort")]
    return found


def restricted_violations(pod_spec: Doc) -> list[str]:
    """What the pod does that Pod Security "restricted" forbids (baseline included)."""
    found = baseline_violations(pod_spec)
    pod_context = pod_spec.get("securityContext", {})
    for v in pod_spec.get("volumes", []):
        if not set(v) - {"name"} <= RESTRICTED_VOLUMES:
            found.append(f"volume {v['name']}")
    for c in containers(pod_spec):
        context = {**pod_context, **c.get("securityContext", {})}
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation")
        if context.get("runAsNonRoot") is not True or context.get("runAsUser") == 0:
            found.append(f"{c['name']}: may run as root")
        if context.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccompProfile")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{c['name']}: capabilities not dropped")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{c['name']}: capabilities added")
    return found


def test_namespace_pod_security_is_the_least_that_admits_the_agents() -> None:
    objects = kustomize(ALL)
    (namespace,) = [o for o in objects if o["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == NAMESPACE
    labels = namespace["metadata"]["labels"]
    prefix = "pod-security.kubernetes.io"
    assert labels[f"{prefix}/warn"] == "restricted"
    assert labels[f"{prefix}/audit"] == "restricted"
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"{prefix}/{mode}-version"] == "latest"

    above_baseline = {ref(w): baseline_violations(pod_template(w)) for w in workloads(objects)}
    above_baseline = {w: v for w, v in above_baseline.items() if v}
    # Nothing stricter than privileged admits these; without them baseline would do.
    assert labels[f"{prefix}/enforce"] == ("privileged" if above_baseline else "baseline")
    assert sorted(above_baseline) == sorted(
        f"{kind} {NAMESPACE}/{name}"
        for (kind, name), policy in POD_POLICY.items()
        if policy.host_namespaces or policy.privileged or policy.host_paths
    )
    # warn/audit restricted names exactly the node agents; the controller is clean.
    comments = (ALL / "namespace.yaml").read_text(encoding="utf-8")
    for workload in workloads(objects):
        name = workload["metadata"]["name"]
        if restricted_violations(pod_template(workload)):
            assert re.search(rf"#\s+{name} \({workload['kind']}\)", comments), (
                f"namespace.yaml does not explain why {name} is not restricted"
            )
        else:
            assert name == "token-refresher-controller", f"{name} meets restricted"


# --- RBAC ---------------------------------------------------------------------------

SA_HEALER = "automount-healer"
SA_ENFORCER = "gpu-mem-enforcer"
SA_CONTROLLER = "token-refresher-controller"
SA_INJECTOR = "token-refresher-injector"
LEASE_NAME = parsed(resolved_env("controller"), "controller").lease_name

# Everything each ServiceAccount may do, and no more:
# (scope, apiGroup, resource, resourceNames) -> verbs, where scope is "cluster"
# for a ClusterRoleBinding or the namespace of a RoleBinding. The per-base
# tests (test_manifests*.py) say why each is needed.
ALLOWED_GRANTS: dict[str, dict[Grant, set[str]]] = {
    # Events on its Node, nothing read from the API.
    SA_HEALER: EVENT_RULES,
    # Its node's pods (a field-selected watch), their Namespaces, its Node,
    # Events. No evictions: the opt-in component gpu-enforcer/evict adds them.
    SA_ENFORCER: {
        ("cluster", group, res, ()): verbs for (group, res), verbs in ENFORCER_RULES.items()
    },
    # Token Secrets (read and write), templates, pods (claims checked, Events),
    # TokenReviews of the injectors' tokens, its own Lease, TLS Secret and CA.
    SA_CONTROLLER: {
        **CONTROLLER_RULES,
        (NAMESPACE, "coordination.k8s.io", "leases", ()): {"create"},
        (NAMESPACE, "coordination.k8s.io", "leases", (LEASE_NAME,)): {"get", "update"},
        **TLS_RULES,
    },
    # Its node's pods and its CA ConfigMap (read only), Events. No Secret.
    SA_INJECTOR: INJECTOR_RULES,
}
# Only the token refresher's controller handles Secrets; the injector gets its
# files from the controller, the healer and the enforcer never see a Secret.
SECRET_ACCOUNTS = {SA_CONTROLLER}
# Verbs that grant more than they name: RBAC escalation and acting as another identity.
FORBIDDEN_VERBS = {"escalate", "bind", "impersonate"}
RULE_KEYS = {"apiGroups", "resources", "verbs", "resourceNames"}
RBAC_GROUP = "rbac.authorization.k8s.io"


def _rule_violations_rbac(where: str, rule: Doc) -> list[str]:
    found: list[str] = []
    if set(rule) - RULE_KEYS:
        found.append(f"{where}: {sorted(set(rule) - RULE_KEYS)} (e.g. nonResourceURLs)")
    for key in ("apiGroups", "resources", "verbs"):
        if not rule.get(key):
            found.append(f"{where}: no {key}")
    for key in sorted(RULE_KEYS):
        wild = [item for item in rule.get(key, []) if "*" in item]
        if wild:
            found.append(f"{where}: wildcard in {key}: {wild}")
    if bad := sorted(FORBIDDEN_RESOURCES & set(rule.get("resources", []))):
        found.append(f"{where}: forbidden resource {bad}")
    if bad := sorted(FORBIDDEN_VERBS & set(rule.get("verbs", []))):
        found.append(f"{where}: forbidden verb {bad}")
    return found


def granted(objects: list[Doc]) -> dict[str, dict[Grant, set[str]]]:
    """What the bindings in `objects` give each ServiceAccount of the bundle."""
    roles = {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
    }
    grants: dict[str, dict[Grant, set[str]]] = {}
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        namespace = binding["metadata"].get("namespace", "")
        kind, name = binding["roleRef"]["kind"], binding["roleRef"]["name"]
        role = roles.get((kind, namespace if kind == "Role" else "", name))
        if role is None:
            continue  # not ours: rbac_violations reports it
        scope = "cluster" if binding["kind"] == "ClusterRoleBinding" else namespace
        for subject in binding.get("subjects", []):
            if subject.get("kind") != "ServiceAccount":
                continue
            account = grants.setdefault(subject["name"], {})
            for rule in role.get("rules", []):
                names = tuple(sorted(rule.get("resourceNames", [])))
                for group in rule.get("apiGroups", []):
                    for resource in rule.get("resources", []):
                        account.setdefault((scope, group, resource, names), set()).update(
                            rule.get("verbs", [])
                        )
    return grants


def rbac_violations(
    objects: list[Doc], allowed: dict[str, dict[Grant, set[str]]] | None = None
) -> list[str]:
    """Everything in the bundle's RBAC that is more than least privilege, one line each.

    Rules: no wildcards, no exec/attach/port-forward/node proxy, no
    escalate/bind/impersonate, no aggregation. Bindings: only our roles, only
    to our ServiceAccounts. Grants: per ServiceAccount at most `allowed`, and
    Secrets for the token refresher only.
    """
    allowed = ALLOWED_GRANTS if allowed is None else allowed
    found: list[str] = []
    roles = {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
    }
    accounts = {
        (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        for o in objects
        if o["kind"] == "ServiceAccount"
    }
    for role in (o for o in objects if o["kind"] in ("Role", "ClusterRole")):
        if "aggregationRule" in role:
            found.append(f"{ref(role)}: aggregationRule (rules would come from elsewhere)")
        for i, rule in enumerate(role.get("rules", [])):
            found += _rule_violations_rbac(f"{ref(role)} rules[{i}]", rule)
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        name = ref(binding)
        namespace = binding["metadata"].get("namespace", "")
        role_ref = binding.get("roleRef", {})
        if role_ref.get("apiGroup") != RBAC_GROUP:
            found.append(f"{name}: roleRef.apiGroup {role_ref.get('apiGroup')!r}")
        kind = role_ref.get("kind")
        if kind == "Role" and binding["kind"] == "ClusterRoleBinding":
            found.append(f"{name}: a ClusterRoleBinding cannot bind a Role")
        target = (kind, namespace if kind == "Role" else "", role_ref.get("name"))
        if target not in roles:
            found.append(f"{name}: binds {kind} {role_ref.get('name')}, which is not in the bundle")
        for subject in binding.get("subjects", []):
            who = (subject.get("namespace", ""), subject.get("name"))
            if subject.get("kind") != "ServiceAccount" or who not in accounts:
                found.append(
                    f"{name}: binds {subject.get('kind')} {'/'.join(filter(None, who))}, "
                    "which is not one of our ServiceAccounts"
                )
    for account, grants in sorted(granted(objects).items()):
        if account not in allowed:
            found.append(f"ServiceAccount {account}: has grants but no allowance in the test")
            continue
        for (scope, group, resource, names), verbs in sorted(grants.items()):
            what = f"{group or 'core'}/{resource}" + (f" {list(names)}" if names else "")
            if resource == "secrets" and account not in SECRET_ACCOUNTS:
                found.append(f"ServiceAccount {account}: Secrets access ({sorted(verbs)})")
            extra = verbs - allowed[account].get((scope, group, resource, names), set())
            if extra:
                found.append(
                    f"ServiceAccount {account}: {sorted(extra)} on {what} ({scope}) "
                    "beyond what it needs"
                )
    return found


def test_rbac_of_the_bundle_is_least_privilege() -> None:
    assert rbac_violations(kustomize(ALL)) == []


def test_each_account_has_exactly_what_its_agent_uses() -> None:
    # Less would break the agent, more is caught by rbac_violations.
    assert granted(kustomize(ALL)) == ALLOWED_GRANTS


def _rule(objects: list[Doc], role_name: str) -> Doc:
    (role,) = [
        o for o in objects if o["kind"].endswith("Role") and o["metadata"]["name"] == role_name
    ]
    rule: Doc = role["rules"][0]
    return rule


def _plant_verbs_wildcard(objects: list[Doc]) -> None:
    _rule(objects, SA_ENFORCER)["verbs"].append("*")


def _plant_resources_wildcard(objects: list[Doc]) -> None:
    _rule(objects, SA_INJECTOR)["resources"] = ["*"]


def _plant_pods_exec(objects: list[Doc]) -> None:
    _rule(objects, SA_CONTROLLER)["resources"].append("pods/exec")


def _plant_groups_wildcard(objects: list[Doc]) -> None:
    _rule(objects, SA_HEALER)["apiGroups"] = ["*"]


def _plant_subresource_wildcard(objects: list[Doc]) -> None:
    _rule(objects, SA_ENFORCER)["resources"].append("pods/*")


def _plant_secrets_for_the_healer(objects: list[Doc]) -> None:
    _rule(objects, SA_HEALER)["resources"].append("secrets")


def _plant_escalate(objects: list[Doc]) -> None:
    _rule(objects, "token-refresher-leader")["verbs"].append("escalate")


def _plant_non_resource_urls(objects: list[Doc]) -> None:
    (role,) = [o for o in objects if identity(o) == ("ClusterRole", "", SA_HEALER)]
    role["rules"].append({"nonResourceURLs": ["/metrics"], "verbs": ["get"]})


def _plant_group_subject(objects: list[Doc]) -> None:
    (binding,) = [o for o in objects if identity(o) == ("ClusterRoleBinding", "", SA_ENFORCER)]
    binding["subjects"].append(
        {"kind": "Group", "name": "system:authenticated", "apiGroup": RBAC_GROUP}
    )


def _plant_cluster_admin(objects: list[Doc]) -> None:
    objects.append(
        {
            "apiVersion": f"{RBAC_GROUP}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "healer-admin"},
            "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": SA_HEALER, "namespace": NAMESPACE}],
        }
    )


def _plant_injector_secrets(objects: list[Doc]) -> None:
    # Within the rules' shape, what the injector had before issue 10: it reads no Secret now.
    (role,) = [o for o in objects if identity(o) == ("ClusterRole", "", SA_INJECTOR)]
    role["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})


def _plant_injector_every_config_map(objects: list[Doc]) -> None:
    # Its CA Role without the name: every ConfigMap of the agents' namespace.
    (role,) = [o for o in objects if identity(o) == ("Role", NAMESPACE, f"{SA_INJECTOR}-ca")]
    del role["rules"][0]["resourceNames"]


def _plant_enforcer_eviction(objects: list[Doc]) -> None:
    (role,) = [o for o in objects if identity(o) == ("ClusterRole", "", SA_ENFORCER)]
    role["rules"].append({"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]})


PLANTED: dict[str, tuple[Callable[[list[Doc]], None], str]] = {
    "verbs-wildcard": (_plant_verbs_wildcard, "wildcard in verbs: ['*']"),
    "resources-wildcard": (_plant_resources_wildcard, "wildcard in resources: ['*']"),
    "pods-exec": (_plant_pods_exec, "forbidden resource ['pods/exec']"),
    "apigroups-wildcard": (_plant_groups_wildcard, "wildcard in apiGroups: ['*']"),
    "subresource-wildcard": (_plant_subresource_wildcard, "wildcard in resources: ['pods/*']"),
    "secrets-for-the-healer": (_plant_secrets_for_the_healer, "automount-healer: Secrets access"),
    "escalate": (_plant_escalate, "forbidden verb ['escalate']"),
    "non-resource-urls": (_plant_non_resource_urls, "['nonResourceURLs'] (e.g. nonResourceURLs)"),
    "group-subject": (_plant_group_subject, "binds Group system:authenticated"),
    "cluster-admin": (_plant_cluster_admin, "binds ClusterRole cluster-admin, which is not in"),
    "injector-reads-secrets": (_plant_injector_secrets, f"{SA_INJECTOR}: Secrets access (['get'])"),
    "injector-reads-every-configmap": (
        _plant_injector_every_config_map,
        f"{SA_INJECTOR}: ['get'] on core/configmaps ({NAMESPACE}) beyond",
    ),
    "enforcer-evicts-by-default": (
        _plant_enforcer_eviction,
        f"{SA_ENFORCER}: ['create'] on core/pods/eviction (cluster) beyond",
    ),
}


@pytest.mark.parametrize("planted", PLANTED, ids=PLANTED)
def test_rbac_violations_catch_a_planted_grant(planted: str) -> None:
    objects = copy.deepcopy(kustomize(ALL))
    plant, expected = PLANTED[planted]
    plant(objects)
    found = rbac_violations(objects)
    assert any(expected in line for line in found), f"{expected!r} not in {found}"


def test_rbac_violations_report_each_planted_wildcard_together() -> None:
    # The issue's acceptance: a wildcard verb, a wildcard resource and
    # pods/exec in one copy of the rendered bundle are each reported.
    objects = copy.deepcopy(kustomize(ALL))
    for planted in ("verbs-wildcard", "resources-wildcard", "pods-exec"):
        PLANTED[planted][0](objects)
    found = "\n".join(rbac_violations(objects))
    assert f"ClusterRole {SA_ENFORCER} rules[0]: wildcard in verbs: ['*']" in found
    assert f"ClusterRole {SA_INJECTOR} rules[0]: wildcard in resources: ['*']" in found
    assert f"ClusterRole {SA_CONTROLLER} rules[0]: forbidden resource ['pods/exec']" in found


def overlay(tmp_path: Path, components: list[Path]) -> Path:
    """An overlay in `tmp_path` of manifests/all with `components`, as an operator writes it."""
    # Kustomize takes relative paths only.
    rel = [Path(os.path.relpath(p, tmp_path)).as_posix() for p in (ALL, *components)]
    lines = [
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        "resources:",
        f"  - {rel[0]}",
        "components:",
        *(f"  - {c}" for c in rel[1:]),
    ]
    (tmp_path / "kustomization.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def test_default_bundle_grants_no_eviction() -> None:
    (kust,) = load_docs(ALL / "kustomization.yaml")
    assert "components" not in kust, "opt-in components are the overlay's choice"
    for account, grants in granted(kustomize(ALL)).items():
        assert not [g for g in grants if g[2] == "pods/eviction"], account


def test_evict_component_adds_exactly_eviction_and_the_action(tmp_path: Path) -> None:
    objects = kustomize(overlay(tmp_path, [EVICT_COMPONENT]))
    default = kustomize(ALL)
    assert schema_violations(objects, schema_version()) == []
    assert crd_violations(objects) == []
    # Exactly one grant more, the enforcer's, cluster-wide.
    evict = {("cluster", group, res, ()): verbs for (group, res), verbs in EVICT_RULES.items()}
    with_evict = {**ALLOWED_GRANTS, SA_ENFORCER: {**ALLOWED_GRANTS[SA_ENFORCER], **evict}}
    assert granted(objects) == with_evict
    assert rbac_violations(objects, with_evict) == []
    # The default allowance reports it: nothing grants eviction unnoticed.
    assert any("pods/eviction" in v for v in rbac_violations(objects))
    # Every object as in manifests/all, but the enforcer's DaemonSet and the new grant.
    before = {identity(o): o for o in default}
    after = {identity(o): o for o in objects}
    changed = {k for k in before.keys() & after.keys() if before[k] != after[k]}
    assert changed == {("DaemonSet", NAMESPACE, SA_ENFORCER)}
    assert {kind for kind, _, _ in after.keys() - before.keys()} == {
        "ClusterRole",
        "ClusterRoleBinding",
    }
    for obj in (after[k] for k in after.keys() - before.keys()):
        assert obj["metadata"]["labels"][PART_OF] == NAMESPACE, ref(obj)
    # What the enforcer then does: --action evict, through its own CLI.
    (c,) = pod_template(after[("DaemonSet", NAMESPACE, SA_ENFORCER)])["containers"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    config, _local = enforcer_config([], env)
    assert config.action == "evict"
    assert pod_security_violations(objects) == []


# --- security contexts --------------------------------------------------------------


@dataclass(frozen=True)
class PodPolicy:
    """What one workload may use on its node; each reason is spelled out in its manifest."""

    service_account: str
    run_as_user: int
    # hostPID / hostNetwork / hostIPC -> why.
    host_namespaces: dict[str, str] = field(default_factory=dict)
    # Why the container is privileged; "" when it is not.
    privileged: str = ""
    # Added after dropping ALL (a privileged container has all of them anyway).
    capabilities: frozenset[str] = frozenset()
    # hostPath path -> why.
    host_paths: dict[str, str] = field(default_factory=dict)


POD_POLICY: dict[tuple[str, str], PodPolicy] = {
    ("DaemonSet", "automount-healer"): PodPolicy(
        service_account=SA_HEALER,
        run_as_user=0,
        host_namespaces={
            "hostPID": "PIDs in /proc/<pid>/fdinfo and in process events are the host's",
            "hostNetwork": "the process-event connector exists in the initial netns only",
        },
        privileged=(
            "umount2 and mounting fusectl over the host's mounts need CAP_SYS_ADMIN; "
            "mountPropagation Bidirectional is allowed only for privileged containers"
        ),
        host_paths={"/cvmfs": "the autofs root: the unmount must reach the host's root"},
    ),
    ("DaemonSet", "gpu-mem-enforcer"): PodPolicy(
        service_account=SA_ENFORCER,
        run_as_user=0,
        host_namespaces={"hostPID": "NVML reports host PIDs; /proc and pidfds must agree"},
        # Signals to other users' processes (kill(2) permission check).
        capabilities=frozenset({"KILL"}),
    ),
    ("DaemonSet", "token-refresher-injector"): PodPolicy(
        service_account=SA_INJECTOR,
        run_as_user=0,
        host_namespaces={"hostPID": "/proc/<pid>/root and cgroup of other pods' processes"},
        # ptrace-gated /proc/<pid>/root; each write with the owner's fsuid/fsgid
        # (injector.yaml says which is which).
        capabilities=frozenset(INJECTOR_CAPABILITIES),
    ),
    ("Deployment", "token-refresher-controller"): PodPolicy(
        service_account=SA_CONTROLLER,
        # Nothing on the node: the conventional "nonroot" uid.
        run_as_user=65532,
    ),
}
HOST_NAMESPACES = ("hostPID", "hostNetwork", "hostIPC")


def _container_violations(where: str, c: Doc, pod_spec: Doc, policy: PodPolicy) -> list[str]:
    found: list[str] = []
    context = c.get("securityContext")
    if not isinstance(context, dict):
        return [f"{where}: no securityContext"]
    pod_context = pod_spec.get("securityContext", {})
    if context.get("readOnlyRootFilesystem") is not True:
        found.append(f"{where}: readOnlyRootFilesystem is not true")
    uid = context.get("runAsUser", pod_context.get("runAsUser"))
    if uid != policy.run_as_user:
        found.append(f"{where}: runAsUser {uid}, expected {policy.run_as_user}")
    if policy.run_as_user != 0 and context.get("runAsNonRoot") is not True:
        found.append(f"{where}: runAsNonRoot is not true")
    if context.get("procMount", "Default") != "Default":
        found.append(f"{where}: procMount {context['procMount']}")
    for port in c.get("ports", []):
        if port.get("hostPort") and not pod_spec.get("hostNetwork"):
            found.append(f"{where}: hostPort {port['hostPort']}")
    if policy.privileged:
        if context.get("privileged") is not True:
            found.append(f"{where}: not privileged, but the policy says it must be")
        # Moot for a privileged container (unconfined, every capability, the API
        # rejects allowPrivilegeEscalation: false): set, they would only mislead.
        for key in ("seccompProfile", "capabilities", "allowPrivilegeEscalation"):
            if key in context:
                found.append(f"{where}: {key} is ignored for a privileged container")
        return found
    if context.get("privileged", False) is not False:
        found.append(f"{where}: privileged")
    if context.get("allowPrivilegeEscalation") is not False:
        found.append(f"{where}: allowPrivilegeEscalation is not false")
    seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        found.append(f"{where}: seccompProfile {seccomp.get('type')}")
    capabilities = context.get("capabilities", {})
    if capabilities.get("drop") != ["ALL"]:
        found.append(f"{where}: capabilities.drop is {capabilities.get('drop')}, not [ALL]")
    added = capabilities.get("add", [])
    if set(added) != policy.capabilities or len(added) != len(set(added)):
        found.append(f"{where}: capabilities.add {added}, expected {sorted(policy.capabilities)}")
    return found


def pod_security_violations(
    objects: list[Doc], policies: dict[tuple[str, str], PodPolicy] | None = None
) -> list[str]:
    """Everything a workload's pod uses beyond its `PodPolicy`, or that a policy lists unused."""
    policies = POD_POLICY if policies is None else policies
    found: list[str] = []
    seen = set()
    for workload in workloads(objects):
        key = (workload["kind"], workload["metadata"]["name"])
        name = ref(workload)
        policy = policies.get(key)
        if policy is None:
            found.append(f"{name}: no PodPolicy in the test")
            continue
        seen.add(key)
        spec = pod_template(workload)
        if spec.get("serviceAccountName") != policy.service_account:
            found.append(f"{name}: serviceAccountName {spec.get('serviceAccountName')}")
        used = {k for k in HOST_NAMESPACES if spec.get(k)}
        for host in sorted(used - set(policy.host_namespaces)):
            found.append(f"{name}: {host}")
        for host in sorted(set(policy.host_namespaces) - used):
            found.append(f"{name}: the policy allows {host}, unused: narrow the policy")
        paths = {v["hostPath"]["path"] for v in spec.get("volumes", []) if "hostPath" in v}
        for path in sorted(paths - set(policy.host_paths)):
            found.append(f"{name}: hostPath {path}")
        for path in sorted(set(policy.host_paths) - paths):
            found.append(f"{name}: the policy allows hostPath {path}, unused")
        if spec.get("hostUsers") is True or spec.get("shareProcessNamespace"):
            found.append(f"{name}: hostUsers/shareProcessNamespace")
        for c in containers(spec):
            found += _container_violations(f"{name} container {c['name']}", c, spec, policy)
    for key in sorted(set(policies) - seen):
        found.append(f"{key[0]} {key[1]}: PodPolicy for a workload not in the bundle")
    return found


def test_security_contexts_are_as_narrow_as_each_agent_allows() -> None:
    assert pod_security_violations(kustomize(ALL)) == []


def _workload(objects: list[Doc], name: str) -> Doc:
    (found,) = [o for o in workloads(objects) if o["metadata"]["name"] == name]
    return found


def _context(objects: list[Doc], name: str) -> Doc:
    context: Doc = pod_template(_workload(objects, name))["containers"][0]["securityContext"]
    return context


PLANTED_CONTEXTS: dict[str, tuple[Callable[[list[Doc]], None], str]] = {
    "host-network": (
        lambda o: pod_template(_workload(o, "gpu-mem-enforcer")).update(hostNetwork=True),
        "DaemonSet node-agents/gpu-mem-enforcer: hostNetwork",
    ),
    "host-path": (
        lambda o: (
            pod_template(_workload(o, "token-refresher-injector"))
            .setdefault("volumes", [])
            .append({"name": "root", "hostPath": {"path": "/"}})
        ),
        "token-refresher-injector: hostPath /",
    ),
    "capability": (
        lambda o: _context(o, "gpu-mem-enforcer")["capabilities"]["add"].append("SYS_ADMIN"),
        "capabilities.add ['KILL', 'SYS_ADMIN'], expected ['KILL']",
    ),
    "escalation": (
        lambda o: _context(o, "token-refresher-injector").update(allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation is not false",
    ),
    "controller-as-root": (
        lambda o: _context(o, "token-refresher-controller").update(runAsUser=0),
        "runAsUser 0, expected 65532",
    ),
    "writable-root": (
        lambda o: _context(o, "automount-healer").pop("readOnlyRootFilesystem"),
        "automount-healer: readOnlyRootFilesystem is not true",
    ),
}


@pytest.mark.parametrize("planted", PLANTED_CONTEXTS, ids=PLANTED_CONTEXTS)
def test_pod_security_violations_catch_a_planted_widening(planted: str) -> None:
    objects = copy.deepcopy(kustomize(ALL))
    plant, expected = PLANTED_CONTEXTS[planted]
    plant(objects)
    found = pod_security_violations(objects)
    assert any(expected in line for line in found), f"{expected!r} not in {found}"


def test_controller_runs_non_root() -> None:
    context = _context(kustomize(ALL), "token-refresher-controller")
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] != 0
    assert context.get("runAsGroup", 0) != 0


# --- the image against the manifests ------------------------------------------------


def test_every_command_is_a_console_script() -> None:
    scripts = console_scripts()
    commands = [
        (ref(w), c.get("command"))
        for w in workloads(kustomize(ALL))
        for c in containers(pod_template(w))
    ]
    assert commands
    for name, command in commands:
        # The image has no ENTRYPOINT: without a command, a container would run the CMD.
        assert command, f"{name}: no command"
        assert command[0] in scripts, f"{name}: {command[0]} is not in [project.scripts]"


def test_containerfile_says_which_agents_need_root() -> None:
    users = [args for keyword, args in containerfile_instructions() if keyword == "USER"]
    assert users == ["0"], "the image's user is root, for the node agents"
    comments = " ".join(
        line.lstrip("# ").strip()
        for line in CONTAINERFILE.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    )
    for workload in workloads(kustomize(ALL)):
        policy = POD_POLICY[(workload["kind"], workload["metadata"]["name"])]
        (c,) = pod_template(workload)["containers"]
        agent = " ".join(c["command"])
        # Each agent that runs as root is named in the comment with why;
        # the one that does not is named as running as a non-root uid.
        assert agent in comments, f"images/Containerfile does not say what {agent} runs as"
        if policy.run_as_user != 0:
            assert str(policy.run_as_user) in comments


# How an overlay moves every agent to another namespace (README, "Deploy
# everything"): `namespace:` alone leaves the binding subjects and the Namespace
# object behind (kustomize's default for subjects is `defaultOnly`).
MOVE_NAMESPACE = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {all}
transformers:
  - |-
    apiVersion: builtin
    kind: NamespaceTransformer
    metadata:
      name: agents-namespace
      namespace: {namespace}
    setRoleBindingSubjects: allServiceAccounts
patches:
  - target: {{kind: Namespace, name: node-agents}}
    patch: |-
      - op: replace
        path: /metadata/name
        value: {namespace}
"""


def test_an_overlay_moves_every_agent_and_its_bindings_to_another_namespace(
    tmp_path: Path,
) -> None:
    rel = Path(os.path.relpath(ALL, tmp_path)).as_posix()
    (tmp_path / "kustomization.yaml").write_text(
        MOVE_NAMESPACE.format(all=rel, namespace="science-agents"), encoding="utf-8"
    )
    objects = kustomize(tmp_path)
    namespaces = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    assert namespaces == ["science-agents"]
    for o in objects:
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"]["namespace"] == "science-agents", (o["kind"], o["metadata"])
        for subject in o.get("subjects") or []:
            assert subject["namespace"] == "science-agents", (o["metadata"]["name"], subject)
