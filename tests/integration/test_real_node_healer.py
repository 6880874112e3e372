"""The project's image, run as its DaemonSet runs it, heals the host's autofs mounts.

The image built from images/Containerfile (hack/test.sh builds it once per run:
`python -m hack.image --prebuild`, `$NODE_AGENTS_IMAGE_DIR`), its root filesystem
run by containerd and runc as manifests/mount-healer/daemonset.yaml asks:
privileged, hostPID, hostNetwork, a read-only root, the autofs root bind-mounted
at the same path. What the fast tests cannot show: the agent as packaged (its
venv, its interpreter, no pip), inside a real mount namespace whose view of the
autofs root is what the runtime made of `mountPropagation`.

- Bidirectional (rshared, the container's root rshared too, as containerd's CRI
  does): the unmount in the container reaches the host, so a severed mount is
  healed there and automount mounts it again;
- HostToContainer (rslave): the copy is a slave whose master is not visible in
  the container; the healer unmounts nothing and says which propagation to ask for.

Marked `autofs`: on a kernel without autofs these run in hack/vm.py's VM (with
containerd inside it; the image's root filesystem is read from the host over 9p).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.mount_healer.healer import PROPAGATION_FIX
from hack import image as hack_image
from hack.autofs_world import AutofsWorld, wait_for
from hack.containerd import Bind, Containerd, RealContainer
from hack.containers import new_pod_uid
from hack.prometheus import free_port, sample, scrape_agent
from tests.support.containers import need, real_node

pytestmark = [pytest.mark.autofs, pytest.mark.realnode, pytest.mark.root]


@pytest.fixture(scope="module")
def image() -> hack_image.Prebuilt:
    done = hack_image.prebuilt()
    need(
        done is not None and done.rootfs.is_dir(),
        "needs the image's root filesystem: hack/test.sh builds it before its passes "
        f"(python -m hack.image --prebuild DIR; ${hack_image.PREBUILT_ENV}=DIR)",
    )
    assert done is not None
    return done


@pytest.fixture(scope="module")
def node() -> Iterator[Containerd]:
    """containerd with no image of its own: the healer brings the project's root filesystem."""
    with real_node(import_base=False) as node:
        yield node


def healer(
    node: Containerd,
    image: hack_image.Prebuilt,
    world: AutofsWorld,
    *,
    propagation: str,
    argv: list[str],
    log: Path,
) -> RealContainer:
    """The DaemonSet's container: privileged, hostPID, hostNetwork, read-only root."""
    config = image.image_config()
    return node.run(
        new_pod_uid(),
        "automount-healer",
        privileged=True,
        host_pid=True,
        host_network=True,
        read_only=True,
        rootfs=image.rootfs,
        env=config["Env"],
        mounts=[Bind(world.root, str(world.root), propagation=propagation)],
        argv=argv,
        log=log,
    )


def metric(port: int, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample of the containerized healer's /metrics (host network: loopback);
    -1 while it does not answer."""
    try:
        return sample(scrape_agent(port), name, labels)
    except OSError:
        return -1.0


def test_bidirectional_heals_the_hosts_mount(
    node: Containerd, image: hack_image.Prebuilt, world: AutofsWorld, tmp_path: Path
) -> None:
    # A node's / is shared (systemd); the VM's is not: the autofs root is made so,
    # as containerd's CRI requires of a Bidirectional mount's source.
    subprocess.run(["mount", "--make-shared", str(world.root)], check=True)
    assert world.access("repo1") == ["README"]
    world.access("repo2")
    neighbour = world.mount("repo2")
    port = free_port()
    log = tmp_path / "healer.log"
    argv = ["automount-healer", "--root", str(world.root), "--interval", "2"]
    argv += ["--metrics-address", f"127.0.0.1:{port}"]
    container = healer(node, image, world, propagation="rshared", argv=argv, log=log)
    try:
        wait_for(lambda: metric(port, "automount_healer_ticks_total") >= 1, 30)
        assert metric(port, "automount_healer_event_driven") == 1, log.read_text()
        old_pid = world.kill_daemon("repo1")
        took = wait_for(lambda: world.mount("repo1") is None, 10)
        print(f"\nhealed on the host {took:.2f} s after the kill (event-driven, in the image)")
        assert metric(port, "automount_healer_heals_total", {"method": "umount"}) == 1
        # Remounted on the next access, by a new daemon; the neighbour untouched.
        assert world.access("repo1") == ["README"]
        assert world.daemon("repo1").pid != old_pid
        assert world.mount("repo2") == neighbour
        assert node.alive(container), log.read_text()
    finally:
        print(log.read_text()[-3000:])


def test_host_to_container_unmounts_nothing_and_names_the_fix(
    node: Containerd, image: hack_image.Prebuilt, world: AutofsWorld, tmp_path: Path
) -> None:
    subprocess.run(["mount", "--make-shared", str(world.root)], check=True)
    world.access("repo1")
    world.kill_daemon("repo1")
    severed = world.mount("repo1")
    assert severed is not None
    argv = ["sleep", "infinity"]
    log = tmp_path / "healer.log"
    container = healer(node, image, world, propagation="rslave", argv=argv, log=log)
    done = node.exec(
        container,
        ["automount-healer", "--once", "--root", str(world.root), "--metrics-address", "off"],
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    row = next(r for r in rows if r[0] == str(world.path("repo1")))
    assert row[1:3] == ["skipped", "none"]
    assert "mount propagation" in row[3]
    assert PROPAGATION_FIX in done.stderr, done.stderr
    # Still severed on the host: nothing was unmounted in the copy.
    assert world.mount("repo1") == severed
