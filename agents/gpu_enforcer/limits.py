"""Each pod's GPU memory limit on one card: the agreed share, or what the pod says.

Order (first found wins), per pod and per GPU:
1. our pod annotation `node-agents.io/gpu-memory-limit` (bytes or a
   Kubernetes quantity such as `10Gi`);
2. a limit users already set for a peer tool: HAMi's `nvidia.com/gpumem`
   (MiB per GPU) or `nvidia.com/gpumem-percentage`, Alibaba gpushare's
   `aliyun.com/gpu-mem` (GiB), summed over the pod's containers;
3. the namespace default annotation `node-agents.io/default-gpu-memory-limit`;
4. the agreed share: card memory / time-slicing replicas of the node x the
   shared GPUs the pod requested (`nvidia.com/gpu` or a renamed
   `nvidia.com/gpu.shared`), at most the whole card.
Local mode (no Kubernetes) takes the same inputs from a limits file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

ANNOTATION_LIMIT = "node-agents.io/gpu-memory-limit"
ANNOTATION_SOFT_LIMIT = "node-agents.io/gpu-memory-soft-limit"
ANNOTATION_NAMESPACE_DEFAULT = "node-agents.io/default-gpu-memory-limit"
# GPU feature discovery labels time-sliced nodes with their replicas.
LABEL_REPLICAS = "nvidia.com/gpu.replicas"

MIB = 1024**2
GIB = 1024**3
GPU_RESOURCES = ("nvidia.com/gpu", "nvidia.com/gpu.shared")

_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_SUFFIXES = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


class LimitError(ValueError):
    """A limit was given but cannot be understood (the pod is then left alone)."""


def parse_quantity(text: str | int) -> int:
    """Bytes from a Kubernetes quantity (`10Gi`, `512M`, `1.5Gi`) or plain bytes."""
    if isinstance(text, int):
        if text < 0:
            raise LimitError(f"negative quantity {text}")
        return text
    match = _QUANTITY.match(str(text))
    if match is None or match.group(2) not in _SUFFIXES:
        raise LimitError(f"not a quantity: {text!r}")
    try:
        value = Decimal(match.group(1)) * _SUFFIXES[match.group(2)]
    except InvalidOperation:
        raise LimitError(f"not a quantity: {text!r}") from None
    return int(value)


@dataclass(frozen=True)
class Limit:
    """A pod's limit on one GPU, and where it came from (shown in Events and tables)."""

    hard_bytes: int
    soft_bytes: int
    source: str


def _containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(pod.get("spec", {}).get("containers") or [])


def _resource_sum(pod: Mapping[str, Any], name: str) -> Decimal | None:
    """Sum of a resource over the pod's containers (limits, else requests)."""
    total: Decimal | None = None
    for container in _containers(pod):
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get(
            name, (resources.get("requests") or {}).get(name)
        )
        if value is None:
            continue
        try:
            total = (total or Decimal(0)) + Decimal(str(value))
        except InvalidOperation:
            raise LimitError(f"resource {name}={value!r} is not a number") from None
    return total


def requested_gpus(pod: Mapping[str, Any]) -> int:
    """Shared GPUs (time-slicing replicas) the pod asked for; at least 1 on a GPU."""
    for name in GPU_RESOURCES:
        try:
            count = _resource_sum(pod, name)
        except LimitError:
            continue
        if count:
            return max(1, int(count))
    return 1


@dataclass(frozen=True)
class LimitPolicy:
    """How limits are resolved on this node."""

    replicas: int | None = None
    """Time-slicing replicas per card; None: no share-based limit."""
    soft_fraction: float = 0.9
    """The soft limit (warn, Event) as a fraction of the hard limit."""

    def resolve(
        self,
        pod: Mapping[str, Any],
        total_bytes: int,
        namespace_default: str | None = None,
    ) -> Limit | None:
        """The pod's limit on a card of `total_bytes`; None when nothing applies."""
        annotations = pod.get("metadata", {}).get("annotations") or {}
        hard, source = self._hard(pod, annotations, total_bytes, namespace_default)
        if hard is None:
            return None
        soft_text = annotations.get(ANNOTATION_SOFT_LIMIT)
        soft = parse_quantity(soft_text) if soft_text else int(hard * self.soft_fraction)
        return Limit(hard_bytes=hard, soft_bytes=min(soft, hard), source=source)

    def _hard(
        self,
        pod: Mapping[str, Any],
        annotations: Mapping[str, str],
        total_bytes: int,
        namespace_default: str | None,
    ) -> tuple[int | None, str]:
        if ANNOTATION_LIMIT in annotations:
            return parse_quantity(annotations[ANNOTATION_LIMIT]), "annotation"
        gpumem = _resource_sum(pod, "nvidia.com/gpumem")
        if gpumem is not None:
            return int(gpumem * MIB), "nvidia.com/gpumem"
        percent = _resource_sum(pod, "nvidia.com/gpumem-percentage")
        if percent is not None:
            return int(Decimal(total_bytes) * percent / 100), "nvidia.com/gpumem-percentage"
        aliyun = _resource_sum(pod, "aliyun.com/gpu-mem")
        if aliyun is not None:
            return int(aliyun * GIB), "aliyun.com/gpu-mem"
        if namespace_default:
            return parse_quantity(namespace_default), "namespace default"
        if self.replicas:
            share = total_bytes // self.replicas * requested_gpus(pod)
            return min(share, total_bytes), f"share 1/{self.replicas}"
        return None, ""


def replicas_from_device_plugin_config(text: str, resource: str = "nvidia.com/gpu") -> int | None:
    """Time-slicing replicas from the NVIDIA device plugin's config (YAML or JSON).

    `sharing.timeSlicing.resources: [{name: nvidia.com/gpu, replicas: 4}]`.
    """
    data = _load_yaml_or_json(text)
    sharing = (data or {}).get("sharing") or {}
    for entry in (sharing.get("timeSlicing") or {}).get("resources") or []:
        if entry.get("name") in (resource, f"{resource}.shared") and entry.get("replicas"):
            return int(entry["replicas"])
    return None


@dataclass(frozen=True)
class LimitsFile:
    """Local mode's limits: `{"default": "<quantity>", "pods": {"<pod-uid>": "<quantity>"}}`."""

    default: int | None
    pods: Mapping[str, int]

    @classmethod
    def load(cls, path: str | Path) -> LimitsFile:
        try:
            data = _load_yaml_or_json(Path(path).read_text())
        except OSError as err:
            raise LimitError(f"cannot read limits file {path}: {err.strerror}") from err
        if not isinstance(data, dict):
            raise LimitError(f"limits file {path}: expected a mapping at the top")
        pods = data.get("pods") or {}
        if not isinstance(pods, dict):
            raise LimitError(f"limits file {path}: 'pods' must map pod UIDs to quantities")
        unknown = set(data) - {"default", "pods"}
        if unknown:
            raise LimitError(f"limits file {path}: unknown keys {sorted(unknown)}")
        default = data.get("default")
        return cls(
            default=None if default is None else parse_quantity(default),
            pods={str(uid): parse_quantity(q) for uid, q in pods.items()},
        )


def _load_yaml_or_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    import yaml  # JSON is the common case; YAML only when needed

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise LimitError(f"neither JSON nor YAML: {' '.join(str(err).split())}") from err
