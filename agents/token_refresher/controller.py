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

Refreshes run on a bounded pool of workers (`refresh_workers`), at most
`refresh_per_host` at a time against one IdP host, each request under one
deadline (oauth.refresh): a slow or hostile token endpoint holds only its own
Secrets' refreshes. The pass itself calls no IdP: it parses, reports and hands
due Secrets to the workers. One Secret is refreshed by one worker at a time,
and the pass leaves a Secret alone while a worker has it; the worker checks the
Lease right before the IdP call and writes the new token before anything else.

The pass and the workers report progress; one that goes `stall_limit`
seconds without any makes `stalled()` say so, and the Lease is then no
longer renewed (leader.py's `health`): a standby takes over rather than
every refresh waiting behind a replica that is stuck.

A Secret's own token URL is used only if the controller's `--token-url` or
one of `--allowed-token-urls` covers it (oauth.TokenURL.covers: scheme, host,
port and a path prefix, all normalised); any other gets a Warning Event and a
status, and no request is made.
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
    TokenURL,
    allowed_token_url,
    decode_token_json,
    parse_token_url,
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
API_TIMEOUT = 10.0
"""Seconds for each Kubernetes API request the pass or a worker makes: a hung
API server must not hold them (the kubernetes client has no timeout of its own)."""

RefreshCall = Callable[[str, Token, str, str], Token]
"""(token_url, token, client_id, client_secret) -> the new token; oauth.refresh bound."""


class _Unusable(Exception):
    """A Secret that cannot be refreshed as it is; `kind` labels it (metric,
    status), `reason` is its Event's."""

    def __init__(self, kind: str, message: str, reason: str = "InvalidTokenSecret") -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason


class Progress:
    """When the pass and each worker last moved on, to tell one that is stuck.

    Every step they take is bounded (the IdP request by its deadline, each API
    request by API_TIMEOUT), so a gap longer than that is a bug or a hang the
    bounds missed: `stalled` names it, and the Lease is not renewed.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._working: dict[int, tuple[str, float]] = {}

    @contextmanager
    def working(self, what: str) -> Iterator[None]:
        """The current thread works on `what` until the block ends."""
        ident = threading.get_ident()
        with self._lock:
            self._working[ident] = (what, self._clock())
        try:
            yield
        finally:
            with self._lock:
                self._working.pop(ident, None)

    def touch(self) -> None:
        """The current thread made progress (it starts a new bounded step)."""
        ident = threading.get_ident()
        with self._lock:
            entry = self._working.get(ident)
            if entry is not None:
                self._working[ident] = (entry[0], self._clock())

    def oldest(self) -> tuple[str, float] | None:
        """What has gone longest without progress, and for how many seconds."""
        now = self._clock()
        with self._lock:
            if not self._working:
                return None
            what, since = min(self._working.values(), key=lambda entry: entry[1])
        return what, now - since


@dataclass
class _State:
    """What the controller knows about one token Secret."""

    uid: str
    digest: bytes = b""
    """Digest of the content last parsed (data + token URL; not our status)."""
    secret: TokenSecret | None = None
    token: Token | None = None
    token_url: str = ""
    """The canonical URL (oauth.TokenURL.url) the refresh is sent to."""
    host: str = ""
    """`host:port` of the token URL: the unit of the per-host limit."""
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
        self._lock = threading.Lock()
        """Guards what the workers share with the pass: the three below."""
        self._unreachable: dict[str, float] = {}
        """Token URLs that timed out or refused, and until when (the failed
        Secret's retry time): the other Secrets of that IdP wait as long, so
        one silent IdP costs one timeout per worker it holds, not one per Secret."""
        self._busy: set[str] = set()
        """Secrets a worker has: the pass leaves them alone until it is done."""
        self._per_host: dict[str, int] = {}
        """Refreshes in flight per `host:port`."""
        self._idle = threading.Condition(self._lock)
        self._pool = ThreadPoolExecutor(
            max_workers=config.refresh_workers, thread_name_prefix="refresh"
        )
        self.progress = Progress()
        idp = config.idp
        self._default_url = (
            parse_token_url(idp.token_url, allow_http=idp.allow_http, what="--token-url")
            if idp.token_url
            else None
        )
        self._allowed: tuple[TokenURL, ...] = tuple(
            parse_token_url(entry, allow_http=idp.allow_http, what="--allowed-token-urls entry")
            for entry in idp.allowed_token_urls
        ) + ((self._default_url,) if self._default_url is not None else ())
        """What a Secret's own token URL must be covered by: the admin's URLs."""
        metrics.in_flight.set_function(lambda: len(self._busy))
        metrics.stalled.set_function(self._stalled_seconds)
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
        # Each job ends within the IdP deadline and its API timeouts.
        self._pool.shutdown(wait=True, cancel_futures=True)

    def drain(self, timeout: float) -> bool:
        """Wait until no refresh is in flight (`--once`); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._busy, timeout)

    def stalled(self) -> str | None:
        """Why this replica must not lead: the pass or a worker has gone
        `stall_limit` seconds without progress; None: all is moving."""
        oldest = self.progress.oldest()
        if oldest is None or oldest[1] <= self.config.stall_limit:
            return None
        what, seconds = oldest
        return f"{what} made no progress for {seconds:.0f} s (limit {self.config.stall_limit:g} s)"

    def _stalled_seconds(self) -> float:
        oldest = self.progress.oldest()
        return 0.0 if oldest is None else oldest[1]

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
        with self.progress.working("the refresh pass"):
            self._pass()

    def _pass(self) -> None:
        self._count_watches()
        if not self.synced:
            log.debug("waiting for the first list of token Secrets")
            return
        self._metrics.leader.set(1 if self._leading() else 0)
        now = self._clock()
        with self._lock:
            self._unreachable = {u: until for u, until in self._unreachable.items() if until > now}
        seen: set[str] = set()
        for cache in self.caches:
            for secret in cache.objects():
                key = _key(secret)
                seen.add(key)
                self.progress.touch()
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
            state = self._states.pop(key)  # a worker that has it finishes with it
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
        with self._lock:
            busy, unreachable = set(self._busy), dict(self._unreachable)
        for key, state in self._states.items():
            if key in busy:
                continue  # its worker wakes the loop when done
            if state.pending is not None:
                times.append(state.retry_at)  # the write is retried first
            elif state.token is not None and state.digest != state.final_digest:
                blocked = unreachable.get(state.token_url, 0.0)
                times.append(max(state.due, state.retry_at, blocked))
        return min(times, default=None)

    def _leading(self) -> bool:
        if self._elector is None:
            return True
        # The IdP call and the Secret write must end before another replica
        # may take over: the refresh token would be used twice.
        return self._elector.holds(self.config.idp.request_timeout + 5.0)

    def _visit(self, key: str, secret: dict[str, Any]) -> None:
        with self._lock:
            if key in self._busy:
                return  # a worker has it: its refresh and write come first
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
        with self._lock:
            if self._unreachable.get(state.token_url, 0.0) > now:
                return  # another Secret of this IdP just timed out: not N timeouts per pass
        # Checked here and again by the worker right before the IdP call.
        if not self._leading():
            return
        if self.config.dry_run:
            log.info("dry run: would refresh token Secret %s now", key)
            state.due = now + self.config.idp.idle_window
            return
        self._dispatch(key, secret, state, token)

    def _dispatch(self, key: str, secret: dict[str, Any], state: _State, token: Token) -> None:
        """Hand the refresh to a worker, if one is free and the IdP's host has
        a slot; else the Secret stays due and a finishing worker wakes the pass."""
        with self._lock:
            if (
                len(self._busy) >= self.config.refresh_workers
                or self._per_host.get(state.host, 0) >= self.config.refresh_per_host
            ):
                return
            self._busy.add(key)
            self._per_host[state.host] = self._per_host.get(state.host, 0) + 1
        try:
            self._pool.submit(self._refresh_job, key, secret, state, token)
        except RuntimeError:  # shut down: stop() is under way
            self._release(key, state)

    def _refresh_job(self, key: str, secret: dict[str, Any], state: _State, token: Token) -> None:
        """A worker: the IdP call, then the Secret write, for one Secret."""
        try:
            with self.progress.working(f"the refresh of token Secret {key}"):
                # The job may have waited: the Lease must outlast the call and write.
                if not self._leading():
                    return
                self._refresh_secret(key, secret, state, token, self._clock())
        except Exception:
            log.exception("token Secret %s: unexpected failure while refreshing", key)
            state.retry_at = max(state.retry_at, self._clock() + self.config.interval)
        finally:
            self._release(key, state)

    def _release(self, key: str, state: _State) -> None:
        with self._idle:
            self._busy.discard(key)
            left = self._per_host.get(state.host, 1) - 1
            if left > 0:
                self._per_host[state.host] = left
            else:
                self._per_host.pop(state.host, None)
            self._idle.notify_all()
        self.wake.set()

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
            state.unreported = (err.reason, str(err), f"{err.kind}: {err}")
            return
        state.secret, state.token, state.state = parsed, token, "ok"
        state.token_url, state.host = url.url, f"{url.host}:{url.port}"
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
    ) -> tuple[TokenSecret, Token, TokenURL, bool, int]:
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
        if not parsed.token_url:
            if self._default_url is None:
                raise _Unusable(
                    "no_token_url",
                    f"no token URL: the controller has no --token-url and the Secret no "
                    f"{OUR_PREFIX}/{TOKEN_URL} annotation",
                )
            return parsed, token, self._default_url, foreign, stray
        # The tenant's URL: the refresh token and client secret go there, from
        # inside the cluster network. Only where the admin said they may.
        try:
            url = parse_token_url(parsed.token_url, allow_http=self.config.idp.allow_http)
        except InsecureURLError as err:
            raise _Unusable("token_url_refused", str(err), "TokenURLRefused") from None
        if not allowed_token_url(url, self._allowed):
            allowed = ", ".join(entry.url for entry in self._allowed) or "none"
            raise _Unusable(
                "token_url_refused",
                f"token URL {url.url[:120]} is not allowed: the controller sends refresh "
                f"tokens and client secrets only to its --token-url and --allowed-token-urls "
                f"(same scheme, host and port, path at or below theirs): {allowed[:600]}",
                "TokenURLRefused",
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
            self.progress.touch()
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
            self.progress.touch()
            state.failures += 1
            state.state = "retrying"
            delay = self._backoff.next_delay(state.failures, err.retry_after)
            # From the failure, not the attempt: a timeout took a while already.
            state.retry_at = self._clock() + delay
            if err.kind in ("timeout", "connection"):
                with self._lock:
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
        self.progress.touch()
        self._metrics.refreshes.labels("ok").inc()
        with self._lock:
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
                self._api_call("update", "secrets")
                meta = current["metadata"]
                response = self._core.replace_namespaced_secret(
                    meta["name"],
                    meta["namespace"],
                    body,
                    _preload_content=False,
                    _request_timeout=API_TIMEOUT,
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
        self._api_call("get", "secrets")
        try:
            response = self._core.read_namespaced_secret(
                meta["name"],
                meta["namespace"],
                _preload_content=False,
                _request_timeout=API_TIMEOUT,
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
        self._api_call("create", "events")
        self._recorder.emit(ref, type_, reason, message)

    def _pods_using(self, secret: dict[str, Any]) -> list[dict[str, Any]]:
        meta = secret["metadata"]
        self._api_call("list", "pods")
        try:
            response = self._core.list_namespaced_pod(
                meta["namespace"], _preload_content=False, _request_timeout=API_TIMEOUT
            )
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
        self._api_call("patch", "secrets")
        try:
            self._core.patch_namespaced_secret(
                meta["name"],
                meta["namespace"],
                {"metadata": {"annotations": {STATUS_ANNOTATION: status[:1024]}}},
                _preload_content=False,
                _request_timeout=API_TIMEOUT,
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

    def _api_call(self, verb: str, resource: str) -> None:
        """Count an API request about to be made; starting it is progress."""
        self.progress.touch()
        self._metrics.api_call(verb, resource)

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
