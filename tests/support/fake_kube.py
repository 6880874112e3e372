"""A stateful fake Kubernetes API server that the real `kubernetes` client talks to over HTTP.

`FakeKube` serves the REST paths the generated client calls (`/api/v1/...`,
`/apis/<group>/<version>/...`) from an in-memory store with one global,
monotonically increasing resourceVersion, as etcd gives the apiserver. Tests
point an agent at it through `kubeconfig(path)` and never patch the client.

Imitated: GET/LIST/CREATE/UPDATE/PATCH/DELETE and WATCH, label and field
selectors, optimistic concurrency (409 on a stale resourceVersion), watch
history with compaction (410 Expired as one ERROR event), the pod eviction
subresource with PodDisruptionBudget refusals (429), finalizers, the status
subresource, Secret `stringData`, Status bodies as the apiserver writes them.

Authentication and authorization: the admin token (`FakeKube(token=...)`) is
system:masters; `service_account_token()` and TokenRequest issue opaque
ServiceAccount tokens (audiences, expiry, bound to a pod and its node) that
authenticate to the API when they are for its audience (`API_AUDIENCE`), and
that TokenReview checks as the apiserver does (expiry, audiences, the bound pod
and the ServiceAccount still there with the same UID). No or unknown token:
401. After `enforce_rbac(objects)`, every non-admin request is authorized by
RBAC (tests/support/rbac.py) over the Roles, ClusterRoles and bindings in the
store, 403 as the RBAC authorizer words it, recorded in `denied()`. The
in-process helpers (`put`, `get`, `delete`, ...) bypass all of this.

Not imitated (no controllers run here): scheduling, kubelets, graceful pod
termination (a deleted pod is gone at once), garbage collection, namespace
cascade and lifecycle (objects may be created in namespaces that do not
exist), admission and validation beyond the few checks in `_validate`,
server-side apply, strategic-merge list semantics (lists are replaced, as in a
JSON merge patch), consistent snapshots for paginated lists, dry runs,
bookmarks. core/v1 and events.k8s.io/v1 Events are stored apart (the
apiserver converts between them): `objects("events")` holds the core ones.

    with FakeKube(rbac_objects=rbac.bundle_rbac()) as kube:
        kube.kubeconfig(tmp_path / "kubeconfig", service_account="node-agents/gpu-mem-enforcer")
        kube.put({"apiVersion": "v1", "kind": "Pod", "metadata": {...}, ...})
        kube.inject_error("GET", "/api/v1/namespaces/ns/pods", 500)
        assert kube.count("POST", ".*/events") == 1
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import re
import secrets
import select
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from tests.support import rbac

log = logging.getLogger(__name__)

JSON = dict[str, Any]

# The apiserver ends a watch after --min-request-timeout (1800 s) when the
# client gives no timeoutSeconds.
DEFAULT_WATCH_TIMEOUT = 1800.0
# How often a waiting watch looks for a closed client or a closing server.
WATCH_POLL = 0.2
# The apiserver's own audience (--api-audiences, defaulting to the issuer):
# tokens for it authenticate to the API, tokens for other audiences only to
# whoever reviews them.
API_AUDIENCE = "https://kubernetes.default.svc"
# version.Info, every field set: the client's model requires them all.
VERSION = {
    "major": "1",
    "minor": "37",
    "gitVersion": "v1.37.0-fake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.25.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
# The extras a pod-bound ServiceAccount token carries (serviceaccount/claims.go).
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
NODE_UID_EXTRA = "authentication.kubernetes.io/node-uid"
CREDENTIAL_ID_EXTRA = "authentication.kubernetes.io/credential-id"
# The admin token's user: system:masters passes every authorization check.
ADMIN = rbac.User("kubernetes-admin", groups=("system:masters", "system:authenticated"))


# -- the served API surface ------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One served resource type, as listed by API discovery."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    # Writes to the object ignore .status; writes to /status change only .status.
    status_subresource: bool = False
    # DELETE answers the deleted object (pods) instead of a Status (most types).
    returns_deleted_object: bool = False
    # Field selector labels beyond metadata.name and metadata.namespace: label -> path.
    field_labels: tuple[tuple[str, str], ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """`pods`, `leases.coordination.k8s.io`: the name kubectl and error messages use."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    def field_path(self, label: str) -> str | None:
        if label in ("metadata.name", "metadata.namespace"):
            return label
        return dict(self.field_labels).get(label)


def _same(*labels: str) -> tuple[tuple[str, str], ...]:
    return tuple((label, label) for label in labels)


