"""The optional Kubernetes client and the Event recorder.

Kubernetes is optional for every agent: in-cluster config, else a kubeconfig,
else none (local mode). `kubernetes` is imported only when a cluster is
configured: the import alone costs ~44 MB of RSS.
"""

from __future__ import annotations

import logging
import os
import time
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
    """

    def __init__(
        self, api_client: Any, component: str, host: str = "", clock: Any = time.time
    ) -> None:
        from kubernetes import client

        # Any: the client takes plain dicts as bodies, its annotations say models.
        self._api: Any = client.CoreV1Api(api_client)
        self.component = component
        self.host = host
        self._clock = clock
        self.failures = 0

    def emit(self, ref: ObjectRef, type_: str, reason: str, message: str) -> bool:
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
            "count": 1,
        }
        try:
            self._api.create_namespaced_event(namespace, body, _request_timeout=10)
        except Exception as err:
            self.failures += 1
            log.warning("cannot post Event %s on %s/%s: %s", reason, ref.kind, ref.name, err)
            return False
        return True
