"""The fake API's authentication and RBAC, through the real `kubernetes` client over HTTP.

ServiceAccount tokens (TokenRequest), TokenReview as the apiserver answers it,
401 for tokens that are not the API's, and 403s worded as the RBAC authorizer
writes them, so that a test fails when a manifest grants too little (or, via
`denied()`, when an agent even tries something it should not). The pure
request-to-attributes and rule evaluation of tests/support/rbac.py first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException

from agents.common.kube import EventRecorder, ObjectRef, load_api_client
from tests.support import rbac
from tests.support.fake_kube import API_AUDIENCE, FakeKube
from tests.support.rbac import Attributes, Denial, User, request_attributes

NS = "node-agents"
FILES_AUDIENCE = "node-agents.io/token-files"
INJECTOR = "token-refresher-injector"
INJECTOR_USER = f"system:serviceaccount:{NS}:{INJECTOR}"

# The client's annotations say models; it takes plain dicts as bodies, as the agents
# pass them (agents/common/kube.py): its entry points are Any here for that reason.
client: Any = kube_client


def status_of(err: ApiException) -> dict[str, Any]:
    """The Status body of a failed call."""
    body: dict[str, Any] = json.loads(err.body or "{}")
    return body


# -- tests/support/rbac.py: request attributes ------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/namespaces/ns/pods", {}, ("list", "", "pods", "", "ns", "")),
        (
            "GET",
            "/api/v1/pods",
            {"watch": "true", "fieldSelector": "spec.nodeName=n1"},
            ("watch", "", "pods", "", "", ""),
        ),
        ("GET", "/api/v1/namespaces/ns/pods/p", {}, ("get", "", "pods", "", "ns", "p")),
        (
            "GET",
            "/api/v1/namespaces/ns/secrets",
            {"fieldSelector": "metadata.name=s"},
            ("list", "", "secrets", "", "ns", "s"),
        ),
        (
            "POST",
            "/api/v1/namespaces/ns/pods/p/eviction",
            {},
            ("create", "", "pods", "eviction", "ns", "p"),
        ),
        (
            "POST",
            "/api/v1/namespaces/ns/serviceaccounts/sa/token",
            {},
            ("create", "", "serviceaccounts", "token", "ns", "sa"),
        ),
        (
            "DELETE",
            "/apis/coordination.k8s.io/v1/namespaces/ns/leases",
            {},
            ("deletecollection", "coordination.k8s.io", "leases", "", "ns", ""),
        ),
        (
            "PATCH",
            "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l",
            {},
            ("patch", "coordination.k8s.io", "leases", "", "ns", "l"),
        ),
        (
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            {},
            ("create", "authentication.k8s.io", "tokenreviews", "", "", ""),
        ),
        # A Namespace is named in its own namespace (RoleBindings there apply to it).
        ("GET", "/api/v1/namespaces/ml", {}, ("get", "", "namespaces", "", "ml", "ml")),
        ("PUT", "/api/v1/nodes/n1/status", {}, ("update", "", "nodes", "status", "", "n1")),
    ],
)
def test_requests_are_seen_as_the_apiserver_sees_them(
    method: str, path: str, query: dict[str, str], expected: tuple[str, ...]
) -> None:
    attrs = request_attributes(method, path, query)
    assert attrs.resource_request
    got = (attrs.verb, attrs.api_group, attrs.resource, attrs.subresource)
    assert (*got, attrs.namespace, attrs.name) == expected


@pytest.mark.parametrize("path", ["/version", "/api", "/api/v1", "/apis/apps/v1", "/healthz"])
def test_discovery_and_info_paths_are_non_resource_requests(path: str) -> None:
    attrs = request_attributes("GET", path, {})
    assert not attrs.resource_request
    assert (attrs.verb, attrs.path) == ("get", path)


# -- tests/support/rbac.py: rules and bindings --------------------------------------------


def role(kind: str, name: str, rules: list[dict[str, Any]], namespace: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "rules": rules,
    }


def binding(
    kind: str, name: str, role_kind: str, subjects: list[dict[str, Any]], namespace: str = ""
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name},
        "subjects": subjects,
    }


def sa_subject(name: str, namespace: str = NS) -> dict[str, Any]:
    return {"kind": "ServiceAccount", "name": name, "namespace": namespace}


ALICE = rbac.service_account_user(NS, "alice")


def allowed(objects: list[dict[str, Any]], method: str, path: str, **query: str) -> bool:
    return rbac.authorize(objects, ALICE, request_attributes(method, path, query)).allowed


def test_a_rule_matches_verb_group_resource_and_subresource_exactly() -> None:
    objects = [
        role(
            "ClusterRole", "alice", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
        ),
        binding("ClusterRoleBinding", "alice", "ClusterRole", [sa_subject("alice")]),
    ]
    assert allowed(objects, "GET", "/api/v1/namespaces/a/pods/p")
    assert not allowed(objects, "GET", "/api/v1/namespaces/a/pods")  # list
    assert not allowed(objects, "GET", "/api/v1/namespaces/a/pods", watch="true")
    assert not allowed(objects, "POST", "/api/v1/namespaces/a/pods/p/eviction")
    assert not allowed(objects, "GET", "/apis/coordination.k8s.io/v1/namespaces/a/leases/p")
    # Another ServiceAccount of the same name elsewhere is someone else.
    other = rbac.service_account_user("elsewhere", "alice")
    attrs = request_attributes("GET", "/api/v1/namespaces/a/pods/p", {})
    assert not rbac.authorize(objects, other, attrs).allowed


def test_wildcards_and_subresource_wildcards() -> None:
    objects = [
        role(
            "ClusterRole",
            "alice",
            [
                {"apiGroups": ["*"], "resources": ["leases"], "verbs": ["*"]},
                {"apiGroups": [""], "resources": ["*/status"], "verbs": ["update"]},
            ],
        ),
        binding("ClusterRoleBinding", "alice", "ClusterRole", [sa_subject("alice")]),
    ]
    assert allowed(objects, "DELETE", "/apis/coordination.k8s.io/v1/namespaces/a/leases")
    assert allowed(objects, "PUT", "/api/v1/nodes/n1/status")
    assert not allowed(objects, "PUT", "/api/v1/nodes/n1")


def test_resource_names_match_only_requests_that_name_the_object() -> None:
    named = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["*"]}
    objects = [
        role("ClusterRole", "alice", [{**named, "resourceNames": ["ca"]}]),
        binding("ClusterRoleBinding", "alice", "ClusterRole", [sa_subject("alice")]),
    ]
    base = "/api/v1/namespaces/a/configmaps"
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        assert allowed(objects, method, f"{base}/ca"), method
        assert not allowed(objects, method, f"{base}/other"), method
    assert not allowed(objects, "GET", base)  # list
    assert not allowed(objects, "POST", base)  # create: the name is not known yet
    # A list or watch of one object by metadata.name is authorized by that name.
    assert allowed(objects, "GET", base, fieldSelector="metadata.name=ca")
    assert allowed(objects, "GET", base, fieldSelector="metadata.name=ca", watch="true")
    assert not allowed(objects, "GET", base, fieldSelector="metadata.name!=ca")


def test_a_role_binding_grants_only_in_its_namespace() -> None:
    secrets_read = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]
    objects = [
        role("Role", "alice", secrets_read, namespace="a"),
        binding("RoleBinding", "alice", "Role", [sa_subject("alice")], namespace="a"),
        # A ClusterRole through a RoleBinding: still only that namespace.
        role(
            "ClusterRole", "alice", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
        ),
        binding("RoleBinding", "alice", "ClusterRole", [sa_subject("alice")], namespace="b"),
    ]
    assert allowed(objects, "GET", "/api/v1/namespaces/a/secrets")
    assert not allowed(objects, "GET", "/api/v1/namespaces/b/secrets")
    assert not allowed(objects, "GET", "/api/v1/secrets")  # every namespace: cluster scope
    assert allowed(objects, "GET", "/api/v1/namespaces/b/pods")
    assert not allowed(objects, "GET", "/api/v1/namespaces/a/pods")
    assert not allowed(objects, "GET", "/api/v1/pods")


def test_groups_bind_too_and_a_missing_role_is_the_reason_given() -> None:
    objects = [
        binding(
            "ClusterRoleBinding",
            "gone",
            "ClusterRole",
            [{"kind": "Group", "name": "system:serviceaccounts"}],
        ),
        *rbac.BOOTSTRAP_POLICY,
    ]
    attrs = request_attributes("GET", "/api/v1/pods", {})
    decision = rbac.authorize(objects, ALICE, attrs)
    assert not decision.allowed
    assert decision.reason == 'RBAC: clusterrole.rbac.authorization.k8s.io "gone" not found'
    assert allowed(objects, "GET", "/version")  # system:discovery, for every authenticated user
    assert not allowed(objects, "GET", "/metrics")


def test_the_forbidden_status_is_worded_as_the_apiservers() -> None:
    user = User(INJECTOR_USER)
    status = rbac.forbidden(user, request_attributes("GET", "/api/v1/secrets", {}))
    assert status["message"] == (
        f'secrets is forbidden: User "{INJECTOR_USER}" cannot list resource "secrets" '
        'in API group "" at the cluster scope'
    )
    assert (status["reason"], status["code"], status["details"]) == (
        "Forbidden",
        403,
        {"kind": "secrets"},
    )
    evict = request_attributes("POST", "/api/v1/namespaces/ml/pods/p/eviction", {})
    assert rbac.forbidden(user, evict)["message"] == (
        f'pods "p" is forbidden: User "{INJECTOR_USER}" cannot create resource '
        '"pods/eviction" in API group "" in the namespace "ml"'
    )
    lease = request_attributes("GET", "/apis/coordination.k8s.io/v1/namespaces/a/leases/l", {})
    assert rbac.forbidden(user, lease)["details"] == {
        "name": "l",
        "group": "coordination.k8s.io",
        "kind": "leases",
    }
    path = Attributes("get", False, "/metrics")
    assert rbac.forbidden(user, path)["message"] == (
        f'forbidden: User "{INJECTOR_USER}" cannot get path "/metrics"'
    )


# -- over HTTP: tokens --------------------------------------------------------------------


def api_for(kube: FakeKube, tmp_path: Path, token: str) -> Any:
    """An ApiClient presenting `token` (a kubeconfig written by hand, as a pod's would be)."""
    path = kube.kubeconfig(tmp_path / f"kubeconfig-{time.monotonic_ns()}")
    config = json.loads(path.read_text())
    config["users"][0]["user"]["token"] = token
    path.write_text(json.dumps(config))
    api_client = load_api_client(str(path))
    assert api_client is not None
    return api_client


@pytest.fixture
def auth(api: Any) -> Any:
    return client.AuthenticationV1Api(api)


def review(auth: Any, token: str, *audiences: str) -> Any:
    spec: dict[str, Any] = {"token": token}
    if audiences:
        spec["audiences"] = list(audiences)
    return auth.create_token_review({"spec": spec}).status


def injector_pod(kube: FakeKube, name: str = "injector-x", node: str = "n1") -> dict[str, Any]:
    return kube.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "nodeName": node,
                "serviceAccountName": INJECTOR,
                "containers": [{"name": "injector", "image": "x"}],
            },
        }
    )


