"""`token-refresher injector` on this host: the real agent against a fake API server
(real HTTP), writing into fake containers that are real chrooted processes in
kubelet-like cgroups (hack/containers.py). Root needed.

The files come the way they do in a cluster: a real controller (its file
server on loopback, TLS from its own CA in the CA ConfigMap) streams them to
the injector, which presents a projected token the fake API issued for its
pod. Both run as their bundle ServiceAccounts under the bundle's RBAC: the
injector reads no Secret and no ConfigMap but its CA.

Each test maps to an acceptance point of the injector.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import agents.token_refresher.injector as injector_module
from agents.mount_healer.mountinfo import read_mount_table
from agents.token_refresher.cli import main
from hack.autofs_world import make_image, wait_for
from hack.containers import Container
from tests.conftest import require_root_tools
from tests.support.agent import AgentThread
from tests.support.fake_kube import FakeKube
from tests.support.token_cluster import AGENTS_NS, NS, Cluster
from tests.support.tokens import token_secret_object

pytestmark = pytest.mark.root

CERN = "oauth2-refresh-controller.cern.ch"
OURS = "token-refresher.node-agents.io"
EOS = "oauth2:$(ACCESS_TOKEN):auth.cern.ch/auth/realms/cern/protocol/openid-connect/userinfo"
FILES_WRITTEN = "token_refresher_files_written_total"
FAILURES = "token_refresher_injection_failures_total"
TICKS = "token_refresher_ticks_total"
TICK_FAILURES = "token_refresher_tick_failures_total"


def eos(access_token: str) -> bytes:
    return EOS.replace("$(ACCESS_TOKEN)", access_token).encode()


# -- the cluster ----------------------------------------------------------------------


def token_json(access_token: str) -> str:
    return json.dumps(
        {
            "access_token": access_token,
            "refresh_token": "refresh-" + access_token,
            "token_type": "Bearer",
            "expires_at": time.time() + 3600,
            "issued_at": time.time(),
        }
    )


def token_secret(
    name: str,
    access_token: str = "at-1",
    *,
    prefix: str = CERN,
    data: dict[str, str] | None = None,
    namespace: str = NS,
) -> dict[str, Any]:
    """A token Secret as users create them (data base64, the is-token annotation)."""
    if data is None:
        data = {"oauth": token_json(access_token), "clientID": "eos", "clientSecret": "s3cret"}
    return token_secret_object(name, data, namespace=namespace, prefix=prefix)


def template_map(name: str, template: str = EOS) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NS},
        "data": {"template": template},
    }


def to_inject(*entries: dict[str, Any], prefix: str = CERN) -> dict[str, str]:
    return {f"{prefix}/to-inject": json.dumps(list(entries))}


def entry(container: str = "app", secret: str = "tok", **more: Any) -> dict[str, Any]:
    return {"secretName": secret, "container": container, "owner": 1000, **more}


def events(kube: FakeKube, reason: str | None = None, pod: str | None = None) -> list[Any]:
    """The injector's Events (the controller posts its own, about Secrets)."""
    return [
        e
        for e in kube.objects("events", NS)
        if e.get("reportingComponent") == injector_module.COMPONENT
        and (reason is None or e["reason"] == reason)
        and (pod is None or e["involvedObject"]["name"] == pod)
    ]


# Requests the controller makes on its own, whatever the injectors do: Lease
# renewals, and the re-checks of a stream's caller (TokenReview, its pod).
CONTROLLER_UPKEEP = (
    r"/apis/coordination\.k8s\.io/.*|/apis/authentication\.k8s\.io/.*"
    rf"|/api/v1/namespaces/{AGENTS_NS}/pods/.*"
)


def requests_but_upkeep(kube: FakeKube) -> list[Any]:
    upkeep = re.compile(CONTROLLER_UPKEEP)
    return [c for c in kube.calls(watch=False) if not upkeep.fullmatch(c.path)]


def file_of(container: Container, path: str = "/tmp/oauthtk_1000") -> Path:
    return container.path(path)


def has(path: Path, content: bytes) -> bool:
    try:
        return path.read_bytes() == content
    except FileNotFoundError:
        return False


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if not p.is_dir()]


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


# -- 1. the right containers of this node's pods, templated, with mode and owner -------


