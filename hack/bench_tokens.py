"""Benchmark of the token refresher (issue 4, acceptance 5). Needs root and gcc.

One node with 500 annotated pods (a node's injector claims at most
fileclient.MAX_CLAIMS, 1024, from the file server),
each a real process chrooted into its own root directory in a kubelet-like
cgroup (hack/containers.py), sharing `--secrets` token Secrets round-robin
(default one), with the EOS template.
The controller and the injector run as their own processes (the
agents.token_refresher CLI), against the fake Kubernetes API over real HTTP and
a real OAuth2 server (Canaille) on loopback whose access tokens live
`--lifetime` seconds, so the controller refreshes each Secret every ~80 % of
that. As in a cluster, the injector reads no Secret: it gets its files from the
controller's file server (TLS on loopback, the CA from the controller's CA
ConfigMap), presenting a projected token the fake API issued for its pod. Each
agent calls the API as its bundle ServiceAccount, under the bundle's RBAC
(`manifests/all` rendered with kubectl; `--no-rbac`, or no kubectl: none).
After the start, for `--refreshes` refreshes of every Secret it measures:

- the time from a Secret's update (its new token, seen by polling the API
  server's store every 2 ms) until the first and until all the files of the
  pods using it hold the new access token;
- the Kubernetes API requests per refresh, by agent and kind; the
  controller's upkeep (Lease renewals, the file server's re-checks of its
  callers, template re-reads, its TLS material) runs on clocks of its own and is
  counted apart, per minute; the IdP calls per refresh;
- each agent's CPU time per refresh; their RSS at the end.

    sudo .venv/bin/python -m hack.bench_tokens [--pods 500] [--secrets 1] [--refreshes 5]

Prints a Markdown table (the README's figures) and writes
hack/results/bench_tokens_<secrets>.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from agents.token_refresher.fileclient import MAX_CLAIMS
from hack.containers import Container, ContainerWorld
from tests.support.fake_kube import ApiCall, FakeKube
from tests.support.idp import TestIdP
from tests.support.rbac import bundle_rbac
from tests.support.token_files import AUDIENCE, INJECTOR_LABELS, INJECTOR_SA

NODE = "bench-node"
NAMESPACE = "default"
SECRET = "bench-token"
OWNER = 1000
EOS = "oauth2:$(ACCESS_TOKEN):auth.cern.ch/auth/realms/cern/protocol/openid-connect/userinfo"
PREFIX = "oauth2-refresh-controller.cern.ch"
AGENTS_NS = "node-agents"  # the bundle's namespace: its Roles grant the agents theirs there
CONTROLLER_SA = "token-refresher-controller"
CONTROLLER = f"system:serviceaccount:{AGENTS_NS}:{CONTROLLER_SA}"
INJECTOR = f"system:serviceaccount:{AGENTS_NS}:{INJECTOR_SA}"
# The controller's requests that do not follow refreshes: Lease renewals, the file
# server's re-checks of its callers (TokenReview, the injector pod), its template
# re-reads (every 30 s per template in use) and its TLS Secret and CA ConfigMap.
UPKEEP = re.compile(
    r"/apis/coordination\.k8s\.io/.*|/apis/authentication\.k8s\.io/.*"
    rf"|/api/v1/namespaces/{AGENTS_NS}/.*|/api/v1/namespaces/[^/]+/configmaps/[^/]+"
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def access_token(kube: FakeKube, name: str) -> tuple[str, str]:
    """(resourceVersion, access token) of the Secret now."""
    secret = kube.store.get(_secrets(), NAMESPACE, name)
    assert secret is not None
    token = json.loads(base64.b64decode(secret["data"]["oauth"]))
    return secret["metadata"]["resourceVersion"], token["access_token"]


def _secrets() -> Any:
    from tests.support.fake_kube import find_resource

    return find_resource("secrets")


def holders(files: list[Path], wanted: bytes) -> int:
    """How many of the files hold `wanted` now."""
    count = 0
    for path in files:
        with contextlib.suppress(OSError):
            count += wanted in path.read_bytes()
    return count


class Refreshes:
    """Follows the Secrets and the files: a new token in a Secret starts a
    measure, the last of its files holding it ends the measure."""

    def __init__(self, kube: FakeKube, files: dict[str, list[Path]], deadline: float) -> None:
        self.kube = kube
        self.files = files
        self.deadline = deadline
        self.seen = {name: access_token(kube, name)[1] for name in files}
        self.pending: dict[str, tuple[float, bytes, float | None]] = {}
        self.latencies: list[dict[str, Any]] = []

    def restart(self) -> None:
        """Measure from now on. A token that changed while nobody polled would be
        seen late (a latency too short, for a refresh made before the count of
        API calls began), and one pending since then would be too long."""
        self.seen = {name: access_token(self.kube, name)[1] for name in self.files}
        self.pending.clear()
        self.latencies.clear()

    def poll(self, *, follow: bool = True) -> None:
        now = time.monotonic()
        if now > self.deadline:
            raise SystemExit("the refreshes did not come in time (see the agents' logs)")
        if follow:
            for name in self.files:
                token = access_token(self.kube, name)[1]
                if token != self.seen[name]:
                    if name in self.pending:
                        raise SystemExit(f"{name} refreshed again before its files caught up")
                    self.pending[name] = (now, token.encode(), None)
                    self.seen[name] = token
        for name, (changed, wanted, first_seen) in list(self.pending.items()):
            count = holders(self.files[name], wanted)
            first = first_seen
            if first is None and count:
                first = time.monotonic() - changed
                self.pending[name] = (changed, wanted, first)
            if count == len(self.files[name]):
                done = time.monotonic() - changed
                self.latencies.append(
                    {
                        "secret": name,
                        "all_files_s": round(done, 3),
                        "first_file_s": round(first or done, 3),
                    }
                )
                del self.pending[name]
            elif time.monotonic() - changed > 30:
                raise SystemExit(f"{name}: files not updated after 30 s")
        time.sleep(0.002)


def upkeep(call: ApiCall) -> bool:
    """A request of the controller's that refreshes do not cause (see UPKEEP)."""
    return call.user == CONTROLLER and UPKEEP.fullmatch(call.path) is not None