def test_token_request_binds_a_token_to_a_pod_and_its_node(
    kube: FakeKube, api: Any, auth: Any
) -> None:
    pod = injector_pod(kube)
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": INJECTOR, "namespace": NS},
        }
    )
    body = {
        "spec": {
            "audiences": [FILES_AUDIENCE],
            "expirationSeconds": 600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod["metadata"]["name"]},
        }
    }
    before = time.time()
    answer = client.CoreV1Api(api).create_namespaced_service_account_token(INJECTOR, NS, body)
    assert answer.spec.audiences == [FILES_AUDIENCE]
    expires = answer.status.expiration_timestamp.timestamp()
    assert before + 599 <= expires <= time.time() + 601
    status = review(auth, answer.status.token, FILES_AUDIENCE)
    assert status.authenticated and status.error is None
    assert status.audiences == [FILES_AUDIENCE]
    assert status.user.username == INJECTOR_USER
    assert status.user.uid == kube.get("serviceaccounts", NS, INJECTOR)["metadata"]["uid"]  # type: ignore[index]
    assert status.user.groups == [
        "system:serviceaccounts",
        f"system:serviceaccounts:{NS}",
        "system:authenticated",
    ]
    extra = status.user.extra
    assert extra["authentication.kubernetes.io/pod-name"] == ["injector-x"]
    assert extra["authentication.kubernetes.io/pod-uid"] == [pod["metadata"]["uid"]]
    assert extra["authentication.kubernetes.io/node-name"] == ["n1"]
    assert extra["authentication.kubernetes.io/credential-id"][0].startswith("JTI=")


