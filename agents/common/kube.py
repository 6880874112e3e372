"""The optional Kubernetes client and the Event recorder.

Kubernetes is optional for every agent: in-cluster config, else a kubeconfig,
else none (local mode). `kubernetes` is imported only when a cluster is
configured: the import alone costs ~44 MB of RSS.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class KubeConfigError(RuntimeError):
    """A kubeconfig was asked for but cannot be loaded."""


def load_api_client(kubeconfig: str | None = None, *, enabled: bool = True) -> Any | None:
    """An `ApiClient`, or None for local mode.

    Order: an explicit kubeconfig path; in-cluster config (the service-account
    token the kubelet mounts); `$KUBECONFIG` (a list of files, as kubectl
    reads it) or `~/.kube/config`; else None.
    """
    if not enabled:
        return None
    in_cluster = "KUBERNETES_SERVICE_HOST" in os.environ and SERVICE_ACCOUNT_TOKEN.exists()
    default_files = os.environ.get("KUBECONFIG", "~/.kube/config")
    found = [p for p in default_files.split(os.pathsep) if p and Path(p).expanduser().is_file()]
    if not kubeconfig and not in_cluster and not found:
        return None
    where = kubeconfig or ("in-cluster config" if in_cluster else default_files)
    try:
        from kubernetes import client
        from kubernetes import config as kube_config
    except ImportError as err:
        raise KubeConfigError(
            f"{where} configures a cluster, but the Kubernetes client is not installed "
            "(install the [kube] extra)"
        ) from err
    loaders: Any = kube_config  # its loaders are untyped
    configuration = client.Configuration()
    # No urllib3 retries: they log a "Retrying" warning per attempt (3 per
    # request while the API server is down) and multiply every request's
    # deadline by 4. Every caller retries with backoff itself and reports an
    # outage once (ApiReachability).
    configuration.retries = False
    try:
        if kubeconfig:
            loaders.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        elif in_cluster:
            loaders.load_incluster_config(client_configuration=configuration)
        else:
            # The client merges a KUBECONFIG list itself, like kubectl.
            loaders.load_kube_config(
                config_file=os.pathsep.join(found), client_configuration=configuration
            )
    except Exception as err:
        # One line: the agents report config errors as a single error line,
        # and PyYAML's messages span several.
        detail = " ".join(str(err).split()) or type(err).__name__
        raise KubeConfigError(f"cannot load Kubernetes config from {where}: {detail}") from err
    return client.ApiClient(configuration)


def api_error_text(err: BaseException, limit: int = 300) -> str:
    """One line for a log or an Event: str() of an ApiException spans lines,
    headers and body (which may echo what was sent)."""
    status = getattr(err, "status", None)
    if isinstance(status, int):
        return f"HTTP {status} {getattr(err, 'reason', '') or ''}".strip()
    return " ".join(str(err).split())[:limit] or type(err).__name__


def is_network_error(err: BaseException) -> bool:
    """True for a request that got no answer (refused, timed out, connection cut)."""
    import urllib3

    if getattr(err, "status", None) is not None:
        return False  # an ApiException: the server answered
    return isinstance(err, OSError | urllib3.exceptions.HTTPError)


class ApiReachability:
    """One warning when the API server stops answering, one info line when it answers again.

    Shared by everything using one ApiClient (watches, the Lease, Events): an
    outage is one failure streak for the agent, not a line per request.
    """

    def __init__(self, server: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self.failures = 0
        """Requests that got no answer in the current streak."""

    def failed(self, what: str, err: BaseException) -> bool:
        """Record a failed request; True when it got no answer (reported here, once
        per streak), False when the server answered (the caller reports it)."""
        if not is_network_error(err):
            if getattr(err, "status", None) is not None:
                self.answered()  # an error status is an answer
            return False
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = self._clock()
            self.failures += 1
        if first:
            detail = " ".join(str(err).split())[:300] or type(err).__name__
            log.warning(
                "Kubernetes API %s unreachable (%s: %s: %s); retrying with backoff, "
                "silent until it answers again",
                self.server,
                what,
                type(err).__name__,
                detail,
            )
        else:
            log.debug("Kubernetes API %s still unreachable (%s)", self.server, what)
        return True

    def answered(self) -> None:
        """Any answer, error statuses included: the server is reachable."""
        with self._lock:
            since, failures = self._down_since, self.failures
            self._down_since, self.failures = None, 0
        if since is not None:
            log.info(
                "Kubernetes API %s answers again after %.0fs (%d requests failed)",
                self.server,
                self._clock() - since,
                failures,
            )


_REACHABILITY: weakref.WeakKeyDictionary[Any, ApiReachability] = weakref.WeakKeyDictionary()
_REACHABILITY_LOCK = threading.Lock()


def reachability(api_client: Any) -> ApiReachability:
    """The one ApiReachability of this ApiClient (made on first use)."""
    with _REACHABILITY_LOCK:
        found = _REACHABILITY.get(api_client)
        if found is None:
            host = getattr(getattr(api_client, "configuration", None), "host", "") or "server"
            found = _REACHABILITY[api_client] = ApiReachability(host)
        return found


@dataclass(frozen=True)
class ObjectRef:
    """What an Event is about (core/v1 ObjectReference)."""

    kind: str
    name: str
    namespace: str = ""
    uid: str = ""
    api_version: str = "v1"


class EventRecorder:
    """Posts core/v1 Events; failures are logged and counted, never raised.

    Events about cluster-scoped objects (Nodes) go to the `default` namespace,
    as the kubelet does.

    Rate-limited per involved object and reason, as client-go's
    EventSourceObjectSpamFilter does per object (a token bucket: burst 25, then
    one per 5 minutes): `burst` at once, then one per `interval`. What a tenant
    writes decides how often an agent would report it (thousands of entries,
    a problem on every pass); without the limit, the API server gets one
    Event each and everyone's requests slow down. Suppressed Events are
    counted (`suppressed`, `on_suppressed`) and the next one posted carries
    their number in `count`.
    """

    def __init__(
        self,
        api_client: Any,
        component: str,
        host: str = "",
        clock: Any = time.time,
        *,
        interval: float = 300.0,
        burst: int = 5,
        max_objects: int = 10_000,
        on_suppressed: Callable[[str], None] = lambda reason: None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client

        if interval <= 0 or burst < 1:
            raise ValueError(
                f"Event rate limit needs interval > 0 and burst >= 1, got {interval}, {burst}"
            )
        # Any: the client takes plain dicts as bodies, its annotations say models.
        self._api: Any = client.CoreV1Api(api_client)
        self.component = component
        self.host = host
        self._clock = clock
        self._reachability = reachability(api_client)
        self.failures = 0
        self.interval = interval
        self.burst = burst
        self._max_objects = max_objects
        self._on_suppressed = on_suppressed
        self._monotonic = monotonic
        self._lock = threading.Lock()
        # (object, reason) -> [tokens, when counted, suppressed since the last post];
        # least recently used first, so the oldest go when there are too many.
        self._buckets: OrderedDict[tuple[str, ...], list[float]] = OrderedDict()
        self.suppressed = 0
        """Events not posted because of the rate limit."""

    def _admit(self, key: tuple[str, ...]) -> int | None:
        """The Event's count (1 + those suppressed since the last one), None: suppressed."""
        now = self._monotonic()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = [float(self.burst), now, 0.0]
                while len(self._buckets) > self._max_objects:
                    self._buckets.popitem(last=False)
            self._buckets.move_to_end(key)
            tokens, then, suppressed = bucket
            tokens = min(float(self.burst), tokens + (now - then) / self.interval)
            if tokens < 1.0:
                bucket[:] = [tokens, now, suppressed + 1]
                self.suppressed += 1
                return None
            bucket[:] = [tokens - 1.0, now, 0.0]
            return 1 + int(suppressed)

    def _refund(self, key: tuple[str, ...], count: int) -> None:
        """A post that failed reached no one: it does not use up the limit."""
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is not None:
                bucket[0] = min(float(self.burst), bucket[0] + 1.0)
                bucket[2] += count - 1

    def emit(self, ref: ObjectRef, type_: str, reason: str, message: str) -> bool:
        """Post the Event; False when it failed or was suppressed by the rate limit."""
        key = (ref.kind, ref.namespace, ref.name, ref.uid, reason)
        count = self._admit(key)
        if count is None:
            log.debug("Event %s on %s/%s suppressed (rate limit)", reason, ref.kind, ref.name)
            try:
                self._on_suppressed(reason)
            except Exception:
                log.exception("counting a suppressed Event failed")
            return False
        namespace = ref.namespace or "default"
        now = datetime.fromtimestamp(self._clock(), UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{ref.name}.{time.time_ns():x}",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": ref.api_version,
                "kind": ref.kind,
                "name": ref.name,
                "namespace": ref.namespace or None,
                "uid": ref.uid or None,
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": self.component, "host": self.host or None},
            "reportingComponent": self.component,
            "reportingInstance": self.host or self.component,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": count,
        }
        try:
            self._api.create_namespaced_event(namespace, body, _request_timeout=10)
        except Exception as err:
            self._refund(key, count)
            self.failures += 1
            if not self._reachability.failed("post an Event", err):
                log.warning("cannot post Event %s on %s/%s: %s", reason, ref.kind, ref.name, err)
            return False
        self._reachability.answered()
        return True
