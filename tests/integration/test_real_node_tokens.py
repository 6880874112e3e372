"""The token injector on a real node: its files written into runc containers that
containerd started (hack/containerd.py), read back from inside them (root,
containerd, ctr, runc).

What the fake containers (test_token_injector.py: chrooted processes) cannot
show: the container's root is an overlayfs in a mount namespace of its own,
reached only through `/proc/<pid>/root` of a process runc started in the
kubelet's cgroup (either driver's naming); `/tmp` is a tmpfs mounted in that
namespace alone, the root filesystem may be read-only, the process may run as
a non-root uid, and a restart brings a new root. Every file is read back with
`ctr tasks exec` in the container's own view, never through a host path, and
the attacks are made by the container's own processes.

The cluster is tests/support/token_cluster.py's on the session's containerd:
the same fake API server, controller and injector as the fast tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hack.autofs_world import wait_for
from hack.containerd import Containerd, RealContainer
from hack.containers import new_pod_uid
from tests.integration.test_token_injector import (
    FAILURES,
    FILES_WRITTEN,
    TICK_FAILURES,
    entry,
    events,
    to_inject,
    token_secret,
)
from tests.support.token_cluster import Cluster, token_cluster

pytestmark = [pytest.mark.realnode, pytest.mark.root]

TOKEN = "/tmp/oauthtk_1000"  # the CERN controller's default path for owner 1000
# A neighbour's update lands in ~0.1 s (test_token_injector.py); generous for CI.
NORMAL_UPDATE = 3.0

RealCluster = Cluster[Containerd]


@pytest.fixture
def cluster(containerd: Containerd, tmp_path: Path) -> Iterator[RealCluster]:
    """The token-delivery cluster on the session's containerd (emptied after the test)."""
    with token_cluster(containerd, tmp_path) as cluster:
        yield cluster


def start_pod(
    cluster: RealCluster, name: str, annotations: dict[str, str], **run: Any
) -> RealContainer:
    """Container `app` of a new pod (`run`: Containerd.run's options), published Running."""
    container = cluster.containers.run(new_pod_uid(), "app", **run)
    cluster.republish(name, [container], annotations)
    return container


def inside(cluster: RealCluster, container: RealContainer, *argv: str, **kw: Any) -> str:
    """What `argv`, which only reads, prints in the container (its root, its
    namespaces, its uid); it must succeed."""
    return cluster.containers.output(container, argv, **kw)


def do_inside(cluster: RealCluster, container: RealContainer, *argv: str, **kw: Any) -> None:
    """Run `argv` in the container (once: it changes something); it must succeed."""
    done = cluster.containers.exec(container, argv, **kw)
    assert done.returncode == 0, f"{argv} in {container.name}: {done.stderr.strip()}"


def fails_inside(cluster: RealCluster, container: RealContainer, *argv: str, **kw: Any) -> bool:
    return cluster.containers.exec(container, argv, **kw).returncode != 0


def owner_and_mode(cluster: RealCluster, container: RealContainer, path: str) -> str:
    """`uid gid mode type` of `path` as the container's stat(1) sees it."""
    return inside(cluster, container, "stat", "-c", "%u %g %a %F", path).strip()


def warning(cluster: RealCluster, pod: str) -> str:
    """The message of the one TokenInjectionFailed Warning on `pod` (posted by now)."""
    wait_for(lambda: events(cluster.kube, "TokenInjectionFailed", pod), 5)
    (event,) = events(cluster.kube, "TokenInjectionFailed", pod)
    assert event["type"] == "Warning"
    return str(event["message"])


# -- 1. the file is in the container's own view, with its owner and mode ---------------


def test_files_land_in_the_containers_own_view_under_both_cgroup_drivers(
    cluster: RealCluster,
) -> None:
    cluster.kube.put(token_secret("tok", "at-1"))
    annotations = to_inject(entry(), entry(path="/tmp/shared/token", mode="0440", group=2000))
    pods = {
        style: start_pod(cluster, f"web-{style}", annotations, cgroup_style=style)
        for style in ("systemd", "cgroupfs")
    }
    for app in pods.values():
        # The owner's own directory, made inside: files are written with its rights.
        do_inside(cluster, app, "install", "-d", "-o", "1000", "-g", "1000", "/tmp/shared")
    with cluster.injector() as agent:
        wait_for(lambda: agent.value("token_refresher_files", {"state": "ok"}) == 4, 10)
        for style, app in pods.items():
            assert inside(cluster, app, "cat", TOKEN) == "at-1", style
            assert owner_and_mode(cluster, app, TOKEN) == "1000 1000 400 regular file"
            assert inside(cluster, app, "cat", "/tmp/shared/token") == "at-1"
            shared = owner_and_mode(cluster, app, "/tmp/shared/token")
            assert shared == "1000 2000 440 regular file"
            # On the container's overlayfs root; no temp file left behind.
            assert inside(cluster, app, "stat", "-f", "-c", "%T", "/tmp").strip() == "overlayfs"
            assert inside(cluster, app, "ls", "-A", "/tmp").split() == ["oauthtk_1000", "shared"]
        wait_for(lambda: all(events(cluster.kube, "TokenInjected", f"web-{s}") for s in pods), 5)
        assert agent.value(FILES_WRITTEN) == 4
        assert agent.value(TICK_FAILURES) == 0
    assert not Path(TOKEN).exists()  # the host's /tmp: not where it went


