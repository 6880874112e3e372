"""The pods bound to one node, kept current by LIST + WATCH in a background thread.

What the kubelet does for its own node, in miniature: LIST
`/api/v1/pods?fieldSelector=spec.nodeName=<node>`, then WATCH from the list's
resourceVersion with `timeoutSeconds` (the apiserver ends the watch then, so it
restarts regularly and a silently dead connection is noticed) and bookmarks.

- A watch that ends normally resumes from the last resourceVersion seen (an
  event's or a bookmark's): no new LIST.
- 410 Gone (the resourceVersion was compacted away, "Expired": an ApiException
  with status 410, or an ERROR event whose Status has code 410) relists from
  scratch and replaces the cache; pods deleted in the meantime disappear and
  `on_change` hears DELETED for them.
- Any other failure (5xx, 429, 401/403, urllib3 and connection errors, a dead
  connection noticed by the read timeout) backs off exponentially with jitter
  and retries the same step; the thread never dies. One warning per streak.

Pods are stored as the plain JSON dicts the apiserver sent, keyed by
metadata.uid: the LIST is made with `_preload_content=False` and parsed here, and
watch events are taken raw (`Watch.get_return_type` answers None), so no
generated model is ever built. That skips the client's model construction and
`sanitize_for_serialization` on every event, and gives callers the same
camelCase shape as `kubectl get -o json`. Stored dicts are replaced, never
changed in place: treat them as read-only.

Stop bound: `stop()` sets the stop event and calls `Watch.stop()` on the open
watch, repeatedly until the thread is gone (that covers a watch that was still
connecting). With kubernetes 37, `Watch.stop()` shuts the watch's socket down,
which ends a blocked read at once, so the thread ends within about `STOP_POLL`
(0.05 s) while watching or backing off, and within `request_timeout` if a LIST
is in flight. With an older client whose `Watch.stop()` only sets a flag, an
idle watch ends at the next event, at the latest after `timeout_seconds`. In
every case `stop(timeout)` itself returns after at most `timeout` seconds
(default 5) and says whether the thread ended; the thread is a daemon.

`kubernetes` is imported lazily, inside the methods that use it: importing this
module costs nothing (the client costs ~44 MB of RSS).
"""

from __future__ import annotations

import functools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

Pod = dict[str, Any]
OnChange = Callable[[str, Pod], None]

# How often stop() re-pokes the watch while it waits for the thread.
STOP_POLL = 0.05
# HTTP 410 Gone: the requested resourceVersion is older than etcd keeps
# (https://kubernetes.io/docs/reference/using-api/api-concepts/#410-gone-responses).
GONE = 410


class PodWatchError(RuntimeError):
    """An ERROR event in the watch stream (a metav1.Status), other than 410."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(f"watch ERROR event: {code} {message}")
        self.code = code


class _Gone(Exception):
    """The resourceVersion we resume from has been compacted: relist."""


@functools.cache
def _raw_watch_class() -> Any:
    """`kubernetes.watch.Watch` that yields events with the object as a plain dict.

    `Watch.unmarshal_event` returns the event undecoded when the return type is
    falsy (since the first releases); ERROR events still raise ApiException.
    """
    from kubernetes import watch

    class RawWatch(watch.Watch):  # type: ignore[misc,unused-ignore]  # Any without the client
        def get_return_type(self, func: Any) -> None:
            return None

    return RawWatch


def _status_of(err: BaseException) -> int | None:
    """The HTTP status of an ApiException (its subclasses too), else None."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(err, ApiException):
        status = err.status
        return status if isinstance(status, int) else None
    return None


