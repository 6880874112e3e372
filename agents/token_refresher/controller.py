"""The controller: the one writer of every token Secret.

Refresh tokens may rotate: each works once, and the IdP revokes it when it
answers. Two refreshers of one Secret would break its chain, so one replica
acts, elected through a Lease (agents/common/leader.py), and it keeps this
order for every Secret:

1. Watch token Secrets (`<prefix>/is-token: "true"`), all namespaces or the
   configured ones. A Secret's content (its data and its token URL) is parsed
   when it changes; a Secret that cannot be used gets a Warning Event, a
   status annotation and no IdP call until its content changes.
2. When the token is due (about 80% of its lifetime, with jitter; tokens with
   no expiry once per idle window; tokens written by another tool, which carry
   no absolute expiry, at once), call the IdP, only while the Lease will
   outlast the request.
3. Write the new token to the Secret before anything else: a PUT with the
   resourceVersion that was read. On 409 Conflict the Secret is read again and
   the token written onto it, unless someone put a new token into it in the
   meantime (theirs wins: it is a fresh chain). A write that fails otherwise is
   kept in memory and retried every pass, and the Secret is not refreshed
   again until it lands. The injectors see the Secret change through their
   watches: one write per refresh, whatever the number of pods.
4. `invalid_grant` / `invalid_client` (and other final errors) stop refreshing
   that Secret until its content changes: a Warning Event on the Secret and on
   each pod that uses it, and the status annotation. Network errors,
   timeouts, 5xx and 429 back off (capped, Retry-After honoured) while the
   current access token stays in the Secret until it expires.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agents.common.kube import EventRecorder, ObjectRef
from agents.common.leader import LeaderElector
from agents.common.watchcache import WatchCache
from agents.token_refresher.config import ControllerConfig
from agents.token_refresher.metrics import ControllerMetrics
from agents.token_refresher.oauth import (
    Backoff,
    FinalError,
    InsecureURLError,
    RetryableError,
    Token,
    TokenFormatError,
    check_token_url,
    decode_token_json,
)
from agents.token_refresher.spec import (
    OUR_PREFIX,
    STATUS,
    TOKEN_URL,
    SpecError,
    TokenSecret,
    annotation,
    is_token_secret,
    parse_to_inject,
    parse_token_secret,
)

log = logging.getLogger(__name__)

COMPONENT = "token-refresher-controller"
STATUS_ANNOTATION = f"{OUR_PREFIX}/{STATUS}"
CONFLICT = 409
NOT_FOUND = 404
# Pods warned about one Secret's final error, at most: an Event each.
MAX_POD_EVENTS = 100

RefreshCall = Callable[[str, Token, str, str], Token]
"""(token_url, token, client_id, client_secret) -> the new token; oauth.refresh bound."""


class _Unusable(Exception):
    """A Secret that cannot be refreshed as it is; `kind` labels it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _State:
    """What the controller knows about one token Secret."""

    uid: str
    digest: bytes = b""
    """Digest of the content last parsed (data + token URL; not our status)."""
    secret: TokenSecret | None = None
    token: Token | None = None
    token_url: str = ""
    due: float = math.inf
    failures: int = 0
    retry_at: float = 0.0
    final_digest: bytes = b""
    """Content a final error was seen with: no IdP call until it changes."""
    pending: Token | None = None
    """Refreshed but not yet in the Secret: written before anything else."""
    pending_from: str = ""
    """The refresh token `pending` was obtained with."""
    state: str = "ok"
    unreported: tuple[str, str, str] | None = None
    """(Event reason, message, status) to report once this replica leads:
    standbys parse too, but only the leader writes Events and annotations."""
    notice: tuple[str, str] | None = None
    """(Event reason, message) of a Warning about usable content, reported
    once per content like `unreported`."""
    version: str = ""
    version_digest: bytes = b""
    """The resourceVersion last seen and its content digest."""
    replaced: set[str] = field(default_factory=set)
    """resourceVersions our writes replaced: the cache may still show one of
    them for a moment, and that old content must not be taken as a change
    (its refresh token is spent)."""