def test_files_land_in_the_named_containers_of_this_nodes_pods_only(cluster: Cluster) -> None:
    kube = cluster.kube
    kube.put(token_secret("tok", "at-1"))
    kube.put(template_map("eos-template"))
    annotations = to_inject(
        entry("app", templateConfigMapName="eos-template"),
        entry("app", mode="0440", group=2000, path="/tmp/plain/token"),
    )
    app, sidecar = cluster.pod("web", annotations, ("app", "sidecar"), dirs=("tmp/plain",))
    # The owner's own directory: files are written with the owner's rights.
    os.chown(app.path("/tmp/plain"), 1000, 1000)
    (elsewhere,) = cluster.pod("far", annotations, node="node-b")
    with cluster.injector() as agent:
        wait_for(lambda: agent.value("token_refresher_files", {"state": "ok"}) == 2, 10)
        assert file_of(app).read_bytes() == eos("at-1")
        assert owner_and_mode(file_of(app)) == (1000, 1000, 0o400)
        plain = file_of(app, "/tmp/plain/token")
        assert plain.read_bytes() == b"at-1"
        assert owner_and_mode(plain) == (1000, 2000, 0o440)
        # Nothing but the two files (no temp file left behind), nowhere else.
        assert sorted(os.listdir(app.path("/tmp"))) == ["oauthtk_1000", "plain"]
        assert files_under(sidecar.root) == []
        assert files_under(elsewhere.root) == []
        # Events are posted from a thread of their own, just after the writes.
        wait_for(lambda: len(events(kube, "TokenInjected", "web")) == 2, 5)
        injected = events(kube, "TokenInjected", "web")
        assert {e["type"] for e in injected} == {"Normal"}
        assert not events(kube, "TokenInjected", "far")
        assert agent.value("token_refresher_files", {"state": "ok"}) == 2
        assert agent.value(FILES_WRITTEN) == 2
        assert agent.value("token_refresher_up") == 1  # this node's pods are listed


# -- 2. a Secret update reaches the files at once, with no API call ---------------------


def test_a_secret_update_reaches_the_files_with_no_api_call(cluster: Cluster) -> None:
    """The controller's Secret watch delivers it and its stream pushes it: no request
    but the controller's own upkeep (Lease, re-checking its caller)."""
    kube = cluster.kube
    kube.put(token_secret("tok", "at-1", prefix=OURS))
    kube.put(template_map("eos-template"))
    annotations = to_inject(entry(templateConfigMapName="eos-template"), prefix=OURS)
    pods = [cluster.pod(f"worker-{i}", annotations)[0] for i in range(3)]
    # No full pass during the test: only the Secret's watch event can do it.
    with cluster.injector(interval=60) as agent:
        wait_for(lambda: all(has(file_of(c), eos("at-1")) for c in pods), 10)
        wait_for(lambda: len(events(kube, "TokenInjected")) == 3, 5)  # the pass is over
        wait_for(lambda: kube.watchers >= 2, 5)  # the injector's pods, the controller's Secrets
        requests, watches = len(requests_but_upkeep(kube)), kube.count(watch=True)
        kube.put(token_secret("tok", "at-2", prefix=OURS))
        took = wait_for(lambda: all(has(file_of(c), eos("at-2")) for c in pods), 10)
        time.sleep(0.3)  # room for any stray request to show up
        assert took < 2.0, f"the new token took {took:.2f}s"
        assert len(requests_but_upkeep(kube)) == requests, requests_but_upkeep(kube)[-5:]
        assert kube.count(watch=True) == watches
        wait_for(lambda: agent.value(FILES_WRITTEN) == 6, 2)
        print(f"secret update -> 3 files in {took:.3f}s")


# -- 3. planted symlinks are refused, nothing is written through them -------------------


def test_symlinks_planted_in_a_container_are_refused(cluster: Cluster, tmp_path: Path) -> None:
    kube = cluster.kube
    kube.put(token_secret("tok"))
    host_file = tmp_path / "host-credential"
    host_file.write_text("host secret\n")
    host_file.chmod(0o600)
    host_before = host_file.stat()
    assert not Path("/etc/oauthtk_1000").exists()

    (to_shadow,) = cluster.pod("to-shadow", to_inject(entry()), dirs=("etc",))
    shadow = to_shadow.path("/etc/shadow")
    shadow.write_text("root:*:19000:0:99999:7:::\n")
    file_of(to_shadow).symlink_to("/etc/shadow")

    (to_host,) = cluster.pod("to-host", to_inject(entry()))
    file_of(to_host).symlink_to(host_file)

    (tmp_link,) = cluster.pod("tmp-link", to_inject(entry()), dirs=("etc",))
    shutil.rmtree(tmp_link.path("/tmp"))
    tmp_link.path("/tmp").symlink_to("/etc")

    (good,) = cluster.pod("good", to_inject(entry()))

    with cluster.injector() as agent:
        wait_for(lambda: agent.value(FAILURES, {"reason": "unsafe_path"}) >= 3, 10)
        wait_for(lambda: has(file_of(good), b"at-1"), 10)
        ticks = agent.value(TICKS)
        wait_for(lambda: agent.value(TICKS) >= ticks + 5, 10)  # full passes: reported once

        assert shadow.read_text() == "root:*:19000:0:99999:7:::\n"
        assert os.readlink(file_of(to_shadow)) == "/etc/shadow"
        assert host_file.read_text() == "host secret\n"
        after = host_file.stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_uid, after.st_mode) == (
            host_before.st_ino,
            host_before.st_mtime_ns,
            host_before.st_uid,
            host_before.st_mode,
        )
        assert os.readlink(file_of(to_host)) == str(host_file)
        assert os.readlink(tmp_link.path("/tmp")) == "/etc"
        assert os.listdir(tmp_link.path("/etc")) == []
        assert not Path("/etc/oauthtk_1000").exists()
        for root in (to_shadow.root, to_host.root, tmp_link.root):
            leftovers = [p for p in root.rglob("*") if p.name.startswith(".oauthtk.")]
            assert leftovers == []
        for pod in ("to-shadow", "to-host", "tmp-link"):
            (event,) = events(kube, "TokenInjectionFailed", pod)
            assert event["type"] == "Warning"
            assert "symlink" in event["message"]
        assert agent.value(FAILURES, {"reason": "unsafe_path"}) == 3
        assert agent.value("token_refresher_files", {"state": "failing"}) == 3
        assert agent.value("token_refresher_files", {"state": "ok"}) == 1
        assert agent.value(TICK_FAILURES) == 0


