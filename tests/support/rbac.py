"""Kubernetes RBAC, evaluated as the apiserver's authorizer does, for the fake API server.

Pure functions over plain objects (Role, ClusterRole, RoleBinding,
ClusterRoleBinding as dicts): `request_attributes` is the apiserver's
RequestInfoFactory (k8s.io/apiserver/pkg/endpoints/request/requestinfo.go),
`authorize` its RBAC authorizer (plugin/pkg/auth/authorizer/rbac/rbac.go and
rule.go), `forbidden` the 403 Status it writes
(endpoints/handlers/responsewriters/errors.go). `bundle_rbac()` renders the
RBAC of `manifests/all` once per session for tests that run an agent under its
own ServiceAccount.

Not imitated: aggregated ClusterRoles (aggregationRule), impersonation, the
Node and Webhook authorizers, escalation checks on writes to RBAC objects.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

JSON = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
RBAC_GROUP = "rbac.authorization.k8s.io"
RBAC_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
SA_PREFIX = "system:serviceaccount:"

# The opt-in kustomize component that grants the GPU enforcer pods/eviction
# (issue 10): tests of `--action evict` add its RBAC when it exists.
GPU_EVICT_COMPONENT = "gpu-enforcer/evict"


@dataclass(frozen=True)
class User:
    """An authenticated identity (k8s.io/apiserver/pkg/authentication/user.Info)."""

    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] | None = None


def service_account_user(namespace: str, name: str, uid: str = "") -> User:
    """The user a ServiceAccount token authenticates as (serviceaccount.UserInfo)."""
    return User(
        f"{SA_PREFIX}{namespace}:{name}",
        uid,
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
    )


@dataclass(frozen=True)
class Attributes:
    """What the authorizer decides on (authorizer.AttributesRecord)."""

    verb: str
    resource_request: bool
    path: str
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""

    @property
    def full_resource(self) -> str:
        """`pods/eviction`: how rules and messages name a subresource."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


class Denial(NamedTuple):
    """One refused request, for test assertions."""

    user: str
    verb: str
    group: str
    resource: str  # with its subresource ("pods/eviction"); a non-resource request: its path
    namespace: str
    name: str


_METHOD_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
# Subresources of a Namespace object itself (/api/v1/namespaces/NS/status).
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})


def _exact_name(field_selector: str) -> str:
    """The value of a `metadata.name=X` (or `==`) requirement, as RequiresExactMatch."""
    for part in field_selector.split(","):
        for op in ("==", "="):
            label, sep, value = part.partition(op)
            if sep and label.strip() == "metadata.name":
                return value.strip()
    return ""


def request_attributes(method: str, path: str, query: Mapping[str, str]) -> Attributes:
    """The authorizer's view of a request (RequestInfoFactory.NewRequestInfo).

    A GET without a name is a list, or a watch with `watch=true`; a list or watch
    whose field selector names one object (`metadata.name=x`) carries that name,
    so resourceNames rules apply to it; a DELETE without a name is deletecollection.
    """
    parts = [p for p in path.split("/") if p]
    non_resource = Attributes(method.lower(), False, path)
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return non_resource
    group = ""
    rest = parts[1:]
    if parts[0] == "apis":
        if len(rest) < 3:
            return non_resource
        group, rest = rest[0], rest[1:]
    version, rest = rest[0], rest[1:]
    verb = _METHOD_VERBS.get(method.upper(), method.lower())
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    if not name and verb == "get":
        watch = query.get("watch", "").lower() in ("true", "1")
        verb = "watch" if watch else "list"
        name = _exact_name(query.get("fieldSelector", ""))
    elif verb == "get" and query.get("watch", "").lower() in ("true", "1"):
        verb = "watch"
    if not name and verb == "delete":
        verb = "deletecollection"
    return Attributes(verb, True, path, group, version, namespace, resource, subresource, name)


# -- rules (rbac/rule.go) ---------------------------------------------------------------


def _resource_matches(rule: JSON, attrs: Attributes) -> bool:
    for resource in rule.get("resources") or ():
        if resource in ("*", attrs.full_resource):
            return True
        # `*/scale` matches every resource's scale subresource.
        if attrs.subresource and resource == f"*/{attrs.subresource}":
            return True
    return False


