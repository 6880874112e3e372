"""Benchmark of the controller's file server at Kubernetes' limits (issue 10, "Scale").

A synthetic cluster in the fake API: `--nodes` (5,000) nodes and `--pods`
(150,000) pods, of which `--token-pods` (3,000) carry a `to-inject`
annotation, spread at random over the nodes and round-robin over
`--namespaces` (300) namespaces, one token Secret per `--pods-per-secret`
(10) token pods, a template ConfigMap in every fourth namespace, and one
injector pod per node. The real controller (`python -m agents.token_refresher
controller`, its own process) serves the files on loopback; then one simulated
injector per node that has token pods presents its projected token (audience
`node-agents.io/token-files`, bound to its injector pod), claims its node's
token pods and waits for its first snapshot, all over TLS with the CA the
controller publishes, every stream kept open. Tokens are far from expiry: no
IdP is called. It reports:

- the controller's RSS after start-up and at its peak (VmRSS, VmHWM);
- the time from the controller's start until it is ready, and until every
  node is served; p50/p99 of the first-snapshot latency per injector;
- the API requests at start-up by verb and resource, the TokenReviews among them;
- a push round: `--push` token Secrets updated at once, the time until every
  stream of a node using one got its new snapshot, and that no other stream
  got any;
- the API requests per second once all are served and nothing changes
  (`--steady` seconds): the open streams' re-checks, template re-reads;
- the connect + TLS handshake time, and the SYNs the machine dropped on a full
  accept queue meanwhile (TcpExt ListenOverflows, machine-wide).

It fails (exit 1) when a node is not served, a snapshot holds a file of
another node's pod, a wrong or stale content, a refresh token or a client
secret, or a stream got a snapshot it had no reason to get.

    .venv/bin/python -m hack.bench_files [--quick] [--nodes 5000] [--pods 150000] ...

Prints a Markdown table (the README's figures), writes hack/results/bench_files.json
and ends with the summary as one JSON line. No root needed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import random
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from agents.token_refresher.spec import OUR_PREFIX, PREFIXES, render

if TYPE_CHECKING:
    from tests.support.fake_kube import FakeKube

JSON = dict[str, Any]

AGENTS_NAMESPACE = "node-agents"
INJECTOR_SA = "token-refresher-injector"
INJECTOR_LABELS = {
    "app.kubernetes.io/name": "token-refresher",
    "app.kubernetes.io/component": "injector",
}
AUDIENCE = "node-agents.io/token-files"
SERVER_NAME = "token-refresher-controller"  # in the serving certificate by default
CA_CONFIGMAP = "token-refresher-ca"
TEMPLATE_CONFIGMAP = "eos-template"
EOS = "oauth2:$(ACCESS_TOKEN):auth.cern.ch/auth/realms/cern/protocol/openid-connect/userinfo"
# Every refresh token and client secret contains this: a snapshot that does
# was given what no node may ever see.
NEVER_SENT = "BENCH-NEVER-SENT"
CREATED = "2026-01-01T00:00:00Z"


@dataclass(frozen=True)
class Sizes:
    nodes: int = 5000
    pods: int = 150_000
    token_pods: int = 3000
    namespaces: int = 300
    pods_per_secret: int = 10
    seed: int = 10


QUICK = Sizes(nodes=40, pods=1200, token_pods=60, namespaces=6, pods_per_secret=5)


# -- the synthetic cluster ---------------------------------------------------------------


@dataclass
class TokenSecret:
    """One token Secret; `generation` counts the bench's updates of its access token."""

    namespace: str
    name: str
    refresh_token: str
    client_secret: str
    prefix: str = OUR_PREFIX
    generation: int = 0
    # The tokens are long: real IdPs issue JWTs of about a kilobyte.
    salt: str = ""

    def access_token(self, generation: int | None = None) -> str:
        gen = self.generation if generation is None else generation
        return f"at-{self.namespace}-{self.name}-{gen}-{self.salt}"

    def obj(self, expires_at: float) -> JSON:
        token = {
            "access_token": self.access_token(),
            "token_type": "Bearer",
            "refresh_token": self.refresh_token,
            "expires_at": math.floor(expires_at),
        }
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "annotations": {f"{self.prefix}/is-token": "true"},
            },
            "type": "Opaque",
            "data": {
                "oauth": _b64(json.dumps(token)),
                "clientID": _b64("bench-client"),
                "clientSecret": _b64(self.client_secret),
            },
        }


@dataclass(frozen=True)
class File:
    secret: tuple[str, str]
    path: str
    template: str | None


@dataclass(frozen=True)
class TokenPod:
    namespace: str
    name: str
    uid: str
    node: str
    files: tuple[File, ...]

    def claim(self, resource_version: str) -> JSON:
        # The resourceVersion the pod was loaded with, as an injector's pod watch
        # has it: a reconnection then reuses the controller's verified pod (no
        # GET), as in a cluster. The bench never changes a pod.
        return {
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
            "resourceVersion": resource_version,
        }