# -- 4. a restarted container gets its file again -----------------------------------------


def test_a_restarted_container_gets_its_file_again(cluster: Cluster) -> None:
    kube = cluster.kube
    kube.put(token_secret("tok"))
    annotations = to_inject(entry())
    (app,) = cluster.pod("web", annotations)
    with cluster.injector(interval=60) as agent:  # no full pass: the pod event does it
        wait_for(lambda: agent.value(FILES_WRITTEN) == 1, 10)
        assert has(file_of(app), b"at-1")
        file_of(app).unlink()
        restarted = cluster.containers.restart(app)
        assert not cluster.containers.alive(app)
        cluster.republish("web", [restarted], annotations)
        wait_for(lambda: has(file_of(restarted), b"at-1"), 5)
        assert owner_and_mode(file_of(restarted)) == (1000, 1000, 0o400)
        wait_for(lambda: agent.value(FILES_WRITTEN) == 2, 2)
        wait_for(lambda: len(events(kube, "TokenInjected", "web")) == 2, 2)


def test_a_container_that_just_exited_is_reported_only_if_it_stays_gone(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod status can say running for a moment after the container died:
    no process found is waited out for a grace period, then reported once."""
    monkeypatch.setattr(injector_module, "NO_PROCESS_GRACE", 2.0)
    kube = cluster.kube
    kube.put(token_secret("tok"))
    (gone,) = cluster.pod("gone", to_inject(entry()))
    cluster.containers.kill(gone)
    (good,) = cluster.pod("good", to_inject(entry()))
    with cluster.injector(interval=0.3) as agent:
        wait_for(lambda: has(file_of(good), b"at-1"), 10)
        wait_for(lambda: agent.value("token_refresher_files", {"state": "waiting"}) == 1, 5)
        time.sleep(1.0)  # several full passes within the grace: nothing said
        assert agent.value(FAILURES, {"reason": "no_process"}) == 0
        assert not events(kube, "TokenInjectionFailed", "gone")
        # Still gone after the grace: said, once.
        wait_for(lambda: agent.value(FAILURES, {"reason": "no_process"}) == 1, 10)
        wait_for(lambda: len(events(kube, "TokenInjectionFailed", "gone")) == 1, 5)
        ticks = agent.value(TICKS)
        wait_for(lambda: agent.value(TICKS) >= ticks + 5, 10)
        assert len(events(kube, "TokenInjectionFailed", "gone")) == 1


# -- 5. unchanged files are left alone ---------------------------------------------------


def test_unchanged_files_are_not_rewritten(cluster: Cluster) -> None:
    kube = cluster.kube
    kube.put(token_secret("tok"))
    (steady,) = cluster.pod("steady", to_inject(entry()))
    (churned,) = cluster.pod("churned", to_inject(entry()))
    with cluster.injector(interval=0.2) as agent:
        wait_for(lambda: agent.value(FILES_WRITTEN) == 2, 10)
        assert has(file_of(steady), b"at-1") and has(file_of(churned), b"at-1")
        before = file_of(steady).stat()
        # A file deleted by its container comes back at the next full pass:
        # twice, so at least two full passes looked at the steady file too.
        for _ in range(2):
            file_of(churned).unlink()
            wait_for(lambda: has(file_of(churned), b"at-1"), 5)
        after = file_of(steady).stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (
            before.st_ino,
            before.st_mtime_ns,
            before.st_ctime_ns,
        )
        wait_for(lambda: agent.value(FILES_WRITTEN) == 4, 2)
        time.sleep(0.5)  # two more full passes: still nothing rewritten
        assert agent.value(FILES_WRITTEN) == 4
        after = file_of(steady).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


# -- 6. what cannot be done is reported once, and disturbs nothing else -----------------


def test_failures_are_reported_once_and_disturb_no_other_pod(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    kube = cluster.kube
    kube.put(token_secret("tok"))
    kube.put(token_secret("no-client-secret", data={"oauth": token_json("x"), "clientID": "c"}))
    kube.put(
        token_secret("garbled", data={"oauth": "{not json", "clientID": "c", "clientSecret": "s"})
    )
    kube.put(template_map("eos-template"))
    kube.put(template_map("typo-template", "oauth2:$(ACCESS_TOKN):auth.cern.ch"))

    (read_only,) = cluster.pod("read-only", to_inject(entry()))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only.path("/tmp"))],
        check=True,
    )
    cluster.pod("no-such-container", to_inject(entry("nope")))
    bad_annotations = {
        "bad-json": {f"{CERN}/to-inject": "[{"},
        "not-a-list": {f"{CERN}/to-inject": json.dumps(entry())},
        "unknown-field": to_inject(entry(colour="blue")),
        "bad-mode": to_inject(entry(mode="0666")),
    }
    started = {
        name: cluster.pod(name, annotations) for name, annotations in bad_annotations.items()
    }
    cluster.pod("secret-missing-keys", to_inject(entry(secret="no-client-secret")))
    cluster.pod("secret-garbled", to_inject(entry(secret="garbled")))
    (waits_for_secret,) = cluster.pod("secret-unknown", to_inject(entry(secret="nowhere")))
    cluster.pod("template-typo", to_inject(entry(templateConfigMapName="typo-template")))
    cluster.pod("template-missing", to_inject(entry(templateConfigMapName="gone-template")))
    (good,) = cluster.pod("good", to_inject(entry(templateConfigMapName="eos-template")))

    expected = {
        "read-only": ("TokenInjectionFailed", "read-only"),
        "no-such-container": ("TokenInjectionFailed", "no container named 'nope'"),
        "bad-json": ("InvalidTokenAnnotation", "not valid JSON"),
        "not-a-list": ("InvalidTokenAnnotation", "must be a JSON list"),
        "unknown-field": ("InvalidTokenAnnotation", "unknown fields ['colour']"),
        "bad-mode": ("InvalidTokenAnnotation", "lets others write"),
        "secret-missing-keys": ("TokenInjectionFailed", "missing clientSecret"),
        "secret-garbled": ("TokenInjectionFailed", "not valid JSON"),
        "secret-unknown": ("TokenInjectionFailed", "no token Secret nowhere"),
        "template-typo": ("TokenInjectionFailed", "unknown variables ['ACCESS_TOKN']"),
        "template-missing": ("TokenInjectionFailed", "gone-template not found"),
    }
    caplog.set_level(logging.WARNING, logger="agents.token_refresher")
    try:
        with cluster.injector() as agent:
            wait_for(lambda: has(file_of(good), eos("at-1")), 10)
            wait_for(
                lambda: all(events(kube, reason, pod) for pod, (reason, _) in expected.items()), 10
            )
            ticks = agent.value(TICKS)
            wait_for(lambda: agent.value(TICKS) >= ticks + 5, 10)  # full passes: no repeats
            for pod, (reason, words) in expected.items():
                (event,) = [e for e in events(kube, pod=pod) if e["type"] == "Warning"]
                assert (event["type"], event["reason"]) == ("Warning", reason), pod
                assert words in event["message"], (pod, event["message"])
            for name in bad_annotations:
                assert any(
                    name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
                ), name
            assert agent.value(FAILURES, {"reason": "bad_annotation"}) == 4
            assert agent.value(FAILURES, {"reason": "read_only"}) == 1
            assert agent.value(FAILURES, {"reason": "no_container"}) == 1
            assert agent.value(FAILURES, {"reason": "bad_secret"}) == 2
            assert agent.value(FAILURES, {"reason": "no_secret"}) == 1
            assert agent.value(FAILURES, {"reason": "bad_template"}) == 2

            # Still serving: a new token reaches the good pod ...
            kube.put(token_secret("tok", "at-2"))
            wait_for(lambda: has(file_of(good), eos("at-2")), 5)
            # ... a fixed annotation is served, a new problem reported once more ...
            cluster.republish("bad-json", started["bad-json"], to_inject(entry()))
            wait_for(lambda: has(file_of(started["bad-json"][0]), b"at-2"), 5)
            cluster.republish("bad-mode", started["bad-mode"], to_inject(entry(mode="0777")))
            wait_for(lambda: len(events(kube, "InvalidTokenAnnotation", "bad-mode")) == 2, 5)
            # ... and a Secret that appears is used.
            kube.put(token_secret("nowhere", "at-3"))
            wait_for(lambda: has(file_of(waits_for_secret), b"at-3"), 5)
            ticks = agent.value(TICKS)
            wait_for(lambda: agent.value(TICKS) >= ticks + 3, 10)
            assert len(events(kube, "InvalidTokenAnnotation", "bad-mode")) == 2
            assert agent.value(FAILURES, {"reason": "bad_annotation"}) == 5
            assert agent.value(TICK_FAILURES) == 0
    finally:
        subprocess.run(["umount", str(read_only.path("/tmp"))], check=False)


# -- 7. --dry-run writes nothing; --once does one pass -----------------------------------


def test_dry_run_writes_nothing(cluster: Cluster) -> None:
    kube = cluster.kube
    kube.put(token_secret("tok"))
    (app,) = cluster.pod("web", to_inject(entry()))
    with cluster.injector("--dry-run") as agent:
        wait_for(lambda: agent.value(TICKS) >= 5, 10)
        assert os.listdir(app.path("/tmp")) == []
        assert agent.value(FILES_WRITTEN) == 0
    assert events(kube) == []


def test_once_does_one_pass_and_returns(cluster: Cluster) -> None:
    kube = cluster.kube
    kube.put(token_secret("tok"))
    (app,) = cluster.pod("web", to_inject(entry()))
    with cluster.controller():
        started = time.monotonic()
        assert main(cluster.argv("--once")) == 0
        took = time.monotonic() - started
    assert file_of(app).read_bytes() == b"at-1"
    print(f"--once took {took:.2f}s")


# -- 8. the controller's --secret-selector: only labelled Secrets are served -----------------


def test_a_secret_selector_serves_only_labelled_secrets(cluster: Cluster) -> None:
    kube = cluster.kube
    labelled = token_secret("tok", "at-1")
    labelled["metadata"]["labels"] = {"node-agents.io/token": "true"}
    kube.put(labelled)
    kube.put(token_secret("plain", "at-9"))
    (served,) = cluster.pod("served", to_inject(entry(secret="tok")))
    (refused,) = cluster.pod("refused", to_inject(entry(secret="plain")))
    with cluster.injector(controller=("--secret-selector", "node-agents.io/token=true")) as agent:
        wait_for(lambda: has(file_of(served), b"at-1"), 10)
        wait_for(lambda: agent.value(FAILURES, {"reason": "no_secret"}) == 1, 5)
        wait_for(lambda: len(events(kube, "TokenInjectionFailed", "refused")) == 1, 5)
        (event,) = events(kube, "TokenInjectionFailed", "refused")
        assert "no token Secret plain" in event["message"]
        assert "with labels node-agents.io/token=true" in event["message"]
        assert files_under(refused.root) == []
    watched = kube.calls("GET", r"/api/v1/(namespaces/[^/]+/)?secrets")
    assert watched and all(
        c.query.get("labelSelector") == "node-agents.io/token=true" for c in watched
    )


# -- 9. controller down: files stay, and come back from the injector's state --------------


def test_with_the_controller_down_a_restarted_injector_writes_its_last_files(
    cluster: Cluster,
) -> None:
    kube = cluster.kube
    kube.put(token_secret("tok"))
    annotations = to_inject(entry())
    (app,) = cluster.pod("web", annotations)
    with cluster.injector() as agent:
        wait_for(lambda: has(file_of(app), b"at-1"), 10)
        assert agent.value("token_refresher_injector_controller_connected") == 1
    # The controller is gone, the injector's container restarts, and so does the
    # app's (a new container, without the file).
    restarted = cluster.containers.restart(app)
    cluster.republish("web", [restarted], annotations)
    with AgentThread(main, cluster.argv()) as agent:
        wait_for(lambda: has(file_of(restarted), b"at-1"), 10)
        assert agent.value("token_refresher_injector_controller_connected") == 0
        errors = "token_refresher_injector_controller_errors_total"
        wait_for(lambda: agent.value(errors, {"reason": "connection"}) >= 1, 5)
        assert agent.value("token_refresher_injector_snapshot_age_seconds") >= 0


# -- 10. issue 11, point 5: no borrowed root ----------------------------------------------
#
# Files are written with the rights of the owner the pod names: the kernel's own
# checks (directory permissions, the sticky bit) apply as to that user, a file of
# another uid is never replaced, and only paths under the admin's prefixes are
# written at all. In each case a neighbour's file still updates at once.

PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
STUCK = "token_refresher_injector_stuck_writes"


def refusals(kube: FakeKube, pod: str, *words: str) -> list[str]:
    """Messages of the Warning Events about `pod` that hold every one of `words`."""
    return [
        e["message"]
        for e in events(kube, "TokenInjectionFailed", pod)
        if e["type"] == "Warning" and all(w in e["message"] for w in words)
    ]


def assert_updates_quickly(
    cluster: Cluster, container: Container, token: str, path: str = "/tmp/oauthtk_1000"
) -> float:
    """A new token reaches `container`'s file as fast as ever (a neighbour's file)."""
    cluster.kube.put(token_secret("tok", token))
    took = wait_for(lambda: has(file_of(container, path), token.encode()), 5)
    assert took < 2.0, f"the neighbour's update took {took:.2f}s"
    return took


def assert_no_token_in_events(kube: FakeKube, *tokens: str) -> None:
    for event in events(kube):
        assert not any(t in event["message"] for t in tokens), event["message"]


def test_a_non_root_tenant_cannot_have_its_etc_passwd_replaced(cluster: Cluster) -> None:
    kube = cluster.kube
    kube.put(token_secret("tok"))
    annotations = to_inject(entry(path="/etc/passwd"), entry(path="/etc/oauthtk_1000"))
    (tenant,) = cluster.pod("tenant", annotations, dirs=("etc",))
    passwd = tenant.path("/etc/passwd")
    passwd.write_text(PASSWD)
    before = passwd.stat()
    (good,) = cluster.pod("good", to_inject(entry()))

    # The default prefix, /tmp/: refused before anything is looked at.
    with cluster.injector(memcg=True) as agent:
        wait_for(lambda: has(file_of(good), b"at-1"), 10)
        wait_for(lambda: agent.value(FAILURES, {"reason": "path_not_allowed"}) == 2, 5)
        wait_for(lambda: len(refusals(kube, "tenant", "--allowed-path-prefixes")) == 2, 5)
        for message in refusals(kube, "tenant"):
            assert "outside the directories this node allows for token files (/tmp/" in message
        assert_updates_quickly(cluster, good, "at-2")

    # /etc/ allowed by the admin: still the owner's rights, and root's file is not uid 1000's.
    with cluster.injector("--allowed-path-prefixes", "/tmp/,/etc/", memcg=True) as agent:
        wait_for(lambda: agent.value(FAILURES, {"reason": "foreign_owner"}) == 1, 10)
        wait_for(lambda: agent.value(FAILURES, {"reason": "permission_denied"}) == 1, 5)
        wait_for(lambda: len(refusals(kube, "tenant")) == 4, 5)
        assert refusals(kube, "tenant", "/etc/passwd", "owned by uid 0", "owner 1000")
        assert refusals(kube, "tenant", "/etc/oauthtk_1000", "uid 1000 may not write")
        assert_updates_quickly(cluster, good, "at-3")
        assert agent.value(TICK_FAILURES) == 0

    after = passwd.stat()
    assert passwd.read_text() == PASSWD
    assert (after.st_ino, after.st_mtime_ns, after.st_uid) == (
        before.st_ino,
        before.st_mtime_ns,
        0,
    )
    assert sorted(os.listdir(tenant.path("/etc"))) == ["passwd"]
    assert_no_token_in_events(kube, "at-1", "at-2", "at-3")


def test_a_file_of_another_uid_in_a_sticky_tmp_is_not_replaced(cluster: Cluster) -> None:
    kube = cluster.kube
    kube.put(token_secret("tok"))
    (tenant,) = cluster.pod("tenant", to_inject(entry()))  # /tmp/oauthtk_1000, owner 1000
    theirs = file_of(tenant)
    theirs.write_text("uid 2000's file\n")
    os.chown(theirs, 2000, 2000)
    before = theirs.stat()
    (good,) = cluster.pod("good", to_inject(entry()))
    with cluster.injector(memcg=True) as agent:
        wait_for(lambda: agent.value(FAILURES, {"reason": "foreign_owner"}) == 1, 10)
        wait_for(lambda: refusals(kube, "tenant", "owned by uid 2000", "never replaced"), 5)
        assert has(file_of(good), b"at-1")
        assert_updates_quickly(cluster, good, "at-2")
        ticks = agent.value(TICKS)
        wait_for(lambda: agent.value(TICKS) >= ticks + 5, 10)  # full passes: said once
        assert len(refusals(kube, "tenant")) == 1
    after = theirs.stat()
    assert theirs.read_text() == "uid 2000's file\n"
    assert (after.st_ino, after.st_uid, after.st_mtime_ns) == (
        before.st_ino,
        2000,
        before.st_mtime_ns,
    )
    assert [n for n in os.listdir(tenant.path("/tmp")) if n != "oauthtk_1000"] == []


def test_another_users_files_on_a_shared_volume_are_not_replaced(cluster: Cluster) -> None:
    """One host directory mounted into two pods: uid 2000's pod and a tenant's."""
    kube = cluster.kube
    kube.put(token_secret("tok"))
    volume = cluster.tmp / "shared-volume"
    (volume / "drop").mkdir(parents=True)
    volume.chmod(0o755)
    (volume / "drop").chmod(0o777)  # world-writable, not sticky
    for name in ("data", "drop/oauthtk_1000"):
        (volume / name).write_text(f"uid 2000's {name}\n")
        os.chown(volume / name, 2000, 2000)
    for path in (volume, volume / "drop"):
        os.chown(path, 2000, 2000)
    shared = ("tmp/shared",)
    (tenant,) = cluster.pod(
        "tenant",
        to_inject(
            entry(path="/tmp/shared/data"),
            entry(path="/tmp/shared/oauthtk_1000"),
            entry(path="/tmp/shared/drop/oauthtk_1000"),
        ),
        dirs=shared,
    )
    (owner,) = cluster.pod(
        "volume-owner", to_inject(entry(owner=2000, path="/tmp/shared/token")), dirs=shared
    )
    for container in (tenant, owner):
        subprocess.run(
            ["mount", "--bind", str(volume), str(container.path("/tmp/shared"))], check=True
        )
    before = {name: (volume / name).stat() for name in ("data", "drop/oauthtk_1000")}
    try:
        with cluster.injector(memcg=True) as agent:
            # The volume's owner writes through the bind mount, with its own rights.
            wait_for(lambda: has(volume / "token", b"at-1"), 10)
            assert owner_and_mode(volume / "token") == (2000, 2000, 0o400)
            wait_for(lambda: agent.value(FAILURES, {"reason": "foreign_owner"}) == 2, 5)
            wait_for(lambda: agent.value(FAILURES, {"reason": "permission_denied"}) == 1, 5)
            wait_for(lambda: len(refusals(kube, "tenant")) == 3, 5)
            assert len(refusals(kube, "tenant", "owned by uid 2000")) == 2
            assert refusals(kube, "tenant", "/tmp/shared/oauthtk_1000", "uid 1000 may not write")
            took = assert_updates_quickly(cluster, owner, "at-2", "/tmp/shared/token")
            print(f"the volume owner's update took {took:.3f}s")
    finally:
        for container in (tenant, owner):
            subprocess.run(["umount", str(container.path("/tmp/shared"))], check=False)
    for name, st in before.items():
        assert (volume / name).read_text() == f"uid 2000's {name}\n"
        assert (volume / name).stat().st_ino == st.st_ino
    assert sorted(os.listdir(volume)) == ["data", "drop", "token"]
    assert os.listdir(volume / "drop") == ["oauthtk_1000"]
    assert_no_token_in_events(kube, "at-1", "at-2")


# -- 11. issue 11, point 6: a FUSE mount whose daemon is stopped freezes nothing -----------


def fuse_daemon(target: Path) -> psutil.Process:
    """The squashfuse serving `target` (it daemonises: no child of ours)."""
    for proc in psutil.process_iter(["cmdline"]):
        if (proc.info.get("cmdline") or [])[-1:] == [str(target)]:
            return proc
    raise AssertionError(f"no FUSE daemon for {target}")


def fuse_requests_waiting(target: Path) -> int:
    """Requests the kernel sent the FUSE daemon at `target` that it has not answered
    (fusectl's `waiting`; found through mountinfo: a stat of `target` would wait too)."""
    mount = read_mount_table().top_at(str(target))
    assert mount is not None and mount.is_fuse, target
    return int(Path(f"/sys/fs/fuse/connections/{mount.minor}/waiting").read_text())


def squashfuse_at(image: Path, target: Path) -> psutil.Process:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["squashfuse", str(image), str(target)], check=True)
    return fuse_daemon(target)