def test_token_request_refuses_what_the_apiserver_refuses(kube: FakeKube, api: Any) -> None:
    v1 = client.CoreV1Api(api)
    with pytest.raises(ApiException) as missing:
        v1.create_namespaced_service_account_token("nobody", NS, {"spec": {}})
    assert missing.value.status == 404
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": INJECTOR, "namespace": NS},
        }
    )
    with pytest.raises(ApiException) as short:
        v1.create_namespaced_service_account_token(
            INJECTOR, NS, {"spec": {"expirationSeconds": 60}}
        )
    assert short.value.status == 422
    assert "may not specify a duration less than 10 minutes" in status_of(short.value)["message"]
    injector_pod(kube)
    ref = {"kind": "Pod", "apiVersion": "v1", "name": "injector-x", "uid": "not-its-uid"}
    with pytest.raises(ApiException) as stale:
        v1.create_namespaced_service_account_token(INJECTOR, NS, {"spec": {"boundObjectRef": ref}})
    assert stale.value.status == 409
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "other", "namespace": NS},
        }
    )
    del ref["uid"]
    with pytest.raises(ApiException) as other:
        v1.create_namespaced_service_account_token("other", NS, {"spec": {"boundObjectRef": ref}})
    assert other.value.status == 400


def test_a_review_without_audiences_is_for_the_apis_own(kube: FakeKube, auth: Any) -> None:
    token = kube.service_account_token(NS, "alice")
    status = review(auth, token)
    assert status.authenticated
    assert status.audiences == [API_AUDIENCE]
    assert "authentication.kubernetes.io/pod-name" not in (status.user.extra or {})