# -- 2. a read-only root: the tmpfs /tmp is written, the root refused ------------------


def test_a_read_only_root_refuses_its_file_and_the_tmpfs_tmp_is_written(
    cluster: RealCluster,
) -> None:
    cluster.kube.put(token_secret("tok", "at-1"))
    on_root = "/var/tmp/oauthtk_1000"  # sticky and writable for all, on the root filesystem
    annotations = to_inject(entry(), entry(path=on_root))
    app = start_pod(cluster, "locked", annotations, read_only=True, tmpfs_tmp=True)
    with cluster.injector("--allowed-path-prefixes", "/tmp/,/var/tmp/") as agent:
        wait_for(lambda: agent.value(FAILURES, {"reason": "read_only"}) == 1, 10)
        wait_for(lambda: agent.value("token_refresher_files", {"state": "ok"}) == 1, 10)
        assert inside(cluster, app, "cat", TOKEN) == "at-1"
        assert owner_and_mode(cluster, app, TOKEN) == "1000 1000 400 regular file"
        assert inside(cluster, app, "stat", "-f", "-c", "%T", "/tmp").strip() == "tmpfs"
        assert fails_inside(cluster, app, "test", "-e", on_root)
        assert fails_inside(cluster, app, "touch", "/var/tmp/probe")  # read-only indeed
        message = warning(cluster, "locked")
        assert on_root in message and "read-only filesystem" in message
        assert agent.value("token_refresher_files", {"state": "failing"}) == 1
        assert inside(cluster, app, "ls", "-A", "/tmp") == "oauthtk_1000\n"
        assert inside(cluster, app, "ls", "-A", "/var/tmp") == ""


# -- 3. a non-root container: its uid's file, written with its rights only ----------------


def test_a_non_root_containers_file_is_its_uids_and_written_with_its_rights_only(
    cluster: RealCluster,
) -> None:
    cluster.kube.put(token_secret("tok", "at-1"))
    annotations = to_inject(entry(), entry(path="/tmp/root-only/token"))
    app = start_pod(cluster, "user", annotations, user=(1000, 1000), tmpfs_tmp=True)
    assert inside(cluster, app, "id", "-u").strip() == "1000"
    # A root-owned directory (as an image's or an init container's would be).
    do_inside(cluster, app, "install", "-d", "-m", "0755", "/tmp/root-only", user=(0, 0))
    with cluster.injector() as agent:
        wait_for(lambda: agent.value(FAILURES, {"reason": "permission_denied"}) == 1, 10)
        wait_for(lambda: agent.value("token_refresher_files", {"state": "ok"}) == 1, 10)
        # Read by the container's own process, as uid 1000; no other uid may.
        assert inside(cluster, app, "cat", TOKEN) == "at-1"
        assert owner_and_mode(cluster, app, TOKEN) == "1000 1000 400 regular file"
        assert fails_inside(cluster, app, "cat", TOKEN, user=(2000, 2000))
        message = warning(cluster, "user")
        assert "/tmp/root-only/token" in message and "uid 1000 may not write" in message
        assert inside(cluster, app, "ls", "-A", "/tmp/root-only") == ""
        assert agent.value("token_refresher_files", {"state": "failing"}) == 1


# -- 4. a restarted container (new ID, new tmpfs) gets its file again -------------------


def test_a_restarted_container_gets_its_file_again(cluster: RealCluster) -> None:
    cluster.kube.put(token_secret("tok", "at-1"))
    annotations = to_inject(entry())
    app = start_pod(cluster, "web", annotations, tmpfs_tmp=True)
    with cluster.injector(interval=60) as agent:  # no full pass: the pod's update does it
        wait_for(lambda: agent.value(FILES_WRITTEN) == 1, 10)
        assert inside(cluster, app, "cat", TOKEN) == "at-1"
        restarted = cluster.containers.restart(app)
        assert restarted.id != app.id and restarted.pod_uid == app.pod_uid
        assert restarted.restarts == 1 and not cluster.containers.alive(app)
        assert inside(cluster, restarted, "ls", "-A", "/tmp") == ""  # a new, empty tmpfs
        cluster.republish("web", [restarted], annotations)  # the kubelet's new status
        wait_for(lambda: agent.value(FILES_WRITTEN) == 2, 5)
        assert inside(cluster, restarted, "cat", TOKEN) == "at-1"
        assert owner_and_mode(cluster, restarted, TOKEN) == "1000 1000 400 regular file"
        wait_for(lambda: len(events(cluster.kube, "TokenInjected", "web")) == 2, 5)
        assert agent.value(FAILURES, {"reason": "no_process"}) == 0


