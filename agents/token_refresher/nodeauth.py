"""Who is asking for token files: an injector pod, and so its node.

An injector proves itself with a projected ServiceAccount token of our own
audience (kubelet writes and rotates it). We never read the token ourselves:
a TokenReview (`POST /apis/authentication.k8s.io/v1/tokenreviews`, with
`spec.audiences` set, so a token made for another audience is refused by the
API server) says whether it is valid and whose it is. A pod-bound token
carries the pod in the user's extras (`authentication.kubernetes.io/pod-name`,
`pod-uid`, and since Kubernetes 1.30 `node-name`: KEP-4193); that pod is then
read and must be an injector pod (its UID, labels, ServiceAccount, not
finished), and its `spec.nodeName` is the caller's node.

Caches, both bounded: a review by sha256(token) for min(60 s, the time left
until the token expires; the `exp` claim, read unverified and only to shorten
that), at most 10,000 entries; the injector pod check for 30 s. An API error
is not an answer: the caller gets 503 and nothing is cached. Error messages
never contain the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agents.token_refresher.metrics import FilesMetrics

log = logging.getLogger(__name__)

AUDIENCE = "node-agents.io/token-files"
INJECTOR_SERVICE_ACCOUNT = "token-refresher-injector"
INJECTOR_SELECTOR = "app.kubernetes.io/name=token-refresher,app.kubernetes.io/component=injector"
# User extras of a pod-bound ServiceAccount token (pkg/serviceaccount/claims.go).
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
NOT_FOUND = 404
_DONE_PHASES = ("Succeeded", "Failed")


class AuthError(Exception):
    """The caller cannot be served; `reason` is a short label for logs, `str()` says why."""

    status = 500

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Unauthenticated(AuthError):
    """No token, or one the API server did not accept for our audience (HTTP 401)."""

    status = 401


class Forbidden(AuthError):
    """A valid token, but not an injector pod's, or that pod is gone (HTTP 403)."""

    status = 403


class AuthUnavailable(AuthError):
    """The API server did not answer the review or the pod read: try again (HTTP 503)."""

    status = 503


@dataclass(frozen=True)
class Caller:
    """An authenticated injector: its pod and its node."""

    node: str
    namespace: str
    pod_name: str
    pod_uid: str
    expires_at: float | None = None
    """When the token expires (unix time, from its `exp` claim), if known."""

    @property
    def who(self) -> str:
        return f"injector pod {self.namespace}/{self.pod_name} on node {self.node}"


@dataclass(frozen=True)
class _Identity:
    """What a TokenReview said about a token we accept."""

    pod_name: str
    pod_uid: str
    node: str  # "" when the cluster sets no node-name extra


class LabelSelector:
    """A label selector as `kubectl -l` takes it: `k=v`, `k==v`, `k!=v`, `k`, `!k`,
    `k in (a,b)`, `k notin (a,b)`, joined by commas."""

    _SET = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")

    def __init__(self, text: str) -> None:
        self.text = text
        self._checks: list[Callable[[Mapping[str, str]], bool]] = []
        for part in _split_selector(text):
            self._checks.append(self._parse(part))

    def _parse(self, part: str) -> Callable[[Mapping[str, str]], bool]:
        if match := self._SET.match(part):
            key, op, values = match.group(1), match.group(2), match.group(3)
            allowed = {v.strip() for v in values.split(",") if v.strip()}
            if op == "in":
                return lambda labels: labels.get(key) in allowed
            return lambda labels: labels.get(key) not in allowed
        for op in ("!=", "==", "="):
            if op in part:
                key, value = (s.strip() for s in part.split(op, 1))
                if not key:
                    raise ValueError(f"bad label selector {self.text!r}")
                if op == "!=":
                    return lambda labels: labels.get(key) != value
                return lambda labels: labels.get(key) == value
        key = part.strip()
        if key.startswith("!"):
            absent = key[1:].strip()
            return lambda labels: absent not in labels
        if not key:
            raise ValueError(f"bad label selector {self.text!r}")
        return lambda labels: key in labels

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        return all(check(labels or {}) for check in self._checks)