def test_the_node_extra_is_absent_on_clusters_without_it(tmp_path: Path) -> None:
    with FakeKube(node_info=False) as kube:
        pod = injector_pod(kube)
        token = kube.service_account_token(
            NS, INJECTOR, audiences=[FILES_AUDIENCE], pod=("injector-x", pod["metadata"]["uid"])
        )
        api_client = api_for(kube, tmp_path, kube.token)
        try:
            status = review(client.AuthenticationV1Api(api_client), token, FILES_AUDIENCE)
        finally:
            api_client.close()
    assert status.authenticated
    assert status.user.extra["authentication.kubernetes.io/pod-name"] == ["injector-x"]
    assert "authentication.kubernetes.io/node-name" not in status.user.extra


def test_a_review_refuses_expired_unknown_and_wrong_audience_tokens(
    kube: FakeKube, auth: Any
) -> None:
    expired = kube.service_account_token(NS, INJECTOR, audiences=[FILES_AUDIENCE], expires_in=-1)
    status = review(auth, expired, FILES_AUDIENCE)
    assert not status.authenticated
    assert "service account token has expired" in status.error
    assert not status.audiences

    status = review(auth, "made-up", FILES_AUDIENCE)
    assert not status.authenticated and status.error

    # A token for the API is not one for the file server, nor the other way round.
    for_api = kube.service_account_token(NS, INJECTOR)
    status = review(auth, for_api, FILES_AUDIENCE)
    assert not status.authenticated
    assert status.error == (
        f'[invalid bearer token, token audiences ["{API_AUDIENCE}"] is invalid for the '
        f'target audiences ["{FILES_AUDIENCE}"]]'
    )
    for_files = kube.service_account_token(NS, INJECTOR, audiences=[FILES_AUDIENCE, "other"])
    assert not review(auth, for_files).authenticated
    # Only the audiences both sides name come back.
    status = review(auth, for_files, "other", "third")
    assert status.authenticated and status.audiences == ["other"]


