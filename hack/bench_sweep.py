"""Benchmark of the healer (issue 2, acceptance 7). Needs root.

1. Sweep cost: CPU time of one zero-touch sweep over a mount table of 1,000
   mounts, 200 of them FUSE mounts under an autofs root served by a real
   automount and real squashfuse daemons (the rest tmpfs mounts elsewhere).
2. Reaction: seconds from a FUSE daemon's death (kill -9) to its mount leaving
   mountinfo, with the agent running as its own process, event-driven and
   periodic (default 2 s interval).

    sudo .venv/bin/python -m hack.bench_sweep [--fuse 200] [--total 1000] [--kills 10]

Prints a Markdown table (the README's figures) and writes hack/results/bench_sweep.json.
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
from pathlib import Path

from prometheus_client import CollectorRegistry

from agents.mount_healer.config import HealerConfig
from agents.mount_healer.fusectl import Fusectl
from agents.mount_healer.healer import Healer, Verdict
from agents.mount_healer.metrics import HealerMetrics
from agents.mount_healer.mountinfo import MountinfoSource, read_mount_table
from agents.mount_healer.probe import Prober
from agents.mount_healer.unmount import umount2
from hack.autofs_world import AutofsWorld, force_unmount_under, wait_for


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def measure_sweeps(world: AutofsWorld, sweeps: int, *, table_changes: bool) -> dict[str, float]:
    """CPU (user+system of this process) and wall time per sweep.

    `table_changes`: the mount table is parsed again every sweep (as after a
    mount or unmount); otherwise the kernel reports it unchanged and the
    parsed table is reused (the steady state).
    """
    config = HealerConfig(roots=(str(world.root),))
    source = MountinfoSource("/proc", max_age=0.0 if table_changes else 3600.0)
    healer = Healer(
        config,
        read_table=source,
        fusectl=Fusectl(),
        prober=Prober(config.probe_timeout),
        umount2=umount2,
        metrics=HealerMetrics(CollectorRegistry()),
    )
    reports = healer.sweep()  # warm-up
    assert all(r.verdict is Verdict.HEALTHY for r in reports), reports
    cpu, wall = [], []
    for _ in range(sweeps):
        c0, w0 = time.process_time(), time.perf_counter()
        healer.sweep()
        cpu.append((time.process_time() - c0) * 1000)
        wall.append((time.perf_counter() - w0) * 1000)
    source.close()
    fuse = len(reports)
    table = len(read_mount_table().mounts)
    return {
        "table_mounts": table,
        "fuse_mounts_under_root": fuse,
        "sweeps": sweeps,
        "cpu_ms_mean": statistics.mean(cpu),
        "cpu_ms_p50": percentile(cpu, 50),
        "cpu_ms_p95": percentile(cpu, 95),
        "wall_ms_mean": statistics.mean(wall),
        "wall_ms_p95": percentile(wall, 95),
        "cpu_us_per_fuse_mount": statistics.mean(cpu) * 1000 / fuse,
        "cpu_us_per_table_mount": statistics.mean(cpu) * 1000 / table,
    }


def measure_reaction(world: AutofsWorld, kills: int, event_driven: bool) -> dict[str, float]:
    """Seconds from kill -9 of a daemon to its mount leaving mountinfo."""
    argv = [
        sys.executable,
        "-m",
        "agents.mount_healer",
        "--root",
        str(world.root),
        "--metrics-address",
        "off",
        "--log-level",
        "warning",
    ]
    if not event_driven:
        argv.append("--no-event-driven")
    agent = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    took = []
    try:
        time.sleep(1.0)
        for i in range(kills):
            repo = world.repos[i % len(world.repos)]
            world.access(repo)
            # Desynchronise from the agent's period, as a real crash would be.
            time.sleep(0.37 * (i % 5) + 0.05)
            started = time.monotonic()
            world.daemon(repo).kill()
            wait_for(lambda r=repo: world.mount(r) is None, 10, interval=0.001)  # type: ignore[misc]
            took.append(time.monotonic() - started)
    finally:
        agent.terminate()
        agent.wait(10)
    return {
        "kills": kills,
        "seconds_mean": statistics.mean(took),
        "seconds_p50": percentile(took, 50),
        "seconds_max": max(took),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuse", type=int, default=200, help="FUSE mounts under the root")
    parser.add_argument("--total", type=int, default=1000, help="mounts in the whole table")
    parser.add_argument("--sweeps", type=int, default=200)
    parser.add_argument("--kills", type=int, default=10)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_sweep: needs root (mounts, automount, FUSE)", file=sys.stderr)
        return 2
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"kernel {platform.release()}",
        "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-healer-") as tmp:
        workdir = Path(tmp)
        repos = tuple(f"repo{i:03d}" for i in range(args.fuse))
        print(f"building {len(repos)} squashfs images ...", file=sys.stderr)
        world = AutofsWorld(workdir, repos, timeout=3600).start()
        filler = workdir / "filler"
        try:
            started = time.monotonic()
            for repo in repos:
                world.access(repo)
            print(
                f"mounted {len(repos)} FUSE mounts in {time.monotonic() - started:.1f}s",
                file=sys.stderr,
            )
            have = len(read_mount_table().mounts)
            for i in range(max(0, args.total - have)):
                target = filler / f"m{i:04d}"
                target.mkdir(parents=True)
                subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", "size=64k", "filler", str(target)], check=True
                )
            results["sweep"] = measure_sweeps(world, args.sweeps, table_changes=False)
            results["sweep_table_changed"] = measure_sweeps(world, args.sweeps, table_changes=True)
            results["reaction_event_driven"] = measure_reaction(world, args.kills, True)
            results["reaction_periodic_2s"] = measure_reaction(world, args.kills, False)
        finally:
            force_unmount_under(filler)
            world.stop()
    out = Path(__file__).parent / "results" / "bench_sweep.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    sweep = results["sweep"]
    changed = results["sweep_table_changed"]
    assert isinstance(sweep, dict) and isinstance(changed, dict)
    event = results["reaction_event_driven"]
    periodic = results["reaction_periodic_2s"]
    assert isinstance(event, dict) and isinstance(periodic, dict)
    print(f"machine: {results['machine']}, Python {results['python']}\n")
    print("| measure | value |\n|---|---|")
    print(
        f"| mounts in table / FUSE under root | {sweep['table_mounts']} / "
        f"{sweep['fuse_mounts_under_root']} |"
    )
    for name, r in (("table unchanged", sweep), ("table changed", changed)):
        print(
            f"| CPU per sweep, {name}: mean / p50 / p95 | {r['cpu_ms_mean']:.2f} / "
            f"{r['cpu_ms_p50']:.2f} / {r['cpu_ms_p95']:.2f} ms |"
        )
        print(
            f"| wall per sweep, {name}: mean / p95 | {r['wall_ms_mean']:.2f} / "
            f"{r['wall_ms_p95']:.2f} ms |"
        )
        print(
            f"| CPU per FUSE mount / per table mount, {name} | "
            f"{r['cpu_us_per_fuse_mount']:.1f} / {r['cpu_us_per_table_mount']:.1f} µs |"
        )
    for name, r in (("event-driven", event), ("periodic, 2 s interval", periodic)):
        print(
            f"| daemon death to unmount, {name} (n={r['kills']}): mean / p50 / max | "
            f"{r['seconds_mean'] * 1000:.0f} / {r['seconds_p50'] * 1000:.0f} / "
            f"{r['seconds_max'] * 1000:.0f} ms |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
