"""The demo: a local autofs root with real FUSE mounts, one severed and healed live.

What a CVMFS node sees after its CSI node plugin restarts: the FUSE daemon
behind a mount dies, the mount stays, every access fails with ENOTCONN, and
automount never expires it. The healer, running as its own process, finds the
severed mount without touching the healthy ones, unmounts it in the autofs
root, and the next access through the pod's view mounts it again.

    sudo hack/demo.sh          (set-up, then: .venv/bin/python -m hack.demo)

Needs root (autofs, FUSE, mounts). Cleans up after itself, also on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from hack.autofs_world import AutofsWorld, force_unmount_under, missing_tools, wait_for

REPOS = ("atlas.cern.ch", "cms.cern.ch", "alice.cern.ch")
INTERVAL = 2.0


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(text: str) -> None:
    print(f"   {text}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metrics(port: int, *names: str) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    return [
        line
        for line in body.splitlines()
        if line.startswith(names) and not line.endswith(" 0.0") and "_created" not in line
    ]


def scraped(port: int, name: str) -> list[str]:
    """Like `metrics`, but empty while the agent is still starting."""
    try:
        return metrics(port, name)
    except OSError:
        return []


def run(workdir: Path) -> None:
    say("A node: an autofs root served by a real automount, FUSE repositories in it")
    world = AutofsWorld(workdir, REPOS, name="cvmfs").start()
    consumer = workdir / "pod-volume"
    agent: subprocess.Popen[bytes] | None = None
    try:
        show(f"autofs root {world.root} (map: <repo> -fstype=fuse :squashfuse#<image>)")
        # A consumer pod's view, as cvmfs-csi publishes it (rbind + make-slave).
        subprocess.run(["mount", "--make-shared", str(world.root)], check=True)
        consumer.mkdir()
        subprocess.run(
            ["mount", "--rbind", "--make-rslave", str(world.root), str(consumer)], check=True
        )
        show(f"a pod sees it at {consumer} (mount --rbind --make-rslave)")
        for repo in REPOS:
            world.access(repo)
            show(f"{repo}: mounted, served by squashfuse pid {world.daemon(repo).pid}")

        victim, second = REPOS[0], REPOS[1]
        say(f"The CSI node plugin restarts: kill -9 the FUSE daemon of {victim}")
        world.daemon(victim).kill()
        try:
            os.listdir(consumer / victim)
        except OSError as err:
            show(f"the pod: ls {consumer / victim}: {err.strerror} (errno {err.errno})")
        show("the mount stays in the table, and automount will never expire it")

        say("An operator looks, by hand: automount-healer --once --dry-run")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "agents.mount_healer",
                "--once",
                "--dry-run",
                "--root",
                str(world.root),
                "--log-level",
                "error",
            ],
            check=True,
        )

        port = free_port()
        say(f"Start the healer (interval {INTERVAL:g} s, metrics on 127.0.0.1:{port})")
        started = time.monotonic()
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agents.mount_healer",
                "--root",
                str(world.root),
                "--interval",
                str(INTERVAL),
                "--metrics-address",
                f"127.0.0.1:{port}",
            ],
        )
        wait_for(lambda: world.mount(victim) is None, 10, 0.005)
        show(f"{victim} unmounted in the root {time.monotonic() - started:.2f}s after start")
        show(
            f"the pod lists it again: {sorted(os.listdir(consumer / victim))}, "
            f"served by a fresh squashfuse, pid {world.daemon(victim).pid}"
        )
        wait_for(lambda: bool(scraped(port, "automount_healer_ticks_total")), 10, 0.1)

        say(f"Again while the healer runs: kill -9 the FUSE daemon of {second}")
        world.daemon(second).kill()
        killed_at = time.monotonic()
        wait_for(lambda: world.mount(second) is None, 10, 0.005)
        show(
            f"unmounted {time.monotonic() - killed_at:.2f}s after the daemon died "
            "(a process exit wakes a sweep)"
        )
        show(f"the pod lists it again: {sorted(os.listdir(consumer / second))}")
        show(f"{REPOS[2]} was never touched: same daemon, pid {world.daemon(REPOS[2]).pid}")

        say("What Prometheus scrapes (non-zero samples)")
        time.sleep(0.2)
        for line in metrics(
            port,
            "automount_healer_heals_total",
            "automount_healer_probes_total",
            "automount_healer_mounts{",
            "automount_healer_event_driven",
            "automount_healer_up",
        ):
            show(line)
    finally:
        say("Clean up")
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(10)
        subprocess.run(["umount", "-R", "-l", str(consumer)], check=False, capture_output=True)
        world.stop()
        force_unmount_under(workdir)
        show("agent stopped, mounts and daemons gone")


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (autofs, FUSE, mounts): sudo hack/demo.sh", file=sys.stderr)
        return 2
    if missing := missing_tools():
        print(f"demo: missing {', '.join(missing)}: run hack/setup.sh", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="healer-demo-") as tmp:
        try:
            run(Path(tmp))
        except KeyboardInterrupt:
            print("\ninterrupted; cleaned up", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
