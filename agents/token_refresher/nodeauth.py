"""Who is asking for token files: an injector pod, and so its node.

An injector proves itself with a projected ServiceAccount token of our own
audience (kubelet writes and rotates it). We never read the token ourselves:
a TokenReview (`POST /apis/authentication.k8s.io/v1/tokenreviews`, with
`spec.audiences` set, so a token made for another audience is refused by the
API server) says whether it is valid and whose it is. A pod-bound token
carries the pod in the user's extras (`authentication.kubernetes.io/pod-name`,
`pod-uid`, and since Kubernetes 1.30 `node-name`: KEP-4193); that pod is then
checked and must be an injector pod (its UID, labels, ServiceAccount, not
finished, not being deleted), and its `spec.nodeName` is the caller's node.

The injector pods: one label-selected WatchCache (`--injector-selector`) of
the pods in the controller's own namespace, so one object per node, never
the cluster's pods, slimmed to what the check reads. A caller whose pod is in
the synced cache costs no API request. A pod not there (just created, the
watch has not delivered it yet; or a UID the cache does not know) is read with
one GET, as is every pod while the cache is not synced; a GET's answer is
reused for 30 s (`pod_ttl`). Every change the watch sees of an injector pod
(deleted, relabelled out of the selector, finished, given a
deletionTimestamp) is passed to the listeners (`add_listener`: the file
server re-checks that pod's open streams at once) instead of waiting for a
periodic re-read.

A pod with a deletionTimestamp is refused at once. The API server keeps its
token valid until a minute after that timestamp (pkg/serviceaccount/claims.go,
`invalidIfDeletedBefore`), which for a pod is the end of its grace period: a
terminating injector needs no new files (its replacement gets its own
stream), and a compromised node's kubelet can keep a deleted pod Terminating
for as long as it likes.

Reviews: cached by sha256(token) for min(`review_ttl`, the time left until the
token expires; the `exp` claim, read unverified and only to shorten that), at
most 10,000 entries. The TTL is 300 s, not the 60 s it was while each open
stream re-read its pod every 30 s: what a review adds to the pod check is
what the watch cannot see, and for a pod-bound token that is little. The API
server invalidates such a token when its pod is deleted (or its UID
changes), which the watch now shows within a second; when it expires, which
`exp` already bounds; and otherwise only when its ServiceAccount is deleted
or recreated, or the signing key is retired: operator actions in the
controller's own namespace, not what a compromised node can do or undo. The
TTL bounds those, and the case where the watch fails but the API still
answers (then a deleted pod shows up at the next review: the API server
rejects its token). 300 s is the stream lifetime (a stream is reviewed about
once in its life); kubelet caches webhook TokenReviews for 2 min by default.
At 5,000 nodes that is ~17 reviews/s instead of ~83.

An API error is not an answer: the caller gets 503 and nothing is cached.
Error messages never contain the token.
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

from agents.common.kube import api_error_text
from agents.common.watchcache import WatchCache
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
# Injector pods listed per page: a LIST of 5,000 DaemonSet pods (~20 MB of
# JSON) is never parsed whole.
INJECTOR_PAGE = 500

PodChange = Callable[[str, dict[str, Any]], None]
"""A listener: (ADDED / MODIFIED / DELETED, the slimmed injector pod)."""


def slim_injector_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """What the injector pod check reads of a pod; the rest (managedFields,
    containers, status conditions) is dropped before the cache stores it."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    return {
        "metadata": {
            key: meta[key]
            for key in (
                "name",
                "namespace",
                "uid",
                "resourceVersion",
                "labels",
                "deletionTimestamp",
            )
            if key in meta
        },
        "spec": {key: spec[key] for key in ("nodeName", "serviceAccountName") if key in spec},
        "status": {"phase": (pod.get("status") or {}).get("phase")},
    }


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