def _url_matches(rule: JSON, path: str) -> bool:
    for url in rule.get("nonResourceURLs") or ():
        if url in ("*", path) or (url.endswith("*") and path.startswith(url[:-1])):
            return True
    return False


def rule_allows(rule: JSON, attrs: Attributes) -> bool:
    """One PolicyRule against a request (RuleAllows)."""
    verbs = rule.get("verbs") or ()
    if "*" not in verbs and attrs.verb not in verbs:
        return False
    if not attrs.resource_request:
        return _url_matches(rule, attrs.path)
    groups = rule.get("apiGroups") or ()
    if "*" not in groups and attrs.api_group not in groups:
        return False
    if not _resource_matches(rule, attrs):
        return False
    names = rule.get("resourceNames") or ()
    # A rule with resourceNames never matches a request without a name
    # (create, list, watch, deletecollection without a metadata.name selector).
    return not names or attrs.name in names


def subject_matches(subject: JSON, user: User) -> bool:
    """appliesToUser: a User by name, a Group by membership, a ServiceAccount by its user name."""
    kind = subject.get("kind")
    if kind == "User":
        return bool(subject.get("name") == user.name)
    if kind == "Group":
        return subject.get("name") in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or ""
        return bool(namespace) and user.name == f"{SA_PREFIX}{namespace}:{subject.get('name')}"
    return False


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # RBAC's reason for a denial: roles that bindings name but that do not exist
    # ("RBAC: clusterrole.rbac.authorization.k8s.io "x" not found").
    reason: str = ""


def authorize(objects: Iterable[JSON], user: User, attrs: Attributes) -> Decision:
    """RBACAuthorizer.Authorize over Roles, ClusterRoles and their bindings.

    A ClusterRoleBinding grants its ClusterRole everywhere; a RoleBinding grants
    its Role or ClusterRole only inside the binding's namespace, so never for a
    cluster-scoped request or a non-resource URL.
    """
    roles: dict[tuple[str, str, str], JSON] = {}
    bindings: list[JSON] = []
    for obj in objects:
        kind, meta = obj.get("kind"), obj.get("metadata") or {}
        if kind in ("Role", "ClusterRole"):
            namespace = meta.get("namespace", "") if kind == "Role" else ""
            roles[(kind, namespace, meta.get("name", ""))] = obj
        elif kind in ("RoleBinding", "ClusterRoleBinding"):
            bindings.append(obj)
    errors: list[str] = []
    for binding in bindings:
        meta = binding.get("metadata") or {}
        namespace = meta.get("namespace", "") if binding["kind"] == "RoleBinding" else ""
        if namespace and (not attrs.resource_request or attrs.namespace != namespace):
            continue
        if not any(subject_matches(s, user) for s in binding.get("subjects") or ()):
            continue
        ref = binding.get("roleRef") or {}
        ref_kind = ref.get("kind", "")
        role = roles.get((ref_kind, namespace if ref_kind == "Role" else "", ref.get("name", "")))
        if role is None:
            errors.append(f'{ref_kind.lower()}.{RBAC_GROUP} "{ref.get("name")}" not found')
            continue
        if any(rule_allows(rule, attrs) for rule in role.get("rules") or ()):
            return Decision(True)
    reason = ""
    if errors:
        joined = ", ".join(errors)
        reason = f"RBAC: {joined if len(errors) == 1 else f'[{joined}]'}"
    return Decision(False, reason)


def forbidden(user: User, attrs: Attributes, reason: str = "") -> JSON:
    """The 403 Status the apiserver writes for a denied request (responsewriters.Forbidden)."""
    if not attrs.resource_request:
        why = f'User "{user.name}" cannot {attrs.verb} path "{attrs.path}"'
    else:
        why = (
            f'User "{user.name}" cannot {attrs.verb} resource "{attrs.full_resource}" '
            f'in API group "{attrs.api_group}"'
        )
        if attrs.namespace:
            why += f' in the namespace "{attrs.namespace}"'
        else:
            why += " at the cluster scope"
    if reason:
        why += f": {reason}"
    # apierrors.NewForbidden(GroupResource, name, err).
    qualified = f"{attrs.resource}.{attrs.api_group}" if attrs.api_group else attrs.resource
    if not attrs.resource:
        message = f"forbidden: {why}"
    elif attrs.name:
        message = f'{qualified} "{attrs.name}" is forbidden: {why}'
    else:
        message = f"{qualified} is forbidden: {why}"
    details: JSON = {}
    if attrs.name:
        details["name"] = attrs.name
    if attrs.api_group:
        details["group"] = attrs.api_group
    if attrs.resource:
        details["kind"] = attrs.resource
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Forbidden",
        "details": details,
        "code": 403,
    }