def test_a_token_bound_to_a_deleted_or_replaced_pod_stops_authenticating(
    kube: FakeKube, auth: Any
) -> None:
    pod = injector_pod(kube)
    uid = pod["metadata"]["uid"]
    token = kube.service_account_token(
        NS, INJECTOR, audiences=[FILES_AUDIENCE], pod=("injector-x", uid)
    )
    assert review(auth, token, FILES_AUDIENCE).authenticated
    kube.delete("pods", NS, "injector-x")
    status = review(auth, token, FILES_AUDIENCE)
    assert not status.authenticated
    assert "service account token has been invalidated" in status.error
    # A new pod of the same name has another UID: the old token stays dead.
    assert injector_pod(kube)["metadata"]["uid"] != uid
    assert not review(auth, token, FILES_AUDIENCE).authenticated


def test_a_token_of_a_deleted_service_account_stops_authenticating(
    kube: FakeKube, auth: Any
) -> None:
    token = kube.service_account_token(NS, "alice")
    kube.delete("serviceaccounts", NS, "alice")
    status = review(auth, token)
    assert not status.authenticated
    assert status.error == f"[invalid bearer token, service account {NS}/alice has been deleted]"


def test_only_tokens_for_the_apis_audience_authenticate_to_it(
    kube: FakeKube, tmp_path: Path
) -> None:
    cases = {
        "admin": (kube.token, 200),
        "service account": (kube.service_account_token(NS, "alice"), 200),
        "files audience": (
            kube.service_account_token(NS, "alice", audiences=[FILES_AUDIENCE]),
            401,
        ),
        "expired": (kube.service_account_token(NS, "alice", expires_in=-1), 401),
        "unknown": ("made-up", 401),
    }
    for case, (token, expected) in cases.items():
        api_client = api_for(kube, tmp_path, token)
        try:
            client.CoreV1Api(api_client).list_namespaced_pod("default")
            code = 200
        except ApiException as err:
            code = err.status
            assert status_of(err)["reason"] == "Unauthorized"
        finally:
            api_client.close()
        assert code == expected, case


def test_each_call_records_who_sent_it(kube: FakeKube, tmp_path: Path) -> None:
    """Benchmarks count each agent's requests apart by their ServiceAccount."""
    for token in (kube.token, kube.service_account_token(NS, "alice"), "made-up"):
        api_client = api_for(kube, tmp_path, token)
        try:
            client.CoreV1Api(api_client).list_namespaced_pod("default")
        except ApiException as err:
            assert err.status == 401
        finally:
            api_client.close()
    users = [c.user for c in kube.calls(path="/api/v1/namespaces/default/pods")]
    assert users == ["kubernetes-admin", f"system:serviceaccount:{NS}:alice", ""]


# -- over HTTP: RBAC ----------------------------------------------------------------------


