"""An injector's word about its pods, checked against the API server one by one.

The controller does not hold the cluster's pods (150,000 at Kubernetes'
documented limits): an injector names the pods of its node it wants files
for, and each claimed pod is read (GET by namespace/name) and must have the
claimed UID and run on the caller's node. Annotations are taken only from
what was read. A pod read is remembered (bounded LRU) and reused while the
claim names the same resourceVersion: a pod's UID and node never change, and
any change of its annotations changes its resourceVersion.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agents.token_refresher.metrics import FilesMetrics
from agents.token_refresher.nodeauth import AuthUnavailable
from agents.token_refresher.spec import PREFIXES, TO_INJECT

log = logging.getLogger(__name__)

NOT_FOUND = 404
_INJECT_KEYS = tuple(f"{prefix}/{TO_INJECT}" for prefix in PREFIXES)
# Claims read in parallel (a reconnecting node with 100 new pods must not wait
# for 100 GETs one after the other).
READERS = 8


@dataclass(frozen=True)
class Claim:
    """One pod an injector asks files for."""

    namespace: str
    name: str
    uid: str
    resource_version: str

    @property
    def where(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class VerifiedPod:
    """A claimed pod as the API server has it (only what rendering needs)."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    node: str
    phase: str
    annotations: Mapping[str, str]
    """The pod's `to-inject` annotations (either prefix), nothing else."""


@dataclass(frozen=True)
class Refusal:
    """A claim that gets no files; `reason`: other_node, not_found or uid_mismatch."""

    claim: Claim
    reason: str
    message: str

    def wire(self) -> dict[str, Any]:
        c = self.claim
        return {
            "namespace": c.namespace,
            "name": c.name,
            "uid": c.uid,
            "reason": self.reason,
            "message": self.message,
        }


@dataclass(frozen=True)
class _Missing:
    """A claim answered 404: the same claim is refused again without a GET for a while."""

    uid: str
    resource_version: str
    until: float


def _verified(pod: dict[str, Any]) -> VerifiedPod:
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    return VerifiedPod(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
        node=str((pod.get("spec") or {}).get("nodeName") or ""),
        phase=str((pod.get("status") or {}).get("phase") or ""),
        annotations={k: str(annotations[k]) for k in _INJECT_KEYS if k in annotations},
    )


class ClaimVerifier:
    """Checks claims; thread-safe. `close()` ends its reader threads."""

    def __init__(
        self,
        api_client: Any,
        *,
        metrics: FilesMetrics,
        max_entries: int = 20_000,
        missing_ttl: float = 30.0,
        request_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client

        self._core: Any = client.CoreV1Api(api_client)
        self._metrics = metrics
        self._max = max_entries
        self._missing_ttl = missing_ttl
        self._timeout = request_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, str], VerifiedPod | _Missing] = OrderedDict()
        self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="claims")
        self.reads = 0
        """Pod GETs made so far (tests and the benchmark read it)."""

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def verify(self, node: str, claims: Sequence[Claim]) -> tuple[list[VerifiedPod], list[Refusal]]:
        """The claimed pods that are on `node`, and the refused claims (counted).

        AuthUnavailable when a pod could not be read (the caller retries).
        """
        known: dict[Claim, VerifiedPod | _Missing] = {}
        unknown: list[Claim] = []
        now = self._clock()
        with self._lock:
            for claim in claims:
                seen = self._seen.get((claim.namespace, claim.name))
                claimed = (claim.uid, claim.resource_version)
                if (isinstance(seen, VerifiedPod) and seen.resource_version == claimed[1]) or (
                    isinstance(seen, _Missing)
                    and seen.until > now
                    and (seen.uid, seen.resource_version) == claimed
                ):
                    known[claim] = seen
                else:
                    unknown.append(claim)
                    continue
                self._seen.move_to_end((claim.namespace, claim.name))
        if unknown:
            for claim, answer in zip(unknown, self._pool.map(self._read, unknown), strict=True):
                known[claim] = answer
            with self._lock:
                for claim in unknown:
                    self._seen[(claim.namespace, claim.name)] = known[claim]
                    self._seen.move_to_end((claim.namespace, claim.name))
                while len(self._seen) > self._max:
                    self._seen.popitem(last=False)
        pods: list[VerifiedPod] = []
        refused: list[Refusal] = []
        for claim in claims:
            answer = known[claim]
            if isinstance(answer, _Missing):
                refusal = Refusal(claim, "not_found", f"pod {claim.where} does not exist")
            elif answer.uid != claim.uid:
                refusal = Refusal(
                    claim, "uid_mismatch", f"pod {claim.where} has another UID than claimed"
                )
            elif answer.node != node:
                refusal = Refusal(claim, "other_node", f"pod {claim.where} is not on node {node}")
            else:
                pods.append(answer)
                continue
            self._metrics.refused_pods.labels(refusal.reason).inc()
            refused.append(refusal)
        return pods, refused

    def _read(self, claim: Claim) -> VerifiedPod | _Missing:
        with self._lock:
            self.reads += 1
        try:
            response = self._core.read_namespaced_pod(
                claim.name, claim.namespace, _preload_content=False, _request_timeout=self._timeout
            )
            pod = json.loads(response.data)
        except Exception as err:
            status = getattr(err, "status", None)
            if status == NOT_FOUND:
                until = self._clock() + self._missing_ttl
                return _Missing(claim.uid, claim.resource_version, until)
            log.warning(
                "cannot read claimed pod %s: %s",
                claim.where,
                f"HTTP {status}" if status else type(err).__name__,
            )
            message = f"pod {claim.where} could not be read"
            raise AuthUnavailable("pod_read_failed", message) from None
        return _verified(pod)
