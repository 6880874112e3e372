"""Each pod's GPU memory limit on one card: the admin's limit, which the pod may only lower.

The admin's limit (first found wins), per pod and per GPU:
1. a peer scheduler's quantity, only for a scheduler the operator declared
   (`--peer-scheduler hami|gpushare`), since only then did a scheduler place
   the pod by it: HAMi's `nvidia.com/gpumem` (MiB per GPU) or
   `nvidia.com/gpumem-percentage`, gpushare's `aliyun.com/gpu-mem` (GiB),
   summed over the pod's containers;
2. the admin's default for the pod: in a cluster the namespace annotation
   `node-agents.io/default-gpu-memory-limit`, in local mode the limits file's
   entry for the pod, else its `default`;
3. the agreed share: card memory / time-slicing replicas of the node x the
   shared GPUs the pod requested (`nvidia.com/gpu` or a renamed
   `nvidia.com/gpu.shared`), at most the whole card.

The pod's own inputs may then only lower it (tenants are not trusted): our pod
annotation `node-agents.io/gpu-memory-limit`, and the peer quantities of a
scheduler nobody declared. The soft limit (`node-agents.io/gpu-memory-soft-limit`,
else `soft_fraction` of the hard limit) is never above the hard limit. A value
that cannot be understood is ignored and reported (a Warning Event on the pod):
the admin's limit stays, it never turns into "no limit".
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
# Peer schedulers and the resources each accounts for when it places a pod.
PEER_SCHEDULERS: dict[str, tuple[str, ...]] = {
    "hami": ("nvidia.com/gpumem", "nvidia.com/gpumem-percentage"),
    "gpushare": ("aliyun.com/gpu-mem",),
}

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
    """A limit was given but cannot be understood."""


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


@dataclass(frozen=True)
class AdminLimit:
    """A limit an admin wrote for a pod, and where, as the operator would name it."""

    quantity: str
    source: str  # "namespace ml annotation ...", "limits.yaml default", ...


@dataclass(frozen=True)
class Resolution:
    """The pod's limit (None: nothing applies), and the inputs that were ignored, and why."""

    limit: Limit | None
    problems: tuple[str, ...] = ()


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
    peer_schedulers: frozenset[str] = frozenset()
    """Peer schedulers the operator declared: their quantities are the admin's limit."""

    def resolve(
        self,
        pod: Mapping[str, Any],
        total_bytes: int,
        admin_limit: AdminLimit | None = None,
    ) -> Resolution:
        """The pod's limit on a card of `total_bytes` (the order is in the module docstring)."""
        problems: list[str] = []
        annotations = pod.get("metadata", {}).get("annotations") or {}
        hard = self._admin(pod, total_bytes, admin_limit, problems)
        for lower in self._pods_own(pod, annotations, total_bytes, problems):
            if hard is None or lower[0] < hard[0]:
                hard = lower
        if hard is None:
            return Resolution(None, tuple(problems))
        hard_bytes, source = hard
        soft = int(hard_bytes * self.soft_fraction)
        soft_text = annotations.get(ANNOTATION_SOFT_LIMIT)
        if soft_text is not None:
            try:
                soft = parse_quantity(soft_text)
            except LimitError as err:
                problems.append(f"pod annotation {ANNOTATION_SOFT_LIMIT}: {err}; ignored")
        return Resolution(Limit(hard_bytes, min(soft, hard_bytes), source), tuple(problems))

    def _admin(
        self,
        pod: Mapping[str, Any],
        total_bytes: int,
        admin_limit: AdminLimit | None,
        problems: list[str],
    ) -> tuple[int, str] | None:
        for scheduler, resources in PEER_SCHEDULERS.items():
            if scheduler in self.peer_schedulers:
                found = _peer_quantity(pod, resources, total_bytes, problems)
                if found is not None:
                    return found[0], f"{found[1]} ({scheduler} scheduler)"
        if admin_limit is not None:
            try:
                return parse_quantity(admin_limit.quantity), admin_limit.source
            except LimitError as err:
                problems.append(f"{admin_limit.source}: {err}; ignored")
        if self.replicas:
            share = total_bytes // self.replicas * requested_gpus(pod)
            return min(share, total_bytes), f"share 1/{self.replicas}"
        return None

    def _pods_own(
        self,
        pod: Mapping[str, Any],
        annotations: Mapping[str, str],
        total_bytes: int,
        problems: list[str],
    ) -> list[tuple[int, str]]:
        """Limits the pod set itself: each may lower the admin's, none may raise it."""
        found: list[tuple[int, str]] = []
        if ANNOTATION_LIMIT in annotations:
            try:
                found.append(
                    (
                        parse_quantity(annotations[ANNOTATION_LIMIT]),
                        f"pod annotation {ANNOTATION_LIMIT}",
                    )
                )
            except LimitError as err:
                problems.append(
                    f"pod annotation {ANNOTATION_LIMIT}: {err}; the admin's limit applies"
                )
        for scheduler, resources in PEER_SCHEDULERS.items():
            if scheduler not in self.peer_schedulers:
                peer = _peer_quantity(pod, resources, total_bytes, problems)
                if peer is not None:
                    found.append((peer[0], f"pod's {peer[1]}"))
        return found


def _peer_quantity(
    pod: Mapping[str, Any], resources: tuple[str, ...], total_bytes: int, problems: list[str]
) -> tuple[int, str] | None:
    """Bytes per GPU from the first of a peer scheduler's resources the pod sets."""
    for name in resources:
        try:
            value = _resource_sum(pod, name)
        except LimitError as err:
            problems.append(f"{err}; ignored")
            continue
        if value is None:
            continue
        if name == "nvidia.com/gpumem-percentage":
            return int(Decimal(total_bytes) * value / 100), name
        return int(value * (GIB if name == "aliyun.com/gpu-mem" else MIB)), name
    return None


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
    """Local mode's limits: `{"default": "<quantity>", "pods": {"<pod-uid>": "<quantity>"}}`.

    Written by the operator, so each entry is an admin's limit (it may raise a
    pod above the share); `path` names the entries in Events and logs.
    """

    default: int | None
    pods: Mapping[str, int]
    path: str = ""

    def admin_limit(self, uid: str) -> AdminLimit | None:
        """The file's entry for the pod, else its default, named by file and key."""
        if uid in self.pods:
            return AdminLimit(str(self.pods[uid]), f"{self.path} pods.{uid}")
        if self.default is not None:
            return AdminLimit(str(self.default), f"{self.path} default")
        return None

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
            path=str(path),
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