@contextlib.contextmanager
def resumed_at_exit(*daemons: psutil.Process) -> Iterator[None]:
    """SIGCONT the daemons when the block ends (before the injector stops, when
    entered after it: a stuck write of a broken injector must not hang the test)."""
    try:
        yield
    finally:
        for daemon in daemons:
            with contextlib.suppress(psutil.NoSuchProcess):
                daemon.resume()


def unmount(*targets: Path) -> None:
    for target in targets:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def test_paths_into_a_stopped_fuse_mount_are_refused_without_asking_it(cluster: Cluster) -> None:
    require_root_tools(autofs=False)
    kube = cluster.kube
    kube.put(token_secret("tok"))
    image = make_image(cluster.tmp, "repo1")
    (fuse_tmp,) = cluster.pod("fuse-tmp", to_inject(entry()))
    (fuse_deeper,) = cluster.pod(
        "fuse-deeper", to_inject(entry(path="/tmp/cvmfs/oauthtk_1000")), dirs=("tmp/cvmfs",)
    )
    (good,) = cluster.pod("good", to_inject(entry()))
    targets = (fuse_tmp.path("/tmp"), fuse_deeper.path("/tmp/cvmfs"))
    try:
        daemons = [squashfuse_at(image, target) for target in targets]
        for daemon in daemons:
            daemon.suspend()  # a hung CVMFS, or the tenant's own stopped daemon
        with cluster.injector(memcg=True) as agent, resumed_at_exit(*daemons):
            # The pass that writes the neighbour's file refuses both (the agent's own
            # start-up, a process under a loaded CI machine, is not what is timed).
            wait_for(lambda: has(file_of(good), b"at-1"), 30)
            took = wait_for(lambda: agent.value(FAILURES, {"reason": "refused_filesystem"}) == 2, 5)
            assert took < 2.0, f"refusing took {took:.2f}s after the neighbour's file"
            for pod, at in (("fuse-tmp", "/tmp"), ("fuse-deeper", "/tmp/cvmfs")):
                wait_for(lambda pod=pod: refusals(kube, pod), 5)
                (message,) = refusals(kube, pod)
                assert f"{at} is on a fuse.squashfuse filesystem" in message
                assert "FUSE and network filesystems are refused" in message
            assert_updates_quickly(cluster, good, "at-2")
            assert agent.value(STUCK) == 0
            assert agent.value(FAILURES, {"reason": "write_timeout"}) == 0
            # Nothing ever asked the daemons: no request waits on either connection.
            for daemon, target in zip(daemons, targets, strict=True):
                assert daemon.status() == psutil.STATUS_STOPPED
                assert fuse_requests_waiting(target) == 0
            assert agent.value(TICK_FAILURES) == 0
    finally:
        unmount(*targets)


