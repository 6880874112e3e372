"""Static checks: manifests/token-refresher agrees with the code of `token-refresher`.

Like test_manifests.py for the mount healer and test_manifests_gpu.py for the
GPU enforcer: an env var a role does not read, a command that is no console
script, a probe on the wrong port, an RBAC rule wider than the role needs, a
capability too many, or a user example the parser rejects deploys fine and
fails (or over-grants) on the cluster; these tests catch it in CI instead.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from agents.token_refresher import spec
from agents.token_refresher.cli import build_parser
from agents.token_refresher.oauth import Token, check_token_url
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

BASE = REPO / "manifests" / "token-refresher"
SAMPLE = "example.yaml"
ENV_PREFIX = "TOKEN_REFRESHER_"
APP = "token-refresher"
CONTAINER = "token-refresher"
DEFAULT_METRICS_PORT = 9103
ROLES = ("controller", "injector")
WORKLOAD_KIND = {"controller": "Deployment", "injector": "DaemonSet"}
ACCOUNT = {role: f"{APP}-{role}" for role in ROLES}
COMPONENT = "app.kubernetes.io/component"

# What the kubelet would put in downward-API env vars, for parsing them.
DOWNWARD_SAMPLES = {
    "metadata.name": "token-refresher-controller-5d8c9b7f4-x7k2q",
    "metadata.namespace": NAMESPACE,
    "spec.nodeName": "node-1.example.org",
}

# Everything each ServiceAccount may do, and no more:
# (scope, apiGroup, resource, resourceNames) -> verbs, where scope is
# "cluster" for a ClusterRoleBinding or the namespace of a RoleBinding.
Grant = tuple[str, str, str, tuple[str, ...]]
EVENT_RULES: dict[Grant, set[str]] = {
    ("cluster", group, "events", ()): EVENT_VERBS for group in EVENT_GROUPS
}
# The names the controller and the injector agree on (issue 10's contract):
# the controller's TLS Secret and the CA ConfigMap injectors trust, both in
# the agents' namespace, and the audience of the injector's projected token.
TLS_SECRET = "token-refresher-tls"
CA_CONFIGMAP = "token-refresher-ca"
FILES_AUDIENCE = "node-agents.io/token-files"
FILES_PORT = 8443
SERVICE = "token-refresher-controller"
CONTROLLER_RULES: dict[Grant, set[str]] = {
    ("cluster", "", "secrets", ()): {"get", "list", "watch", "update", "patch"},
    # Claims about pods checked by GET; Events on the pods of a failed Secret.
    ("cluster", "", "pods", ()): {"get", "list", "watch"},
    # Templates, rendered on the controller's side.
    ("cluster", "", "configmaps", ()): {"get"},
    # The injectors' projected tokens.
    ("cluster", "authentication.k8s.io", "tokenreviews", ()): {"create"},
    **EVENT_RULES,
}
# Its own TLS Secret and CA ConfigMap: created once (create cannot be limited
# by name), the CA ConfigMap rotated; reading and rotating the Secret is the
# cluster-wide rule above.
TLS_RULES: dict[Grant, set[str]] = {
    (NAMESPACE, "", "secrets", ()): {"create"},
    (NAMESPACE, "", "configmaps", ()): {"create"},
    (NAMESPACE, "", "configmaps", (CA_CONFIGMAP,)): {"update"},
}
# No Secret, no ConfigMap but the CA.
INJECTOR_RULES: dict[Grant, set[str]] = {
    ("cluster", "", "pods", ()): {"get", "list", "watch"},
    (NAMESPACE, "", "configmaps", (CA_CONFIGMAP,)): {"get"},
    **EVENT_RULES,
}
# ptrace-gated /proc/<pid>/root; the owner's fsuid/fsgid and groups for each write.
INJECTOR_CAPABILITIES = {"SYS_PTRACE", "SETUID", "SETGID"}
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
# Subresources that would run code in, or read from, a container through the API.
FORBIDDEN_RESOURCES = {"pods/exec", "pods/attach", "pods/portforward", "nodes/proxy"}


def named(kind: str, name: str, docs: list[Doc] | None = None) -> Doc:
    matches = [
        d
        for d in (base_objects(BASE) if docs is None else docs)
        if d["kind"] == kind and d["metadata"]["name"] == name
    ]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def workload(role: str, docs: list[Doc] | None = None) -> Doc:
    return only(WORKLOAD_KIND[role], base_objects(BASE) if docs is None else docs)


def pod_spec(role: str) -> Doc:
    spec_: Doc = workload(role)["spec"]["template"]["spec"]
    return spec_


def container(role: str) -> Doc:
    found: list[Doc] = [c for c in pod_spec(role)["containers"] if c["name"] == CONTAINER]
    assert len(found) == 1, f"expected one container {CONTAINER} in the {role}"
    return found[0]


def resolved_env(role: str) -> dict[str, str]:
    """The container's env as the kubelet would set it (downward API filled in)."""
    env: dict[str, str] = {}
    for entry in container(role).get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        field = entry["valueFrom"]["fieldRef"]["fieldPath"]
        assert field in DOWNWARD_SAMPLES, f"{entry['name']}: unexpected valueFrom {entry}"
        env[entry["name"]] = DOWNWARD_SAMPLES[field]
    return env


