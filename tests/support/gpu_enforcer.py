"""The GPU enforcer's test world: the fake card, the fake API with the bundle's RBAC,
the agent's argv (tests/integration/test_gpu_enforcer.py, test_real_node_gpu.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hack.fake_nvml import FakeGpu, FakeNvmlWorld, fake_uuid, load_in_process
from tests.support.fake_kube import FakeKube
from tests.support.rbac import bundle_rbac

# The enforcer's ServiceAccount in the bundle (manifests/gpu-enforcer/serviceaccount.yaml):
# the agent talks to the fake API with its token, under the bundle's RBAC.
SERVICE_ACCOUNT = "node-agents/gpu-mem-enforcer"
GIB = 1024**3
CARD = 16 * GIB  # two replicas: an agreed share of 8 GiB each
NODE = "gpu-node-1"


@contextlib.contextmanager
def fake_card(library: Path, tmp_path: Path) -> Iterator[FakeNvmlWorld]:
    """One 16 GiB card, no processes yet; this process's pynvml reads it."""
    world = FakeNvmlWorld(tmp_path / "nvml.state", [FakeGpu(0, fake_uuid(0), total=CARD)])
    world.write()
    with load_in_process(library, world.path):
        yield world


@contextlib.contextmanager
def cluster(
    tmp_path: Path,
    *pods: dict[str, Any],
    replicas: int | None = 2,
    namespace_annotations: dict[str, str] | None = None,
    components: tuple[str, ...] = (),
) -> Iterator[FakeKube]:
    """The node, namespace `ml` and `pods`, and a kubeconfig for the enforcer's ServiceAccount.

    The bundle's RBAC (plus `components` of manifests/) is enforced, and no
    request of the agent may have been refused: a manifest that grants too
    little fails here, not on a cluster.
    """
    with FakeKube(rbac_objects=bundle_rbac(*components)) as kube:
        labels = {"nvidia.com/gpu.replicas": str(replicas)} if replicas else {}
        kube.put({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": labels}})
        kube.put(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "ml", "annotations": namespace_annotations or {}},
            }
        )
        for pod in pods:
            kube.put(pod)
        kube.kubeconfig(tmp_path / "kubeconfig", service_account=SERVICE_ACCOUNT)
        yield kube
        assert kube.denied() == []


def enforcer_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--kubeconfig",
        str(tmp_path / "kubeconfig"),
        "--node-name",
        NODE,
        "--interval",
        "0.2",
        "--metrics-address",
        "off",
        *extra,
    ]