def _split_selector(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, unverified (the review verifies it); None if unreadable.

    Used only to cache a review no longer than the token lives.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


def _one(extra: Mapping[str, Any], key: str) -> str:
    """A user extra that must be a one-element list of a non-empty string; "" otherwise."""
    value = extra.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    return ""


def _short(err: BaseException) -> str:
    status = getattr(err, "status", None)
    if isinstance(status, int):
        return f"HTTP {status} {getattr(err, 'reason', '') or ''}".strip()
    return " ".join(str(err).split())[:200] or type(err).__name__


class NodeAuthenticator:
    """Turns a bearer token into a `Caller`, or raises an `AuthError`. Thread-safe.

    `api_client` is a `kubernetes.client.ApiClient`; `namespace` is the
    controller's own, where the injector pods run.
    """

    def __init__(
        self,
        api_client: Any,
        *,
        namespace: str,
        metrics: FilesMetrics,
        audience: str = AUDIENCE,
        service_account: str = INJECTOR_SERVICE_ACCOUNT,
        selector: str = INJECTOR_SELECTOR,
        review_ttl: float = 60.0,
        pod_ttl: float = 30.0,
        max_reviews: int = 10_000,
        request_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from kubernetes import client

        self._auth: Any = client.AuthenticationV1Api(api_client)
        self._core: Any = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.audience = audience
        self.service_account = service_account
        self.username = f"system:serviceaccount:{namespace}:{service_account}"
        self.selector = LabelSelector(selector)
        self._metrics = metrics
        self._review_ttl = review_ttl
        self._pod_ttl = pod_ttl
        self._max_reviews = max_reviews
        self._timeout = request_timeout
        self._clock = clock
        self._lock = threading.Lock()
        # sha256(token) -> (identity or the refusal, until when, token expiry)
        self._reviews: OrderedDict[bytes, tuple[_Identity | Unauthenticated, float, float | None]]
        self._reviews = OrderedDict()
        # (pod name, uid) -> (its node or the refusal, until when); one entry per
        # injector pod: bounded by the number of nodes.
        self._pods: dict[tuple[str, str], tuple[str | Forbidden, float]] = {}

    @property
    def cached_reviews(self) -> int:
        with self._lock:
            return len(self._reviews)

    def authenticate(self, token: str, *, fresh_pod: bool = False) -> Caller:
        """The injector behind `token`; `fresh_pod` reads its pod again (a stream's re-check)."""
        if not token:
            raise Unauthenticated("no_token", "no bearer token")
        identity, expires_at = self._review(token)
        node = self._check_pod(identity, fresh=fresh_pod)
        return Caller(node, self.namespace, identity.pod_name, identity.pod_uid, expires_at)

    # -- the review

    def _review(self, token: str) -> tuple[_Identity, float | None]:
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        with self._lock:
            cached = self._reviews.get(key)
            if cached is not None and cached[1] > now:
                self._reviews.move_to_end(key)
                known, _, expires_at = cached
                if isinstance(known, Unauthenticated):
                    raise known
                return known, expires_at
        expires_at = token_expiry(token)
        try:
            answer: _Identity | Unauthenticated = self._ask(token)
        except AuthUnavailable:
            self._metrics.reviews.labels("error").inc()
            raise
        self._metrics.reviews.labels(
            "rejected" if isinstance(answer, Unauthenticated) else "authenticated"
        ).inc()
        ttl = self._review_ttl
        if expires_at is not None:
            ttl = min(ttl, expires_at - now)
        if ttl > 0:
            with self._lock:
                self._reviews[key] = (answer, now + ttl, expires_at)
                self._reviews.move_to_end(key)
                while len(self._reviews) > self._max_reviews:
                    self._reviews.popitem(last=False)
        if isinstance(answer, Unauthenticated):
            raise answer
        return answer, expires_at

    def _ask(self, token: str) -> _Identity | Unauthenticated:
        """One TokenReview; a refusal is returned (it is cached), an API error raised."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        }
        try:
            response = self._auth.create_token_review(
                body, _preload_content=False, _request_timeout=self._timeout
            )
            review = json.loads(response.data)
        except Exception as err:
            # Not the caller's fault: never cached, never a 401.
            log.warning("TokenReview failed: %s", _short(err))
            raise AuthUnavailable("review_failed", "the token could not be reviewed") from None
        status = review.get("status") or {}
        if not status.get("authenticated"):
            # status.error is the API server's text: it names no token, but is kept out
            # of the answer anyway (it may say which check failed; logs have it).
            log.info("injector token rejected: %s", str(status.get("error") or "")[:200])
            return Unauthenticated("invalid_token", "the token is invalid or expired")
        if self.audience not in (status.get("audiences") or []):
            return Unauthenticated("wrong_audience", f"the token is not for {self.audience}")
        user = status.get("user") or {}
        username = user.get("username") or ""
        if username != self.username:
            return Unauthenticated(
                "wrong_service_account",
                f"the token is not the injector's ServiceAccount's ({self.username})",
            )
        extra = user.get("extra") or {}
        pod_name, pod_uid = _one(extra, POD_NAME_EXTRA), _one(extra, POD_UID_EXTRA)
        if not pod_name or not pod_uid:
            return Unauthenticated(
                "not_pod_bound", "the token is not bound to a pod (use a projected token)"
            )
        return _Identity(pod_name, pod_uid, _one(extra, NODE_NAME_EXTRA))

    # -- the injector pod

    def _check_pod(self, identity: _Identity, *, fresh: bool) -> str:
        key = (identity.pod_name, identity.pod_uid)
        now = self._clock()
        with self._lock:
            cached = self._pods.get(key)
            # Expired entries of pods no token names any more would pile up.
            if len(self._pods) > 4 * self._max_reviews:
                self._pods = {k: v for k, v in self._pods.items() if v[1] > now}
        if cached is not None and cached[1] > now and not fresh:
            answer = cached[0]
        else:
            answer = self._read_pod(identity)
            with self._lock:
                self._pods[key] = (answer, now + self._pod_ttl)
        if isinstance(answer, Forbidden):
            raise answer
        if identity.node and identity.node != answer:
            raise Forbidden(
                "node_mismatch",
                f"the token names node {identity.node}, its pod runs on {answer}",
            )
        return answer

    def _read_pod(self, identity: _Identity) -> str | Forbidden:
        where = f"pod {self.namespace}/{identity.pod_name}"
        try:
            response = self._core.read_namespaced_pod(
                identity.pod_name,
                self.namespace,
                _preload_content=False,
                _request_timeout=self._timeout,
            )
            pod = json.loads(response.data)
        except Exception as err:
            if getattr(err, "status", None) == NOT_FOUND:
                return Forbidden("pod_gone", f"{where} does not exist")
            log.warning("cannot read injector %s: %s", where, _short(err))
            raise AuthUnavailable("pod_read_failed", f"{where} could not be read") from None
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        if meta.get("uid") != identity.pod_uid:
            return Forbidden("uid_mismatch", f"{where} is not the pod the token was made for")
        if not self.selector.matches(meta.get("labels")):
            return Forbidden(
                "not_injector", f"{where} has not the injector labels ({self.selector.text})"
            )
        if spec.get("serviceAccountName") != self.service_account:
            return Forbidden(
                "wrong_service_account", f"{where} does not run as {self.service_account}"
            )
        if (pod.get("status") or {}).get("phase") in _DONE_PHASES:
            return Forbidden("pod_finished", f"{where} has finished")
        node = spec.get("nodeName") or ""
        if not node:
            return Forbidden("no_node", f"{where} is not bound to a node")
        return str(node)