def downward_fields(role: str) -> dict[str, str]:
    return {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in container(role).get("env", [])
        if "valueFrom" in e
    }


def role_parser(environ: dict[str, str], role: str) -> argparse.ArgumentParser:
    """The sub-parser of one role, built with `environ` (for its help text)."""
    parser = build_parser(environ)
    (roles,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub: argparse.ArgumentParser = roles.choices[role]
    return sub


def parsed(environ: dict[str, str], role: str) -> argparse.Namespace:
    try:
        return build_parser(environ).parse_args([role])
    except SystemExit:
        pytest.fail(f"`token-refresher {role}` rejects its environment {sorted(environ)}")


def pod_labels(role: str, docs: list[Doc] | None = None) -> dict[str, str]:
    labels: dict[str, str] = workload(role, docs)["spec"]["template"]["metadata"]["labels"]
    return labels


def sample(kind: str) -> Doc:
    return only(kind, load_docs(BASE / SAMPLE))


def sample_token() -> Token:
    token_secret = spec.parse_token_secret(sample("Secret"))
    return Token.from_json(token_secret.token_json, now=1_700_000_000.0)


def granted_to(account: str, docs: list[Doc]) -> dict[Grant, set[str]]:
    """What the bindings in `docs` give the ServiceAccount `account`, rule by rule."""
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"].endswith("Role")}
    granted: dict[Grant, set[str]] = {}
    for binding in (d for d in docs if d["kind"].endswith("RoleBinding")):
        subject = {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        if subject not in binding["subjects"]:
            continue
        assert binding["roleRef"]["apiGroup"] == "rbac.authorization.k8s.io"
        role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
        # A Role (and a RoleBinding) lives in the base's namespace; kustomize sets it.
        scope = "cluster" if binding["kind"] == "ClusterRoleBinding" else NAMESPACE
        for rule in role["rules"]:
            names = tuple(sorted(rule.get("resourceNames", [])))
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((scope, group, resource, names), set()).update(rule["verbs"])
    return granted


def may(
    grants: dict[Grant, set[str]],
    verb: str,
    resource: str,
    namespace: str,
    name: str = "",
    *,
    group: str = "",
) -> bool:
    """Whether RBAC allows the request, given what `granted_to` found.

    A ClusterRoleBinding's rule applies in every namespace, a RoleBinding's in
    its own; a rule with resourceNames applies only to requests for one of
    those names (a list or watch of everything has no name: `name` "").
    """
    for (scope, rule_group, rule_resource, names), verbs in grants.items():
        if (rule_group, rule_resource) != (group, resource) or verb not in verbs:
            continue
        if scope not in ("cluster", namespace):
            continue
        if names and name not in names:
            continue
        return True
    return False


def comment_text(path: Path) -> str:
    """The comments of a YAML file, one line each, without the `#`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(line.split("#", 1)[1] for line in lines if "#" in line)


role_params = pytest.mark.parametrize("role", ROLES)


# --- (a) the YAML as written ---------------------------------------------------------


@role_params
def test_command_is_the_console_script_and_the_role(role: str) -> None:
    assert APP in console_scripts()
    # The agent is PID 1 of its container, no wrapper; the role picks the sub-command.
    assert container(role)["command"] == [APP, role]
    # The role exists (parsing with no environment at all).
    assert parsed({}, role).role == role


@role_params
def test_env_vars_are_flags_of_the_role(role: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Wide help so that no env var name is wrapped across lines.
    monkeypatch.setenv("COLUMNS", "1000")
    env = resolved_env(role)
    assert f"{ENV_PREFIX}LOG_FORMAT" in env
    defaults = vars(parsed({}, role))
    for name, value in env.items():
        # Only the role's own variables, and the bare NODE_NAME of add_kube_flags.
        assert name.startswith(ENV_PREFIX) or name == "NODE_NAME", f"{name} is read by nobody"
        assert name in role_parser({}, role).format_help(), f"{name} is no env var of {role}"
        # The value lands: it changes what the role parses, and nothing else fails.
        changed = {k: v for k, v in vars(parsed({name: value}, role)).items() if defaults[k] != v}
        assert changed, f"{name}={value!r} changes nothing in `token-refresher {role}`"


def test_controller_env_values_land() -> None:
    env = resolved_env("controller")
    args = parsed(env, "controller")
    assert args.identity == DOWNWARD_SAMPLES["metadata.name"]
    assert args.lease_namespace == NAMESPACE
    assert args.token_url == env[f"{ENV_PREFIX}TOKEN_URL"]
    assert args.log_format == "json"
    assert args.metrics_address.port == DEFAULT_METRICS_PORT
    # What `main` checks before starting: https, a host.
    check_token_url(args.token_url, allow_http=args.allow_http)
    assert not args.allow_http
    assert not args.dry_run and not args.once


def test_injector_env_values_land() -> None:
    args = parsed(resolved_env("injector"), "injector")
    assert args.node_name == DOWNWARD_SAMPLES["spec.nodeName"]
    assert args.log_format == "json"
    # hostPID: the container's own /proc shows the host's processes.
    assert args.proc_root == "/proc"
    assert not args.dry_run and not args.once


@pytest.mark.parametrize("path", sorted(BASE.glob("*.yaml")), ids=lambda p: p.name)
def test_env_vars_named_in_comments_are_flags_too(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Commented-out settings (CA bundle, allowed token URLs) are uncommented by
    # operators as they are: a typo there would be read by nobody.
    monkeypatch.setenv("COLUMNS", "1000")
    named_roles = [r for r in ROLES if path.stem == r] or list(ROLES)
    helps = "".join(role_parser({}, r).format_help() for r in named_roles)
    for name in set(re.findall(rf"{ENV_PREFIX}[A-Z0-9_]+", path.read_text(encoding="utf-8"))):
        assert f"[env {name}]" in helps, f"{path.name}: {name} is no env var of {named_roles}"


def test_downward_api_gives_identity_lease_namespace_and_node() -> None:
    assert downward_fields("controller") == {
        f"{ENV_PREFIX}IDENTITY": "metadata.name",
        f"{ENV_PREFIX}LEASE_NAMESPACE": "metadata.namespace",
    }
    assert downward_fields("injector") == {"NODE_NAME": "spec.nodeName"}


def test_token_url_is_a_placeholder_with_cerns_in_a_comment() -> None:
    url = plain_env(container("controller"))[f"{ENV_PREFIX}TOKEN_URL"]
    assert url.startswith("https://auth.example.org/"), "a placeholder the operator must set"
    comments = comment_text(BASE / "controller.yaml")
    assert "https://auth.cern.ch/auth/realms/cern/protocol/openid-connect/token" in comments
    check_token_url(url)


def test_optional_ca_bundle_is_a_consistent_commented_example() -> None:
    comments = comment_text(BASE / "controller.yaml")
    bundle = re.search(rf"{ENV_PREFIX}CA_BUNDLE\s+value: (\S+)", comments)
    mount = re.search(r"name: ca-bundle\s+mountPath: (\S+)\s+readOnly: true", comments)
    volume = re.search(r"name: ca-bundle\s+configMap:\s+name: (\S+)", comments)
    assert bundle and mount and volume, "the commented CA bundle example is incomplete"
    assert str(PurePosixPath(bundle.group(1)).parent) == mount.group(1)
    # Not the CA ConfigMap of the controller's own TLS, which it writes.
    assert volume.group(1) == "token-refresher-idp-ca"
    assert volume.group(1) != CA_CONFIGMAP
    # Commented out by default: the system store is used.
    assert f"{ENV_PREFIX}CA_BUNDLE" not in resolved_env("controller")
    assert "volumes" not in pod_spec("controller")


def test_controller_is_one_leader_and_a_warm_standby() -> None:
    deployment = workload("controller")
    assert deployment["spec"]["replicas"] == 2
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    # A Lease candidate stays Ready throughout a rollout.
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    # The refresh in flight (IdP request, then the Secret write) fits in the grace.
    args = parsed(resolved_env("controller"), "controller")
    assert pod_spec("controller")["terminationGracePeriodSeconds"] > args.request_timeout
    # A leader stops being one after --lease-duration; renewals must come well before.
    assert args.renew_interval < args.lease_duration


def test_controller_has_no_privilege() -> None:
    spec_ = pod_spec("controller")
    for host in ("hostPID", "hostNetwork", "hostIPC"):
        assert not spec_.get(host, False), host
    assert not any("hostPath" in v for v in spec_.get("volumes", []))
    context = container("controller")["securityContext"]
    assert context.get("privileged", False) is False
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 65532
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}, "no capability added"
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_injector_has_exactly_what_writing_into_containers_needs() -> None:
    spec_ = pod_spec("injector")
    # /proc/<pid>/root and /proc/<pid>/cgroup of other pods' processes.
    assert spec_["hostPID"] is True
    assert not spec_.get("hostNetwork", False)
    assert not spec_.get("hostIPC", False)
    # Everything goes through /proc: no host directory is mounted in.
    assert not any("hostPath" in v for v in spec_.get("volumes", []))
    context = container("injector")["securityContext"]
    assert context.get("privileged", False) is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    # Capabilities in Kubernetes' `add` are effective for uid 0 only.
    assert context["runAsUser"] == 0
    assert context["capabilities"]["drop"] == ["ALL"]
    added = context["capabilities"]["add"]
    assert len(added) == len(set(added))
    assert set(added) == INJECTOR_CAPABILITIES
    # Nothing that overrides file permissions: files are written as their owner.
    assert not set(added) & {"DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "CHOWN", "FSETID"}


def test_injector_runs_on_every_node() -> None:
    daemonset = workload("injector")
    spec_ = pod_spec("injector")
    assert spec_["tolerations"] == [{"operator": "Exists"}]
    assert "nodeSelector" not in spec_
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "10%"},
    }


def test_workloads_select_their_own_pods_only() -> None:
    for role in ROLES:
        selector = workload(role)["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels(role).items(), role
        assert pod_labels(role)[COMPONENT] == role
        (other,) = [r for r in ROLES if r != role]
        assert not selector.items() <= pod_labels(other).items(), f"{role} selects {other} pods"
    # The standby is kept off the leader's node (where possible).
    terms = pod_spec("controller")["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    (term,) = [t["podAffinityTerm"] for t in terms]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod_labels("controller").items()


def test_resources_are_modest_and_have_no_cpu_limit() -> None:
    controller = container("controller")["resources"]
    assert controller["requests"] == {"cpu": "50m", "memory": "128Mi"}
    # Every injector stream on one replica (~90 KiB each; hack/bench_files.py).
    assert controller["limits"] == {"memory": "768Mi"}
    injector = container("injector")["resources"]
    assert set(injector["requests"]) == {"cpu", "memory"}
    assert set(injector["limits"]) == {"memory"}, "no CPU limit (throttling delays writes)"


@role_params
def test_probes_use_the_health_endpoints_on_the_metrics_port(role: str) -> None:
    c = container(role)
    (metrics,) = [p for p in c["ports"] if p["name"] == "metrics"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ("metrics", metrics["containerPort"]), probe


@role_params
def test_metrics_port_is_the_port_the_agent_listens_on(role: str) -> None:
    env = resolved_env(role)
    expected = parsed(env, role).metrics_address.port
    if f"{ENV_PREFIX}METRICS_ADDRESS" not in env:
        assert expected == DEFAULT_METRICS_PORT
    (metrics,) = [p for p in container(role)["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == expected
    assert "hostPort" not in metrics


def test_service_accounts_one_per_role() -> None:
    accounts = [d for d in base_objects(BASE) if d["kind"] == "ServiceAccount"]
    assert sorted(a["metadata"]["name"] for a in accounts) == sorted(ACCOUNT.values())
    for account in accounts:
        # Both roles talk to the API server with their own token.
        assert account["automountServiceAccountToken"] is True
    for role in ROLES:
        assert pod_spec(role)["serviceAccountName"] == ACCOUNT[role]


def test_rbac_rules_are_well_formed_and_narrow() -> None:
    docs = load_docs(BASE / "rbac.yaml")
    assert {d["kind"] for d in docs} == {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    for role in (d for d in docs if d["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            # No nonResourceURLs, no aggregation, nothing but these keys.
            assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                for item in rule.get(key, []):
                    assert "*" not in item, f"wildcard in {key}: {rule}"
            assert not FORBIDDEN_RESOURCES & set(rule["resources"]), rule
            assert "nodes" not in rule["resources"], rule
    for binding in (d for d in docs if d["kind"].endswith("RoleBinding")):
        # Each binding names its role and one account of this base.
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount"
        assert subject["name"] in ACCOUNT.values()
        assert subject["namespace"] == NAMESPACE


def test_rbac_is_exactly_what_each_account_uses() -> None:
    docs = load_docs(BASE / "rbac.yaml")
    lease_name = parsed(resolved_env("controller"), "controller").lease_name
    leader_rules: dict[Grant, set[str]] = {
        # `create` cannot be limited by resourceNames (the object has no name yet).
        (NAMESPACE, "coordination.k8s.io", "leases", ()): {"create"},
        # Everything else on the one Lease the controller uses.
        (NAMESPACE, "coordination.k8s.io", "leases", (lease_name,)): {"get", "update"},
    }
    controller = granted_to(ACCOUNT["controller"], docs)
    assert controller == {**CONTROLLER_RULES, **leader_rules, **TLS_RULES}
    assert granted_to(ACCOUNT["injector"], docs) == INJECTOR_RULES
    # Spelled out: the controller writes Secrets but deletes none.
    assert not may(controller, "delete", "secrets", NAMESPACE, TLS_SECRET)


def test_leader_role_is_namespaced_where_the_lease_is() -> None:
    # The Lease namespace is the pod's own (downward API), i.e. the base's namespace,
    # where kustomize puts the Role and the RoleBinding.
    assert downward_fields("controller")[f"{ENV_PREFIX}LEASE_NAMESPACE"] == "metadata.namespace"
    role = named("Role", "token-refresher-leader")
    assert role["metadata"].get("namespace", NAMESPACE) == NAMESPACE
    binding = named("RoleBinding", "token-refresher-leader")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "token-refresher-leader",
    }


def test_podmonitor_scrapes_both_workloads_on_the_metrics_port() -> None:
    monitor = only("PodMonitor", base_objects(BASE))
    selector = monitor["spec"]["selector"]["matchLabels"]
    for role in ROLES:
        assert selector.items() <= pod_labels(role).items(), f"the {role} is not scraped"
    # The controller's other port is the file server (HTTPS, not metrics).
    assert [p["name"] for p in container("controller")["ports"]] == ["metrics", "files"]
    assert [p["name"] for p in container("injector")["ports"]] == ["metrics"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    node_label = {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}
    assert endpoint == {
        "port": "metrics",
        "path": "/metrics",
        "interval": "15s",
        "relabelings": [node_label],  # alerts and the dashboard name the node
    }
    assert monitor["spec"]["podTargetLabels"] == [COMPONENT]


def test_injector_reads_no_secret_and_no_config_map_but_its_ca() -> None:
    # The injector's token is on every node: root on any one of them has it.
    injector = granted_to(ACCOUNT["injector"], load_docs(BASE / "rbac.yaml"))
    for namespace in (NAMESPACE, "kube-system", "team-a"):
        for verb in ("get", "list", "watch"):
            assert not may(injector, verb, "secrets", namespace), (verb, namespace)
            assert not may(injector, verb, "secrets", namespace, TLS_SECRET), (verb, namespace)
            assert not may(injector, verb, "configmaps", namespace), (verb, namespace)
            assert not may(injector, verb, "configmaps", namespace, "eos-template")
    # Its CA, by name, where the controller publishes it; nowhere else.
    assert may(injector, "get", "configmaps", NAMESPACE, CA_CONFIGMAP)
    assert not may(injector, "get", "configmaps", "team-a", CA_CONFIGMAP)
    # It writes nothing but Events (not even its CA).
    written = {r for (_, _, r, _), verbs in injector.items() if verbs & WRITE_VERBS}
    assert written == {"events"}


def test_controller_reviews_tokens_and_checks_pods_and_templates() -> None:
    controller = granted_to(ACCOUNT["controller"], load_docs(BASE / "rbac.yaml"))
    assert may(controller, "create", "tokenreviews", "", group="authentication.k8s.io")
    # A claimed pod of any namespace, one GET each; a template in the pod's namespace.
    assert may(controller, "get", "pods", "team-a", "notebook-0")
    assert may(controller, "get", "configmaps", "team-a", "eos-template")
    # Its TLS objects: the first ones created, the CA rotated, in its namespace only.
    assert may(controller, "create", "secrets", NAMESPACE)
    assert may(controller, "create", "configmaps", NAMESPACE)
    assert may(controller, "update", "configmaps", NAMESPACE, CA_CONFIGMAP)
    assert may(controller, "update", "secrets", NAMESPACE, TLS_SECRET)
    assert not may(controller, "create", "secrets", "team-a")
    assert not may(controller, "update", "configmaps", NAMESPACE, "another")
    assert not may(controller, "update", "configmaps", "team-a", CA_CONFIGMAP)


def projected_token() -> tuple[Doc, Doc]:
    """(volumeMount, serviceAccountToken source) of the injector's controller token."""
    volumes = {v["name"]: v for v in pod_spec("injector")["volumes"]}
    found = [
        (mount, source["serviceAccountToken"])
        for mount in container("injector")["volumeMounts"]
        for source in volumes[mount["name"]].get("projected", {}).get("sources", [])
        if "serviceAccountToken" in source
    ]
    assert len(found) == 1, "one projected ServiceAccount token for the controller"
    return found[0]


def state_volume() -> tuple[Doc, Doc]:
    """(volumeMount, volume) of the injector's state directory."""
    volumes = {v["name"]: v for v in pod_spec("injector")["volumes"]}
    (found,) = [
        (m, volumes[m["name"]])
        for m in container("injector")["volumeMounts"]
        if "emptyDir" in volumes[m["name"]]
    ]
    return found


def test_injector_proves_its_node_with_a_token_for_the_controller_only() -> None:
    mount, token = projected_token()
    # An audience of its own: the API server and other services reject it.
    assert token["audience"] == FILES_AUDIENCE
    assert token["path"] == "token"
    assert mount["mountPath"] == "/var/run/secrets/node-agents.io/token-files"
    assert mount["readOnly"] is True
    # Kubelet rotates at 80 % of the lifetime; the API's minimum is 600 s.
    assert 600 <= token["expirationSeconds"] <= 3600
    # Distinct from the API credentials (the default token mount).
    assert not mount["mountPath"].startswith("/var/run/secrets/kubernetes.io/")


def test_injector_keeps_its_last_copy_in_memory_across_container_restarts() -> None:
    mount, volume = state_volume()
    assert mount["mountPath"] == "/var/lib/token-injector"
    assert mount.get("readOnly", False) is False
    # tmpfs: the node's access tokens never reach its disk; bounded.
    assert volume["emptyDir"]["medium"] == "Memory"
    assert volume["emptyDir"]["sizeLimit"]
    # The root filesystem stays read-only: the emptyDir is the only writable place.
    assert container("injector")["securityContext"]["readOnlyRootFilesystem"] is True


def test_injector_names_agree_with_its_cli_defaults() -> None:
    # The manifest sets none of these: the defaults must point where it mounts.
    args = parsed(resolved_env("injector"), "injector")
    mount, token = projected_token()
    assert args.controller_token_file == f"{mount['mountPath']}/{token['path']}"
    assert str(PurePosixPath(args.state_file).parent) == state_volume()[0]["mountPath"]
    assert args.ca_configmap == CA_CONFIGMAP
    urls = args.controller_url
    (url,) = urls if isinstance(urls, (list, tuple)) else str(urls).split(",")
    # The headless Service, in the injector's namespace (DNS search path), its port.
    assert url == f"https://{SERVICE}:{FILES_PORT}"


def test_controller_names_agree_with_its_cli_defaults() -> None:
    args = parsed(resolved_env("controller"), "controller")
    address = args.files_address
    port = getattr(address, "port", None) or int(str(address).rpartition(":")[2])
    (files,) = [p for p in container("controller")["ports"] if p["name"] == "files"]
    assert port == files["containerPort"] == FILES_PORT
    assert args.files_audience == projected_token()[1]["audience"]
    assert args.tls_secret == TLS_SECRET
    assert args.ca_configmap == CA_CONFIGMAP
    assert args.injector_service_account == pod_spec("injector")["serviceAccountName"]
    selector = dict(pair.split("=", 1) for pair in str(args.injector_selector).split(","))
    assert selector.items() <= pod_labels("injector").items()
    assert not selector.items() <= pod_labels("controller").items()


# What NodeRestriction forbids a kubelet to set on its own Node (plugin/pkg/admission/
# noderestriction: getForbiddenLabels): node-restriction labels, and kubernetes.io /
# k8s.io labels other than the kubelet's own. Any other label a compromised node
# could put on itself to attract the controller.
KUBELET_LABELS = {
    "kubernetes.io/hostname",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
}


def kubelet_may_set(label: str) -> bool:
    domain = label.partition("/")[0] if "/" in label else ""

    def within(parent: str) -> bool:
        return domain == parent or domain.endswith(f".{parent}")

    if within("node-restriction.kubernetes.io"):
        return False
    if within("kubernetes.io") or within("k8s.io"):
        own = within("kubelet.kubernetes.io") or within("node.kubernetes.io")
        return label in KUBELET_LABELS or own
    return True


def test_kubelet_label_rules_as_noderestriction_has_them() -> None:
    assert kubelet_may_set("node-agents.io/trusted-infra")
    assert kubelet_may_set("kubernetes.io/hostname")
    assert not kubelet_may_set("node-role.kubernetes.io/control-plane")
    assert not kubelet_may_set("node-restriction.kubernetes.io/pool")
    assert not kubelet_may_set("example.com.node-restriction.kubernetes.io/fips")


def test_controller_runs_only_on_nodes_a_tenant_kubelet_cannot_qualify() -> None:
    spec_ = pod_spec("controller")
    required = spec_["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    terms = required["nodeSelectorTerms"]
    # OR-ed terms: a control-plane node, or one the operator labels.
    assert terms == [
        {
            "matchExpressions": [
                {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}
            ]
        },
        {
            "matchExpressions": [
                {
                    "key": "node-agents.io.node-restriction.kubernetes.io/trusted-infra",
                    "operator": "In",
                    "values": ["true"],
                }
            ]
        },
    ]
    for term in terms:
        assert "matchFields" not in term
        for expression in term["matchExpressions"]:
            # No kubelet can label its own node into the controller's pool.
            assert not kubelet_may_set(expression["key"]), expression["key"]
            assert expression["operator"] in ("Exists", "In")
    # The control-plane taint is tolerated, nothing else (no blanket toleration).
    assert spec_["tolerations"] == [
        {
            "key": "node-role.kubernetes.io/control-plane",
            "operator": "Exists",
            "effect": "NoSchedule",
        }
    ]
    assert "nodeSelector" not in spec_
    # Every replica serves files: two, spread over nodes where possible.
    assert workload("controller")["spec"]["replicas"] == 2
    assert spec_["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    # Documented where it is set: why, and how an overlay changes it.
    comments = comment_text(BASE / "controller.yaml")
    assert "tenant" in comments and "nodeSelectorTerms" in comments


def test_service_is_headless_over_the_ready_controllers_files_port() -> None:
    service = only("Service", base_objects(BASE))
    assert service["metadata"]["name"] == SERVICE
    spec_ = service["spec"]
    # One DNS record per replica, so that an injector can move between them.
    assert spec_["clusterIP"] == "None"
    assert spec_["publishNotReadyAddresses"] is False
    (port,) = spec_["ports"]
    assert port["name"] == "files"
    assert port["port"] == FILES_PORT
    (files,) = [p for p in container("controller")["ports"] if p["name"] == port["targetPort"]]
    # Headless: no port mapping, the injector dials the pod's port itself.
    assert files["containerPort"] == port["port"]


# --- the user example (not a resource) ----------------------------------------------


def test_example_holds_a_secret_a_template_and_a_pod() -> None:
    docs = load_docs(BASE / SAMPLE)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Pod", "Secret"]
    for doc in docs:
        # Applied in the user's namespace, not the agents'.
        assert "namespace" not in doc["metadata"], doc["kind"]


def test_example_secret_is_a_token_secret_with_fake_values() -> None:
    secret = sample("Secret")
    assert spec.is_token_secret(secret)
    # The annotation key of oauth2-refresh-controller, as existing users have it.
    assert secret["metadata"]["annotations"] == {f"{spec.CERN_PREFIX}/{spec.IS_TOKEN}": "true"}
    assert "data" not in secret, "stringData, so that the example is readable"
    parsed_secret = spec.parse_token_secret(secret)
    assert parsed_secret.token_key == "oauth"
    assert parsed_secret.token_url == "", "the controller's default endpoint"
    token = sample_token()
    assert token.refresh_token, "nothing to refresh with"
    assert token.expires_at is not None
    # Obviously fake: nobody mistakes them for credentials (or pastes real ones here).
    for value in (token.access_token, token.refresh_token, parsed_secret.client_secret):
        assert "FAKE" in value


def test_example_pod_asks_for_the_eos_file_in_its_own_container() -> None:
    pod = sample("Pod")
    annotations = pod["metadata"]["annotations"]
    assert f"{spec.OUR_PREFIX}/{spec.TO_INJECT}" in annotations
    (injection,) = spec.parse_to_inject(annotations)
    assert injection.secret_name == sample("Secret")["metadata"]["name"]
    assert injection.template_config_map == sample("ConfigMap")["metadata"]["name"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert injection.container in containers, "the file would go to no container"
    # The defaults: /tmp/oauthtk_<owner>, 0400, owned by the uid the pod runs as.
    assert injection.owner == pod["spec"]["securityContext"]["runAsUser"]
    assert injection.group == injection.owner
    assert injection.path == f"/tmp/oauthtk_{injection.owner}"
    assert injection.mode == spec.DEFAULT_MODE
    # eosxd and the EOS clients read the token from the file named here.
    env = plain_env(containers[injection.container])
    assert env["OAUTH2_TOKEN"] == f"FILE:{injection.path}"


def test_example_optional_fields_in_the_comment_parse() -> None:
    comments = " ".join(comment_text(BASE / SAMPLE).split())
    match = re.search(r"e\.g\. (\{[^}]*\})", comments)
    assert match, "the example of the optional fields is gone"
    entry: dict[str, Any] = json.loads(match.group(1))
    assert {"path", "mode"} <= set(entry)
    key = f"{spec.OUR_PREFIX}/{spec.TO_INJECT}"
    (injection,) = spec.parse_to_inject({key: json.dumps([entry])})
    assert injection.path == entry["path"]
    assert injection.mode == int(entry["mode"], 8)


def test_example_template_renders_the_eos_format() -> None:
    config_map = sample("ConfigMap")
    name = config_map["metadata"]["name"]
    template = spec.template_of(config_map, name)
    token = sample_token()
    assert (
        spec.render(template, token)
        == (
            f"oauth2:{token.access_token}:"
            "auth.cern.ch/auth/realms/cern/protocol/openid-connect/userinfo"
        ).encode()
    )


# --- (b) the rendered kustomization --------------------------------------------------


def test_kustomize_renders_the_base() -> None:
    docs = kustomize(BASE)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ServiceAccount"] * 2
        + ["ClusterRole", "ClusterRoleBinding"] * 2
        # The Lease, the controller's TLS objects, the injector's CA.
        + ["Role", "RoleBinding"] * 3
        + ["Deployment", "Service", "DaemonSet", "PodMonitor"]
    )
    # Labels, namespace and selectors: test_manifests checks them for every base.
    # Here: each role's selector picks its own pods, not the other role's.
    for role in ROLES:
        selector = workload(role, docs)["spec"]["selector"]["matchLabels"]
        (other,) = [r for r in ROLES if r != role]
        assert not selector.items() <= pod_labels(other, docs).items(), role
    # The Service selects the controller's pods only (labels as rendered).
    selector = only("Service", docs)["spec"]["selector"]
    assert selector.items() <= pod_labels("controller", docs).items()
    assert not selector.items() <= pod_labels("injector", docs).items()
    # The permissions per account are unchanged by rendering.
    assert granted_to(ACCOUNT["injector"], docs) == INJECTOR_RULES
    assert granted_to(ACCOUNT["controller"], docs).keys() >= CONTROLLER_RULES.keys()