# -- the cluster's own policy (plugin/pkg/auth/authorizer/rbac/bootstrappolicy) ----------


def _cluster_role(name: str, rules: list[JSON]) -> JSON:
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": rules,
    }


def _group_binding(name: str, *groups: str) -> JSON:
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": name},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": g} for g in groups],
    }


_INFO_URLS = ["/healthz", "/livez", "/readyz", "/version", "/version/"]
_DISCOVERY_URLS = ["/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", *_INFO_URLS]

BOOTSTRAP_POLICY: tuple[JSON, ...] = (
    # system:masters is everything (the apiserver also short-circuits it).
    _cluster_role(
        "cluster-admin",
        [
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]},
        ],
    ),
    _group_binding("cluster-admin", "system:masters"),
    # API discovery for every authenticated user.
    _cluster_role(
        "system:discovery",
        [
            {
                "nonResourceURLs": _DISCOVERY_URLS,
                "verbs": ["get"],
            }
        ],
    ),
    _group_binding("system:discovery", "system:authenticated"),
    _cluster_role("system:public-info-viewer", [{"nonResourceURLs": _INFO_URLS, "verbs": ["get"]}]),
    _group_binding("system:public-info-viewer", "system:authenticated", "system:unauthenticated"),
    # Everyone may ask what they may do.
    _cluster_role(
        "system:basic-user",
        [
            {
                "apiGroups": ["authorization.k8s.io"],
                "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                "verbs": ["create"],
            },
            {
                "apiGroups": ["authentication.k8s.io"],
                "resources": ["selfsubjectreviews"],
                "verbs": ["create"],
            },
        ],
    ),
    _group_binding("system:basic-user", "system:authenticated"),
)


# -- the bundle's RBAC, rendered -----------------------------------------------------------


def _require_kubectl() -> None:
    """Skip without kubectl, or fail in CI (`CI` set), as tests/unit/test_manifests.py does."""
    if shutil.which("kubectl") is None:
        reason = "kubectl not on PATH: cannot render the kustomization (`kubectl kustomize`)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test: {reason}")
        pytest.skip(reason)


@functools.cache
def _render(components: tuple[str, ...]) -> tuple[JSON, ...]:
    """`kubectl kustomize manifests/all`, with these components of manifests/ added."""
    with tempfile.TemporaryDirectory() as tmp:
        # kustomize refuses absolute paths to other kustomizations: relative ones.
        def rel(path: Path) -> str:
            return os.path.relpath(path, tmp)

        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [rel(REPO / "manifests" / "all")],
            "components": [rel(REPO / "manifests" / c) for c in components],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        result = subprocess.run(
            ["kubectl", "kustomize", tmp], capture_output=True, text=True, timeout=60, check=False
        )
    assert result.returncode == 0, f"kubectl kustomize manifests/all {components}: {result.stderr}"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(doc for doc in yaml.load_all(result.stdout, Loader=loader) if doc is not None)


def bundle_rbac(*components: str) -> list[JSON]:
    """The ServiceAccounts, Roles, ClusterRoles and bindings `manifests/all` renders.

    `components` are kustomize components under manifests/ to add (e.g.
    GPU_EVICT_COMPONENT); one that does not exist yet is left out, so tests can
    name it before it lands. Rendered once per session and argument list.
    """
    _require_kubectl()
    present = tuple(c for c in components if (REPO / "manifests" / c).is_dir())
    kinds = (*RBAC_KINDS, "ServiceAccount")
    return [copy.deepcopy(doc) for doc in _render(present) if doc.get("kind") in kinds]