def test_a_write_stuck_in_the_kernel_is_abandoned_at_its_deadline(cluster: Cluster) -> None:
    """overlayfs over a FUSE lower layer (a CVMFS-backed image) has type `overlay`, and
    its lookups wait for the FUSE daemon: stopped, the write blocks in the kernel."""
    require_root_tools(autofs=False)
    kube = cluster.kube
    kube.put(token_secret("tok"))
    image = make_image(cluster.tmp, "repo1")
    lower, upper = cluster.tmp / "lower", cluster.tmp / "upper"
    (stuck,) = cluster.pod("overlay-tmp", to_inject(entry()))
    (good,) = cluster.pod("good", to_inject(entry()))
    merged = stuck.path("/tmp")
    try:
        daemon = squashfuse_at(image, lower)
        upper.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(upper)], check=True)
        (upper / "u").mkdir(mode=0o1777)
        (upper / "u").chmod(0o1777)
        (upper / "w").mkdir()
        options = f"lowerdir={lower},upperdir={upper}/u,workdir={upper}/w"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True
        )
        daemon.suspend()
        with cluster.injector("--write-timeout", "1", memcg=True) as agent, resumed_at_exit(daemon):
            wait_for(lambda: has(file_of(good), b"at-1"), 10)
            took = wait_for(lambda: agent.value(FAILURES, {"reason": "write_timeout"}) == 1, 5)
            wait_for(lambda: refusals(kube, "overlay-tmp", "did not finish within 1 s"), 5)
            assert agent.value(STUCK) == 1
            assert fuse_requests_waiting(lower) >= 1  # the overlay's lookup, in the kernel
            # The neighbour is served at its normal speed while the write is stuck.
            assert_updates_quickly(cluster, good, "at-2")
            # Full passes come and go: the stuck container takes no second thread.
            ticks = agent.value(TICKS)
            wait_for(lambda: agent.value(TICKS) >= ticks + 5, 10)
            assert agent.value(STUCK) == 1
            assert agent.value(FAILURES, {"reason": "write_timeout"}) == 1
            assert len(refusals(kube, "overlay-tmp")) == 1
            print(f"stuck write reported {took:.2f}s after the injector started")
            # Once the filesystem answers, its thread comes back and the file is written.
            daemon.resume()
            wait_for(lambda: agent.value(STUCK) == 0, 5)
            wait_for(lambda: has(file_of(stuck), b"at-2"), 5)
            assert owner_and_mode(file_of(stuck)) == (1000, 1000, 0o400)
            assert agent.value(TICK_FAILURES) == 0
    finally:
        unmount(merged, upper, lower)
    assert_no_token_in_events(kube, "at-1", "at-2")