@pytest.fixture
def injector_api(
    kube: FakeKube, bundle_rbac: list[dict[str, Any]], tmp_path: Path
) -> Iterator[Any]:
    """The API as the bundle's injector ServiceAccount sees it (manifests/all's RBAC)."""
    kube.enforce_rbac(bundle_rbac)
    for name in ("token-refresher-ca", "templates"):
        kube.put(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS}}
        )
    kube.put({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tok", "namespace": "ml"}})
    path = kube.kubeconfig(tmp_path / "injector", service_account=f"{NS}/{INJECTOR}")
    api_client = load_api_client(str(path))
    assert api_client is not None
    try:
        yield client.CoreV1Api(api_client)
    finally:
        api_client.close()


def forbidden(call: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(ApiException) as refused:
        call(*args, **kwargs)
    assert refused.value.status == 403
    body = status_of(refused.value)
    assert body["reason"] == "Forbidden"
    return body


def test_the_injector_is_refused_every_secret_and_every_configmap_but_its_ca(
    kube: FakeKube, injector_api: Any
) -> None:
    body = forbidden(injector_api.list_secret_for_all_namespaces)
    assert body["message"] == (
        f'secrets is forbidden: User "{INJECTOR_USER}" cannot list resource "secrets" '
        'in API group "" at the cluster scope'
    )
    assert body["details"] == {"kind": "secrets"}
    body = forbidden(injector_api.read_namespaced_secret, "tok", "ml")
    assert body["message"] == (
        f'secrets "tok" is forbidden: User "{INJECTOR_USER}" cannot get resource "secrets" '
        'in API group "" in the namespace "ml"'
    )
    forbidden(injector_api.list_namespaced_secret, "ml", watch=False)
    forbidden(injector_api.read_namespaced_config_map, "templates", NS)
    forbidden(injector_api.list_namespaced_config_map, NS)
    # Its CA by name in its own namespace, not a ConfigMap of that name elsewhere.
    assert injector_api.read_namespaced_config_map("token-refresher-ca", NS).metadata.name
    forbidden(injector_api.read_namespaced_config_map, "token-refresher-ca", "ml")
    assert injector_api.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1").items == []
    assert kube.denied() == [
        Denial(INJECTOR_USER, "list", "", "secrets", "", ""),
        Denial(INJECTOR_USER, "get", "", "secrets", "ml", "tok"),
        Denial(INJECTOR_USER, "list", "", "secrets", "ml", ""),
        Denial(INJECTOR_USER, "get", "", "configmaps", NS, "templates"),
        Denial(INJECTOR_USER, "list", "", "configmaps", NS, ""),
        Denial(INJECTOR_USER, "get", "", "configmaps", "ml", "token-refresher-ca"),
    ]


def test_watches_and_subresources_are_authorized_too(kube: FakeKube, injector_api: Any) -> None:
    forbidden(injector_api.list_namespaced_secret, "ml", watch=True, timeout_seconds=1)
    injector_pod(kube, "victim")
    forbidden(
        injector_api.create_namespaced_pod_eviction,
        "victim",
        NS,
        {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "victim"}},
    )
    forbidden(injector_api.delete_namespaced_pod, "victim", NS)
    assert kube.get("pods", NS, "victim") is not None
    assert [d.resource for d in kube.denied()] == ["secrets", "pods/eviction", "pods"]
    assert kube.denied()[0].verb == "watch"


def test_token_reviews_need_their_own_grant(kube: FakeKube, tmp_path: Path) -> None:
    reviewer = [
        role(
            "ClusterRole",
            "reviewer",
            [
                {
                    "apiGroups": ["authentication.k8s.io"],
                    "resources": ["tokenreviews"],
                    "verbs": ["create"],
                }
            ],
        ),
        binding("ClusterRoleBinding", "reviewer", "ClusterRole", [sa_subject("reviewer")]),
    ]
    kube.enforce_rbac(reviewer)
    token = kube.service_account_token(NS, "someone", audiences=[FILES_AUDIENCE])
    spec = {"spec": {"token": token, "audiences": [FILES_AUDIENCE]}}
    for account, allowed_to in (("reviewer", True), ("someone", False)):
        api_client = api_for(kube, tmp_path, kube.service_account_token(NS, account))
        try:
            auth = client.AuthenticationV1Api(api_client)
            if allowed_to:
                assert auth.create_token_review(spec).status.authenticated
            else:
                body = forbidden(auth.create_token_review, spec)
                assert body["details"] == {"group": "authentication.k8s.io", "kind": "tokenreviews"}
        finally:
            api_client.close()


def test_the_admin_and_discovery_pass_and_rbac_objects_are_live(
    kube: FakeKube, tmp_path: Path, api: Any
) -> None:
    kube.enforce_rbac([])
    token = kube.service_account_token(NS, "alice")
    api_client = api_for(kube, tmp_path, token)
    try:
        v1 = client.CoreV1Api(api_client)
        assert client.VersionApi(api_client).get_code().git_version
        forbidden(v1.list_namespaced_pod, "default")
        assert client.CoreV1Api(api).list_namespaced_pod("default").items == []  # the admin
        # Granting over the API (as the admin) takes effect at the next request.
        rbac_v1 = client.RbacAuthorizationV1Api(api)
        rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
        rbac_v1.create_namespaced_role("default", role("Role", "alice", rules))
        rbac_v1.create_namespaced_role_binding(
            "default", binding("RoleBinding", "alice", "Role", [sa_subject("alice")])
        )
        assert v1.list_namespaced_pod("default").items == []
    finally:
        api_client.close()


def test_the_expiration_timestamp_is_rfc3339_utc(kube: FakeKube, api: Any) -> None:
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "alice", "namespace": NS},
        }
    )
    answer = client.CoreV1Api(api).create_namespaced_service_account_token(
        "alice", NS, {"spec": {}}
    )
    assert answer.status.expiration_timestamp.tzinfo is not None
    assert answer.spec.expiration_seconds == 3600
    assert answer.status.expiration_timestamp > datetime.now(UTC)


