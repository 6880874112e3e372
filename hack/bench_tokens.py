"""Benchmark of the token refresher (issue 4, acceptance 5). Needs root and gcc.

One node with 500 annotated pods, each a real process chrooted into its own
root directory in a kubelet-like cgroup (hack/containers.py), all using one
token Secret with the EOS template. The controller and the injector run as
their own processes (`python -m agents.token_refresher`), against the fake
Kubernetes API over real HTTP and a real OAuth2 server (Canaille) on loopback
whose access tokens live `--lifetime` seconds, so the controller refreshes the
Secret every ~80 % of that. For each refresh it measures:

- the time from the Secret's update (its new resourceVersion, seen by polling
  the API server's store every millisecond) until the first and until all 500
  files in the containers hold the new access token;
- the Kubernetes API requests made between two refreshes, by kind (the Lease
  renewals of the controller are counted apart: they are periodic, not per
  refresh), and the IdP calls;
- the injector's CPU time per refresh; its RSS at the end.

    sudo .venv/bin/python -m hack.bench_tokens [--pods 500] [--refreshes 5]

Prints a Markdown table (the README's figures) and writes hack/results/bench_tokens.json.
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


def access_token(kube: FakeKube) -> tuple[str, str]:
    """(resourceVersion, access token) of the Secret now."""
    secret = kube.store.get(_secrets(), NAMESPACE, SECRET)
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
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root: cgroups, chroot, /proc/<pid>/root", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}",
        "python": platform.python_version(),
        "pods": args.pods,
    }
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
        to_inject = json.dumps(
            [
                {
                    "secretName": SECRET,
                    "container": "app",
                    "owner": OWNER,
                    "templateConfigMapName": "eos-template",
                }
            ]
        )
        for i, container in enumerate(containers):
            kube.put(
                world.pod(
                    f"user-{i:04d}",
                    NAMESPACE,
                    NODE,
                    [container],
                    {f"{PREFIX}/to-inject": to_inject},
                )
            )
        files = [c.path(f"/tmp/oauthtk_{OWNER}") for c in containers]

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
        # The seed: a token due at once (written as CERN's controller leaves it).
        seed = json.loads(idp.issue())
        kube.put(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": SECRET,
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
        version, token = access_token(kube)
        measures: list[dict[str, Any]] = []
        inj = psutil.Process(injector.pid)
        deadline = time.monotonic() + 60 + args.refreshes * args.lifetime * 2
        calls_before = len(kube.calls())
        idp_before = idp.token_calls("refresh_token")
        cpu_before = sum(inj.cpu_times()[:2])
        while len(measures) < args.refreshes + 1:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"no refresh within the deadline; see {controller_log} and {injector_log}"
                )
            new_version, new_token = access_token(kube)
            if new_version == version or new_token == token:
                version = new_version
                time.sleep(0.001)
                continue
            changed = time.monotonic()
            wanted = new_token.encode()
            first = None
            while (count := holders(files, wanted)) < len(files):
                if first is None and count:
                    first = time.monotonic() - changed
                if time.monotonic() - changed > 30:
                    raise SystemExit(f"files not updated after 30 s ({count}/{len(files)})")
                time.sleep(0.005)
            done = time.monotonic() - changed
            calls = kube.calls()
            window = Counter(category(c.method, c.path, c.watch) for c in calls[calls_before:])
            cpu = sum(inj.cpu_times()[:2])
            measures.append(
                {
                    "all_files_s": round(done, 3),
                    "first_file_s": round(first if first is not None else done, 3),
                    "api_calls": dict(window),
                    "idp_refresh_calls": idp.token_calls("refresh_token") - idp_before,
                    "injector_cpu_s": round(cpu - cpu_before, 3),
                }
            )
            if len(measures) == 1:
                # The start: the injector still posts its first-write Events
                # (one per container, from a thread of their own). Let them
                # drain, so that the refreshes measured are steady state.
                settled(kube)
                calls = kube.calls()
                cpu = sum(inj.cpu_times()[:2])
            calls_before, cpu_before = len(calls), cpu
            idp_before = idp.token_calls("refresh_token")
            version, token = new_version, new_token
        results["rss_mib_injector"] = round(inj.memory_info().rss / 2**20, 1)
        results["files"] = len(files)
        # The first round includes the start (lists, watches, the first writes).
        results["start"] = measures[0]
        results["refreshes"] = measures[1:]
    steady = results["refreshes"]
    all_files = [m["all_files_s"] for m in steady]
    results["summary"] = {
        "all_files_s_median": statistics.median(all_files),
        "all_files_s_max": max(all_files),
        "first_file_s_median": statistics.median(m["first_file_s"] for m in steady),
        "injector_cpu_s_median": statistics.median(m["injector_cpu_s"] for m in steady),
    }
    out = Path(__file__).parent / "results" / "bench_tokens.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    s = results["summary"]
    print(f"machine: {results['machine']}, Python {results['python']}\n")
    print("| measure | result | target |\n|---|---|---|")
    print(
        f"| Secret update -> all {len(files)} files, median / max | "
        f"{s['all_files_s_median']:.2f} / {s['all_files_s_max']:.2f} s | < 2 s |"
    )
    print(f"| Secret update -> first file, median | {s['first_file_s_median']:.3f} s | |")
    for m in steady:
        non_lease = {k: v for k, v in m["api_calls"].items() if "leases" not in k}
        leases = sum(v for k, v in m["api_calls"].items() if "leases" in k)
        print(f"| per refresh: API calls (besides {leases} Lease renewals) | {non_lease} | O(1) |")
        print(f"| per refresh: IdP calls | {m['idp_refresh_calls']} | 1 |")
    print(f"| injector CPU per refresh, median | {s['injector_cpu_s_median']:.2f} s | |")
    print(f"| injector RSS | {results['rss_mib_injector']} MiB | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