# Field labels as registered by each type's GetAttrs (pkg/registry/*/strategy.go).
RESOURCES: tuple[Resource, ...] = (
    Resource(
        "",
        "v1",
        "pods",
        "Pod",
        status_subresource=True,
        returns_deleted_object=True,
        field_labels=_same(
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ),
    ),
    Resource("", "v1", "secrets", "Secret", field_labels=_same("type")),
    Resource("", "v1", "configmaps", "ConfigMap"),
    Resource(
        "",
        "v1",
        "events",
        "Event",
        field_labels=(
            *_same(
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "type",
            ),
            ("source", "source.component"),
        ),
    ),
    Resource(
        "",
        "v1",
        "nodes",
        "Node",
        namespaced=False,
        status_subresource=True,
        field_labels=_same("spec.unschedulable"),
    ),
    Resource(
        "",
        "v1",
        "namespaces",
        "Namespace",
        namespaced=False,
        status_subresource=True,
        field_labels=_same("status.phase"),
    ),
    Resource("", "v1", "serviceaccounts", "ServiceAccount"),
    Resource("coordination.k8s.io", "v1", "leases", "Lease"),
    Resource("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    Resource("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    Resource(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        namespaced=False,
    ),
    Resource(
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        field_labels=_same(
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ),
    ),
)


def find_resource(name: str) -> Resource:
    """`pods`, `leases` or `leases.coordination.k8s.io`; a bare `events` is core/v1."""
    for res in RESOURCES:
        if name == res.qualified:
            return res
    matches = [res for res in RESOURCES if res.plural == name]
    if len(matches) == 1:
        return matches[0]
    raise KeyError(f"FakeKube serves no resource {name!r}")


def _resource_of(obj: JSON) -> Resource:
    """The resource an object belongs to, from its apiVersion and kind."""
    for res in RESOURCES:
        if (res.api_version, res.kind) == (obj.get("apiVersion"), obj.get("kind")):
            return res
    raise KeyError(f"FakeKube serves no {obj.get('apiVersion')} {obj.get('kind')}")


# -- Status bodies ---------------------------------------------------------------------

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """A failed request, answered with a metav1.Status body (k8s.io/apimachinery errors)."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: JSON | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or REASONS.get(code, "Unknown")
        self.details = details
        self.retry_after = retry_after

    def status(self) -> JSON:
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body

    @staticmethod
    def _details(res: Resource, name: str) -> JSON:
        details: JSON = {"name": name, "kind": res.plural}
        if res.group:
            details["group"] = res.group
        return details

    @classmethod
    def not_found(cls, res: Resource, name: str) -> ApiError:
        return cls(404, f'{res.qualified} "{name}" not found', details=cls._details(res, name))

    @classmethod
    def already_exists(cls, res: Resource, name: str) -> ApiError:
        return cls(
            409,
            f'{res.qualified} "{name}" already exists',
            reason="AlreadyExists",
            details=cls._details(res, name),
        )

    @classmethod
    def conflict(cls, res: Resource, name: str, why: str) -> ApiError:
        return cls(
            409,
            f'Operation cannot be fulfilled on {res.qualified} "{name}": {why}',
            details=cls._details(res, name),
        )

    @classmethod
    def stale(cls, res: Resource, name: str) -> ApiError:
        """The optimistic-concurrency failure (storage.NewResourceVersionConflictsError)."""
        return cls.conflict(
            res,
            name,
            "the object has been modified; please apply your changes to the latest "
            "version and try again",
        )

    @classmethod
    def invalid(cls, res: Resource, name: str, path: str, value: Any, why: str) -> ApiError:
        cause = f"{path}: Invalid value: {json.dumps(value)}: {why}"
        return cls(
            422,
            f'{res.kind} "{name}" is invalid: {cause}',
            details={
                "name": name,
                "group": res.group,
                "kind": res.kind,
                "causes": [{"reason": "FieldValueInvalid", "message": cause, "field": path}],
            },
        )

    @classmethod
    def expired(cls, since: int, oldest: int) -> ApiError:
        """What a watch from a compacted resourceVersion gets (storage/cacher)."""
        return cls(410, f"too old resource version: {since} ({oldest})", reason="Expired")


# -- selectors -------------------------------------------------------------------------

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_LABEL_EQ = re.compile(rf"^(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>[-A-Za-z0-9_.]*)$")
_LABEL_SET = re.compile(rf"^(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_LABEL_EXISTS = re.compile(rf"^(?P<not>!)?\s*(?P<key>{_KEY})$")


def _split_requirements(text: str) -> list[str]:
    """Split on commas that are not inside `in (a,b)` value sets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [p for p in parts if p]


@dataclass(frozen=True)
class LabelRequirement:
    """One requirement of a label selector (k8s.io/apimachinery/pkg/labels)."""

    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        inside = present and labels[self.key] in self.values
        # `a!=b` and `a notin (b)` also match objects without the label.
        return inside if self.op in ("=", "in") else not inside


@dataclass(frozen=True)
class LabelSelector:
    """`labelSelector=`: `a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x,y)`."""

    requirements: tuple[LabelRequirement, ...] = ()

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        reqs = []
        for part in _split_requirements(text):
            if m := _LABEL_EQ.match(part):
                op = "!=" if m["op"] == "!=" else "="
                reqs.append(LabelRequirement(m["key"], op, frozenset([m["value"]])))
            elif m := _LABEL_SET.match(part):
                values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
                reqs.append(LabelRequirement(m["key"], m["op"], values))
            elif m := _LABEL_EXISTS.match(part):
                reqs.append(LabelRequirement(m["key"], "!" if m["not"] else "exists"))
            else:
                raise ApiError(400, f"unable to parse requirement: {part!r}")
        return cls(tuple(reqs))

    def matches(self, obj: JSON) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(req.matches(labels) for req in self.requirements)


def _field_value(obj: JSON, path: str) -> str:
    """A field as the apiserver's field sets render it: missing is "", booleans lower-case."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class FieldSelector:
    """`fieldSelector=`: `f=v`, `f==v`, `f!=v` over the labels the resource registers."""

    requirements: tuple[tuple[str, str, bool], ...] = ()  # (path, value, negate)

    @classmethod
    def parse(cls, text: str, res: Resource) -> FieldSelector:
        reqs = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            m = re.match(r"^(?P<label>[^=!]+?)\s*(?P<op>==|=|!=)\s*(?P<value>.*)$", part)
            if m is None:
                raise ApiError(400, f"invalid selector: {part!r}")
            path = res.field_path(m["label"])
            if path is None:
                # fields.Selector conversion: apiserver's "field label not supported".
                raise ApiError(400, f"field label not supported: {m['label']}")
            reqs.append((path, m["value"], m["op"] == "!="))
        return cls(tuple(reqs))

    def matches(self, obj: JSON) -> bool:
        return all((_field_value(obj, p) == v) != n for p, v, n in self.requirements)


@dataclass(frozen=True)
class Filter:
    """What a LIST or WATCH asks for: a namespace (or all) and selectors."""

    namespace: str | None = None
    labels: LabelSelector = field(default_factory=LabelSelector)
    fields: FieldSelector = field(default_factory=FieldSelector)

    def matches(self, obj: JSON) -> bool:
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace", "") != self.namespace:
            return False
        return self.labels.matches(obj) and self.fields.matches(obj)


# -- patches ---------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merge, `null` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _strategic_merge_patch(target: JSON, patch: Any) -> Any:
    """A strategic merge patch without list merge keys: a merge patch; directives refused."""

    def directives(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for key, item in value.items():
                if key.startswith("$"):
                    yield key
                yield from directives(item)
        elif isinstance(value, list):
            for item in value:
                yield from directives(item)

    if found := sorted(set(directives(patch))):
        raise ApiError(415, f"FakeKube treats strategic merge patches as merge patches: {found}")
    return merge_patch(target, patch)


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(doc, list):
            doc = doc[int(token)]
        elif isinstance(doc, dict):
            doc = doc[token]
        else:
            raise KeyError(token)
    return doc


def json_patch(target: JSON, ops: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    if not isinstance(ops, list):
        raise ApiError(400, "a JSON patch must be a list of operations")
    doc: Any = copy.deepcopy(target)
    for op in ops:
        try:
            kind, tokens = op["op"], _pointer(op["path"])
            if kind in ("move", "copy"):
                value = copy.deepcopy(_walk(doc, _pointer(op["from"])))
                if kind == "move":
                    doc = _remove(doc, _pointer(op["from"]))
                doc = _add(doc, tokens, value)
            elif kind == "add":
                doc = _add(doc, tokens, copy.deepcopy(op["value"]))
            elif kind == "remove":
                doc = _remove(doc, tokens)
            elif kind == "replace":
                _walk(doc, tokens)  # must exist
                doc = _add(_remove(doc, tokens), tokens, copy.deepcopy(op["value"]))
            elif kind == "test":
                if _walk(doc, tokens) != op["value"]:
                    raise ApiError(422, f"testing value {op['path']} failed")
            else:
                raise ApiError(422, f"unexpected JSON patch operation {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise ApiError(422, f"JSON patch {op!r} cannot be applied: {err!r}") from err
    return doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent, last = _walk(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if not 0 <= index <= len(parent):
            raise IndexError(index)
        parent.insert(index, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise KeyError(last)
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise KeyError("cannot remove the whole document")
    parent, last = _walk(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, list):
        del parent[int(last)]
    elif isinstance(parent, dict):
        del parent[last]
    else:
        raise KeyError(last)
    return doc


# -- per-type write rules (the apiserver's strategies) ---------------------------------

_GENERATE_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apiserver names.SimpleNameGenerator


_TIME = "%Y-%m-%dT%H:%M:%SZ"  # metav1.Time on the wire (RFC 3339, seconds)


def _now() -> str:
    return datetime.now(UTC).strftime(_TIME)


def _drop_nulls(value: Any) -> Any:
    """Typed decoding on the apiserver turns `null` fields into absent ones."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


# metav1.MicroTime fields; every other `...Time`/`...Timestamp` field is a metav1.Time.
_MICRO_TIMES = frozenset({"eventTime", "renewTime", "acquireTime"})


def _normalize_times(value: Any, key: str = "") -> Any:
    """Timestamps come back as the apiserver encodes them: UTC, `Z`, seconds or micro.

    The client sends datetimes as `2026-01-01T00:00:00+00:00`; metav1.Time
    drops sub-second precision, metav1.MicroTime keeps microseconds.
    """
    if isinstance(value, dict):
        return {k: _normalize_times(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize_times(v) for v in value]
    if isinstance(value, str) and key.endswith(("Time", "Timestamp")):
        try:
            stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        stamp = stamp.astimezone(UTC)
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if key in _MICRO_TIMES else _TIME)
    return value


# Metadata only the server writes (rest.FillObjectMetaSystemFields, graceful deletion).
_SYSTEM_FIELDS = (
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)


def _spec_of(obj: JSON) -> JSON:
    """Everything that bumps metadata.generation: all but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _prepare(res: Resource, obj: JSON) -> JSON:
    """Decoding and defaulting common to create and update."""
    obj = _normalize_times(_drop_nulls(obj))
    obj["apiVersion"], obj["kind"] = res.api_version, res.kind
    obj.setdefault("metadata", {})
    if res.kind == "Secret":
        obj.setdefault("type", "Opaque")
        # stringData is write-only: merged into data, base64-encoded (core/v1 Secret).
        string_data = obj.pop("stringData", None) or {}
        if string_data:
            data = obj.setdefault("data", {})
            for key, text in string_data.items():
                data[key] = base64.b64encode(str(text).encode()).decode()
    if res.kind == "Pod":
        obj.setdefault("status", {}).setdefault("phase", "Pending")
    if res.kind == "Namespace":
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj.setdefault("status", {}).setdefault("phase", "Active")
    return obj


def _validate(res: Resource, obj: JSON) -> None:
    """The validation rules tests are likely to trip over (pkg/apis/core/validation)."""
    meta = obj["metadata"]
    if res == find_resource("events"):
        # legacyValidateEvent: involvedObject.namespace must agree with the Event's
        # namespace; events about cluster-scoped objects go to "default".
        involved = obj.get("involvedObject", {}).get("namespace", "")
        namespace = meta.get("namespace", "")
        allowed = ("", "default") if not involved else (involved,)
        if namespace not in allowed:
            raise ApiError.invalid(
                res,
                meta.get("name", ""),
                "involvedObject.namespace",
                involved,
                "does not match event.namespace",
            )


# -- the store: etcd plus the watch cache ------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One committed write, as a watch sees it."""

    rv: int
    resource: Resource
    type: str  # ADDED, MODIFIED, DELETED
    obj: JSON  # the new state (DELETED: the last state, with the deletion's resourceVersion)
    old: JSON | None  # the state before (MODIFIED only)


class Store:
    """Objects by resource, one global resourceVersion, a bounded change history.

    Every write goes through `_commit`, which bumps the resourceVersion, records
    the change for watches and wakes them. A new watch from before `compacted`
    gets 410; an open watch gets 410 only when it falls behind the history it
    still needs (`forgotten`), as the watch cache ends a watcher that lags.
    """

    def __init__(self, history: int) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.rv = 0
        self.compacted = 0  # new watches must start at or after this version
        self.forgotten = 0  # the newest version dropped from the history
        self._history_size = history
        self._history: deque[Change] = deque()
        self._objects: dict[Resource, dict[tuple[str, str], JSON]] = {r: {} for r in RESOURCES}

    # reads

    def get(self, res: Resource, namespace: str, name: str) -> JSON | None:
        with self.cond:
            obj = self._objects[res].get((namespace if res.namespaced else "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def select(self, res: Resource, where: Filter | None = None) -> list[JSON]:
        """Matching objects sorted by namespace and name, as etcd returns keys."""
        return self.page(res, where)[0]

    def page(
        self, res: Resource, where: Filter | None = None, start: int = 0, limit: int = 0
    ) -> tuple[list[JSON], int]:
        """Matching objects `start` to `start + limit` (0: all), copied, and how many match."""
        with self.cond:
            bucket = self._objects[res]
            keys = [key for key in sorted(bucket) if where is None or where.matches(bucket[key])]
            end = start + limit if limit > 0 else len(keys)
            return [copy.deepcopy(bucket[key]) for key in keys[start:end]], len(keys)

    def load(self, objects: Iterable[tuple[Resource, JSON]]) -> int:
        """Store objects as they are (no copy, no event); the history counts as compacted."""
        count = 0
        with self.cond:
            for res, obj in objects:
                meta = obj["metadata"]
                self.rv += 1
                meta["resourceVersion"] = str(self.rv)
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                namespace = meta.get("namespace", "") if res.namespaced else ""
                self._objects[res][(namespace, meta["name"])] = obj
                count += 1
            # No event was recorded for these versions: a watch from before them
            # must relist (410), as after an etcd compaction.
            self.compacted = self.forgotten = self.rv
            self.cond.notify_all()
        return count

    def check_watchable(self, rv: int) -> None:
        """ApiError 410 for a new watch from a compacted resourceVersion."""
        with self.cond:
            if rv < self.compacted:
                raise ApiError.expired(rv, self.compacted + 1)

    def changes_after(self, rv: int) -> list[Change]:
        """Changes newer than `rv`; ApiError 410 when some of them are gone from the history."""
        with self.cond:
            if rv < self.forgotten:
                raise ApiError.expired(rv, self.forgotten + 1)
            return [c for c in self._history if c.rv > rv]

    # writes

    def create(self, res: Resource, obj: JSON) -> JSON:
        """Store a new object (registry Store.Create); ApiError 409 AlreadyExists."""
        with self.cond:
            meta = obj["metadata"]
            if not meta.get("name") and meta.get("generateName"):
                namespace = meta.get("namespace", "")
                meta["name"] = self._generate_name(res, namespace, meta["generateName"])
            name = meta.get("name")
            if not name:
                raise ApiError.invalid(
                    res, "", "metadata.name", "", "name or generateName is required"
                )
            if (meta.get("namespace", ""), name) in self._objects[res]:
                raise ApiError.already_exists(res, name)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta.setdefault("generation", 1)
            return self._commit(res, "ADDED", obj, None)

    def update(self, res: Resource, obj: JSON, precondition: str | None = None) -> JSON:
        """Replace an object (GuaranteedUpdate): 404 when missing, 409 on a stale rv.

        A write that changes nothing keeps the resourceVersion and sends no event;
        one that removes the last finalizer of a deleted object deletes it.
        """
        with self.cond:
            meta = obj["metadata"]
            name, namespace = meta["name"], meta.get("namespace", "")
            old = self._objects[res].get((namespace, name))
            if old is None:
                raise ApiError.not_found(res, name)
            if precondition and precondition != old["metadata"]["resourceVersion"]:
                raise ApiError.stale(res, name)
            for key in _SYSTEM_FIELDS:
                if key in old["metadata"]:
                    meta[key] = old["metadata"][key]
                else:
                    meta.pop(key, None)
            if _spec_of(obj) != _spec_of(old):
                meta["generation"] = old["metadata"].get("generation", 0) + 1
            meta["resourceVersion"] = old["metadata"]["resourceVersion"]
            if obj == old:
                return copy.deepcopy(old)
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                return self._commit(res, "DELETED", obj, old)
            return self._commit(res, "MODIFIED", obj, old)

    def delete(self, res: Resource, namespace: str, name: str, options: JSON | None = None) -> JSON:
        """Delete (registry Store.Delete): finalizers only mark it, preconditions may 409."""
        with self.cond:
            old = self._objects[res].get((namespace if res.namespaced else "", name))
            if old is None:
                raise ApiError.not_found(res, name)
            pre = (options or {}).get("preconditions") or {}
            for key, label in (("resourceVersion", "ResourceVersion"), ("uid", "UID")):
                want, have = pre.get(key), old["metadata"].get(key)
                if want and want != have:
                    raise ApiError.conflict(
                        res,
                        name,
                        f"Precondition failed: {label} in precondition: {want}, "
                        f"{label} in object meta: {have}",
                    )
            obj = copy.deepcopy(old)
            if obj["metadata"].get("finalizers"):
                if obj["metadata"].get("deletionTimestamp"):
                    return obj
                obj["metadata"]["deletionTimestamp"] = _now()
                obj["metadata"]["deletionGracePeriodSeconds"] = 0
                return self._commit(res, "MODIFIED", obj, old)
            return self._commit(res, "DELETED", obj, old)

    def compact(self) -> int:
        """Refuse new watches from before now, as after an etcd compaction.

        Open watches keep their stream: the watch cache serves them.
        """
        with self.cond:
            self.compacted = self.rv
            return self.rv

    def _commit(self, res: Resource, type_: str, obj: JSON, old: JSON | None) -> JSON:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if type_ == "DELETED":
            self._objects[res].pop(key, None)
        else:
            self._objects[res][key] = obj
        self._history.append(Change(self.rv, res, type_, obj, old if type_ == "MODIFIED" else None))
        while len(self._history) > self._history_size:
            self.forgotten = self._history.popleft().rv
            self.compacted = max(self.compacted, self.forgotten)
        self.cond.notify_all()
        return copy.deepcopy(obj)

    def _generate_name(self, res: Resource, namespace: str, prefix: str) -> str:
        while True:
            name = prefix + "".join(secrets.choice(_GENERATE_CHARS) for _ in range(5))
            if (namespace, name) not in self._objects[res]:
                return name


# -- requests and routes ---------------------------------------------------------------


@dataclass(frozen=True)
class ApiCall:
    """One request as the fake received it, for tests that count API calls."""

    method: str
    path: str
    query: dict[str, str]
    # Who sent it (the bearer token's user name; "" when it did not authenticate):
    # benchmarks count each agent's requests apart.
    user: str = ""

    @property
    def watch(self) -> bool:
        return self.query.get("watch", "").lower() in ("true", "1")


@dataclass(frozen=True)
class Eviction:
    """A policy/v1 Eviction the fake granted (the pod was deleted)."""

    namespace: str
    name: str
    body: JSON


@dataclass(frozen=True)
class IssuedToken:
    """A ServiceAccount token the fake issued (what the apiserver signs into a JWT)."""

    namespace: str
    service_account: str
    service_account_uid: str
    audiences: tuple[str, ...]
    expires_at: float  # time.time()
    pod: tuple[str, str] | None  # (name, uid) of the pod it is bound to
    node: tuple[str, str] | None  # (name, uid or "") of that pod's node
    credential_id: str  # the JWT's jti


@dataclass(frozen=True)
class Review:
    """What authenticating a token gives: a user and the audiences it was good for, or why not."""

    user: rbac.User | None
    audiences: tuple[str, ...] = ()
    error: str = ""


@dataclass
class _Injection:
    method: str
    path: re.Pattern[str]
    error: ApiError
    times: int | None
    watch: bool | None

    def matches(self, call: ApiCall) -> bool:
        return (
            self.method in ("*", call.method)
            and self.path.fullmatch(call.path) is not None
            and self.watch in (None, call.watch)
        )


@dataclass(frozen=True)
class _Route:
    """A parsed REST path: /api/v1/namespaces/NS/pods/NAME/SUB and its variants."""

    resource: Resource
    namespace: str | None  # None: all namespaces (or a cluster-scoped type)
    name: str | None
    subresource: str | None


def _parse_route(path: str) -> _Route | None:
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    served = {r.plural: r for r in RESOURCES if (r.group, r.version) == (group, version)}
    namespace = None
    # /namespaces/NS/<plural>/...: a namespaced collection; /namespaces/NS[/sub]: a Namespace.
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in served:
        namespace, rest = rest[1], rest[2:]
    if not rest or rest[0] not in served or len(rest) > 3:
        return None
    res = served[rest[0]]
    if res.namespaced and namespace is None and len(rest) > 1:
        return None  # /api/v1/pods/NAME
    if not res.namespaced and namespace is not None:
        return None  # /api/v1/namespaces/NS/nodes
    return _Route(
        res, namespace, rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
    )


# -- HTTP glue -------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to FakeKube; HTTP/1.1 keep-alive as the client's urllib3 pool uses."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle on, the body waits for
    # the client's delayed ACK (40 ms on Linux), per request.
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self.server.kube._serve(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fake-kube: " + format, *args)

    def send_json(self, code: int, body: JSON, headers: Iterable[tuple[str, str]] = ()) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def client_gone(self) -> bool:
        """The client closed its end (Watch.stop(), a dropped connection)."""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


class _Server(ThreadingHTTPServer):
    """Tracks open connections so that `close()` can end keep-alive handler threads."""

    daemon_threads = True

    def __init__(self, kube: FakeKube, port: int = 0, backlog: int | None = None) -> None:
        self.kube = kube
        self.open_connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        if backlog is not None:
            self.request_queue_size = backlog  # read by server_activate(): listen(backlog)
        super().__init__(("127.0.0.1", port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self.open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._lock:
            for sock in self.open_connections:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("fake-kube: connection from %s failed", client_address, exc_info=True)


# -- the server --------------------------------------------------------------------------


class FakeKube:
    """A Kubernetes API server in a thread, backed by `Store`, with test hooks."""

    NAMESPACES: ClassVar[tuple[str, ...]] = (
        "default",
        "kube-system",
        "kube-public",
        "kube-node-lease",
    )

    def __init__(
        self,
        *,
        token: str = "fake-token",
        history: int = 1000,
        rbac_objects: Iterable[JSON] | None = None,
        node_info: bool = True,
        backlog: int | None = None,
    ) -> None:
        """`token` is the admin's (system:masters); `rbac_objects`: see `enforce_rbac`.

        `node_info` False models a cluster without the ServiceAccountTokenPodNodeInfo
        feature (before Kubernetes 1.30): pod-bound tokens carry no node extras.
        `backlog`: the listening socket's accept queue (socketserver's default is
        5); benchmarks that send bursts of requests pass `socket.SOMAXCONN`, as
        the apiserver's Go listener uses somaxconn: a full queue costs each
        refused SYN a 1 s retransmission, which is no property of the client.
        """
        self.token = token
        self.node_info = node_info
        self.backlog = backlog
        self._tokens: dict[str, IssuedToken] = {}
        self._enforcing = False
        self._denials: list[rbac.Denial] = []
        self.store = Store(history)
        self.evictions: list[Eviction] = []
        self._calls: list[ApiCall] = []
        self._injections: list[_Injection] = []
        self._held_watches: list[re.Pattern[str]] = []
        self._refusals: int | None = 0  # None: refuse every eviction
        self._refusing_budget = ""
        self._hooks = threading.Lock()
        self._closing = threading.Event()
        self._watchers = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        for name in self.NAMESPACES:
            self.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        if rbac_objects is not None:
            self.enforce_rbac(rbac_objects)

    # -- life cycle

    def start(self, port: int = 0) -> FakeKube:
        """Serve on `port` (0: any free one); after `close()`, the old `port` brings
        the same server back (an API server outage), its store intact."""
        self._closing.clear()
        self._server = _Server(self, port, self.backlog)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-kube", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving: end watches, drop keep-alive connections, join every thread."""
        if self._server is None:
            return
        self._closing.set()
        with self.store.cond:
            self.store.cond.notify_all()
        self._server.shutdown()
        self._server.drop_connections()
        self._server.server_close()  # joins the handler threads
        if self._thread is not None:
            self._thread.join(10)
        self._server = None

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeKube is not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeKube is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def kubeconfig(
        self, path: Path | str, namespace: str = "default", *, service_account: str | None = None
    ) -> Path:
        """Write a kubeconfig for this server (plain HTTP, a bearer token); returns its path.

        The token is the admin's, or with `service_account="ns/name"` a token of
        that ServiceAccount for the API's audience (valid for a day), as a pod
        running under it would present.
        """
        path = Path(path)
        token = self.token
        if service_account is not None:
            sa_namespace, _, sa_name = service_account.partition("/")
            if not sa_namespace or not sa_name:
                raise ValueError(f"service_account must be 'namespace/name': {service_account!r}")
            token = self.service_account_token(sa_namespace, sa_name, expires_in=86400.0)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "fake", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}
            ],
            "users": [{"name": "fake", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path

    # -- direct store access (no HTTP, no checks; watches see the changes)

    @property
    def resource_version(self) -> str:
        return str(self.store.rv)

    def put(self, obj: JSON) -> JSON:
        """Create or overwrite an object as a controller would have left it; returns it stored."""
        res = _resource_of(obj)
        obj = _prepare(res, copy.deepcopy(obj))
        meta = obj["metadata"]
        if res.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        meta.pop("resourceVersion", None)
        with self.store.cond:
            if self.store.get(res, meta.get("namespace", ""), meta["name"]) is None:
                return self.store.create(res, obj)
            return self.store.update(res, obj)

    def get(self, kind_plural: str, namespace: str | None, name: str) -> JSON | None:
        """An object from the store (`namespace` None or "" for cluster-scoped types)."""
        return self.store.get(find_resource(kind_plural), namespace or "", name)

    def objects(self, kind_plural: str, namespace: str | None = None) -> list[JSON]:
        """All stored objects of a type (in one namespace if given), sorted as a LIST is."""
        return self.store.select(find_resource(kind_plural), Filter(namespace))

    def delete(self, kind_plural: str, namespace: str | None, name: str) -> JSON:
        """Delete an object directly (finalizers honoured); KeyError when absent."""
        try:
            return self.store.delete(find_resource(kind_plural), namespace or "", name)
        except ApiError as err:
            raise KeyError(err.message) from err

    def compact(self) -> str:
        """Compact the history to now: watches from an older resourceVersion get 410."""
        return str(self.store.compact())

    def load(self, objects: Iterable[JSON]) -> int:
        """Bulk-load objects straight into the store, for benchmarks and large fixtures.

        Unlike `put`: no copy, no defaults, no validation, no watch event. Each
        object gets the next resourceVersion (and a uid and creationTimestamp if
        it has none) and is stored as given, so objects may share sub-objects
        (the store never changes a stored object in place: reads and writes
        copy). The caller must not change them afterwards. The watch history
        counts as compacted past the load: a watch from before it gets 410 and
        relists, as after an etcd compaction. Objects need `apiVersion`, `kind`
        and `metadata.name` (and `metadata.namespace` for namespaced kinds).
        Returns how many were stored.
        """
        return self.store.load((_resource_of(obj), obj) for obj in objects)

    # -- ServiceAccount tokens and RBAC

    def service_account_token(
        self,
        namespace: str,
        name: str,
        *,
        audiences: Iterable[str] = (API_AUDIENCE,),
        expires_in: float = 3600.0,
        pod: tuple[str, str] | None = None,
        node: str | None = None,
    ) -> str:
        """Issue a token of ServiceAccount namespace/name, as kubelet projects one into a pod.

        The ServiceAccount is created when missing (a test need not put it);
        deleting it afterwards invalidates the token, as in the apiserver.
        `pod` = (name, uid) binds the token to that pod: it stops authenticating
        once no pod of that name and UID exists. Its node is `node`, else the
        pod's spec.nodeName when the pod is stored. `expires_in` <= 0 gives a
        token that is already expired. Unlike TokenRequest over HTTP, nothing is
        checked here (no minimum lifetime, the pod need not exist or run as this
        ServiceAccount), so tests can forge what kubelet never would.
        """
        account = self.get("serviceaccounts", namespace, name)
        if account is None:
            account = self.put(
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": name, "namespace": namespace},
                }
            )
        bound_node: tuple[str, str] | None = None
        if pod is not None:
            stored = self.get("pods", namespace, pod[0])
            if node is None and stored is not None:
                node = (stored.get("spec") or {}).get("nodeName") or None
        if node is not None:
            node_obj = self.get("nodes", None, node)
            bound_node = (node, node_obj["metadata"]["uid"] if node_obj else "")
        token = secrets.token_urlsafe(32)
        issued = IssuedToken(
            namespace,
            name,
            account["metadata"]["uid"],
            tuple(audiences),
            time.time() + expires_in,
            pod,
            bound_node,
            str(uuid.uuid4()),
        )
        with self._hooks:
            self._tokens[token] = issued
        return token

    def review(self, token: str, audiences: Iterable[str] = ()) -> Review:
        """Authenticate `token` for `audiences` (empty: the API's), as a TokenReview does."""
        wanted = tuple(audiences) or (API_AUDIENCE,)
        if token == self.token:
            return Review(ADMIN, wanted)
        with self._hooks:
            issued = self._tokens.get(token)
        if issued is None:
            return Review(None, error="[invalid bearer token, Token has been invalidated]")
        granted = tuple(a for a in wanted if a in issued.audiences)
        if not granted:
            return Review(
                None,
                error=f"[invalid bearer token, token audiences {_go_quote(issued.audiences)} "
                f"is invalid for the target audiences {_go_quote(wanted)}]",
            )
        if time.time() >= issued.expires_at:
            return Review(None, error="[invalid bearer token, service account token has expired]")
        account = self.get("serviceaccounts", issued.namespace, issued.service_account)
        if account is None or account["metadata"]["uid"] != issued.service_account_uid:
            return Review(
                None,
                error=f"[invalid bearer token, service account {issued.namespace}/"
                f"{issued.service_account} has been deleted]",
            )
        extra: dict[str, tuple[str, ...]] = {CREDENTIAL_ID_EXTRA: (f"JTI={issued.credential_id}",)}
        if issued.pod is not None:
            # The validator reads the bound pod on every review (claims.go).
            pod = self.get("pods", issued.namespace, issued.pod[0])
            if pod is None or pod["metadata"]["uid"] != issued.pod[1]:
                return Review(
                    None, error="[invalid bearer token, service account token has been invalidated]"
                )
            extra[POD_NAME_EXTRA], extra[POD_UID_EXTRA] = (issued.pod[0],), (issued.pod[1],)
            if issued.node is not None and self.node_info:
                extra[NODE_NAME_EXTRA] = (issued.node[0],)
                if issued.node[1]:
                    extra[NODE_UID_EXTRA] = (issued.node[1],)
        base = rbac.service_account_user(
            issued.namespace, issued.service_account, issued.service_account_uid
        )
        return Review(rbac.User(base.name, base.uid, base.groups, extra), granted)

    def enforce_rbac(self, objects: Iterable[JSON]) -> None:
        """Authorize every ServiceAccount request with RBAC from now on.

        `objects` (e.g. `rbac.bundle_rbac()`, or all that `kubectl kustomize`
        renders) are stored; of them, Roles, ClusterRoles, their bindings and
        ServiceAccounts are kept, anything else is ignored. Call again to add
        more. The RBAC objects in the store are read at every request, so a test
        may also `put` or `delete` them later. The cluster's bootstrap policy
        (discovery, system:masters) applies too. Until the first call every
        authenticated request is allowed.
        """
        for obj in objects:
            if obj.get("kind") in (*rbac.RBAC_KINDS, "ServiceAccount"):
                self.put(obj)
        self._enforcing = True

    def denied(self) -> list[rbac.Denial]:
        """Requests refused by RBAC so far: (user, verb, group, resource, namespace, name)."""
        with self._hooks:
            return list(self._denials)

    # -- test hooks

    def inject_error(
        self,
        method: str,
        path_regex: str,
        status: int,
        times: int | None = 1,
        *,
        message: str = "injected by FakeKube",
        reason: str | None = None,
        watch: bool | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Fail the next `times` (None: all) calls whose method and whole path match.

        `method` "*" matches any; `watch` True/False restricts to watch or non-watch
        requests. No Retry-After header unless given: with one, urllib3 itself retries
        GETs answered 429/503.
        """
        error = ApiError(status, message, reason=reason, retry_after=retry_after)
        with self._hooks:
            self._injections.append(
                _Injection(method.upper(), re.compile(path_regex), error, times, watch)
            )

    def hold_watches(self, path_regex: str) -> None:
        """Watches whose whole path matches (open ones and new ones) deliver no change
        until `release_watches()`, then every one they held, in order: a client whose
        watch lags (a slow connection, an apiserver's watch cache behind etcd). Lists
        and GETs still answer with the current state."""
        with self._hooks:
            self._held_watches.append(re.compile(path_regex))

    def release_watches(self) -> None:
        with self._hooks:
            self._held_watches.clear()
        with self.store.cond:
            self.store.cond.notify_all()

    def _held(self, path: str) -> bool:
        with self._hooks:
            return any(p.fullmatch(path) for p in self._held_watches)

    def refuse_evictions(self, times: int | None = 1, budget: str = "fake-pdb") -> None:
        """Answer the next `times` (None: all, 0: none) evictions 429, as a PodDisruptionBudget.

        As in the apiserver, pods in a terminal phase are evicted regardless.
        """
        with self._hooks:
            self._refusals, self._refusing_budget = times, budget

    def calls(
        self, method: str | None = None, path: str | None = None, *, watch: bool | None = None
    ) -> list[ApiCall]:
        """Requests received so far, filtered by method, whole-path regex and watch-ness."""
        pattern = re.compile(path) if path is not None else None
        with self._hooks:
            return [
                c
                for c in self._calls
                if (method is None or c.method == method.upper())
                and (pattern is None or pattern.fullmatch(c.path))
                and (watch is None or c.watch == watch)
            ]

    def count(
        self, method: str | None = None, path: str | None = None, *, watch: bool | None = None
    ) -> int:
        return len(self.calls(method, path, watch=watch))

    def clear_calls(self) -> None:
        with self._hooks:
            self._calls.clear()

    @property
    def watchers(self) -> int:
        """Watch streams open now (tests wait for an agent to be watching)."""
        with self._hooks:
            return self._watchers

    # -- request handling

    def _serve(self, handler: _Handler) -> None:
        url = urlsplit(handler.path)
        try:
            user: rbac.User | ApiError = self._authenticate(handler.headers.get("Authorization"))
        except ApiError as err:
            user = err  # answered below, once the call is recorded
        call = ApiCall(
            handler.command,
            url.path,
            dict(parse_qsl(url.query)),
            user.name if isinstance(user, rbac.User) else "",
        )
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        with self._hooks:
            self._calls.append(call)
        try:
            if isinstance(user, ApiError):
                raise user
            self._authorize(user, call)
            self._injected(call)
            body = json.loads(raw) if raw else None
            if call.watch:
                self._watch(handler, call)
                return
            code, reply = self._dispatch(call, body, handler.headers.get("Content-Type", ""))
        except ApiError as err:
            headers = [("Retry-After", str(err.retry_after))] if err.retry_after else []
            handler.send_json(err.code, err.status(), headers)
            return
        except json.JSONDecodeError as err:
            handler.send_json(400, ApiError(400, f"invalid JSON body: {err}").status())
            return
        except Exception as err:
            log.exception("fake-kube: %s %s failed", call.method, call.path)
            handler.send_json(500, ApiError(500, f"FakeKube bug: {err!r}").status())
            return
        handler.send_json(code, reply)

    def _authenticate(self, authorization: str | None) -> rbac.User:
        """The bearer token's user: only tokens for the API's audience count; 401 otherwise."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "Unauthorized")
        review = self.review(token.strip())
        if review.user is None:
            raise ApiError(401, "Unauthorized")
        return review.user

    def _authorize(self, user: rbac.User, call: ApiCall) -> None:
        """RBAC (once `enforce_rbac` was called); system:masters is never asked about."""
        if not self._enforcing or "system:masters" in user.groups:
            return
        attrs = rbac.request_attributes(call.method, call.path, call.query)
        objects = [*rbac.BOOTSTRAP_POLICY]
        for plural in ("clusterroles", "clusterrolebindings", "roles", "rolebindings"):
            objects += self.objects(f"{plural}.rbac.authorization.k8s.io")
        decision = rbac.authorize(objects, user, attrs)
        if decision.allowed:
            return
        with self._hooks:
            self._denials.append(
                rbac.Denial(
                    user.name,
                    attrs.verb,
                    attrs.api_group,
                    attrs.full_resource if attrs.resource_request else attrs.path,
                    attrs.namespace,
                    attrs.name,
                )
            )
        status = rbac.forbidden(user, attrs, decision.reason)
        raise ApiError(403, status["message"], details=status["details"])

    def _injected(self, call: ApiCall) -> None:
        with self._hooks:
            for injection in self._injections:
                if injection.matches(call):
                    if injection.times is not None:
                        injection.times -= 1
                        if injection.times <= 0:
                            self._injections.remove(injection)
                    raise injection.error

    def _dispatch(self, call: ApiCall, body: Any, content_type: str) -> tuple[int, JSON]:
        if call.path in ("/version", "/version/"):  # the client asks for /version/
            return 200, VERSION
        if call.path == TOKEN_REVIEW_PATH:
            if call.method != "POST":
                raise ApiError(405, f"{call.method} is not supported on tokenreviews")
            return 201, self._token_review(body or {})
        route = _parse_route(call.path)
        if route is None:
            raise ApiError(404, "the server could not find the requested resource", details={})
        verb = (call.method, route.name is not None, route.subresource)
        if route.subresource not in (None, "status", "eviction", "token") or (
            route.subresource == "status" and not route.resource.status_subresource
        ):
            raise ApiError(404, "the server could not find the requested resource", details={})
        if route.subresource == "eviction":
            if route.resource.plural != "pods" or call.method != "POST":
                raise ApiError(405, f"{call.method} is not supported on evictions")
            return self._evict(route, body or {})
        if route.subresource == "token":
            if route.resource.plural != "serviceaccounts" or call.method != "POST":
                raise ApiError(405, f"{call.method} is not supported on token requests")
            return self._token_request(route, body or {})
        if verb in (("GET", True, None), ("GET", True, "status")):
            return 200, self._read(route)
        if verb == ("GET", False, None):
            return 200, self._list(route, call)
        if verb == ("POST", False, None):
            return 201, self._create(route, body)
        if verb in (("PUT", True, None), ("PUT", True, "status")):
            return 200, self._replace(route, body)
        if verb in (("PATCH", True, None), ("PATCH", True, "status")):
            return 200, self._patch(route, body, content_type)
        if verb == ("DELETE", True, None):
            return 200, self._delete(route, body)
        if verb == ("DELETE", False, None):
            return 200, self._delete_collection(route, call)
        raise ApiError(405, f"the server does not allow {call.method} on {call.path}")

    # -- verbs

    def _read(self, route: _Route) -> JSON:
        assert route.name is not None
        obj = self.store.get(route.resource, route.namespace or "", route.name)
        if obj is None:
            raise ApiError.not_found(route.resource, route.name)
        return obj

    def _filter(self, route: _Route, call: ApiCall) -> Filter:
        return Filter(
            route.namespace if route.resource.namespaced else None,
            LabelSelector.parse(call.query.get("labelSelector", "")),
            FieldSelector.parse(call.query.get("fieldSelector", ""), route.resource),
        )

    def _list(self, route: _Route, call: ApiCall) -> JSON:
        """LIST with selectors and `limit`/`continue` paging (no snapshot: current state)."""
        where = self._filter(route, call)
        start = 0
        if token := call.query.get("continue"):
            try:
                start = int(base64.urlsafe_b64decode(token.encode()).decode())
            except ValueError as err:
                raise ApiError(400, f"invalid continue token {token!r}") from err
        limit = int(call.query.get("limit") or 0)
        with self.store.cond:
            # Only the page is copied: a LIST in pages of a large set stays cheap.
            items, total = self.store.page(route.resource, where, start, limit)
            rv = self.store.rv
        meta: JSON = {"resourceVersion": str(rv)}
        end = start + len(items)
        if end < total:
            meta["continue"] = base64.urlsafe_b64encode(str(end).encode()).decode()
            meta["remainingItemCount"] = total - end
        for item in items:
            # List items carry no apiVersion/kind on the wire.
            item.pop("apiVersion", None)
            item.pop("kind", None)
        return {
            "apiVersion": route.resource.api_version,
            "kind": route.resource.list_kind,
            "metadata": meta,
            "items": items,
        }

    def _decode(self, route: _Route, body: Any) -> JSON:
        """An object body for this route: kind and namespace must agree with the URL."""
        res = route.resource
        if not isinstance(body, dict):
            raise ApiError(400, f"the body of the request must be a {res.kind} object")
        if body.get("kind") not in (None, res.kind):
            raise ApiError(400, f"the kind in the body ({body.get('kind')}) is not {res.kind}")
        obj = _prepare(res, copy.deepcopy(body))
        meta = obj["metadata"]
        if res.namespaced:
            if meta.get("namespace") not in (None, "", route.namespace):
                raise ApiError(
                    400,
                    "the namespace of the provided object does not match the namespace "
                    "sent on the request",
                )
            meta["namespace"] = route.namespace
        else:
            meta.pop("namespace", None)
        if route.name is not None and meta.setdefault("name", route.name) != route.name:
            raise ApiError(
                400,
                f"the name of the object ({meta['name']}) does not match the name on "
                f"the URL ({route.name})",
            )
        return obj

    def _create(self, route: _Route, body: Any) -> JSON:
        if route.resource.namespaced and route.namespace is None:
            raise ApiError(405, f"POST needs a namespace for {route.resource.qualified}")
        obj = self._decode(route, body)
        if obj["metadata"].get("resourceVersion"):
            # etcd3 store: "resourceVersion should not be set on objects to be created".
            raise ApiError(500, "resourceVersion should not be set on objects to be created")
        for key in _SYSTEM_FIELDS:
            obj["metadata"].pop(key, None)
        _validate(route.resource, obj)
        return self.store.create(route.resource, obj)

    def _replace(self, route: _Route, body: Any) -> JSON:
        obj = self._decode(route, body)
        return self._update(route, obj, obj["metadata"].get("resourceVersion") or None)

    def _patch(self, route: _Route, body: Any, content_type: str) -> JSON:
        kind = content_type.split(";", maxsplit=1)[0].strip()
        with self.store.cond:  # read, patch and write as one step: no spurious 409
            old = self._read(route)
            if kind == "application/merge-patch+json":
                patched = merge_patch(old, body)
            elif kind == "application/strategic-merge-patch+json":
                patched = _strategic_merge_patch(old, body)
            elif kind == "application/json-patch+json":
                patched = json_patch(old, body)
            else:
                raise ApiError(415, f"the body of the request was in an unknown format ({kind})")
            # A resourceVersion set by the patch is a precondition (patcher.applyPatch).
            wanted = (patched.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != old["metadata"]["resourceVersion"]:
                assert route.name is not None
                raise ApiError.stale(route.resource, route.name)
            return self._update(route, self._decode(route, patched), None)

    def _update(self, route: _Route, obj: JSON, precondition: str | None) -> JSON:
        """PUT and PATCH: the status subresource splits what each endpoint may change."""
        res = route.resource
        with self.store.cond:
            old = self._read(route)
            if res.status_subresource:
                if route.subresource == "status":
                    obj = {**old, "status": obj.get("status", {})}
                elif "status" in old:
                    obj["status"] = old["status"]
                else:
                    obj.pop("status", None)
            _validate(res, obj)
            return self.store.update(res, obj, precondition)

    def _delete(self, route: _Route, body: Any) -> JSON:
        res = route.resource
        assert route.name is not None
        gone = self.store.delete(res, route.namespace or "", route.name, body)
        if res.returns_deleted_object or gone["metadata"].get("deletionTimestamp"):
            return gone
        details = {**ApiError._details(res, route.name), "uid": gone["metadata"]["uid"]}
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }

    def _delete_collection(self, route: _Route, call: ApiCall) -> JSON:
        where = self._filter(route, call)
        items = []
        for obj in self.store.select(route.resource, where):
            meta = obj["metadata"]
            with contextlib.suppress(ApiError):
                items.append(
                    self.store.delete(route.resource, meta.get("namespace", ""), meta["name"])
                )
        return {
            "apiVersion": route.resource.api_version,
            "kind": route.resource.list_kind,
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": items,
        }

    def _token_review(self, body: JSON) -> JSON:
        """authentication.k8s.io/v1 TokenReview (registry/authentication/tokenreview)."""
        spec = body.get("spec") or {}
        token = spec.get("token") or ""
        if not token:
            raise ApiError(400, "token is required for TokenReview in authentication")
        review = self.review(token, spec.get("audiences") or ())
        status: JSON = {"authenticated": review.user is not None}
        if review.user is not None:
            user: JSON = {
                "username": review.user.name,
                "uid": review.user.uid,
                "groups": list(review.user.groups),
            }
            if review.user.extra:
                user["extra"] = {k: list(v) for k, v in review.user.extra.items()}
            status["user"] = user
            status["audiences"] = list(review.audiences)
        else:
            status["user"] = {}
            status["error"] = review.error
        return {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }

    def _token_request(self, route: _Route, body: JSON) -> tuple[int, JSON]:
        """serviceaccounts/token: a TokenRequest (registry/core/serviceaccount/storage/token.go)."""
        assert route.name is not None and route.namespace is not None
        account = self._read(route)  # 404 for a ServiceAccount that does not exist
        spec = dict(body.get("spec") or {})
        audiences = list(spec.get("audiences") or [API_AUDIENCE])
        seconds = int(spec.get("expirationSeconds") or 3600)
        if seconds < 600 or seconds > 1 << 32:
            why = (
                "may not specify a duration less than 10 minutes"
                if seconds < 600
                else "may not specify a duration larger than 2^32 seconds"
            )
            cause = f"spec.expirationSeconds: Invalid value: {seconds}: {why}"
            raise ApiError(
                422,
                f'TokenRequest.authentication.k8s.io "{route.name}" is invalid: {cause}',
                details={
                    "name": route.name,
                    "group": "authentication.k8s.io",
                    "kind": "TokenRequest",
                    "causes": [
                        {
                            "reason": "FieldValueInvalid",
                            "message": cause,
                            "field": "spec.expirationSeconds",
                        }
                    ],
                },
            )
        pod: tuple[str, str] | None = None
        if ref := spec.get("boundObjectRef"):
            if ref.get("kind") != "Pod":
                raise ApiError(400, f"FakeKube binds tokens only to pods, not {ref.get('kind')}")
            pods = find_resource("pods")
            bound = self.store.get(pods, route.namespace, ref.get("name") or "")
            if bound is None:
                raise ApiError.not_found(pods, ref.get("name") or "")
            uid = bound["metadata"]["uid"]
            if ref.get("uid") and ref["uid"] != uid:
                raise ApiError.conflict(
                    pods,
                    bound["metadata"]["name"],
                    f"the UID in the bound object reference ({ref['uid']}) does not match the "
                    "UID in record. The object might have been deleted and then recreated",
                )
            if (bound.get("spec") or {}).get("serviceAccountName", "default") != route.name:
                raise ApiError(
                    400,
                    f'cannot bind token for serviceaccount "{route.name}" to pod running '
                    "with different serviceaccount name.",
                )
            pod = (bound["metadata"]["name"], uid)
        token = self.service_account_token(
            route.namespace,
            account["metadata"]["name"],
            audiences=audiences,
            expires_in=float(seconds),
            pod=pod,
        )
        with self._hooks:
            expires_at = self._tokens[token].expires_at
        spec.update(audiences=audiences, expirationSeconds=seconds)
        return 201, {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {
                "name": route.name,
                "namespace": route.namespace,
                "creationTimestamp": None,
            },
            "spec": spec,
            "status": {
                "token": token,
                "expirationTimestamp": datetime.fromtimestamp(expires_at, UTC).strftime(_TIME),
            },
        }

    def _evict(self, route: _Route, body: JSON) -> tuple[int, JSON]:
        """policy/v1 Eviction (registry/core/pod/storage/eviction.go): delete, or 429."""
        assert route.name is not None and route.namespace is not None
        if (body.get("metadata") or {}).get("name") not in (None, route.name):
            raise ApiError(400, "name in URL does not match name in Eviction object")
        pod = self._read(route)
        terminal = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
        with self._hooks:
            refuse = not terminal and (self._refusals is None or self._refusals > 0)
            if refuse and self._refusals is not None:
                self._refusals -= 1
            budget = self._refusing_budget
        if refuse:
            err = ApiError(429, "Cannot evict pod as it would violate the pod's disruption budget.")
            err.details = {
                "causes": [
                    {
                        "reason": "DisruptionBudget",
                        "message": f"The disruption budget {budget} needs 1 healthy pods "
                        "and has 1 currently",
                    }
                ]
            }
            raise err
        self.store.delete(route.resource, route.namespace, route.name, body.get("deleteOptions"))
        with self._hooks:
            self.evictions.append(Eviction(route.namespace, route.name, copy.deepcopy(body)))
        return 201, {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "code": 201,
        }

    def _watch(self, handler: _Handler, call: ApiCall) -> None:
        """WATCH: newline-delimited events over a chunked response, until timeoutSeconds.

        No resourceVersion (or "0"): synthetic ADDED events for the current state
        first. From a compacted resourceVersion: one ERROR event with a 410 Status
        (the cacher answers this inside a 200 stream, not as an HTTP error).
        Selectors apply to both states of a change: an object that starts or stops
        matching is ADDED or DELETED, as the watch cache does.
        """
        route = _parse_route(call.path)
        if route is None or route.name is not None or route.subresource is not None:
            raise ApiError(404, "the server could not find the requested resource", details={})
        where = self._filter(route, call)
        timeout = float(call.query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        deadline = time.monotonic() + timeout
        since = call.query.get("resourceVersion", "")
        if since and not since.isdigit():
            raise ApiError(400, f"invalid resourceVersion {since!r}")
        initial: list[tuple[str, JSON]] = []
        with self.store.cond:
            if since in ("", "0"):
                cursor = self.store.rv
                initial = [("ADDED", obj) for obj in self.store.select(route.resource, where)]
            else:
                cursor = int(since)
                try:
                    self.store.check_watchable(cursor)
                except ApiError as err:
                    initial, deadline = [("ERROR", err.status())], 0.0
        handler.start_stream()
        with self._hooks:
            self._watchers += 1
        try:
            for type_, obj in initial:
                handler.send_chunk(_event_line(type_, obj))
            follow = self._follow(handler, route.resource, where, cursor, deadline, path=call.path)
            for type_, obj in follow:
                handler.send_chunk(_event_line(type_, obj))
            handler.send_chunk(b"")
        except OSError:
            handler.close_connection = True
        finally:
            with self._hooks:
                self._watchers -= 1

    def _follow(
        self,
        handler: _Handler,
        res: Resource,
        where: Filter,
        cursor: int,
        deadline: float,
        *,
        path: str,
    ) -> Iterator[tuple[str, JSON]]:
        """Events after `cursor` as they are committed, until the deadline or close."""
        while not self._closing.is_set() and time.monotonic() < deadline:
            if self._held(path):  # hold_watches: the cursor stays, events wait
                with self.store.cond:
                    self.store.cond.wait(max(0.0, min(deadline - time.monotonic(), WATCH_POLL)))
                if handler.client_gone():
                    return
                continue
            expired: ApiError | None = None
            with self.store.cond:
                try:
                    changes = self.store.changes_after(cursor)
                except ApiError as err:
                    expired = err
                else:
                    if not changes:
                        self.store.cond.wait(max(0.0, min(deadline - time.monotonic(), WATCH_POLL)))
            if expired is not None:
                yield "ERROR", expired.status()
                return
            for change in changes:
                cursor = change.rv
                if change.resource == res and (event := _seen_as(change, where)):
                    yield event
            if not changes and handler.client_gone():
                return


def _seen_as(change: Change, where: Filter) -> tuple[str, JSON] | None:
    """How a watcher with this filter sees a change (storage/cacher/cache_watcher.go)."""
    now = change.type != "DELETED" and where.matches(change.obj)
    before = where.matches(change.old if change.old is not None else change.obj)
    if change.type == "ADDED":
        return ("ADDED", change.obj) if now else None
    if change.type == "DELETED":
        return ("DELETED", change.obj) if before else None
    if now:
        return ("MODIFIED" if before else "ADDED", change.obj)
    if before:
        assert change.old is not None
        gone = copy.deepcopy(change.old)
        gone["metadata"]["resourceVersion"] = str(change.rv)
        return "DELETED", gone
    return None


def _go_quote(values: Iterable[str]) -> str:
    """A string slice as Go's %q prints it: ["a" "b"]."""
    return "[" + " ".join(json.dumps(v) for v in values) + "]"


def _event_line(type_: str, obj: JSON) -> bytes:
    return json.dumps({"type": type_, "object": obj}).encode() + b"\n"