# -- the bundle's ServiceAccounts ---------------------------------------------------------


@pytest.fixture
def bundle(kube: FakeKube, bundle_rbac: list[dict[str, Any]], tmp_path: Path) -> Iterator[Any]:
    """A CoreV1Api factory: the API as one of the bundle's ServiceAccounts sees it."""
    kube.enforce_rbac(bundle_rbac)
    opened: list[Any] = []

    def as_account(name: str) -> Any:
        path = kube.kubeconfig(tmp_path / name, service_account=f"{NS}/{name}")
        api_client = load_api_client(str(path))
        opened.append(api_client)
        return api_client

    yield as_account
    for api_client in opened:
        api_client.close()


def test_the_bundle_lets_the_healer_post_node_events_and_nothing_else(
    kube: FakeKube, bundle: Any
) -> None:
    api_client = bundle("automount-healer")
    recorder = EventRecorder(api_client, "automount-healer", host="n1")
    node = ObjectRef(kind="Node", name="n1", uid="n1")
    assert recorder.emit(node, "Normal", "FuseMountHealed", "healed")
    assert kube.denied() == []
    v1 = client.CoreV1Api(api_client)
    forbidden(v1.list_pod_for_all_namespaces)
    forbidden(v1.read_node, "n1")
    forbidden(v1.list_secret_for_all_namespaces)
    assert [(d.verb, d.resource) for d in kube.denied()] == [
        ("list", "pods"),
        ("get", "nodes"),
        ("list", "secrets"),
    ]


def test_the_bundle_lets_the_gpu_enforcer_read_pods_and_never_delete_them(
    kube: FakeKube, bundle: Any
) -> None:
    v1 = client.CoreV1Api(bundle("gpu-mem-enforcer"))
    kube.put({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
    injector_pod(kube, "p")
    assert v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1").items
    assert v1.read_namespace("default").metadata.name == "default"
    assert v1.read_node("n1").metadata.name == "n1"
    forbidden(v1.delete_namespaced_pod, "p", NS)
    forbidden(v1.list_secret_for_all_namespaces)
    forbidden(v1.read_namespaced_config_map, "token-refresher-ca", NS)
    assert [(d.verb, d.resource) for d in kube.denied()] == [
        ("delete", "pods"),
        ("list", "secrets"),
        ("get", "configmaps"),
    ]