# -- 5. symlinks made by the container's own processes are refused ----------------------


def test_symlinks_made_inside_a_real_container_are_refused_and_a_neighbour_is_served(
    cluster: RealCluster, tmp_path: Path
) -> None:
    cluster.kube.put(token_secret("tok", "at-1"))
    host_file = tmp_path / "host-credential"
    host_file.write_text("host secret\n")
    host_file.chmod(0o600)
    before = host_file.stat()

    def identity(st: os.stat_result) -> tuple[int, ...]:
        return st.st_ino, st.st_mtime_ns, st.st_uid, st.st_mode

    assert not Path("/etc/oauthtk_1000").exists()

    swapped_path = "/tmp/own/oauthtk_1000"
    # pod: (its file, the symlink made inside, where it points)
    attacks = {
        # The parent directory a link to the container's /etc.
        "parent-link": (entry(path="/tmp/etc/oauthtk_1000"), "/tmp/etc", "/etc"),
        # The target a link to a host file: through the host's PID 1 root (where
        # /proc/<pid>/root/tmp/... followed by the host's rules would land), by its path.
        "via-pid-1": (entry(), TOKEN, f"/proc/1/root{host_file}"),
        "host-path": (entry(), TOKEN, str(host_file)),
        # Delivered first into the owner's directory, then a link swapped in for it.
        "swapped": (entry(path=swapped_path), "/tmp/own", "/etc"),
    }
    attackers = {}
    for name, (wanted, link, target) in attacks.items():
        attackers[name] = attacker = start_pod(cluster, name, to_inject(wanted), tmpfs_tmp=True)
        if name == "swapped":
            do_inside(cluster, attacker, "install", "-d", "-o", "1000", "/tmp/own")
        else:
            do_inside(cluster, attacker, "ln", "-s", target, link)
    good = start_pod(cluster, "good", to_inject(entry()), tmpfs_tmp=True)

    def served(token: str) -> bool:
        return inside(cluster, good, "cat", TOKEN) == token

    # No full pass after the first (interval 60 s): the swap below is two renames,
    # and only the Secret's update writes again, once the link is in place.
    with cluster.injector(interval=60, memcg=True) as agent:
        wait_for(lambda: agent.value(FAILURES, {"reason": "unsafe_path"}) == 3, 15)
        wait_for(lambda: agent.value("token_refresher_files", {"state": "ok"}) == 2, 10)
        assert served("at-1")
        swapped = attackers["swapped"]
        assert inside(cluster, swapped, "cat", swapped_path) == "at-1"
        do_inside(cluster, swapped, "sh", "-c", "mv /tmp/own /tmp/own.old && ln -s /etc /tmp/own")
        cluster.kube.put(token_secret("tok", "at-2"))
        took = wait_for(lambda: served("at-2"), 10)
        assert took < NORMAL_UPDATE, f"the neighbour's new token took {took:.2f}s"
        wait_for(lambda: agent.value(FAILURES, {"reason": "unsafe_path"}) == 4, 10)
        assert agent.value("token_refresher_files", {"state": "failing"}) == 4
        assert agent.value(TICK_FAILURES) == 0
        messages = {name: warning(cluster, name) for name in attacks}
        assert all("symlink" in message for message in messages.values()), messages
        assert "parent directory /tmp/own is reached through a symlink" in messages["swapped"]

    # Nothing written through a link: the host file, the host's /etc and the
    # containers' /etc are as they were, the links left in place.
    assert host_file.read_text() == "host secret\n"
    assert identity(host_file.stat()) == identity(before)
    assert not Path("/etc/oauthtk_1000").exists()
    for name, attacker in attackers.items():
        found = inside(
            cluster, attacker, "find", "/etc", "/tmp/", "-type", "f", "-name", "*oauthtk*"
        )
        expected = {"swapped": "/tmp/own.old/oauthtk_1000\n"}.get(name, "")
        assert found == expected, name
        assert inside(cluster, attacker, "readlink", attacks[name][1]) == attacks[name][2] + "\n"
    assert inside(cluster, swapped, "cat", "/tmp/own.old/oauthtk_1000") == "at-1"
