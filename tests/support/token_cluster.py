"""The token-delivery cluster of the injector tests: fake API, containers, both agents.

`Cluster` holds a fake API server (real HTTP, the bundle's RBAC), a world of
containers and the argv of a real controller serving files over TLS and of a
real injector streaming them. The world is fake containers (real chrooted
processes in kubelet-like cgroups, hack/containers.py) in the fast tests, a real
containerd (hack/containerd.py) in the real-node ones: the agents see the same
Pods either way. The `container_init` and `cluster` fixtures are in
tests/integration/conftest.py.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from agents.token_refresher.cli import main
from hack.autofs_world import wait_for
from hack.containers import Container, ContainerWorld, new_pod_uid
from hack.prometheus import free_port
from tests.support.agent import AgentThread
from tests.support.fake_kube import FakeKube
from tests.support.memcg import BoundedAgent
from tests.support.rbac import bundle_rbac
from tests.support.token_files import AUDIENCE, INJECTOR_LABELS, INJECTOR_SA

NODE = "node-a"
NS = "science"
AGENTS_NS = "node-agents"  # the bundle's namespace: RBAC grants the agents' Roles there
CONTROLLER_SA = "token-refresher-controller"


class PodWorld(Protocol):
    """What a Cluster needs of its containers: the Pod their kubelet would report
    (`ContainerWorld.pod`, `Containerd.pod`)."""

    def pod(
        self,
        name: str,
        namespace: str,
        node: str,
        containers: Sequence[Any],
        annotations: dict[str, str] | None = None,
        /,
    ) -> dict[str, Any]: ...


World = TypeVar("World", bound=PodWorld)


@dataclass
class Cluster(Generic[World]):
    """A fake API server, containers, a controller serving files, and helpers."""

    kube: FakeKube
    containers: World
    tmp: Path
    files_port: int = field(default_factory=free_port)

    def pod(
        self: Cluster[ContainerWorld],
        name: str,
        annotations: dict[str, str],
        containers: tuple[str, ...] = ("app",),
        *,
        node: str = NODE,
        dirs: tuple[str, ...] = (),
    ) -> list[Container]:
        """Start the pod's fake containers and publish the pod as its kubelet would."""
        uid = new_pod_uid()
        started = self.containers.add_many([(uid, c) for c in containers], dirs=dirs)
        self.kube.put(self.containers.pod(name, NS, node, started, annotations))
        return started

    def republish(self, name: str, started: Sequence[Any], annotations: dict[str, str]) -> None:
        """Publish (again) pod `name` of these started containers, as its kubelet would
        (a restart: the new container IDs in its status)."""
        self.kube.put(self.containers.pod(name, NS, NODE, started, annotations))

    @property
    def kubeconfig(self) -> Path:
        """The injector's: its ServiceAccount's token, the bundle's rules."""
        return self.kube.kubeconfig(
            self.tmp / "kubeconfig-injector", service_account=f"{AGENTS_NS}/{INJECTOR_SA}"
        )

    def argv(self, *extra: str, interval: float = 0.3) -> list[str]:
        return [
            "injector",
            "--kubeconfig",
            str(self.kubeconfig),
            # In a pod its ServiceAccount mount says where it runs.
            "--own-namespace",
            AGENTS_NS,
            "--node-name",
            NODE,
            "--interval",
            str(interval),
            "--metrics-address",
            "off",
            "--controller-url",
            f"https://127.0.0.1:{self.files_port}",
            "--controller-token-file",
            str(self.projected_token()),
            "--state-file",
            str(self.tmp / "injector-state" / "files.json"),
            *extra,
        ]

    def projected_token(self) -> Path:
        """The injector pod's projected token (audience of the file server), as kubelet
        writes it; the pod is published first, as the DaemonSet's would be."""
        name = f"injector-{NODE}"
        pod = self.kube.get("pods", AGENTS_NS, name)
        if pod is None:
            pod = self.kube.put(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": name,
                        "namespace": AGENTS_NS,
                        "uid": new_pod_uid(),
                        "labels": dict(INJECTOR_LABELS),
                    },
                    "spec": {
                        "nodeName": NODE,
                        "serviceAccountName": INJECTOR_SA,
                        "containers": [{"name": "injector", "image": "node-agents"}],
                    },
                    "status": {"phase": "Running"},
                }
            )
        meta = pod["metadata"]
        path = self.tmp / "projected" / "token"
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            self.kube.service_account_token(
                AGENTS_NS,
                INJECTOR_SA,
                audiences=(AUDIENCE,),
                pod=(meta["name"], meta["uid"]),
            )
        )
        return path

    def controller_argv(self, *extra: str) -> list[str]:
        kubeconfig = self.kube.kubeconfig(
            self.tmp / "kubeconfig-controller", service_account=f"{AGENTS_NS}/{CONTROLLER_SA}"
        )
        return [
            "controller",
            "--kubeconfig",
            str(kubeconfig),
            "--own-namespace",
            AGENTS_NS,
            "--interval",
            "0.3",
            "--metrics-address",
            "off",
            "--files-address",
            f"127.0.0.1:{self.files_port}",
            "--tls-names",
            "127.0.0.1",
            "--identity",
            "replica-a",
            # Never called (no token is due within a test), but a Secret without a
            # token URL would be reported, and its status written, at every change.
            "--token-url",
            "https://idp.invalid/token",
            *extra,
        ]

    def agent_logs(self) -> str:
        """What the agents run as processes (`memcg`) logged; in-thread agents log to caplog."""
        return "".join(log.read_text(errors="replace") for log in sorted(self.tmp.glob("*-*.log")))

    def _agent(self, argv: list[str], role: str, memcg: bool) -> AgentThread | BoundedAgent:
        """In a thread, or (memcg) as a process in a memory cgroup with its manifest's
        limit, checked when it stops: the red-team tests run the agent they attack so."""
        if memcg:
            log = self.tmp / f"{role}-{len(list(self.tmp.glob(f'{role}-*.log')))}.log"
            return BoundedAgent(argv, f"token-refresher/{role}.yaml", log=log)
        return AgentThread(main, argv)

    @contextlib.contextmanager
    def controller(self, *extra: str, memcg: bool = False) -> Iterator[AgentThread | BoundedAgent]:
        """The controller, once its file server answers with its CA published."""
        with self._agent(self.controller_argv(*extra), "controller", memcg) as controller:
            wait_for(lambda: self.kube.get("configmaps", AGENTS_NS, "token-refresher-ca"), 20)
            wait_for(self._files_listening, 20)
            yield controller

    def _files_listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.files_port), 0.5).close()
        except OSError:
            return False
        return True

    @contextlib.contextmanager
    def injector(
        self,
        *extra: str,
        interval: float = 0.3,
        controller: tuple[str, ...] = (),
        memcg: bool = False,
    ) -> Iterator[AgentThread | BoundedAgent]:
        """The injector (yielded: tests read its metrics), with a controller serving it;
        `memcg`: both as processes in memory cgroups with their manifests' limits."""
        with (
            self.controller(*controller, memcg=memcg),
            self._agent(self.argv(*extra, interval=interval), "injector", memcg) as agent,
        ):
            yield agent


@contextlib.contextmanager
def token_cluster(containers: World, tmp_path: Path) -> Iterator[Cluster[World]]:
    """A Cluster on `containers` with the tenant's and the agents' namespaces; at its
    end, the bundle's RBAC refused neither agent anything it needs (nor allowed what
    it must not)."""
    with FakeKube(rbac_objects=bundle_rbac()) as kube:
        for namespace in (NS, AGENTS_NS):
            kube.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        yield Cluster(kube, containers, tmp_path)
        assert kube.denied() == []
