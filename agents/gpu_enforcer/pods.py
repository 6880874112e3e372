"""Where pod facts come from: Kubernetes (a node-scoped pod watch) or a limits file."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from agents.gpu_enforcer.limits import (
    ANNOTATION_NAMESPACE_DEFAULT,
    LABEL_REPLICAS,
    AdminLimit,
    LimitsFile,
)

log = logging.getLogger(__name__)


class LocalPods:
    """Local mode: every pod UID the cgroups name is a pod; limits from the file."""

    def __init__(self, limits: LimitsFile | None, replicas: int | None = None) -> None:
        self._limits = limits
        self._replicas = replicas

    def pod(self, uid: str) -> Mapping[str, Any] | None:
        return {"metadata": {"uid": uid, "name": uid, "namespace": "", "annotations": {}}}

    def admin_limit(self, pod: Mapping[str, Any]) -> AdminLimit | None:
        # The operator wrote the file: its entries are the admin's, not the pod's.
        if self._limits is None:
            return None
        return self._limits.admin_limit(pod.get("metadata", {}).get("uid", ""))

    def replicas(self) -> int | None:
        return self._replicas


class KubePods:
    """Pods from a node-scoped watch; namespace defaults and node replicas, cached.

    Namespaces and the Node are read at most once per `ttl` seconds each: the
    enforcer asks every tick, the API server should not hear it every tick.
    """

    def __init__(
        self,
        api_client: Any,
        cache: Any,
        node_name: str,
        *,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client

        self._core: Any = client.CoreV1Api(api_client)
        self._cache = cache
        self._node_name = node_name
        self._ttl = ttl
        self._clock = clock
        self._namespaces: dict[str, tuple[float, str | None]] = {}
        self._node: tuple[float, int | None] | None = None

    def pod(self, uid: str) -> Mapping[str, Any] | None:
        pod: Mapping[str, Any] | None = self._cache.get(uid)
        return pod

    def admin_limit(self, pod: Mapping[str, Any]) -> AdminLimit | None:
        """The namespace's default annotation, if its namespace has one."""
        namespace = pod.get("metadata", {}).get("namespace", "")
        value = self._namespace_default(namespace)
        if value is None:
            return None
        return AdminLimit(value, f"namespace {namespace} annotation {ANNOTATION_NAMESPACE_DEFAULT}")

    def _namespace_default(self, namespace: str) -> str | None:
        cached = self._namespaces.get(namespace)
        if cached is not None and self._clock() - cached[0] < self._ttl:
            return cached[1]
        value: str | None = None
        try:
            ns = self._core.read_namespace(namespace, _request_timeout=10)
            value = (ns.metadata.annotations or {}).get(ANNOTATION_NAMESPACE_DEFAULT)
        except Exception as err:
            log.warning("cannot read namespace %s: %s", namespace, err)
            if cached is not None:
                return cached[1]  # keep the last known value
        self._namespaces[namespace] = (self._clock(), value)
        return value

    def replicas(self) -> int | None:
        if self._node is not None and self._clock() - self._node[0] < self._ttl:
            return self._node[1]
        value: int | None = None
        try:
            node = self._core.read_node(self._node_name, _request_timeout=10)
            label = (node.metadata.labels or {}).get(LABEL_REPLICAS)
            value = int(label) if label and label.isdigit() and int(label) > 0 else None
        except Exception as err:
            log.warning("cannot read node %s: %s", self._node_name, err)
            if self._node is not None:
                return self._node[1]
        self._node = (self._clock(), value)
        return value


class KubeEvictor:
    """The Eviction API: the API server checks PodDisruptionBudgets (429 when refused)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._core: Any = client.CoreV1Api(api_client)

    def evict(self, namespace: str, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        try:
            self._core.create_namespaced_pod_eviction(name, namespace, body, _request_timeout=10)
        except ApiException as err:
            if err.status == 429:
                log.warning("eviction of %s/%s refused: %s", namespace, name, err.reason)
                return False
            raise
        return True
