"""Leader election through a coordination.k8s.io/v1 Lease, by client-go's rules.

One replica of a controller acts; the others wait, ready to take over. The
rules are those of client-go's `leaderelection` package (what kube-scheduler
and kube-controller-manager use), so `kubectl get lease` reads as usual:

- A candidate creates the Lease if it is missing, or takes it over when the
  holder is empty or the record has not changed for `lease_duration` seconds
  *as seen on the candidate's own clock* (the time it observed the last
  change, never the holder's `renewTime`: clocks of different nodes differ).
- The holder renews every `renew_interval` seconds. Every write is a PUT with
  the resourceVersion read just before, so two candidates never both win:
  the second one gets 409 Conflict.
- The holder considers itself leader only until `lease_duration` after its last
  successful renewal, by its own monotonic clock: by then a candidate may have
  taken over. `holds(seconds)` tells whether the leadership lasts at least that
  long, for actions that must not overlap with another leader's (an IdP call
  with a refresh token that works once).
- On `stop()` the holder releases the Lease (empty holder, duration 1 s), so a
  rolling update hands over at once instead of after `lease_duration`.
- `health`, asked before every round, ties leading to the work getting done:
  while it names a problem (the controller's pass or a worker is stuck), this
  replica neither renews nor acquires, and `holds()` is false at once. The
  Lease is not released: whatever is stuck may still be using a refresh
  token, so the standby takes over only once the Lease has run out.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agents.common.kube import reachability

log = logging.getLogger(__name__)

OnApiCall = Callable[[str, str], None]
"""(verb, resource) of each API request made, for metrics."""

CONFLICT = 409
NOT_FOUND = 404


def _micro_time(when: float) -> str:
    """metav1.MicroTime as the apiserver writes it."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaigns for and holds one Lease in a daemon thread; `is_leader` says who acts."""

    def __init__(
        self,
        api_client: Any,
        *,
        name: str,
        namespace: str,
        identity: str,
        lease_duration: float = 30.0,
        renew_interval: float = 5.0,
        request_timeout: float = 10.0,
        on_api_call: OnApiCall | None = None,
        on_leading: Callable[[], None] | None = None,
        health: Callable[[], str | None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not identity:
            raise ValueError("a leader election identity must not be empty")
        if not 0 < renew_interval < lease_duration:
            raise ValueError(
                f"renew interval ({renew_interval}s) must be shorter than the lease "
                f"duration ({lease_duration}s)"
            )
        self.api_client = api_client
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_interval = renew_interval
        self.request_timeout = request_timeout
        self._on_api_call = on_api_call
        self._on_leading = on_leading
        """Called when this replica becomes leader: work that waits for the
        Lease starts then, not at the controller's next pass."""
        self._health = health
        self.unhealthy = ""
        """Why this replica does not campaign (`health`'s answer); empty: it does."""
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._valid_until = 0.0  # monotonic; leader while now < this
        self._observed: tuple[Any, ...] | None = None  # the last record seen
        self._observed_at = 0.0  # monotonic time it was first seen
        self._leading = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.transitions = 0  # times this replica became leader
        self.failures = 0
        self._reachability = reachability(api_client)

    # -- queries (any thread)

    def is_leader(self) -> bool:
        return self.holds(0.0)

    def holds(self, seconds: float) -> bool:
        """True when this replica leads and will for at least `seconds` more,
        even if no renewal succeeds in between."""
        with self._lock:
            return self._leading and self._monotonic() + seconds < self._valid_until

    # -- life cycle

    def start(self) -> LeaderElector:
        if self._thread is not None:
            raise RuntimeError("LeaderElector.start() called twice")
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop campaigning; a leader releases the Lease."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._leading:
            self._release()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.try_acquire_or_renew()
            self._stopping.wait(self.renew_interval)

    # -- one round

    def try_acquire_or_renew(self) -> bool:
        """One attempt to become or stay leader; True when leading after it."""
        from kubernetes import client

        api: Any = client.CoordinationV1Api(self.api_client)
        if not self._healthy():
            return self._lost(f"not renewing the Lease: {self.unhealthy}")
        now_mono, now = self._monotonic(), self._wall()
        try:
            lease = self._get(api)
            self._reachability.answered()
            if lease is None:
                self._write(api, "create", self._record(None, now))
                return self._won(now_mono, "created")
            spec = lease.get("spec") or {}
            record = (
                spec.get("holderIdentity"),
                spec.get("renewTime"),
                spec.get("leaseDurationSeconds"),
                lease["metadata"].get("resourceVersion"),
            )
            if record != self._observed:
                self._observed, self._observed_at = record, now_mono
            holder = spec.get("holderIdentity") or ""
            duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
            if holder and holder != self.identity and now_mono < self._observed_at + duration:
                return self._lost(f"held by {holder}")
            self._write(api, "replace", self._record(lease, now))
            return self._won(now_mono, "renewed" if holder == self.identity else "acquired")
        except Exception as err:
            self.failures += 1
            status = getattr(err, "status", None)
            if status == CONFLICT:
                return self._lost("another candidate wrote the Lease first (409)")
            if self._reachability.failed(f"Lease {self.namespace}/{self.name}", err):
                return self.is_leader()  # an outage: reported once, for the agent
            log.warning(
                "leader election: Lease %s/%s: %s",
                self.namespace,
                self.name,
                f"HTTP {status}" if status else f"{type(err).__name__}: {err}",
            )
            return self.is_leader()  # still valid until the lease runs out

    def _healthy(self) -> bool:
        problem = self._health() if self._health is not None else None
        if problem and not self.unhealthy:
            log.error(
                "leader election: %s stops campaigning for Lease %s/%s: %s",
                self.identity,
                self.namespace,
                self.name,
                problem,
            )
        elif not problem and self.unhealthy:
            log.info("leader election: %s campaigns again: its work moves on", self.identity)
        self.unhealthy = problem or ""
        return not problem

    def _get(self, api: Any) -> dict[str, Any] | None:
        self._count("get")
        try:
            response = api.read_namespaced_lease(
                self.name,
                self.namespace,
                _preload_content=False,
                _request_timeout=self.request_timeout,
            )
        except Exception as err:
            if getattr(err, "status", None) == NOT_FOUND:
                return None
            raise
        data: dict[str, Any] = json.loads(response.data)
        return data

    def _record(self, lease: dict[str, Any] | None, now: float) -> dict[str, Any]:
        spec = dict((lease or {}).get("spec") or {})
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = _micro_time(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (
                1 if lease is not None else 0
            )
        spec["holderIdentity"] = self.identity
        spec["leaseDurationSeconds"] = max(1, round(self.lease_duration))
        spec["renewTime"] = _micro_time(now)
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if lease is not None:
            # Optimistic concurrency: the PUT fails with 409 if anyone wrote since.
            metadata = {**lease["metadata"], **metadata}
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }

    def _write(self, api: Any, verb: str, body: dict[str, Any]) -> None:
        self._count(verb)
        if verb == "create":
            api.create_namespaced_lease(
                self.namespace, body, _preload_content=False, _request_timeout=self.request_timeout
            )
        else:
            api.replace_namespaced_lease(
                self.name,
                self.namespace,
                body,
                _preload_content=False,
                _request_timeout=self.request_timeout,
            )

    def _won(self, started: float, how: str) -> bool:
        with self._lock:
            # Counted from before the GET: the write may have taken a while.
            self._valid_until = started + self.lease_duration
            became = not self._leading
            self._leading = True
        if became:
            self.transitions += 1
            log.info(
                "leader election: %s leads (Lease %s/%s %s)",
                self.identity,
                self.namespace,
                self.name,
                how,
            )
            if self._on_leading is not None:
                self._on_leading()
        return True

    def _lost(self, why: str) -> bool:
        with self._lock:
            was = self._leading
            self._leading = False
            self._valid_until = 0.0
        if was:
            log.warning("leader election: %s stopped leading: %s", self.identity, why)
        else:
            log.debug("leader election: %s waits: %s", self.identity, why)
        return False

    def _release(self) -> None:
        """Hand the Lease over now: empty holder, 1 s duration (client-go's ReleaseOnCancel)."""
        from kubernetes import client

        api: Any = client.CoordinationV1Api(self.api_client)
        with self._lock:
            self._leading = False
            self._valid_until = 0.0
        try:
            lease = self._get(api)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            body = self._record(lease, self._wall())
            body["spec"]["holderIdentity"] = ""
            body["spec"]["leaseDurationSeconds"] = 1
            self._write(api, "replace", body)
            log.info("leader election: %s released Lease %s", self.identity, self.name)
        except Exception as err:
            log.warning("leader election: could not release Lease %s: %s", self.name, err)

    def _count(self, verb: str) -> None:
        if self._on_api_call is not None:
            self._on_api_call(verb, "leases")
