"""Core/v1 objects kept current by LIST + WATCH in a background thread.

`WatchCache` holds one type (pods, Secrets, ConfigMaps) in all namespaces or
one, narrowed by field and label selectors and by a `keep` predicate applied
on arrival (objects it refuses are never stored); a `transform` may slim each
object before it is stored (client-go's informer `SetTransform`, used there to
drop managedFields: what is stored is what stays in memory). `NodePodCache` is the
kubelet's view in miniature: LIST
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

Objects are stored as the plain JSON dicts the apiserver sent, keyed by
metadata.uid (and found by namespace/name too): the LIST is made with
`_preload_content=False` and parsed here, and watch events are taken raw
(`Watch.get_return_type` answers None), so no generated model is ever
built. That skips the client's model construction and
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

from agents.common.kube import is_network_error, reachability

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Pod = Obj
OnChange = Callable[[str, Obj], None]
Keep = Callable[[Obj], bool]
Transform = Callable[[Obj], Obj]

# Resource -> the CoreV1Api method suffix that lists it.
_LISTED = {"pods": "pod", "secrets": "secret", "configmaps": "config_map"}

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


class WatchCache:
    """A thread-safe cache of one core/v1 resource, by list+watch.

    `api_client` is a `kubernetes.client.ApiClient` (injected; the caller closes
    it). `resource` is "pods", "secrets" or "configmaps"; `namespace` None
    watches every namespace. `keep` decides, per object as it arrives, whether
    it is stored; one that stops being kept is dropped and reported DELETED.
    `transform` returns what is stored of a kept object (and what `on_change`
    hears): a new dict, keeping metadata's name, namespace, uid and
    resourceVersion. `page_size` > 0 LISTs in pages of that many objects
    (`limit`/`continue`), so that a large LIST is never parsed whole at once.
    Counters `lists`, `watches`, `relists_after_gone` and `errors` only grow;
    agents export them as Prometheus counters (they are the API calls made).
    """

    def __init__(
        self,
        api_client: Any,
        resource: str,
        *,
        namespace: str | None = None,
        field_selector: str = "",
        label_selector: str = "",
        keep: Keep | None = None,
        transform: Transform | None = None,
        page_size: int = 0,
        timeout_seconds: int = 300,
        request_timeout: float = 30.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        on_change: OnChange | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if resource not in _LISTED:
            raise ValueError(f"unsupported resource {resource!r}; one of {sorted(_LISTED)}")
        if namespace == "":
            raise ValueError("namespace must be None (all) or a name")
        if timeout_seconds < 1:
            raise ValueError("timeout_seconds must be at least 1")
        self.api_client = api_client
        self.resource = resource
        self.namespace = namespace
        self.field_selector = field_selector
        self.label_selector = label_selector
        self.keep = keep
        self.transform = transform
        self.page_size = max(0, int(page_size))
        self.timeout_seconds = int(timeout_seconds)
        self.request_timeout = float(request_timeout)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.on_change = on_change
        self._jitter = jitter
        self.what = " ".join(
            part
            for part in (
                resource,
                f"in {namespace}" if namespace else "",
                f"({field_selector})" if field_selector else "",
            )
            if part
        )

        self.lists = 0
        self.watches = 0
        self.relists_after_gone = 0
        self.errors = 0

        self._lock = threading.Lock()
        self._objects: dict[str, Obj] = {}
        self._names: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid
        self._resource_version = ""
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._watch: Any = None  # the open Watch, for stop()
        self._thread: threading.Thread | None = None
        self._streak = 0  # consecutive failures
        self._streak_is_outage = False  # its last failures got no answer: reported as an outage
        self._reachability = reachability(api_client)
        self._gone_streak = 0  # consecutive 410s with no watch event in between

    # -- life cycle

    def start(self) -> WatchCache:
        """Start the list+watch thread (a daemon); once per cache."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._thread = threading.Thread(
            target=self._run, name=f"watch-{self.resource}-{self.namespace or 'all'}", daemon=True
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

    def __enter__(self) -> WatchCache:
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

    def get(self, uid: str) -> Obj | None:
        with self._lock:
            return self._objects.get(uid)

    def named(self, namespace: str, name: str) -> Obj | None:
        """The object called `name` in `namespace`, if stored."""
        with self._lock:
            uid = self._names.get((namespace, name))
            return None if uid is None else self._objects.get(uid)

    def by_uid(self) -> dict[str, Obj]:
        """A snapshot: a new mapping of uid -> object (the dicts are shared, read-only)."""
        with self._lock:
            return dict(self._objects)

    def objects(self) -> list[Obj]:
        with self._lock:
            return list(self._objects.values())

    # -- the thread

    def _run(self) -> None:
        from kubernetes import client

        core: Any = client.CoreV1Api(self.api_client)
        singular = _LISTED[self.resource]
        if self.namespace is None:
            lister = getattr(core, f"list_{singular}_for_all_namespaces")
        else:
            lister = functools.partial(getattr(core, f"list_namespaced_{singular}"), self.namespace)
        need_list = True
        while not self._stopping.is_set():
            try:
                if need_list:
                    self._list(lister)
                    need_list = False
                    self._succeeded()
                if self._watch_once(lister):
                    self._succeeded()
            except _Gone:
                # Relist now; a second 410 in a row with no event in between
                # (the list itself was already too old) backs off first.
                self.relists_after_gone += 1
                need_list = True
                self._gone_streak += 1
                log.info(
                    "watch of %s: resourceVersion %s expired (410), relisting",
                    self.what,
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

    def _list(self, lister: Any) -> None:
        """LIST and replace the cache with the result."""
        self.lists += 1
        # A LIST with no resourceVersion is a consistent read: never older than
        # what a previous watch delivered. Pages (page_size) are one snapshot:
        # each `continue` token carries the first page's resourceVersion, and
        # the last page's metadata.resourceVersion is that snapshot's
        # (api-concepts, "Retrieving large results sets in chunks"); an
        # expired token (410) fails this LIST, which is retried whole.
        kind = _KINDS[self.resource]
        objects: dict[str, Obj] = {}
        token = ""
        while True:
            paging: dict[str, Any] = {}
            if self.page_size:
                paging["limit"] = self.page_size
            if token:
                paging["_continue"] = token
            response = lister(
                **self._selectors(),
                **paging,
                _preload_content=False,
                _request_timeout=(self.request_timeout, self.request_timeout),
            )
            try:
                body = json.loads(response.data)
            finally:
                response.release_conn()
            for item in body.get("items") or []:
                # List items carry no apiVersion/kind; watch objects do.
                item.setdefault("apiVersion", "v1")
                item.setdefault("kind", kind)
                uid = (item.get("metadata") or {}).get("uid")
                if uid and self._kept(item):
                    objects[uid] = self._stored(item)
            meta = body.get("metadata") or {}
            token = str(meta.get("continue") or "") if self.page_size else ""
            if not token:
                break
            del body  # the parsed page: only what is stored stays
        resource_version = str(meta.get("resourceVersion") or "")
        with self._lock:
            old, self._objects = self._objects, objects
            self._names = {_name_of(obj): uid for uid, obj in objects.items()}
            self._resource_version = resource_version
        self._synced.set()
        log.debug(
            "list of %s: %d objects at resourceVersion %s",
            self.what,
            len(objects),
            resource_version,
        )
        self._notify(_diff(old, objects))

    def _selectors(self) -> dict[str, str]:
        selectors = {}
        if self.field_selector:
            selectors["field_selector"] = self.field_selector
        if self.label_selector:
            selectors["label_selector"] = self.label_selector
        return selectors

    def _kept(self, obj: Obj) -> bool:
        if self.keep is None:
            return True
        try:
            return self.keep(obj)
        except Exception:
            log.exception("watch of %s: keep() failed; not storing the object", self.what)
            return False

    def _stored(self, obj: Obj) -> Obj:
        """What is kept of an object (`transform`); the object itself if that fails."""
        if self.transform is None:
            return obj
        try:
            return self.transform(obj)
        except Exception:
            log.exception("watch of %s: transform() failed; storing the object whole", self.what)
            return obj

    def _watch_once(self, lister: Any) -> bool:
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
            lister,
            **self._selectors(),
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
        if type_ in ("ADDED", "MODIFIED") and uid and not self._kept(obj):
            type_ = "DELETED"  # no longer ours: drop it as if deleted
        obj = self._stored(obj)
        with self._lock:
            if resource_version:
                self._resource_version = str(resource_version)
            if type_ in ("ADDED", "MODIFIED") and uid:
                self._objects[uid] = obj
                self._names[_name_of(obj)] = uid
            elif type_ == "DELETED" and uid:
                if self._objects.pop(uid, None) is None:
                    return  # never stored: nothing to report
                if self._names.get(_name_of(obj)) == uid:
                    del self._names[_name_of(obj)]
            else:
                # BOOKMARK (only the resourceVersion counts) or an unknown type.
                return
        self._notify([(str(type_), obj)])

    def _notify(self, changes: list[tuple[str, Obj]]) -> None:
        """Call on_change for each change, outside the lock; its errors are logged."""
        if self.on_change is None:
            return
        for type_, pod in changes:
            try:
                self.on_change(type_, pod)
            except Exception:
                log.exception("watch of %s: on_change(%s) failed", self.what, type_)

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
        if self._reachability.failed(f"{step} of {self.what}", err):
            self._streak_is_outage = True  # reported once, for the whole agent
            log.debug("%s of %s failed (%s), next try in %.2fs", step, self.what, what, delay)
        elif self._streak == 1 or self._streak_is_outage:
            self._streak_is_outage = False
            # Unexpected error types get a traceback: they are likely our bugs.
            expected = status is not None or is_network_error(err)
            log.warning(
                "%s of %s failed (%s: %s); retrying with backoff",
                step,
                self.what,
                what,
                _describe(err),
                exc_info=None if expected else err,
            )
        else:
            log.debug(
                "%s of %s failed again (%s), failure %d, next try in %.2fs",
                step,
                self.what,
                what,
                self._streak,
                delay,
            )
        self._stopping.wait(delay)

    def _succeeded(self) -> None:
        self._reachability.answered()
        if self._streak and not self._streak_is_outage:
            log.info(
                "watch of %s works again after %d failures",
                self.what,
                self._streak,
            )
        self._streak, self._streak_is_outage = 0, False


class NodePodCache(WatchCache):
    """The pods bound to `node_name` (field selector spec.nodeName)."""

    def __init__(self, api_client: Any, node_name: str, **kwargs: Any) -> None:
        if not node_name:
            raise ValueError("node_name must not be empty")
        super().__init__(api_client, "pods", field_selector=f"spec.nodeName={node_name}", **kwargs)
        self.node_name = node_name

    def pods(self) -> list[Pod]:
        return self.objects()


_KINDS = {"pods": "Pod", "secrets": "Secret", "configmaps": "ConfigMap"}


def _name_of(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _diff(old: dict[str, Obj], new: dict[str, Obj]) -> list[tuple[str, Obj]]:
    """What changed between two lists, as watch events (a relist replaces the cache)."""
    changes: list[tuple[str, Obj]] = []
    for uid, obj in new.items():
        before = old.get(uid)
        if before is None:
            changes.append(("ADDED", obj))
        elif _rv(before) != _rv(obj):
            changes.append(("MODIFIED", obj))
    changes.extend(("DELETED", obj) for uid, obj in old.items() if uid not in new)
    return changes


def _rv(obj: Obj) -> Any:
    return (obj.get("metadata") or {}).get("resourceVersion")


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