# -- 12. issue 11, point 1 (the injector's part): a surprise is one file's problem ---------


def test_an_unencodable_path_fails_only_its_own_file(cluster: Cluster) -> None:
    """A lone surrogate (`\\ud800`, plain ASCII in JSON) cannot be encoded for a syscall:
    it once failed every pass of the node. Refused when parsed, or else contained."""
    kube = cluster.kube
    kube.put(token_secret("tok"))
    annotations = {
        f"{CERN}/to-inject": '[{"secretName": "tok", "container": "app", '
        '"owner": 1000, "path": "/tmp/\\ud800"}]'
    }
    cluster.pod("surrogate", annotations)
    (good,) = cluster.pod("good", to_inject(entry()))
    with cluster.injector(memcg=True) as agent:
        wait_for(lambda: has(file_of(good), b"at-1"), 10)
        wait_for(lambda: [e for e in events(kube, pod="surrogate") if e["type"] == "Warning"], 5)
        assert_updates_quickly(cluster, good, "at-2")
        assert agent.value(TICK_FAILURES) == 0
        contained = agent.value(FAILURES, {"reason": "internal"}) + agent.value(
            FAILURES, {"reason": "bad_annotation"}
        )
        assert contained == 1


def test_an_unexpected_exception_is_that_files_problem_reported_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in planning one file or in writing another (faults injected at the
    injector's boundaries) fails those files only, each logged once with its traceback."""
    real_write, real_allowed = injector_module.write_file, injector_module.path_allowed

    def write_file(root: int, path: str, content: bytes, **kwargs: Any) -> Any:
        if path == "/tmp/write-bug":
            raise ValueError("a bug in writing")
        return real_write(root, path, content, **kwargs)

    def path_allowed(path: str, prefixes: Any) -> bool:
        if path == "/tmp/plan-bug":
            raise KeyError("a bug in planning")
        return real_allowed(path, prefixes)

    monkeypatch.setattr(injector_module, "write_file", write_file)
    monkeypatch.setattr(injector_module, "path_allowed", path_allowed)
    caplog.set_level(logging.WARNING, logger="agents.token_refresher")
    kube = cluster.kube
    kube.put(token_secret("tok"))
    cluster.pod("buggy", to_inject(entry(path="/tmp/write-bug"), entry(path="/tmp/plan-bug")))
    (good,) = cluster.pod("good", to_inject(entry()))
    with cluster.injector() as agent:
        wait_for(lambda: agent.value(FAILURES, {"reason": "internal"}) == 2, 10)
        wait_for(lambda: len(refusals(kube, "buggy", "internal error")) == 2, 5)
        assert has(file_of(good), b"at-1")
        assert_updates_quickly(cluster, good, "at-2")
        ticks = agent.value(TICKS)
        wait_for(lambda: agent.value(TICKS) >= ticks + 5, 10)  # full passes: said once
        assert agent.value(FAILURES, {"reason": "internal"}) == 2
        assert agent.value(TICK_FAILURES) == 0
    assert refusals(kube, "buggy", "while writing the file (ValueError)")
    assert refusals(kube, "buggy", "while planning the file (KeyError)")
    tracebacks = [r for r in caplog.records if r.exc_info and "buggy" in r.getMessage()]
    assert sorted(type(r.exc_info[1]).__name__ for r in tracebacks) == ["KeyError", "ValueError"]