class NodeAuthenticator:
    """Turns a bearer token into a `Caller`, or raises an `AuthError`. Thread-safe.

    `api_client` is a `kubernetes.client.ApiClient`; `namespace` is the
    controller's own, where the injector pods run. `start()` starts the
    injector pod watch (until then, and until it has listed, pods are read
    with GETs); `close()` stops it.
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
        review_ttl: float = 300.0,
        pod_ttl: float = 30.0,
        max_reviews: int = 10_000,
        request_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        watch_timeout: int = 300,
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
        self._listeners: list[PodChange] = []
        self.pods = WatchCache(
            api_client,
            "pods",
            namespace=namespace,
            # The API server filters: only the injector pods are sent, whatever
            # else runs in this namespace.
            label_selector=selector,
            transform=slim_injector_pod,
            page_size=INJECTOR_PAGE,
            timeout_seconds=watch_timeout,
            request_timeout=request_timeout,
            on_change=self._pod_changed,
        )
        """The injector pods, as the watch has them."""
        self.pod_reads = 0
        """Injector pod GETs made so far (pods the watch could not answer for)."""

    # -- life cycle

    def start(self) -> NodeAuthenticator:
        self.pods.start()
        return self

    def close(self) -> None:
        self.pods.stop()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Whether the injector pods were listed (within `timeout` seconds)."""
        return self.pods.wait_synced(timeout)

    def add_listener(self, listener: PodChange) -> None:
        """Call `listener` (in the watch's thread) whenever an injector pod changes."""
        self._listeners.append(listener)

    def _pod_changed(self, type_: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        with self._lock:
            # A GET's answer about this pod is now older than what the watch says.
            self._pods.pop((str(meta.get("name") or ""), str(meta.get("uid") or "")), None)
        for listener in self._listeners:
            try:
                listener(type_, pod)
            except Exception:
                log.exception("injector pod listener failed on %s", type_)

    @property
    def cached_reviews(self) -> int:
        with self._lock:
            return len(self._reviews)

    def authenticate(self, token: str, *, fresh_pod: bool = False) -> Caller:
        """The injector behind `token`. `fresh_pod` (a stream's re-check): a pod the
        synced watch does not hold is read again rather than taken from an earlier GET."""
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
            log.warning("TokenReview failed: %s", api_error_text(err))
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
        watched = self.pods.named(self.namespace, identity.pod_name) if self.pods.synced else None
        if watched is not None and (watched.get("metadata") or {}).get("uid") == identity.pod_uid:
            answer = self._judge(identity, watched)
        else:
            answer = self._checked_by_get(identity, fresh=fresh)
        if isinstance(answer, Forbidden):
            raise answer
        if identity.node and identity.node != answer:
            raise Forbidden(
                "node_mismatch",
                f"the token names node {identity.node}, its pod runs on {answer}",
            )
        return answer

    def _checked_by_get(self, identity: _Identity, *, fresh: bool) -> str | Forbidden:
        """The pod as a GET reads it (a consistent read), or an answer of the last `pod_ttl` s."""
        key = (identity.pod_name, identity.pod_uid)
        now = self._clock()
        with self._lock:
            cached = self._pods.get(key)
            # Expired entries of pods no token names any more would pile up.
            if len(self._pods) > 4 * self._max_reviews:
                self._pods = {k: v for k, v in self._pods.items() if v[1] > now}
        if cached is not None and cached[1] > now and not fresh:
            return cached[0]
        answer = self._read_pod(identity)
        with self._lock:
            self._pods[key] = (answer, now + self._pod_ttl)
        return answer

    def _read_pod(self, identity: _Identity) -> str | Forbidden:
        where = f"pod {self.namespace}/{identity.pod_name}"
        with self._lock:
            self.pod_reads += 1
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
            log.warning("cannot read injector %s: %s", where, api_error_text(err))
            raise AuthUnavailable("pod_read_failed", f"{where} could not be read") from None
        return self._judge(identity, pod)

    def _judge(self, identity: _Identity, pod: dict[str, Any]) -> str | Forbidden:
        """The node of `pod` if it is the live injector pod the token names, else why not."""
        where = f"pod {self.namespace}/{identity.pod_name}"
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
        if meta.get("deletionTimestamp"):
            return Forbidden("pod_deleted", f"{where} is being deleted")
        node = spec.get("nodeName") or ""
        if not node:
            return Forbidden("no_node", f"{where} is not bound to a node")
        return str(node)
