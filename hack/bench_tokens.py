"""Benchmark of the token refresher (issue 4, acceptance 5). Needs root and gcc.

One node with 500 annotated pods, each a real process chrooted into its own
root directory in a kubelet-like cgroup (hack/containers.py), sharing
`--secrets` token Secrets round-robin (default one), with the EOS template.
The controller and the injector run as their own processes (`python -m
agents.token_refresher`), against the fake Kubernetes API over real HTTP and a
real OAuth2 server (Canaille) on loopback whose access tokens live
`--lifetime` seconds, so the controller refreshes each Secret every ~80 % of
that. After the start, for `--refreshes` refreshes of every Secret it measures:

- the time from a Secret's update (its new token, seen by polling the API
  server's store every 2 ms) until the first and until all the files of the
  pods using it hold the new access token;
- the Kubernetes API requests per refresh, by kind (the controller's Lease
  renewals are periodic, not per refresh), and the IdP calls per refresh;
- the injector's CPU time per refresh; its RSS at the end.

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

from hack.containers import Container, ContainerWorld
from tests.support.fake_kube import FakeKube
from tests.support.idp import TestIdP

NODE = "bench-node"
NAMESPACE = "default"
SECRET = "bench-token"
OWNER = 1000
EOS = "oauth2:$(ACCESS_TOKEN):auth.cern.ch/auth/realms/cern/protocol/openid-connect/userinfo"
PREFIX = "oauth2-refresh-controller.cern.ch"


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
        self.latencies: list[dict[str, float]] = []

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
                    {"all_files_s": round(done, 3), "first_file_s": round(first or done, 3)}
                )
                del self.pending[name]
            elif time.monotonic() - changed > 30:
                raise SystemExit(f"{name}: files not updated after 30 s")
        time.sleep(0.002)


def settled(kube: FakeKube, quiet: float = 1.0, timeout: float = 60.0) -> None:
    """Wait until no API request came for `quiet` seconds (Lease renewals aside)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = sum(1 for c in kube.calls() if "/leases" not in c.path)
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def category(method: str, path: str, watch: bool) -> str:
    """A short name for an API request."""
    kind = "watch" if watch else method
    if "/leases" in path:
        return f"{kind} leases"
    match = re.search(r"/(pods|secrets|configmaps|events)(?:/|$)", path)
    return f"{kind} {match.group(1) if match else path}"


@contextlib.contextmanager
def agent(role: str, *args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agents.token_refresher", role, *args],
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
    parser.add_argument("--pods", type=int, default=500)
    parser.add_argument("--refreshes", type=int, default=5)
    parser.add_argument("--lifetime", type=int, default=8, help="access token lifetime, s")
    parser.add_argument(
        "--secrets", type=int, default=1, help="token Secrets, shared round-robin by the pods"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root: cgroups, chroot, /proc/<pid>/root", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}",
        "python": platform.python_version(),
        "pods": args.pods,
        "secrets": args.secrets,
    }
    names = [SECRET] if args.secrets == 1 else [f"{SECRET}-{j}" for j in range(args.secrets)]
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tokens-")))
        kube = stack.enter_context(FakeKube())
        idp = stack.enter_context(TestIdP(tls=True, lifetime=args.lifetime, workdir=work / "idp"))
        world = stack.enter_context(ContainerWorld(work / "containers"))
        kubeconfig = kube.kubeconfig(work / "kubeconfig")

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
        injector = stack.enter_context(
            agent(
                "injector",
                "--kubeconfig",
                str(kubeconfig),
                "--node-name",
                NODE,
                "--metrics-address",
                "off",
                log=injector_log,
            )
        )
        stack.enter_context(
            agent(
                "controller",
                "--kubeconfig",
                str(kubeconfig),
                "--token-url",
                idp.token_url,
                "--ca-bundle",
                str(idp.ca_bundle),
                "--min-refresh-interval",
                "1",
                "--interval",
                "1",
                "--lease-namespace",
                NAMESPACE,
                "--identity",
                "bench",
                "--metrics-address",
                "off",
                log=controller_log,
            )
        )
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
        inj = psutil.Process(injector.pid)
        watch = Refreshes(kube, files, time.monotonic() + 60 + args.refreshes * args.lifetime * 2)
        # The start: every Secret refreshed once and every file written.
        started = time.monotonic()
        while len(watch.latencies) < len(names):
            watch.poll()
        results["start"] = {
            "all_files_s": round(time.monotonic() - started, 3),
            "api_calls": dict(Counter(category(c.method, c.path, c.watch) for c in kube.calls())),
        }
        # The injector still posts its first-write Events (one per container,
        # from a thread of their own): let them drain, then measure steady state.
        settled(kube)
        watch.latencies.clear()
        calls_before = len(kube.calls())
        idp_before = idp.token_calls("refresh_token")
        cpu_before = sum(inj.cpu_times()[:2])
        while len(watch.latencies) < args.refreshes * len(names):
            watch.poll()
        # Count whole refreshes only: finish those that began meanwhile.
        while watch.pending:
            watch.poll(follow=False)
        calls = kube.calls()[calls_before:]
        results["refreshes"] = {
            "count": len(watch.latencies),
            "latencies": watch.latencies,
            "api_calls": dict(Counter(category(c.method, c.path, c.watch) for c in calls)),
            "idp_refresh_calls": idp.token_calls("refresh_token") - idp_before,
            "injector_cpu_s": round(sum(inj.cpu_times()[:2]) - cpu_before, 3),
        }
        results["rss_mib_injector"] = round(inj.memory_info().rss / 2**20, 1)
        results["files"] = sum(len(f) for f in files.values())
    steady = results["refreshes"]
    all_files = [m["all_files_s"] for m in steady["latencies"]]
    per_refresh = {k: v / steady["count"] for k, v in steady["api_calls"].items()}
    results["summary"] = {
        "all_files_s_median": statistics.median(all_files),
        "all_files_s_max": max(all_files),
        "first_file_s_median": statistics.median(m["first_file_s"] for m in steady["latencies"]),
        "api_calls_per_refresh": per_refresh,
        "idp_calls_per_refresh": steady["idp_refresh_calls"] / steady["count"],
        "injector_cpu_s_per_refresh": steady["injector_cpu_s"] / steady["count"],
    }
    out = Path(__file__).parent / "results" / f"bench_tokens_{args.secrets}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    s = results["summary"]
    pods_per_secret = results["files"] // args.secrets
    print(f"machine: {results['machine']}, Python {results['python']}")
    print(
        f"{results['files']} pods, {args.secrets} Secret(s) ({pods_per_secret} pods each), "
        f"{steady['count']} refreshes measured\n"
    )
    print("| measure | result | target |\n|---|---|---|")
    print(
        f"| Secret update -> all its {pods_per_secret} files, median / max | "
        f"{s['all_files_s_median']:.2f} / {s['all_files_s_max']:.2f} s | < 2 s |"
    )
    print(f"| Secret update -> first file, median | {s['first_file_s_median']:.3f} s | |")
    calls = ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["api_calls_per_refresh"].items()))
    print(f"| API calls per refresh (Lease renewals are periodic) | {calls} | O(1) |")
    print(f"| IdP calls per refresh | {s['idp_calls_per_refresh']:.2f} | 1 |")
    print(f"| injector CPU per refresh | {s['injector_cpu_s_per_refresh']:.2f} s | |")
    print(f"| injector RSS | {results['rss_mib_injector']} MiB | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