class NodePodCache:
    """A thread-safe cache of the pods bound to `node_name`, by list+watch.

    `api_client` is a `kubernetes.client.ApiClient` (injected; the caller closes
    it). Counters `lists`, `watches`, `relists_after_gone` and `errors` only
    grow; agents export them as Prometheus counters.
    """

    def __init__(
        self,
        api_client: Any,
        node_name: str,
        *,
        timeout_seconds: int = 300,
        request_timeout: float = 30.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        on_change: OnChange | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not node_name:
            raise ValueError("node_name must not be empty")
        if timeout_seconds < 1:
            raise ValueError("timeout_seconds must be at least 1")
        self.api_client = api_client
        self.node_name = node_name
        self.field_selector = f"spec.nodeName={node_name}"
        self.timeout_seconds = int(timeout_seconds)
        self.request_timeout = float(request_timeout)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.on_change = on_change
        self._jitter = jitter

        self.lists = 0
        self.watches = 0
        self.relists_after_gone = 0
        self.errors = 0

        self._lock = threading.Lock()
        self._pods: dict[str, Pod] = {}
        self._resource_version = ""
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._watch: Any = None  # the open Watch, for stop()
        self._thread: threading.Thread | None = None
        self._streak = 0  # consecutive failures
        self._gone_streak = 0  # consecutive 410s with no watch event in between

    # -- life cycle

    def start(self) -> NodePodCache:
        """Start the list+watch thread (a daemon); once per cache."""
        if self._thread is not None:
            raise RuntimeError("NodePodCache.start() called twice")
        self._thread = threading.Thread(
            target=self._run, name=f"podwatch-{self.node_name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread; True when it ended within `timeout` seconds (module docstring)."""
        self._stopping.set()
        thread = self._thread
        if thread is None:
            return True
        deadline = time.monotonic() + timeout
        while thread.is_alive():
            with self._lock:
                watch = self._watch
            if watch is not None:
                # Shuts the socket down (kubernetes 37); stream() resets the flag
                # when it starts, so poke again until the thread is gone.
                watch.stop()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            thread.join(min(STOP_POLL, left))
        return not thread.is_alive()

    def __enter__(self) -> NodePodCache:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- reads (any thread)

    @property
    def synced(self) -> bool:
        """True once the first LIST succeeded (later failures keep the last state)."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    @property
    def resource_version(self) -> str:
        """The resourceVersion the next watch starts from ("" before the first LIST)."""
        with self._lock:
            return self._resource_version

    def get(self, uid: str) -> Pod | None:
        with self._lock:
            return self._pods.get(uid)

    def by_uid(self) -> dict[str, Pod]:
        """A snapshot: a new mapping of uid -> pod (the pod dicts are shared, read-only)."""
        with self._lock:
            return dict(self._pods)

    def pods(self) -> list[Pod]:
        with self._lock:
            return list(self._pods.values())

    # -- the thread

    def _run(self) -> None:
        from kubernetes import client

        api: Any = client.CoreV1Api(self.api_client)
        need_list = True
        while not self._stopping.is_set():
            try:
                if need_list:
                    self._list(api)
                    need_list = False
                    self._succeeded()
                if self._watch_once(api):
                    self._succeeded()
            except _Gone:
                # Relist now; a second 410 in a row with no event in between
                # (the list itself was already too old) backs off first.
                self.relists_after_gone += 1
                need_list = True
                self._gone_streak += 1
                log.info(
                    "pod watch for node %s: resourceVersion %s expired (410), relisting",
                    self.node_name,
                    self.resource_version,
                )
                if self._gone_streak > 1:
                    self._stopping.wait(self._backoff(self._gone_streak - 1))
            except Exception as err:
                if self._stopping.is_set():
                    break  # stop() broke the connection on purpose
                self._failed("list" if need_list else "watch", err)
        with self._lock:
            self._watch = None

    def _list(self, api: Any) -> None:
        """LIST the node's pods and replace the cache with them."""
        self.lists += 1
        # A LIST with no resourceVersion is a consistent read: never older than
        # what a previous watch delivered. No paging: a node runs at most a few
        # hundred pods (kubelet --max-pods, 110 by default).
        response = api.list_pod_for_all_namespaces(
            field_selector=self.field_selector,
            _preload_content=False,
            _request_timeout=(self.request_timeout, self.request_timeout),
        )
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        pods: dict[str, Pod] = {}
        for item in body.get("items") or []:
            # List items carry no apiVersion/kind; watch objects do.
            item.setdefault("apiVersion", "v1")
            item.setdefault("kind", "Pod")
            uid = (item.get("metadata") or {}).get("uid")
            if uid:
                pods[uid] = item
        resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        with self._lock:
            old, self._pods = self._pods, pods
            self._resource_version = resource_version
        self._synced.set()
        log.debug(
            "pod list for node %s: %d pods at resourceVersion %s",
            self.node_name,
            len(pods),
            resource_version,
        )
        self._notify(_diff(old, pods))

    def _watch_once(self, api: Any) -> bool:
        """One WATCH from the current resourceVersion until the server ends it.

        True when it ended normally (or delivered an event); raises _Gone on 410.
        """
        watch = _raw_watch_class()()
        with self._lock:
            self._watch = watch
        if self._stopping.is_set():
            return False
        self.watches += 1
        stream: Iterator[Any] = watch.stream(
            api.list_pod_for_all_namespaces,
            field_selector=self.field_selector,
            resource_version=self.resource_version,
            timeout_seconds=self.timeout_seconds,
            allow_watch_bookmarks=True,
            # Read timeout: the server ends the watch after timeout_seconds; silence
            # for longer than that means a dead connection.
            _request_timeout=(self.request_timeout, self.timeout_seconds + self.request_timeout),
        )
        try:
            for event in stream:
                if not isinstance(event, dict):
                    continue  # blank keep-alive lines
                self._apply(event)
                self._gone_streak = 0
                self._succeeded()
        except Exception as err:
            if _status_of(err) == GONE:
                raise _Gone from err
            raise
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # the generator's finally releases the connection
            with self._lock:
                self._watch = None
        self._gone_streak = 0
        return not self._stopping.is_set()

    def _apply(self, event: dict[str, Any]) -> None:
        type_ = event.get("type")
        obj = event.get("raw_object", event.get("object"))
        if not isinstance(obj, dict):
            return
        if type_ == "ERROR":
            # The client raises these as ApiException; older ones may yield them.
            code = obj.get("code")
            if code == GONE:
                raise _Gone(obj.get("message", ""))
            raise PodWatchError(code if isinstance(code, int) else None, obj.get("message", ""))
        meta = obj.get("metadata") or {}
        resource_version = meta.get("resourceVersion")
        uid = meta.get("uid")
        with self._lock:
            if resource_version:
                self._resource_version = str(resource_version)
            if type_ in ("ADDED", "MODIFIED") and uid:
                self._pods[uid] = obj
            elif type_ == "DELETED" and uid:
                self._pods.pop(uid, None)
            else:
                # BOOKMARK (only the resourceVersion counts) or an unknown type.
                return
        self._notify([(str(type_), obj)])

    def _notify(self, changes: list[tuple[str, Pod]]) -> None:
        """Call on_change for each change, outside the lock; its errors are logged."""
        if self.on_change is None:
            return
        for type_, pod in changes:
            try:
                self.on_change(type_, pod)
            except Exception:
                log.exception("pod watch for node %s: on_change(%s) failed", self.node_name, type_)

    # -- backoff

    def _backoff(self, failures: int) -> float:
        """Exponential with equal jitter: in [d/2, d], d = min(cap, base * 2**(failures-1))."""
        delay = min(self.backoff_cap, self.backoff_base * 2.0 ** min(failures - 1, 32))
        return delay * (0.5 + 0.5 * self._jitter())

    def _failed(self, step: str, err: Exception) -> None:
        self.errors += 1
        self._streak += 1
        delay = self._backoff(self._streak)
        status = _status_of(err)
        what = f"HTTP {status}" if status else type(err).__name__
        if self._streak == 1:
            # Unexpected error types get a traceback: they are likely our bugs.
            expected = status is not None or _is_network_error(err)
            log.warning(
                "pod %s for node %s failed (%s: %s); retrying with backoff",
                step,
                self.node_name,
                what,
                _describe(err),
                exc_info=None if expected else err,
            )
        else:
            log.debug(
                "pod %s for node %s failed again (%s), failure %d, next try in %.2fs",
                step,
                self.node_name,
                what,
                self._streak,
                delay,
            )
        self._stopping.wait(delay)

    def _succeeded(self) -> None:
        if self._streak:
            log.info(
                "pod watch for node %s works again after %d failures",
                self.node_name,
                self._streak,
            )
            self._streak = 0


def _diff(old: dict[str, Pod], new: dict[str, Pod]) -> list[tuple[str, Pod]]:
    """What changed between two lists, as watch events (a relist replaces the cache)."""
    changes: list[tuple[str, Pod]] = []
    for uid, pod in new.items():
        before = old.get(uid)
        if before is None:
            changes.append(("ADDED", pod))
        elif _rv(before) != _rv(pod):
            changes.append(("MODIFIED", pod))
    changes.extend(("DELETED", pod) for uid, pod in old.items() if uid not in new)
    return changes


def _rv(pod: Pod) -> Any:
    return (pod.get("metadata") or {}).get("resourceVersion")


def _is_network_error(err: BaseException) -> bool:
    import urllib3

    return isinstance(err, OSError | urllib3.exceptions.HTTPError)


def _describe(err: BaseException) -> str:
    """One short line: the Status message of an API error, else the exception text.

    (str() of an ApiException spans lines and carries headers and body.)
    """
    text = ""
    if _status_of(err) is not None:
        body = getattr(err, "body", None)
        try:
            status = json.loads(body) if body else {}
        except ValueError:
            status = {}
        message = status.get("message") if isinstance(status, dict) else None
        text = str(message or getattr(err, "reason", "") or "")
    text = text or str(err)
    return " ".join(text.split())[:300] or type(err).__name__