def secret_digest(secret: dict[str, Any]) -> bytes:
    """What a change of the Secret means to us: its data and its token URL.

    Our own status annotation is left out, so writing it is not a change.
    """
    data = secret.get("data") or {}
    url = annotation((secret.get("metadata") or {}).get("annotations"), TOKEN_URL) or ""
    text = json.dumps([sorted(data.items()), url], separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()


def _key(secret: dict[str, Any]) -> str:
    meta = secret.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _ref(obj: dict[str, Any], kind: str = "Secret") -> ObjectRef:
    meta = obj.get("metadata") or {}
    return ObjectRef(kind, meta.get("name", ""), meta.get("namespace", ""), meta.get("uid", ""))


def _stamp(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Controller:
    """Refreshes token Secrets; `tick()` is one pass over them (the run loop calls it)."""

    def __init__(
        self,
        api_client: Any,
        config: ControllerConfig,
        *,
        refresh_fn: RefreshCall,
        metrics: ControllerMetrics,
        elector: LeaderElector | None,
        recorder: EventRecorder | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        from kubernetes import client

        self.config = config
        self.api_client = api_client
        self._core: Any = client.CoreV1Api(api_client)
        self._refresh = refresh_fn
        self._metrics = metrics
        self._elector = elector
        self._recorder = recorder
        self._clock = clock
        self._rng = rng or random.Random()
        self._backoff = Backoff(cap=config.backoff_cap, rng=self._rng)
        self._states: dict[str, _State] = {}
        self._unreachable: dict[str, float] = {}
        """Token URLs that timed out or refused, and until when (the failed
        Secret's retry time): the other Secrets of that IdP wait as long, so
        one silent IdP costs one timeout, not one per Secret."""
        self._next_due: float | None = None
        """When the next Secret is due (unix time), as of the last pass."""
        self.wake = threading.Event()
        """Set when a Secret changes: the run loop passes at once."""
        namespaces: list[str | None] = list(config.namespaces) or [None]
        self.caches = [
            WatchCache(
                api_client,
                "secrets",
                namespace=namespace,
                label_selector=config.secret_selector,
                keep=is_token_secret,
                on_change=self._changed,
            )
            for namespace in namespaces
        ]
        self._watch_counts = [(0, 0)] * len(self.caches)
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def add_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """Call `listener(type, secret)` on every change of a watched token Secret.

        From the watch threads: it must return quickly (the file server only
        marks the streams concerned). Add before `start()`.
        """
        self._listeners.append(listener)

    # -- life cycle

    def start(self) -> Controller:
        for cache in self.caches:
            cache.start()
        return self

    def stop(self) -> None:
        for cache in self.caches:
            cache.stop()

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(c.wait_synced(max(0.0, deadline - time.monotonic())) for c in self.caches)

    @property
    def synced(self) -> bool:
        return all(c.synced for c in self.caches)

    def _changed(self, type_: str, secret: dict[str, Any]) -> None:
        self.wake.set()
        for listener in self._listeners:
            listener(type_, secret)

    # -- one pass

    def tick(self) -> None:
        self._count_watches()
        if not self.synced:
            log.debug("waiting for the first list of token Secrets")
            return
        self._metrics.leader.set(1 if self._leading() else 0)
        now = self._clock()
        self._unreachable = {url: until for url, until in self._unreachable.items() if until > now}
        seen: set[str] = set()
        for cache in self.caches:
            for secret in cache.objects():
                key = _key(secret)
                seen.add(key)
                try:
                    self._visit(key, secret)
                except Exception:
                    # One Secret's surprise must not stop the others' refreshes.
                    log.exception("token Secret %s: unexpected failure", key)
                    if key in self._states:
                        # Again on the next regular pass, not on every wake-up.
                        state = self._states[key]
                        state.retry_at = max(state.retry_at, now + self.config.interval)
        for key in set(self._states) - seen:
            state = self._states.pop(key)
            if state.pending is not None:
                log.warning(
                    "token Secret %s was deleted before its refreshed token was written", key
                )
            self._metrics.expiries.remove(key)
        self._export_states()
        self._next_due = self._earliest_due() if self._leading() else None

    def next_due(self) -> float | None:
        """Seconds until the next Secret is due (the run loop wakes then), None:
        none is, or this replica does not lead (the interval stays the safety
        net). Without it a refresh waited for the next pass: up to an interval
        late, past the end of a short-lived refresh token."""
        return None if self._next_due is None else self._next_due - self._clock()

    def _earliest_due(self) -> float | None:
        times = []
        for state in self._states.values():
            if state.pending is not None:
                times.append(state.retry_at)  # the write is retried first
            elif state.token is not None and state.digest != state.final_digest:
                blocked = self._unreachable.get(state.token_url, 0.0)
                times.append(max(state.due, state.retry_at, blocked))
        return min(times, default=None)

    def _leading(self) -> bool:
        if self._elector is None:
            return True
        # The IdP call and the Secret write must end before another replica
        # may take over: the refresh token would be used twice.
        return self._elector.holds(self.config.idp.request_timeout + 5.0)

    def _visit(self, key: str, secret: dict[str, Any]) -> None:
        now = self._clock()
        uid = (secret.get("metadata") or {}).get("uid", "")
        state = self._states.get(key)
        if state is None or state.uid != uid:
            state = self._states[key] = _State(uid=uid)
        if state.pending is not None:
            # A refreshed token waits to be written: nothing else until it is.
            if now >= state.retry_at:
                self._persist(key, secret, state, now)
            return
        version = (secret.get("metadata") or {}).get("resourceVersion", "")
        if version in state.replaced:
            return  # our write is not in the cache yet
        state.replaced.clear()
        if version != state.version:
            # Hash the content only when the object changed (most passes see none).
            state.version, state.version_digest = version, secret_digest(secret)
        digest = state.version_digest
        if digest not in (state.digest, state.final_digest):
            self._adopt(key, secret, state, digest, now)
        if state.unreported is not None and self._leading():
            reason, message, status = state.unreported
            state.unreported = None
            if reason:
                self._report(secret, reason, message, status=status)
            else:
                self._set_status(secret, status)
        if state.notice is not None and self._leading():
            reason, message = state.notice
            state.notice = None
            self._event(secret, "Warning", reason, message)
        if digest == state.final_digest:
            return
        token = state.token
        assert token is not None and state.secret is not None
        self._metrics.expiries.set(key, token, now)
        if now < state.due or now < state.retry_at:
            return
        if self._unreachable.get(state.token_url, 0.0) > now:
            return  # another Secret of this IdP just timed out: not N timeouts per pass
        # Checked before every IdP call, not once per pass: a pass may take a while.
        if not self._leading():
            return
        if self.config.dry_run:
            log.info("dry run: would refresh token Secret %s now", key)
            state.due = now + self.config.idp.idle_window
            return
        self._refresh_secret(key, secret, state, token, now)

    def _adopt(
        self, key: str, secret: dict[str, Any], state: _State, digest: bytes, now: float
    ) -> None:
        """Parse new content; a Secret that cannot be used stops here until it changes."""
        state.digest = digest
        state.failures, state.retry_at = 0, 0.0
        try:
            parsed, token, url, foreign, stray = self._parse(secret, now)
        except _Unusable as err:
            state.final_digest = digest
            state.state = "invalid"
            self._metrics.refreshes.labels(err.kind).inc()
            log.error("token Secret %s cannot be refreshed: %s", key, err)
            state.unreported = ("InvalidTokenSecret", str(err), f"{err.kind}: {err}")
            return
        state.secret, state.token, state.token_url, state.state = parsed, token, url, "ok"
        status = ((secret.get("metadata") or {}).get("annotations") or {}).get(STATUS_ANNOTATION)
        # New content: an old complaint is moot (else nothing to say).
        state.unreported = ("", "", "ok") if status not in (None, "ok") else None
        state.notice = None
        if stray:
            # Accepted, but the owner should fix the source they copied it from.
            message = (
                f"key {parsed.token_key}: ignored {stray} stray '}}' after the token JSON "
                "object; the token is used, and the controller's next write of it drops them"
            )
            log.warning("token Secret %s: %s", key, message)
            state.notice = ("TokenJSONTrailingIgnored", message)
        if foreign:
            # No absolute expiry: written by another tool (the seed's controller
            # stores the IdP's response as it came) at a time we cannot know.
            # Refresh now rather than trust a relative expires_in.
            state.due = now
        else:
            state.due = token.refresh_due(
                now,
                fraction=self.config.idp.refresh_fraction,
                idle_window=self.config.idp.idle_window,
                min_interval=self.config.idp.min_refresh_interval,
                rng=self._rng,
            )
        log.debug("token Secret %s: next refresh at %s", key, _stamp(state.due))

    def _parse(
        self, secret: dict[str, Any], now: float
    ) -> tuple[TokenSecret, Token, str, bool, int]:
        """The Secret's parts, its token URL, whether another tool wrote the
        token (no absolute expiry), and the stray `}` ignored after its JSON."""
        try:
            parsed = parse_token_secret(secret)
        except SpecError as err:
            raise _Unusable("bad_secret", str(err)) from None
        try:
            data, stray = decode_token_json(parsed.token_json)
            token = Token.from_object(data, now)
            foreign = data.get("expires_at") is None
        except TokenFormatError as err:
            raise _Unusable("bad_token", f"key {parsed.token_key}: {err}") from None
        if not token.refresh_token:
            raise _Unusable("bad_token", f"key {parsed.token_key}: the token has no refresh_token")
        url = parsed.token_url or self.config.idp.token_url
        if not url:
            raise _Unusable(
                "no_token_url",
                f"no token URL: the controller has no --token-url and the Secret no "
                f"{OUR_PREFIX}/{TOKEN_URL} annotation",
            )
        try:
            check_token_url(url, allow_http=self.config.idp.allow_http)
        except InsecureURLError as err:
            raise _Unusable("bad_token_url", str(err)) from None
        allowed = self.config.idp.allowed_token_urls
        if parsed.token_url and allowed and not any(url.startswith(p) for p in allowed):
            raise _Unusable(
                "bad_token_url",
                f"token URL {url} is not one of the allowed ones ({', '.join(allowed)})",
            )
        return parsed, token, url, foreign, stray

    def _refresh_secret(
        self, key: str, secret: dict[str, Any], state: _State, token: Token, now: float
    ) -> None:
        assert state.secret is not None
        try:
            new = self._refresh(
                state.token_url, token, state.secret.client_id, state.secret.client_secret
            )
        except FinalError as err:
            state.final_digest = state.digest
            state.state = "stopped"
            self._metrics.refreshes.labels(err.kind).inc()
            log.error(
                "token Secret %s: refresh failed for good (%s): %s; no further attempt "
                "until the Secret changes",
                key,
                err.kind,
                err,
            )
            message = f"refresh failed for good: {err}; put a new token into the Secret"
            self._report(
                secret,
                "TokenRefreshFailed",
                message,
                status=f"{err.kind}: refresh stopped at {_stamp(now)}; update the Secret to resume",
                pods=True,
            )
            return
        except RetryableError as err:
            state.failures += 1
            state.state = "retrying"
            delay = self._backoff.next_delay(state.failures, err.retry_after)
            # From the failure, not the attempt: a timeout took a while already.
            state.retry_at = self._clock() + delay
            if err.kind in ("timeout", "connection"):
                self._unreachable[state.token_url] = state.retry_at
            self._metrics.refreshes.labels(err.kind).inc()
            left = token.lifetime(now)
            log.warning(
                "token Secret %s: refresh failed (%s): %s; retry in %.0fs, the current "
                "token stays (%s)",
                key,
                err.kind,
                err,
                delay,
                "no expiry" if left is None else f"expires in {left:.0f}s",
            )
            if state.failures == 1:
                self._event(
                    secret,
                    "Warning",
                    "TokenRefreshRetrying",
                    f"refresh failed ({err.kind}): {err}; retrying with backoff, the "
                    "current token stays in use until it expires",
                )
            return
        self._metrics.refreshes.labels("ok").inc()
        self._unreachable.pop(state.token_url, None)
        state.pending, state.pending_from = new, token.refresh_token
        state.retry_at = 0.0
        self._persist(key, secret, state, now)

    # -- the Secret write

    def _persist(self, key: str, secret: dict[str, Any], state: _State, now: float) -> bool:
        """Write `state.pending` to the Secret; True once it is there (or moot)."""
        new = state.pending
        assert new is not None and state.secret is not None
        current = secret
        for attempt in range(self.config.conflict_retries + 1):
            body = self._with_token(current, state.secret.token_key, new, now)
            state.replaced.add(current["metadata"].get("resourceVersion", ""))
            try:
                self._metrics.api_call("update", "secrets")
                meta = current["metadata"]
                response = self._core.replace_namespaced_secret(
                    meta["name"], meta["namespace"], body, _preload_content=False
                )
                written = json.loads(response.data)
            except Exception as err:
                status = getattr(err, "status", None)
                if status == CONFLICT and attempt < self.config.conflict_retries:
                    self._metrics.write_conflicts.inc()
                    log.info("token Secret %s changed while refreshing (409); re-reading", key)
                    fresh = self._read(current)
                    if fresh is None or not self._still_ours(key, fresh, state):
                        state.pending = None
                        return True
                    current = fresh
                    continue
                state.failures += 1
                state.retry_at = now + self._backoff.next_delay(state.failures)
                log.error(
                    "token Secret %s: cannot write the refreshed token (%s); kept in memory, "
                    "retrying in %.0fs",
                    key,
                    f"HTTP {status}" if status else f"{type(err).__name__}: {err}",
                    state.retry_at - now,
                )
                return False
            break
        else:  # pragma: no cover - the loop always breaks or returns
            return False
        state.pending, state.pending_from = None, ""
        state.failures, state.retry_at, state.state = 0, 0.0, "ok"
        state.digest = secret_digest(written)
        state.token = new
        state.due = new.refresh_due(
            now,
            fraction=self.config.idp.refresh_fraction,
            idle_window=self.config.idp.idle_window,
            min_interval=self.config.idp.min_refresh_interval,
            rng=self._rng,
        )
        self._metrics.expiries.set(key, new, now)
        log.info(
            "token Secret %s refreshed; expires in %s, next refresh at %s",
            key,
            "unknown" if new.expires_at is None else f"{new.expires_at - now:.0f}s",
            _stamp(state.due),
        )
        return True

    def _with_token(
        self, secret: dict[str, Any], token_key: str, token: Token, now: float
    ) -> dict[str, Any]:
        body = copy.deepcopy(secret)
        body.setdefault("data", {})[token_key] = base64.b64encode(
            token.to_json(now).encode()
        ).decode()
        body.pop("stringData", None)
        annotations = body["metadata"].setdefault("annotations", {})
        annotations[STATUS_ANNOTATION] = "ok"
        # The resourceVersion read stays in the body: the PUT is conditional on it.
        return body

    def _read(self, secret: dict[str, Any]) -> dict[str, Any] | None:
        meta = secret["metadata"]
        self._metrics.api_call("get", "secrets")
        try:
            response = self._core.read_namespaced_secret(
                meta["name"], meta["namespace"], _preload_content=False
            )
        except Exception as err:
            if getattr(err, "status", None) == NOT_FOUND:
                return None
            raise
        data: dict[str, Any] = json.loads(response.data)
        return data

    def _still_ours(self, key: str, fresh: dict[str, Any], state: _State) -> bool:
        """Whether the Secret still holds the token we refreshed from.

        If someone put another token into it meanwhile (a new login), that
        one is a fresh chain and wins; ours is dropped.
        """
        try:
            parsed = parse_token_secret(fresh)
            current = Token.from_json(parsed.token_json, self._clock())
        except (SpecError, TokenFormatError):
            current = None
        if current is not None and current.refresh_token == state.pending_from:
            return True
        log.warning(
            "token Secret %s got a new token while it was being refreshed; keeping the "
            "new one and dropping the refreshed one",
            key,
        )
        return False

    # -- reporting

    def _report(
        self,
        secret: dict[str, Any],
        reason: str,
        message: str,
        *,
        status: str,
        pods: bool = False,
    ) -> None:
        """A Warning Event on the Secret (and the pods using it), and the status annotation."""
        self._event(secret, "Warning", reason, message)
        if pods:
            for pod in self._pods_using(secret)[:MAX_POD_EVENTS]:
                about = f"token Secret {_key(secret)}: {message}"
                self._emit(_ref(pod, "Pod"), "Warning", reason, about)
        self._set_status(secret, status)

    def _event(self, secret: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self._emit(_ref(secret), type_, reason, message)

    def _emit(self, ref: ObjectRef, type_: str, reason: str, message: str) -> None:
        if self._recorder is None or self.config.dry_run:
            return
        self._metrics.api_call("create", "events")
        self._recorder.emit(ref, type_, reason, message)

    def _pods_using(self, secret: dict[str, Any]) -> list[dict[str, Any]]:
        meta = secret["metadata"]
        self._metrics.api_call("list", "pods")
        try:
            response = self._core.list_namespaced_pod(meta["namespace"], _preload_content=False)
            pods = json.loads(response.data).get("items") or []
        except Exception as err:
            log.warning("cannot list pods using token Secret %s: %s", _key(secret), err)
            return []
        using = []
        for pod in pods:
            try:
                entries = parse_to_inject((pod.get("metadata") or {}).get("annotations"))
            except SpecError:
                continue  # the injector reports those
            if any(entry.secret_name == meta["name"] for entry in entries):
                using.append(pod)
        return using

    def _set_status(self, secret: dict[str, Any], status: str) -> None:
        meta = secret["metadata"]
        if (meta.get("annotations") or {}).get(STATUS_ANNOTATION) == status or self.config.dry_run:
            return
        self._metrics.api_call("patch", "secrets")
        try:
            self._core.patch_namespaced_secret(
                meta["name"],
                meta["namespace"],
                {"metadata": {"annotations": {STATUS_ANNOTATION: status[:1024]}}},
                _preload_content=False,
            )
        except Exception as err:
            log.warning("cannot set the status of token Secret %s: %s", _key(secret), err)

    def _export_states(self) -> None:
        counts = {"ok": 0, "retrying": 0, "stopped": 0, "invalid": 0}
        unpersisted = 0
        for state in self._states.values():
            counts[state.state] = counts.get(state.state, 0) + 1
            unpersisted += state.pending is not None
        for name, count in counts.items():
            self._metrics.token_secrets.labels(name).set(count)
        self._metrics.unpersisted.set(unpersisted)

    def _count_watches(self) -> None:
        """Turn the caches' list/watch counters into api_calls increments."""
        for i, cache in enumerate(self.caches):
            lists, watches = cache.lists, cache.watches
            seen_lists, seen_watches = self._watch_counts[i]
            if lists > seen_lists:
                self._metrics.api_calls.labels("list", "secrets").inc(lists - seen_lists)
            if watches > seen_watches:
                self._metrics.api_calls.labels("watch", "secrets").inc(watches - seen_watches)
            self._watch_counts[i] = (lists, watches)