@dataclass
class Cluster:
    sizes: Sizes
    nodes: list[str]
    namespaces: list[str]
    secrets: dict[tuple[str, str], TokenSecret]
    token_pods: list[TokenPod]
    injectors: dict[str, tuple[str, str]]  # node -> (pod name, uid)
    expires_at: float
    by_node: dict[str, list[TokenPod]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pod in self.token_pods:
            self.by_node.setdefault(pod.node, []).append(pod)

    def expected(self, node: str, generations: dict[tuple[str, str], int] | None = None) -> JSON:
        """{pod uid: {path: content}} the node should get (`generations`: per Secret)."""
        out: JSON = {}
        for pod in self.by_node.get(node, ()):
            files = {}
            for f in pod.files:
                secret = self.secrets[f.secret]
                gen = (generations or {}).get(f.secret, secret.generation)
                files[f.path] = render(f.template, _Token(secret.access_token(gen)))
            out[pod.uid] = files
        return out


@dataclass(frozen=True)
class _Token:
    access_token: str
    token_type: str = "Bearer"
    expires_at: float | None = None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# What a pod object holds besides its identity, shared by reference between
# pods: ~3 KB of JSON as the API returns it (managedFields, status), so that
# the controller's GETs parse realistic bodies, while 150,000 pods fit in
# the fake API's memory. The store never changes an object in place.
def _container(name: str) -> JSON:
    return {
        "name": name,
        "image": f"registry.example.org/{name}:1.2.3",
        "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/sh", "-c", "exec sleep infinity"],
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "TZ", "value": "UTC"}],
        "resources": {
            "limits": {"cpu": "1", "memory": "1Gi"},
            "requests": {"cpu": "100m", "memory": "256Mi"},
        },
        "volumeMounts": [
            {
                "name": "kube-api-access",
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                "readOnly": True,
            }
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }


_CONTAINERS = [_container("app"), _container("sidecar")]
_SPEC_REST: JSON = {
    "containers": _CONTAINERS,
    "restartPolicy": "Always",
    "terminationGracePeriodSeconds": 30,
    "dnsPolicy": "ClusterFirst",
    "schedulerName": "default-scheduler",
    "securityContext": {},
    "enableServiceLinks": True,
    "preemptionPolicy": "PreemptLowerPriority",
    "priority": 0,
    "tolerations": [
        {
            "key": "node.kubernetes.io/not-ready",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 300,
        },
        {
            "key": "node.kubernetes.io/unreachable",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 300,
        },
    ],
    "volumes": [
        {
            "name": "kube-api-access",
            "projected": {
                "defaultMode": 420,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {
                        "configMap": {
                            "name": "kube-root-ca.crt",
                            "items": [{"key": "ca.crt", "path": "ca.crt"}],
                        }
                    },
                ],
            },
        }
    ],
}
_STATUS: JSON = {
    "phase": "Running",
    "conditions": [
        {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": CREATED}
        for t in (
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        )
    ],
    "hostIP": "10.0.0.1",
    "podIP": "10.1.0.1",
    "qosClass": "Burstable",
    "startTime": CREATED,
    "containerStatuses": [
        {
            "name": c["name"],
            "ready": True,
            "restartCount": 0,
            "started": True,
            "image": c["image"],
            "imageID": "registry.example.org/app@sha256:" + "0" * 64,
            "containerID": "containerd://" + "1" * 64,
            "state": {"running": {"startedAt": CREATED}},
            "lastState": {},
        }
        for c in _CONTAINERS
    ],
}
_MANAGED_FIELDS = [
    {
        "manager": "kube-controller-manager",
        "operation": "Update",
        "apiVersion": "v1",
        "time": CREATED,
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}}},
            "f:spec": {"f:containers": {'k:{"name":"app"}': {".": {}, "f:image": {}}}},
        },
    },
    {
        "manager": "kubelet",
        "operation": "Update",
        "apiVersion": "v1",
        "time": CREATED,
        "fieldsType": "FieldsV1",
        "subresource": "status",
        "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:podIP": {}}},
    },
]


def _pod(
    namespace: str,
    name: str,
    uid: str,
    spec: JSON,
    labels: JSON,
    *,
    annotations: JSON | None = None,
) -> JSON:
    meta: JSON = {
        "name": name,
        "namespace": namespace,
        "uid": uid,
        "creationTimestamp": CREATED,
        "generation": 1,
        "labels": labels,
        "managedFields": _MANAGED_FIELDS,
    }
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": _STATUS}


def synthetic_cluster(sizes: Sizes, now: float) -> tuple[Cluster, Iterator[JSON]]:
    """The cluster's description and its objects (a generator: 150,000 pods are not
    built twice). Seeded: the same sizes give the same cluster."""
    if sizes.token_pods + sizes.nodes > sizes.pods:
        raise SystemExit("--pods must cover the token pods and one injector pod per node")
    rng = random.Random(sizes.seed)
    nodes = [f"node-{i:05d}" for i in range(sizes.nodes)]
    namespaces = [f"tenant-{i:04d}" for i in range(sizes.namespaces)]
    secrets: dict[tuple[str, str], TokenSecret] = {}
    token_pods: list[TokenPod] = []
    for j in range(sizes.token_pods):
        namespace = namespaces[j % len(namespaces)]
        index = j // len(namespaces)  # the pod's rank in its namespace
        key = (namespace, f"token-{index // sizes.pods_per_secret}")
        if key not in secrets:
            secrets[key] = TokenSecret(
                *key,
                refresh_token=f"rt-{NEVER_SENT}-{rng.getrandbits(64):x}",
                client_secret=f"cs-{NEVER_SENT}-{rng.getrandbits(64):x}",
                salt=rng.randbytes(660).hex(),
                # Half under CERN's prefix: both must keep working (compatibility).
                prefix=PREFIXES[len(secrets) % 2],
            )
        templated = (j % len(namespaces)) % 4 == 0
        files = [File(key, "/tmp/oauthtk_1000", EOS if templated else None)]
        if j % 5 == 0:  # a second container with its own file, as some pods have
            files.append(File(key, "/run/token/access", None))
        token_pods.append(
            TokenPod(namespace, f"user-{j:05d}", _uid(rng), rng.choice(nodes), tuple(files))
        )
    injectors = {node: (f"token-injector-{i:05d}", _uid(rng)) for i, node in enumerate(nodes)}
    cluster = Cluster(sizes, nodes, namespaces, secrets, token_pods, injectors, now + 30 * 86400)
    return cluster, _objects(cluster, rng)


