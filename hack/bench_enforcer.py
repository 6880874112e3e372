"""Benchmark of the GPU memory enforcer (issue 3, acceptance 7). Needs root and gcc.

One tick over 8 GPUs x 64 compute processes: 512 real processes in 64
kubelet-like pod cgroups, listed by the fake libnvidia-ml through the real
pynvml. It reports the CPU time of a tick, split into the NVML sample
(pynvml + the fake library, which reads its state file on every call and
parses it again only when it changed) and the agent's own work
(attribution, limits, decisions), then the steady RSS of the agent running as
its own process, in local mode and with Kubernetes (a fake API server).

    sudo .venv/bin/python -m hack.bench_enforcer [--ticks 200]

Prints a Markdown table (the README's figures) and writes hack/results/bench_enforcer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry

from agents.gpu_enforcer.config import EnforcerConfig
from agents.gpu_enforcer.enforcer import Enforcer
from agents.gpu_enforcer.metrics import EnforcerMetrics
from agents.gpu_enforcer.nvml import Nvml
from agents.gpu_enforcer.pods import LocalPods
from hack.cgroups import FakePodCgroups
from hack.fake_nvml import FakeGpu, FakeNvmlWorld, FakeProcess, build, fake_uuid, load_in_process

GIB = 1024**3
GPUS, PODS_PER_GPU, PROCS_PER_POD = 8, 8, 8


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def cpu_ms(fn: object, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.process_time()
        fn()  # type: ignore[operator]
        out.append((time.process_time() - start) * 1000)
    return out


def rss_of_agent(env: dict[str, str], argv: list[str], seconds: float) -> float:
    """Resident MiB of the agent after running `seconds` at a 0.5 s interval."""
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agents.gpu_enforcer",
            "--interval",
            "0.5",
            "--metrics-address",
            "127.0.0.1:0",
            "--log-level",
            "warning",
            *argv,
        ],
        env=env,
    )
    try:
        time.sleep(seconds)
        assert agent.poll() is None, "agent exited"
        return float(psutil.Process(agent.pid).memory_info().rss) / 2**20
    finally:
        agent.terminate()
        agent.wait(15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=200)
    parser.add_argument("--rss-seconds", type=float, default=15.0)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of 50 ticks")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_enforcer: needs root (cgroups)", file=sys.stderr)
        return 2
    results: dict[str, object] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, kernel {platform.release()}",
        "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-enforcer-") as tmp, FakePodCgroups() as cgroups:
        workdir = Path(tmp)
        library = build(workdir / "lib")
        procs: list[subprocess.Popen[bytes]] = []
        fake: list[FakeProcess] = []
        try:
            for gpu in range(GPUS):
                for _ in range(PODS_PER_GPU):
                    handle = cgroups.create_pod_container(
                        "systemd-v2-containerd", str(uuid.uuid4()), uuid.uuid4().hex * 2
                    )
                    for _ in range(PROCS_PER_POD):
                        proc = subprocess.Popen(["sleep", "600"])
                        cgroups.move(proc.pid, handle)
                        procs.append(proc)
                        # 4 GiB per pod on a 40 GiB card split 8 ways: all within share.
                        fake.append(FakeProcess(gpu, proc.pid, GIB // 2))
            gpus = [FakeGpu(i, fake_uuid(i)) for i in range(GPUS)]
            world = FakeNvmlWorld(workdir / "nvml.state", gpus, fake).write()
            with load_in_process(library, world.path):
                nvml = Nvml()
                enforcer = Enforcer(
                    EnforcerConfig(replicas=PODS_PER_GPU),
                    nvml=nvml,
                    pods=LocalPods(None, PODS_PER_GPU),
                    metrics=EnforcerMetrics(CollectorRegistry()),
                )
                report = enforcer.tick()  # warm-up: attributes every process once
                assert sum(len(g.usages) for g in report.gpus) == GPUS * PODS_PER_GPU
                if args.profile:
                    import cProfile
                    import pstats

                    cProfile.runctx(
                        "for _ in range(50): enforcer.tick()",
                        globals(),
                        {"enforcer": enforcer},
                        str(workdir / "prof"),
                    )
                    pstats.Stats(str(workdir / "prof")).sort_stats("tottime").print_stats(25)
                tick = cpu_ms(enforcer.tick, args.ticks)
                sample = cpu_ms(nvml.snapshot, args.ticks)
                enforcer.close()
            results["tick"] = {
                "processes": len(fake),
                "ticks": args.ticks,
                "cpu_ms_mean": statistics.mean(tick),
                "cpu_ms_p50": percentile(tick, 50),
                "cpu_ms_p95": percentile(tick, 95),
                "nvml_sample_cpu_ms_mean": statistics.mean(sample),
                "rest_cpu_ms_mean": statistics.mean(tick) - statistics.mean(sample),
            }
            env = world.subprocess_env(library)
            results["rss_mib_local"] = rss_of_agent(
                env, ["--local", "--replicas", "8"], args.rss_seconds
            )
            from tests.support.fake_kube import FakeKube

            with FakeKube() as kube:
                kube.put({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "bench"}})
                config = kube.kubeconfig(workdir / "kubeconfig")
                results["rss_mib_kubernetes"] = rss_of_agent(
                    env,
                    ["--kubeconfig", str(config), "--node-name", "bench", "--replicas", "8"],
                    args.rss_seconds,
                )
        finally:
            for proc in procs:
                proc.kill()
            for proc in procs:
                proc.wait()
    out = Path(__file__).parent / "results" / "bench_enforcer.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    t = results["tick"]
    assert isinstance(t, dict)
    print(f"machine: {results['machine']}, Python {results['python']}\n")
    print("| measure | value |\n|---|---|")
    print(f"| processes ({GPUS} GPUs x {PODS_PER_GPU * PROCS_PER_POD}) | {t['processes']} |")
    print(
        f"| CPU per tick, mean / p50 / p95 | {t['cpu_ms_mean']:.2f} / {t['cpu_ms_p50']:.2f} / "
        f"{t['cpu_ms_p95']:.2f} ms |"
    )
    print(
        f"| of which the NVML sample (pynvml + the fake library) | "
        f"{t['nvml_sample_cpu_ms_mean']:.2f} ms |"
    )
    print(f"| of which attribution, limits, decisions | {t['rest_cpu_ms_mean']:.2f} ms |")
    print(
        f"| steady RSS, local mode / with Kubernetes | {results['rss_mib_local']:.1f} / "
        f"{results['rss_mib_kubernetes']:.1f} MiB |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