def by_agent(calls: list[ApiCall]) -> dict[str, dict[str, int]]:
    """Requests by agent (the controller's upkeep apart), then by kind."""
    agents = {CONTROLLER: "controller", INJECTOR: "injector"}
    counts: dict[str, Counter[str]] = {
        "controller": Counter(),
        "controller_upkeep": Counter(),
        "injector": Counter(),
    }
    for call in calls:
        who = "controller_upkeep" if upkeep(call) else agents.get(call.user, call.user or "?")
        counts.setdefault(who, Counter())[category(call.method, call.path, call.watch)] += 1
    return {who: dict(kinds) for who, kinds in counts.items()}


def settled(kube: FakeKube, quiet: float = 1.0, timeout: float = 60.0) -> None:
    """Wait until no API request came for `quiet` seconds (the controller's upkeep aside)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = sum(1 for c in kube.calls() if not upkeep(c))
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def category(method: str, path: str, watch: bool) -> str:
    """A short name for an API request ("own" ones are in the agents' namespace)."""
    kind = "watch" if watch else method
    match = re.search(r"/(pods|secrets|configmaps|events|leases|tokenreviews)(?:/|$)", path)
    if match is None:
        return f"{kind} {path}"
    own = f"/namespaces/{AGENTS_NS}/" in path and match.group(1) != "leases"
    return f"{kind} {match.group(1)}{' (own)' if own else ''}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def injector_pod(kube: FakeKube) -> dict[str, Any]:
    """The DaemonSet's pod on this node: its projected token is bound to it."""
    return kube.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"injector-{NODE}",
                "namespace": AGENTS_NS,
                "uid": str(uuid.uuid4()),
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


def serving(kube: FakeKube, port: int, controller: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the controller published its CA and its file server listens."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if controller.poll() is not None:
            raise SystemExit(f"the controller exited ({controller.returncode}):\n{log.read_text()}")
        if kube.get("configmaps", AGENTS_NS, "token-refresher-ca") is not None:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return
        time.sleep(0.05)
    raise SystemExit(f"the controller's file server did not come up:\n{log.read_text()}")


@contextlib.contextmanager
def tails_on_failure(*logs: Path, lines: int = 40) -> Iterator[None]:
    """On a failed run, the end of each agent's log (the work directory goes away)."""
    try:
        yield
    except BaseException:
        for log in logs:
            text = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {log.name} (last {lines} lines)", *text, sep="\n", file=sys.stderr)
        raise


@contextlib.contextmanager
def agent(role: str, *args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    # Outside a pod no ServiceAccount mount says where the agents run.
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agents.token_refresher",
                role,
                "--own-namespace",
                AGENTS_NS,
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pods",
        type=int,
        default=500,
        help=f"annotated pods on the node (at most {MAX_CLAIMS}: what one injector may claim)",
    )
    parser.add_argument("--refreshes", type=int, default=5)
    parser.add_argument("--lifetime", type=int, default=8, help="access token lifetime, s")
    parser.add_argument(
        "--secrets", type=int, default=1, help="token Secrets, shared round-robin by the pods"
    )
    parser.add_argument(
        "--no-rbac",
        dest="rbac",
        action="store_false",
        help="let the agents do anything (the bundle's RBAC needs kubectl to render it)",
    )
    args = parser.parse_args(argv)
    if args.pods > MAX_CLAIMS:
        # Beyond, the injector claims only the first MAX_CLAIMS pods (the server
        # refuses more, 413): the others would never get a file.
        parser.error(f"--pods: the file server serves at most {MAX_CLAIMS} pods per node")
    if args.rbac and shutil.which("kubectl") is None:
        print("kubectl not on PATH: the bundle's RBAC is not enforced", file=sys.stderr)
        args.rbac = False
    if os.geteuid() != 0:
        print("needs root: cgroups, chroot, /proc/<pid>/root", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}",
        "python": platform.python_version(),
        "pods": args.pods,
        "secrets": args.secrets,
        "rbac": args.rbac,
        "load_before": os.getloadavg(),
    }
    names = [SECRET] if args.secrets == 1 else [f"{SECRET}-{j}" for j in range(args.secrets)]
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tokens-")))
        kube = stack.enter_context(FakeKube(rbac_objects=bundle_rbac() if args.rbac else None))
        kube.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": AGENTS_NS}})
        idp = stack.enter_context(TestIdP(tls=True, lifetime=args.lifetime, workdir=work / "idp"))
        world = stack.enter_context(ContainerWorld(work / "containers"))

        started = time.monotonic()
        containers: list[Container] = world.add_many(
            [(str(uuid.uuid4()), "app") for _ in range(args.pods)]
        )
        results["containers_start_s"] = round(time.monotonic() - started, 2)
        kube.put(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "eos-template", "namespace": NAMESPACE},
                "data": {"template": EOS},
            }
        )
        for i, container in enumerate(containers):
            to_inject = json.dumps(
                [
                    {
                        "secretName": names[i % len(names)],
                        "container": "app",
                        "owner": OWNER,
                        "templateConfigMapName": "eos-template",
                    }
                ]
            )
            kube.put(
                world.pod(
                    f"user-{i:04d}",
                    NAMESPACE,
                    NODE,
                    [container],
                    {f"{PREFIX}/to-inject": to_inject},
                )
            )
        files = {
            name: [c.path(f"/tmp/oauthtk_{OWNER}") for c in containers[j :: len(names)]]
            for j, name in enumerate(names)
        }

        controller_log, injector_log = work / "controller.log", work / "injector.log"
        files_port = free_port()
        controller = stack.enter_context(
            agent(
                "controller",
                "--kubeconfig",
                str(
                    kube.kubeconfig(
                        work / "kubeconfig-controller",
                        service_account=f"{AGENTS_NS}/{CONTROLLER_SA}",
                    )
                ),
                "--files-address",
                f"127.0.0.1:{files_port}",
                "--tls-names",
                "127.0.0.1",
                "--token-url",
                idp.token_url,
                "--ca-bundle",
                str(idp.ca_bundle),
                "--min-refresh-interval",
                "1",
                "--interval",
                "1",
                "--identity",
                "bench",
                "--metrics-address",
                "off",
                log=controller_log,
            )
        )
        # The injector starts once there is a CA to trust and a server to call, as
        # its DaemonSet would find a running controller (else it backs off).
        serving(kube, files_port, controller, controller_log)
        pod = injector_pod(kube)["metadata"]
        token_file = work / "projected" / "token"
        token_file.parent.mkdir()
        token_file.write_text(
            kube.service_account_token(
                AGENTS_NS, INJECTOR_SA, audiences=(AUDIENCE,), pod=(pod["name"], pod["uid"])
            )
        )
        injector = stack.enter_context(
            agent(
                "injector",
                "--kubeconfig",
                str(
                    kube.kubeconfig(
                        work / "kubeconfig-injector", service_account=f"{AGENTS_NS}/{INJECTOR_SA}"
                    )
                ),
                "--node-name",
                NODE,
                "--metrics-address",
                "off",
                "--controller-url",
                f"https://127.0.0.1:{files_port}",
                "--controller-token-file",
                str(token_file),
                "--state-file",
                str(work / "injector-state" / "files.json"),
                log=injector_log,
            )
        )
        stack.enter_context(tails_on_failure(controller_log, injector_log))
        # The seeds: tokens due at once (written as CERN's controller leaves them).
        for name in names:
            seed = json.loads(idp.issue())
            kube.put(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {
                        "name": name,
                        "namespace": NAMESPACE,
                        "annotations": {f"{PREFIX}/is-token": "true"},
                    },
                    "data": {
                        "oauth": b64(json.dumps(seed)),
                        "clientID": b64(idp.client_id),
                        "clientSecret": b64(idp.client_secret),
                    },
                }
            )
        inj, ctl = psutil.Process(injector.pid), psutil.Process(controller.pid)
        watch = Refreshes(kube, files, time.monotonic() + 60 + args.refreshes * args.lifetime * 2)
        # The start: every Secret refreshed once and every file written.
        started = time.monotonic()
        while {m["secret"] for m in watch.latencies} != set(names):
            watch.poll()
        results["start"] = {
            "all_files_s": round(time.monotonic() - started, 3),
            "api_calls": by_agent(kube.calls()),
        }
        # The injector still posts its first-write Events (one per container,
        # from a thread of their own): let them drain, then measure steady state.
        settled(kube)
        calls_before = len(kube.calls())
        watch.restart()
        idp_before = idp.token_calls("refresh_token")
        cpu_before = sum(inj.cpu_times()[:2]), sum(ctl.cpu_times()[:2])
        window = time.monotonic()
        while len(watch.latencies) < args.refreshes * len(names):
            watch.poll()
        # Count whole refreshes only: finish those that began meanwhile.
        while watch.pending:
            watch.poll(follow=False)
        calls = kube.calls()[calls_before:]
        results["refreshes"] = {
            "count": len(watch.latencies),
            "window_s": round(time.monotonic() - window, 2),
            "latencies": watch.latencies,
            "api_calls": by_agent(calls),
            "idp_refresh_calls": idp.token_calls("refresh_token") - idp_before,
            "injector_cpu_s": round(sum(inj.cpu_times()[:2]) - cpu_before[0], 3),
            "controller_cpu_s": round(sum(ctl.cpu_times()[:2]) - cpu_before[1], 3),
        }
        results["rss_mib_injector"] = round(inj.memory_info().rss / 2**20, 1)
        results["rss_mib_controller"] = round(ctl.memory_info().rss / 2**20, 1)
        results["files"] = sum(len(f) for f in files.values())
        # Neither agent was refused anything it needs (nor tried what it must not).
        results["rbac_denials"] = [d._asdict() for d in kube.denied()]
    results["load_after"] = os.getloadavg()
    steady = results["refreshes"]
    all_files = [m["all_files_s"] for m in steady["latencies"]]
    api_calls = steady["api_calls"]
    per_refresh = {
        who: {k: v / steady["count"] for k, v in kinds.items()}
        for who, kinds in api_calls.items()
        if who != "controller_upkeep"
    }
    minutes = steady["window_s"] / 60
    results["summary"] = {
        "all_files_s_median": statistics.median(all_files),
        "all_files_s_max": max(all_files),
        "first_file_s_median": statistics.median(m["first_file_s"] for m in steady["latencies"]),
        "api_calls_per_refresh": per_refresh,
        "controller_upkeep_per_minute": {
            k: v / minutes for k, v in api_calls["controller_upkeep"].items()
        },
        "idp_calls_per_refresh": steady["idp_refresh_calls"] / steady["count"],
        "injector_cpu_s_per_refresh": steady["injector_cpu_s"] / steady["count"],
        "controller_cpu_s_per_refresh": steady["controller_cpu_s"] / steady["count"],
    }
    out = Path(__file__).parent / "results" / f"bench_tokens_{args.secrets}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    s = results["summary"]
    pods_per_secret = results["files"] // args.secrets
    print(f"machine: {results['machine']}, Python {results['python']}")
    load = "/".join(f"{x:.2f}" for x in results["load_before"])
    print(
        f"{results['files']} pods, {args.secrets} Secret(s) ({pods_per_secret} pods each), "
        f"{steady['count']} refreshes measured in {steady['window_s']:.0f} s; "
        f"RBAC {'enforced' if args.rbac else 'off'}; load average before {load}\n"
    )
    print("| measure | result | target |\n|---|---|---|")
    print(
        f"| Secret update -> all its {pods_per_secret} files, median / max | "
        f"{s['all_files_s_median']:.2f} / {s['all_files_s_max']:.2f} s | < 2 s |"
    )
    print(f"| Secret update -> first file, median | {s['first_file_s_median']:.3f} s | |")
    for who, label in (("controller", "controller (upkeep apart)"), ("injector", "injector")):
        kinds = s["api_calls_per_refresh"].get(who, {})
        listed = ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items())) or "none"
        print(f"| API calls per refresh, {label} | {listed} | O(1) |")
    others = set(s["api_calls_per_refresh"]) - {"controller", "injector"}
    for who in sorted(others):  # nobody else should call; shown if someone did
        print(f"| API calls per refresh, {who} | {s['api_calls_per_refresh'][who]} | |")
    upkeep_rates = ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(s["controller_upkeep_per_minute"].items())
    )
    print(f"| controller upkeep, calls per minute | {upkeep_rates} | |")
    print(f"| IdP calls per refresh | {s['idp_calls_per_refresh']:.2f} | 1 |")
    print(f"| injector CPU per refresh | {s['injector_cpu_s_per_refresh']:.3f} s | |")
    print(f"| controller CPU per refresh | {s['controller_cpu_s_per_refresh']:.3f} s | |")
    print(f"| injector RSS | {results['rss_mib_injector']} MiB | |")
    print(f"| controller RSS | {results['rss_mib_controller']} MiB | |")
    if results["rbac_denials"]:
        print(f"\nRBAC denied {len(results['rbac_denials'])} request(s):", file=sys.stderr)
        for denial in results["rbac_denials"][:10]:
            print(f"  {denial}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