def _to_inject(pod: TokenPod) -> str:
    entries = []
    for f in pod.files:
        entry: JSON = {"secretName": f.secret[1], "container": "app", "owner": 1000}
        if f.path != "/tmp/oauthtk_1000":
            entry.update(container="sidecar", path=f.path, mode="0440")
        if f.template is not None:
            entry["templateConfigMapName"] = TEMPLATE_CONFIGMAP
        entries.append(entry)
    return json.dumps(entries)


def _objects(cluster: Cluster, rng: random.Random) -> Iterator[JSON]:
    sizes = cluster.sizes
    for name in [AGENTS_NAMESPACE, *cluster.namespaces]:
        yield {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
    for node in cluster.nodes:
        yield {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node,
                "uid": _uid(rng),
                "labels": {"kubernetes.io/hostname": node},
            },
        }
    templated = {pod.namespace for pod in cluster.token_pods if pod.files[0].template}
    for namespace in sorted(templated):
        yield {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": TEMPLATE_CONFIGMAP, "namespace": namespace},
            "data": {"template": EOS},
        }
    for secret in cluster.secrets.values():
        yield secret.obj(cluster.expires_at)
    # One spec per node and ServiceAccount, shared by the pods that have both.
    specs: dict[tuple[str, str], JSON] = {}

    def spec(node: str, account: str) -> JSON:
        key = (node, account)
        if key not in specs:
            specs[key] = {
                **_SPEC_REST,
                "nodeName": node,
                "serviceAccountName": account,
                "serviceAccount": account,
            }
        return specs[key]

    injector_labels = {**INJECTOR_LABELS, "controller-revision-hash": "6d4cf56db6"}
    for node, (name, uid) in cluster.injectors.items():
        yield _pod(AGENTS_NAMESPACE, name, uid, spec(node, INJECTOR_SA), injector_labels)
    app_labels = {
        namespace: {"app": "notebook", "team": namespace} for namespace in cluster.namespaces
    }
    for i, pod in enumerate(cluster.token_pods):
        # Half under CERN's prefix: both must keep working (issue 10, compatibility).
        annotation = {f"{PREFIXES[i % 2]}/to-inject": _to_inject(pod)}
        yield _pod(
            pod.namespace,
            pod.name,
            pod.uid,
            spec(pod.node, "default"),
            app_labels[pod.namespace],
            annotations=annotation,
        )
    plain = sizes.pods - sizes.token_pods - sizes.nodes
    for i in range(plain):
        namespace = cluster.namespaces[i % len(cluster.namespaces)]
        node = cluster.nodes[i % len(cluster.nodes)]
        yield _pod(
            namespace, f"batch-{i:06d}", _uid(rng), spec(node, "default"), app_labels[namespace]
        )


def _status_kib(name: str, pid: int | str = "self") -> int:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


# -- the simulated injectors ---------------------------------------------------------------
#
# They run in a process of their own, on one asyncio loop: their TLS and
# parsing share no GIL with the fake API (this process) nor the controller,
# and 5,000 of them cost one thread. Each event goes to stdout as a JSON line.


class _Refused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _lines(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The NDJSON lines of a chunked body, until its last chunk."""
    buffer = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            return
        buffer += (await reader.readexactly(size + 2))[:-2]
        while b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            yield line


class Injectors:
    """One simulated injector per job: open the stream, report every snapshot, reconnect
    at once after a clean end (as the injector does), until told to stop."""

    def __init__(self, plan: JSON, out: IO[str]) -> None:
        self.plan = plan
        self.out = out
        self.heartbeats = 0
        self.stopping = asyncio.Event()
        self.context: ssl.SSLContext | None = None

    def emit(self, **event: Any) -> None:
        self.out.write(json.dumps(event, separators=(",", ":")) + "\n")
        self.out.flush()

    async def run(self, go: asyncio.Event) -> None:
        gate = asyncio.Semaphore(self.plan["concurrency"])
        self.emit(e="loaded", injectors=len(self.plan["jobs"]))
        await go.wait()
        # The CA exists only once the controller published it, just before `go`.
        self.context = ssl.create_default_context(cafile=self.plan["ca_file"])
        tasks = [asyncio.create_task(self.injector(job, gate)) for job in self.plan["jobs"]]
        await self.stopping.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.emit(e="bye", heartbeats=self.heartbeats, cpu_s=usage.ru_utime + usage.ru_stime)

    async def injector(self, job: JSON, gate: asyncio.Semaphore) -> None:
        node = job["node"]
        body = job["body"].encode()
        request = (
            f"POST /v1/files HTTP/1.1\r\nHost: {SERVER_NAME}:{self.plan['port']}\r\n"
            f"Authorization: Bearer {job['token']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        timeout = self.plan["timeout"]
        stream = 0
        while True:
            stream += 1
            writer: asyncio.StreamWriter | None = None
            try:
                async with gate:  # bounded: how many are between connect and first snapshot
                    started = time.monotonic()
                    reader, opened = await asyncio.wait_for(
                        asyncio.open_connection(
                            "127.0.0.1",
                            self.plan["port"],
                            ssl=self.context,
                            server_hostname=SERVER_NAME,
                        ),
                        timeout,
                    )
                    connected = time.monotonic()
                    writer = opened
                    opened.write(request)
                    status, headers = await asyncio.wait_for(_head(reader), timeout)
                    if status != 200:
                        length = int(headers.get("content-length") or 0)
                        raise _Refused(status, await reader.readexactly(length))
                    lines = _lines(reader)
                    first = await asyncio.wait_for(anext(lines), timeout)
                    self.emit(
                        e="snap",
                        n=node,
                        s=stream,
                        t=time.monotonic(),
                        t0=started,
                        tc=connected,
                        line=first.decode(),
                    )
                async for line in lines:
                    if line.startswith(b'{"type":"heartbeat"'):
                        self.heartbeats += 1
                    else:
                        self.emit(
                            e="snap", n=node, s=stream, t=time.monotonic(), line=line.decode()
                        )
                self.emit(e="end", n=node, s=stream, t=time.monotonic())
                continue  # a clean end: at once, no backoff (the contract)
            except asyncio.CancelledError:
                raise
            except _Refused as err:
                self.emit(
                    e="error",
                    n=node,
                    s=stream,
                    t=time.monotonic(),
                    error=f"http_{err.status}",
                    detail=str(err),
                )
            except (OSError, EOFError, ValueError, StopAsyncIteration, TimeoutError) as err:
                self.emit(
                    e="error",
                    n=node,
                    s=stream,
                    t=time.monotonic(),
                    error=type(err).__name__,
                    detail=str(err)[:200],
                )
            finally:
                if writer is not None:
                    writer.close()
            await asyncio.sleep(self.plan["retry"])


def run_injectors(plan_path: str) -> int:
    """The injectors' process: `go` on stdin starts them, `stop` (or EOF) ends them."""
    plan = json.loads(Path(plan_path).read_text())

    async def main() -> None:
        injectors = Injectors(plan, sys.stdout)
        loop = asyncio.get_running_loop()
        go = asyncio.Event()

        def commands() -> None:
            for line in sys.stdin:
                if line.strip() == "go":
                    loop.call_soon_threadsafe(go.set)
                elif line.strip() == "stop":
                    break
            loop.call_soon_threadsafe(go.set)
            loop.call_soon_threadsafe(injectors.stopping.set)

        threading.Thread(target=commands, daemon=True).start()
        await injectors.run(go)

    asyncio.run(main())
    return 0


# -- what the injectors saw ----------------------------------------------------------------


@dataclass
class Snapshot:
    t: float
    node: str
    stream: int
    revision: int
    generations: dict[tuple[str, str], int]  # Secret -> the generation its files hold


class Observed:
    """The injectors' events, checked as they come (a reader thread feeds them)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.cond = threading.Condition()
        self.first: dict[str, float] = {}  # node -> its first snapshot
        self.latency: dict[str, float] = {}  # node -> first snapshot - its attempt's start
        self.handshake: list[float] = []
        self.snapshots: list[Snapshot] = []
        self.revisions: dict[tuple[str, int], int] = {}
        self.errors: Counter[str] = Counter()
        self.ended = 0
        self.problems: list[str] = []
        self.loaded = False
        self.bye: JSON | None = None

    def problem(self, text: str) -> None:
        self.problems.append(text)
        if len(self.problems) <= 20:
            print(f"CHECK FAILED: {text}", file=sys.stderr)

    def feed(self, event: JSON) -> None:
        with self.cond:
            kind = event["e"]
            if kind == "snap":
                self._snapshot(event)
            elif kind == "error":
                self.errors[event["error"]] += 1
                if self.errors[event["error"]] <= 3:
                    print(
                        f"injector {event['n']}: {event['error']}: {event['detail']}",
                        file=sys.stderr,
                    )
            elif kind == "end":
                self.ended += 1
            elif kind == "loaded":
                self.loaded = True
            elif kind == "bye":
                self.bye = event
            self.cond.notify_all()

    def _snapshot(self, event: JSON) -> None:
        node, line = event["n"], event["line"]
        snapshot = json.loads(line)
        if NEVER_SENT in line:
            self.problem(f"{node}: a snapshot holds a refresh token or client secret")
        if snapshot.get("type") != "snapshot" or snapshot.get("node") != node:
            kind, its = snapshot.get("type"), snapshot.get("node")
            self.problem(f"{node}: not its snapshot: type {kind}, node {its}")
            return
        key = (node, event["s"])
        revision = snapshot.get("revision")
        if revision != self.revisions.get(key, 0) + 1:
            self.problem(f"{node}: revision {revision} after {self.revisions.get(key, 0)}")
        self.revisions[key] = revision
        if snapshot.get("refused"):
            self.problem(f"{node}: claims refused: {snapshot['refused']}")
        mine = {pod.uid: pod for pod in self.cluster.by_node.get(node, ())}
        got = {pod.get("uid"): pod for pod in snapshot.get("pods") or ()}
        if foreign := set(got) - set(mine):
            self.problem(f"{node}: got {len(foreign)} pod(s) not on this node: {sorted(foreign)}")
        if missing := set(mine) - set(got):
            self.problem(f"{node}: {len(missing)} of its pods missing: {sorted(missing)}")
        generations: dict[tuple[str, str], int] = {}
        for uid, wire in got.items():
            pod = mine.get(uid)
            if pod is None:
                continue
            if wire.get("problem"):
                self.problem(f"{node}: pod {pod.name}: {wire['problem']}")
            files = {f.get("path"): f for f in wire.get("files") or ()}
            for f in pod.files:
                sent = files.get(f.path)
                if sent is None or sent.get("content") is None:
                    self.problem(f"{node}: {pod.name}:{f.path} missing: {sent}")
                    continue
                content = base64.b64decode(sent["content"])
                if NEVER_SENT.encode() in content:
                    self.problem(
                        f"{node}: {pod.name}:{f.path} holds a refresh token or client secret"
                    )
                gen = self._generation(f, content)
                if gen is None:
                    self.problem(f"{node}: {pod.name}:{f.path} holds no token of {f.secret}")
                else:
                    generations[f.secret] = min(gen, generations.get(f.secret, gen))
        self.snapshots.append(Snapshot(event["t"], node, event["s"], revision, generations))
        if node not in self.first:
            self.first[node] = event["t"]
            self.latency[node] = event["t"] - event["t0"]
            self.handshake.append(event["tc"] - event["t0"])

    def _generation(self, f: File, content: bytes) -> int | None:
        secret = self.cluster.secrets[f.secret]
        for gen in range(secret.generation, -1, -1):
            if content == render(f.template, _Token(secret.access_token(gen))):
                return gen
        return None

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(done, timeout)


def _follow(proc: subprocess.Popen[str], observed: Observed) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        observed.feed(json.loads(line))


# -- the controller ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A process's memory and CPU from /proc, sampled so that the peak is not missed."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def status(self, name: str) -> int:
        return _status_kib(name, self.pid)

    def cpu_s(self) -> float:
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime

    def sample(self) -> JSON:
        return {
            "rss_mib": round(self.status("VmRSS") / 1024, 1),
            "peak_rss_mib": round(self.status("VmHWM") / 1024, 1),
            "threads": self.status("Threads"),
            "cpu_s": round(self.cpu_s(), 2),
        }


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except OSError:
        return 0, ""


def _metrics(text: str) -> dict[str, float]:
    """The file server's and TokenReview samples of a /metrics page."""
    out = {}
    for line in text.splitlines():
        if line.startswith(("token_refresher_files_", "token_refresher_token_reviews_total")):
            name, _, value = line.rpartition(" ")
            if not name.endswith(("_created", '_created"')) and "_created{" not in name:
                out[name] = float(value)
    return out


def api_request(method: str, path: str, watch: bool) -> str:
    """`verb resource` of an API request, as RBAC names them; pod reads split into the
    injectors' own (node authentication) and the claimed ones (claim verification)."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"]:
        rest = parts[3:]
    else:
        return f"{method.lower()} {path}"
    namespace = ""
    if len(rest) > 2 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    named = len(rest) > 1
    resource = "/".join(rest[:1] + rest[2:3])
    if resource == "pods" and (named or namespace):
        resource += " (injector)" if namespace == AGENTS_NAMESPACE else " (claimed)"
    verb = {
        "GET": "watch" if watch else "get" if named else "list",
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }.get(method, method.lower())
    return f"{verb} {resource}"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def _netstat(*names: str) -> dict[str, int]:
    """TcpExt counters (whole machine): ListenOverflows counts SYNs dropped on a full
    accept queue, each a client waiting for its 1 s SYN retransmission."""
    with open("/proc/net/netstat") as netstat:
        lines = netstat.read().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            table = dict(zip(head.split()[1:], map(int, values.split()[1:]), strict=True))
            return {name: table.get(name, 0) for name in names}
    return {}


# -- the run -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small cluster: a smoke run")
    for name, default in vars(Sizes()).items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"default {default} ({getattr(QUICK, name)} with --quick)",
        )
    parser.add_argument("--push", type=int, default=None, help="Secrets updated at once (20; 3)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=256,
        help="injectors between connecting and their first snapshot at once",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="s until every node is served")
    parser.add_argument("--settle", type=float, default=3.0, help="s to watch for stray pushes")
    parser.add_argument(
        "--steady",
        type=float,
        default=None,
        help="s of API requests measured once all are served, nothing changing (60; 5)",
    )
    parser.add_argument("--injectors", metavar="PLAN", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.injectors:
        return run_injectors(args.injectors)
    base = QUICK if args.quick else Sizes()
    sizes = Sizes(
        **{k: v if getattr(args, k) is None else getattr(args, k) for k, v in vars(base).items()}
    )
    push = args.push if args.push is not None else (3 if args.quick else 20)
    if args.steady is None:
        args.steady = 5.0 if args.quick else 60.0
    work = Path(tempfile.mkdtemp(prefix="bench-files-"))
    try:
        results, failures = _run(sizes, push, args, work)
    except BenchError as err:
        print(f"bench_files: {err} (logs in {work})", file=sys.stderr)
        return 1
    out = Path(__file__).parent / "results" / "bench_files.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    _table(results)
    summary = {**results["summary"], "failures": len(failures)}
    if failures:
        print(f"\n{len(failures)} check(s) failed; first: {failures[:5]} (logs in {work})")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, separators=(",", ":")))
    return 1 if failures else 0


class BenchError(Exception):
    """The run could not go on (the controller died, the fake API lacks something)."""


def _run(sizes: Sizes, push: int, args: argparse.Namespace, work: Path) -> tuple[JSON, list[str]]:
    from tests.support import fake_kube

    results: JSON = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}",
        "python": platform.python_version(),
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
        "sizes": vars(sizes),
        "concurrency": args.concurrency,
    }
    failures: list[str] = []
    # socketserver's backlog of 5 would lose SYNs of a burst of the controller's
    # API requests (1 s each): no property of the controller. The apiserver's
    # Go listener uses somaxconn.
    kube = fake_kube.FakeKube(backlog=socket.SOMAXCONN)
    if not hasattr(kube, "service_account_token"):
        raise BenchError("the fake API issues no ServiceAccount tokens yet (issue10-fakeapi)")
    rss = _status_kib("VmRSS")
    started = time.monotonic()
    cluster, objects = synthetic_cluster(sizes, time.time())
    # FakeKube.put copies every object four times and records an event: 150,000
    # pods would take ~15 s and ~300 MB. load() stores them as they are (they
    # share sub-objects) and compacts the history past them.
    stored = kube.load(objects)
    served = sorted(cluster.by_node)
    results["cluster"] = {
        "objects": stored,
        "nodes_with_token_pods": len(served),
        "token_secrets": len(cluster.secrets),
        "files": sum(len(p.files) for p in cluster.token_pods),
        "load_s": round(time.monotonic() - started, 2),
        "fake_api_mib": round((_status_kib("VmRSS") - rss) / 1024),
    }
    print(f"cluster: {results['cluster']}", file=sys.stderr)
    versions = {}
    for pod in cluster.token_pods:
        stored = kube.get("pods", pod.namespace, pod.name)
        assert stored is not None
        versions[(pod.namespace, pod.name)] = stored["metadata"]["resourceVersion"]
    jobs = []
    for node in served:
        token = kube.service_account_token(
            AGENTS_NAMESPACE, INJECTOR_SA, audiences=(AUDIENCE,), pod=cluster.injectors[node]
        )
        claims = [pod.claim(versions[(pod.namespace, pod.name)]) for pod in cluster.by_node[node]]
        jobs.append({"node": node, "token": token, "body": json.dumps({"pods": claims})})
    files_port, metrics_port = _free_port(), _free_port()
    ca_file = work / "ca.crt"
    plan = {
        "port": files_port,
        "ca_file": str(ca_file),
        "concurrency": args.concurrency,
        "timeout": 120.0,
        "retry": 0.5,
        "jobs": jobs,
    }
    (work / "plan.json").write_text(json.dumps(plan))
    observed = Observed(cluster)
    with contextlib.ExitStack() as stack:
        kube.start()
        stack.callback(kube.close)
        kubeconfig = kube.kubeconfig(work / "kubeconfig", AGENTS_NAMESPACE)
        # The injectors' process starts first: its own start-up is not measured.
        injectors = subprocess.Popen(
            [sys.executable, "-m", "hack.bench_files", "--injectors", str(work / "plan.json")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(_end, injectors)
        threading.Thread(target=_follow, args=(injectors, observed), daemon=True).start()
        if not observed.wait(lambda: observed.loaded, 60):
            raise BenchError("the injectors' process did not start")
        kube.clear_calls()
        netstat = _netstat("ListenOverflows", "ListenDrops")
        cpu = time.process_time()
        log = (work / "controller.log").open("wb")
        t0 = time.monotonic()
        controller = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agents.token_refresher",
                "controller",
                # Outside a pod no ServiceAccount mount says where it runs.
                "--own-namespace",
                AGENTS_NAMESPACE,
                "--kubeconfig",
                str(kubeconfig),
                # Never called: every token is 30 days from expiry.
                "--token-url",
                "https://idp.invalid/token",
                "--lease-namespace",
                AGENTS_NAMESPACE,
                "--identity",
                "bench",
                "--metrics-address",
                f"127.0.0.1:{metrics_port}",
                "--files-address",
                f"127.0.0.1:{files_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        stack.callback(_end, controller)
        proc = Process(controller.pid)
        base_url = f"http://127.0.0.1:{metrics_port}"
        deadline = t0 + 120
        while True:
            if controller.poll() is not None:
                raise BenchError(f"the controller exited with {controller.returncode}")
            ca = kube.get("configmaps", AGENTS_NAMESPACE, CA_CONFIGMAP)
            if ca and _get(base_url + "/readyz", 1.0)[0] == 200:
                break
            if time.monotonic() > deadline:
                raise BenchError("the controller was not ready within 120 s")
            time.sleep(0.05)
        t_ready = time.monotonic()
        calls_ready = len(kube.calls())
        ready_sample = proc.sample()
        ca_file.write_text(ca["data"]["ca.crt"])
        assert injectors.stdin is not None
        injectors.stdin.write("go\n")
        injectors.stdin.flush()
        t_go = time.monotonic()
        deadline = t_go + args.timeout
        while not observed.wait(lambda: len(observed.first) == len(served), 1.0):
            if controller.poll() is not None:
                raise BenchError(f"the controller exited with {controller.returncode}")
            if time.monotonic() > deadline:
                break
        with observed.cond:
            missing = sorted(set(served) - set(observed.first))
            since_go = [t - t_go for t in observed.first.values()]
            latencies = list(observed.latency.values())
            handshakes = list(observed.handshake)
            last = max(observed.first.values(), default=t_go)
        if missing:
            failures.append(
                f"{len(missing)} node(s) not served in {args.timeout:g} s: {missing[:5]}"
            )
        calls = kube.calls()
        started_sample = proc.sample()
        fake_cpu = time.process_time() - cpu
        overflows = {k: v - netstat[k] for k, v in _netstat(*netstat).items()}
        results["start"] = {
            "ready_s": round(t_ready - t0, 2),
            "all_served_s": round(last - t0, 2),
            "served_after_ready_s": round(last - t_go, 2),
            "nodes_served": len(observed.first),
            # From the injectors' start (after the controller is ready), retries included.
            "first_snapshot_s_p50": round(percentile(since_go, 50), 3) if since_go else None,
            "first_snapshot_s_p99": round(percentile(since_go, 99), 3) if since_go else None,
            "first_snapshot_s_max": round(max(since_go), 3) if since_go else None,
            # From the start of the attempt that got it: connect, TLS, request, answer.
            "attempt_s_p50": round(percentile(latencies, 50), 3) if latencies else None,
            "attempt_s_p99": round(percentile(latencies, 99), 3) if latencies else None,
            "handshake_s_p99": round(percentile(handshakes, 99), 3) if handshakes else None,
            "client_errors": dict(observed.errors),
            "controller_at_ready": ready_sample,
            "controller_after_start": started_sample,
            "bench_process_cpu_s": round(fake_cpu, 2),
            "api_requests_until_ready": dict(
                Counter(api_request(c.method, c.path, c.watch) for c in calls[:calls_ready])
            ),
            "api_requests": dict(
                sorted(Counter(api_request(c.method, c.path, c.watch) for c in calls).items())
            ),
            # Beyond one per stream: the 30 s re-checks of open streams, once the 300 s
            # review cache lapsed, and retried connections.
            "token_reviews": sum(1 for c in calls if c.path.endswith("/tokenreviews")),
            "listen_overflows": overflows,
            "metrics": _metrics(_get(base_url + "/metrics")[1]),
        }
        results["push"] = _push(
            kube, cluster, observed, count=push, settle=args.settle, failures=failures
        )
        results["steady"] = _steady(kube, args.steady, len(served))
        results["controller_end"] = proc.sample()
        results["metrics_end"] = _metrics(_get(base_url + "/metrics")[1])
        injectors.stdin.write("stop\n")
        injectors.stdin.flush()
        observed.wait(lambda: observed.bye is not None, 60)
        results["injectors"] = {
            "process_cpu_s": round((observed.bye or {}).get("cpu_s", 0.0), 2),
            "heartbeats": (observed.bye or {}).get("heartbeats"),
            "streams_ended_by_server": observed.ended,
        }
    failures += observed.problems
    results["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    start, pushed = results["start"], results["push"]
    results["summary"] = {
        "nodes": sizes.nodes,
        "pods": sizes.pods,
        "token_pods": sizes.token_pods,
        "streams": len(served),
        "controller_rss_mib_after_start": started_sample["rss_mib"],
        "controller_rss_mib_peak": results["controller_end"]["peak_rss_mib"],
        "ready_s": start["ready_s"],
        "all_served_s": start["all_served_s"],
        "first_snapshot_s_p50": start["first_snapshot_s_p50"],
        "first_snapshot_s_p99": start["first_snapshot_s_p99"],
        "api_requests_at_start": sum(start["api_requests"].values()),
        "token_reviews": start["token_reviews"],
        "push_secrets": pushed["secrets"],
        "push_streams": pushed["affected_streams"],
        "push_s_p50": pushed["latency_s_p50"],
        "push_s_max": pushed["latency_s_max"],
        "push_to_other_streams": pushed["snapshots_to_other_streams"],
        "steady_api_requests_per_s": round(sum(results["steady"]["requests_per_s"].values()), 1),
        "load_avg": results["load_avg_before"][0],
    }
    return results, failures


def _push(
    kube: FakeKube,
    cluster: Cluster,
    observed: Observed,
    *,
    count: int,
    settle: float,
    failures: list[str],
) -> JSON:
    """Update `count` Secrets at once (a refresh each): every stream using one gets
    the new token, no other stream gets anything."""
    rng = random.Random(cluster.sizes.seed + 1)
    chosen = set(rng.sample(sorted(cluster.secrets), min(count, len(cluster.secrets))))
    uses = {
        node: {f.secret for pod in pods for f in pod.files} & chosen
        for node, pods in cluster.by_node.items()
    }
    affected = {node for node, keys in uses.items() if keys}
    with observed.cond:
        since = len(observed.snapshots)
    calls = len(kube.calls())
    put_at: dict[tuple[str, str], float] = {}
    for key in sorted(chosen):
        secret = cluster.secrets[key]
        secret.generation += 1
        kube.put(secret.obj(cluster.expires_at))
        put_at[key] = time.monotonic()
    delivered: dict[str, float] = {}

    def scan() -> bool:
        for snap in observed.snapshots[since:]:
            if (
                snap.node in affected
                and snap.node not in delivered
                and all(
                    snap.generations.get(k) == cluster.secrets[k].generation
                    for k in uses[snap.node]
                )
            ):
                delivered[snap.node] = snap.t
        return len(delivered) == len(affected)

    observed.wait(scan, 30.0)
    time.sleep(settle)  # stray pushes would come within this
    with observed.cond:
        scan()
        later = observed.snapshots[since:]
    # A new stream (the server ends each after ~300 s) starts at revision 1: no push.
    strays = [s for s in later if s.node not in affected and s.revision > 1]
    extra = len([s for s in later if s.node in affected and s.revision > 1]) - len(delivered)
    if strays:
        failures.append(f"{len(strays)} snapshot(s) pushed to nodes using none of the Secrets")
    if len(delivered) != len(affected):
        failures.append(f"{len(affected) - len(delivered)} stream(s) never got the new tokens")
    latencies = [t - max(put_at[k] for k in uses[node]) for node, t in delivered.items()]
    return {
        "secrets": len(chosen),
        "affected_streams": len(affected),
        "delivered": len(delivered),
        "latency_s_p50": round(percentile(latencies, 50), 3) if latencies else None,
        "latency_s_p99": round(percentile(latencies, 99), 3) if latencies else None,
        "latency_s_max": round(max(latencies), 3) if latencies else None,
        "all_delivered_s": round(max(delivered.values()) - min(put_at.values()), 3)
        if delivered
        else None,
        "snapshots_to_other_streams": len(strays),
        "extra_snapshots_to_affected": max(0, extra),
        "api_requests": dict(
            Counter(api_request(c.method, c.path, c.watch) for c in kube.calls()[calls:])
        ),
    }


def _steady(kube: FakeKube, seconds: float, streams: int) -> JSON:
    """API requests per second while nothing changes: the open streams' re-checks
    (every 30 s; a TokenReview once its 300 s cache lapsed; the injector pods come
    from a watch), template re-reads, Lease renewals."""
    since = len(kube.calls())
    time.sleep(seconds)
    calls = Counter(api_request(c.method, c.path, c.watch) for c in kube.calls()[since:])
    return {
        "seconds": seconds,
        "requests_per_s": {k: round(v / seconds, 2) for k, v in sorted(calls.items())}
        if seconds > 0
        else {},
        "requests_per_stream_per_min": round(sum(calls.values()) / seconds * 60 / streams, 2)
        if streams and seconds > 0
        else None,
    }


def _end(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _table(results: JSON) -> None:
    s, start, pushed = results["summary"], results["start"], results["push"]
    cluster, after = results["cluster"], start["controller_after_start"]
    steady = results["steady"]
    print(
        f"machine: {results['machine']}, Python {results['python']}, load average "
        f"{results['load_avg_before']} before, {results['load_avg_after']} after"
    )
    print(
        f"{s['nodes']} nodes, {s['pods']} pods, {s['token_pods']} token pods on {s['streams']} "
        f"nodes ({cluster['token_secrets']} token Secrets, {cluster['files']} files); "
        f"fake API: {cluster['fake_api_mib']} MiB\n"
    )
    calls = ", ".join(f"{k} {v}" for k, v in start["api_requests"].items())
    rows = [
        (
            "controller RSS after start-up / peak",
            f"{s['controller_rss_mib_after_start']} / {s['controller_rss_mib_peak']} MiB "
            f"({after['threads']} threads)",
        ),
        (
            "controller start -> ready / every node served",
            f"{s['ready_s']} / {s['all_served_s']} s",
        ),
        (
            "first snapshot per injector, p50 / p99 / max",
            f"{s['first_snapshot_s_p50']} / {s['first_snapshot_s_p99']} / "
            f"{start['first_snapshot_s_max']} s",
        ),
        (
            "connect + TLS handshake, p99 (SYNs dropped on a full accept queue)",
            f"{start['handshake_s_p99']} s ({start['listen_overflows'].get('ListenOverflows')})",
        ),
        (
            "injector attempts that failed",
            ", ".join(f"{k} {v}" for k, v in start["client_errors"].items()) or "none",
        ),
        ("controller CPU until every node served", f"{after['cpu_s']} s"),
        (f"API requests at start-up ({s['api_requests_at_start']})", calls),
        ("TokenReviews", str(s["token_reviews"])),
        (
            f"push: {pushed['secrets']} Secrets -> {pushed['affected_streams']} streams, "
            "p50 / p99 / max",
            f"{pushed['latency_s_p50']} / {pushed['latency_s_p99']} / {pushed['latency_s_max']} s",
        ),
        ("snapshots to streams using none of them", str(pushed["snapshots_to_other_streams"])),
        (
            f"API requests per s, steady ({steady['seconds']:.0f} s, "
            f"{steady['requests_per_stream_per_min']} per stream per min)",
            ", ".join(f"{k} {v}" for k, v in steady["requests_per_s"].items()),
        ),
    ]
    print("| measure | result |\n|---|---|")
    for measure, result in rows:
        print(f"| {measure} | {result} |")


if __name__ == "__main__":
    sys.exit(main())
