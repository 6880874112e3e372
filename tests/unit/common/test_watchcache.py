"""NodePodCache against the fake API server, through the real client over real HTTP."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.common.watchcache import NodePodCache, Pod
from hack.autofs_world import wait_for
from tests.support.fake_kube import FakeKube

NS = "team-a"
NODE = "node-a"
OTHER = "node-b"
LIST = ("GET", "/api/v1/pods")
REPO = Path(__file__).resolve().parents[3]


class Changes:
    """An on_change callback that records what it heard, thread-safely."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[tuple[str, str]] = []

    def __call__(self, type_: str, pod: Pod) -> None:
        with self._lock:
            self._seen.append((type_, pod["metadata"]["name"]))

    @property
    def seen(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._seen)


@pytest.fixture
def changes() -> Changes:
    return Changes()


@pytest.fixture
def make_cache(api: Any, changes: Changes) -> Iterator[Callable[..., NodePodCache]]:
    """Started caches for NODE; every one is stopped (and must stop) at teardown."""
    made: list[NodePodCache] = []

    def make(**options: Any) -> NodePodCache:
        options.setdefault("on_change", changes)
        cache = NodePodCache(api, NODE, **options)
        made.append(cache)
        return cache.start()

    yield make
    for cache in made:
        assert cache.stop(), "the pod watch thread did not stop"


def pod(name: str, node: str = NODE, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]},
    }


def names(cache: NodePodCache) -> set[str]:
    return {p["metadata"]["name"] for p in cache.pods()}


def watch_calls(kube: FakeKube) -> list[Any]:
    return kube.calls(*LIST, watch=True)


def list_count(kube: FakeKube) -> int:
    return kube.count(*LIST, watch=False)


# -- sync and events ---------------------------------------------------------------------


def test_initial_sync_holds_only_the_pods_of_its_node(
    kube: FakeKube, make_cache: Callable[..., NodePodCache], changes: Changes
) -> None:
    mine = [kube.put(pod("a-0")), kube.put(pod("a-1"))]
    kube.put(pod("b-0", node=OTHER))
    kube.put(pod("unscheduled", node=""))

    cache = make_cache()
    assert cache.wait_synced(5)
    assert cache.synced
    assert names(cache) == {"a-0", "a-1"}
    by_uid = cache.by_uid()
    assert set(by_uid) == {p["metadata"]["uid"] for p in mine}
    # Stored as the apiserver's JSON, with apiVersion/kind as a watch delivers them.
    stored = cache.get(mine[0]["metadata"]["uid"])
    assert stored is not None
    assert stored["kind"] == "Pod" and stored["apiVersion"] == "v1"
    assert stored["spec"]["nodeName"] == NODE
    assert stored["metadata"]["resourceVersion"] == mine[0]["metadata"]["resourceVersion"]
    assert cache.get("no-such-uid") is None
    assert sorted(changes.seen) == [("ADDED", "a-0"), ("ADDED", "a-1")]
    assert cache.lists == 1 and cache.errors == 0
    (listed,) = kube.calls(*LIST, watch=False)
    assert listed.query["fieldSelector"] == f"spec.nodeName={NODE}"
    # by_uid() is a copy: changing it does not change the cache.
    by_uid.clear()
    assert len(cache.by_uid()) == 2


def test_watch_events_reach_the_cache_within_a_second(
    kube: FakeKube, make_cache: Callable[..., NodePodCache], changes: Changes
) -> None:
    cache = make_cache()
    assert cache.wait_synced(5)
    wait_for(lambda: kube.watchers == 1, 5)
    (watching,) = watch_calls(kube)
    assert watching.query["fieldSelector"] == f"spec.nodeName={NODE}"
    assert watching.query["allowWatchBookmarks"] == "true"
    assert watching.query["timeoutSeconds"] == "300"
    assert watching.query["resourceVersion"] == kube.resource_version

    added = kube.put(pod("a-0"))
    uid = added["metadata"]["uid"]
    wait_for(lambda: cache.get(uid) is not None, 1)

    modified = kube.put(pod("a-0", stage="two"))
    wait_for(
        lambda: (cache.get(uid) or {}).get("metadata", {}).get("labels") == {"stage": "two"}, 1
    )
    assert cache.resource_version == modified["metadata"]["resourceVersion"]

    kube.put(pod("b-0", node=OTHER))  # not this node's: never seen
    kube.delete("pods", NS, "a-0")
    wait_for(lambda: cache.get(uid) is None, 1)

    assert changes.seen == [("ADDED", "a-0"), ("MODIFIED", "a-0"), ("DELETED", "a-0")]
    assert names(cache) == set()
    assert cache.lists == 1 and cache.watches == 1 and cache.errors == 0


def test_a_watch_ending_normally_resumes_from_its_resource_version(
    kube: FakeKube, make_cache: Callable[..., NodePodCache]
) -> None:
    cache = make_cache(timeout_seconds=1)
    assert cache.wait_synced(5)
    wait_for(lambda: len(watch_calls(kube)) >= 2, 5)
    changed = kube.put(pod("a-0"))
    wait_for(lambda: len(watch_calls(kube)) >= 4, 5)

    assert list_count(kube) == 1
    assert cache.lists == 1
    assert cache.relists_after_gone == 0 and cache.errors == 0
    starts = [int(c.query["resourceVersion"]) for c in watch_calls(kube)]
    assert starts == sorted(starts)  # never goes back
    # The watch after the change resumes from the change, not from the list.
    assert starts[-1] == int(changed["metadata"]["resourceVersion"])
    assert names(cache) == {"a-0"}


# -- 410 Gone ----------------------------------------------------------------------------


def test_gone_relists_once_and_drops_pods_deleted_in_the_gap(
    kube: FakeKube, make_cache: Callable[..., NodePodCache], changes: Changes
) -> None:
    kube.put(pod("stays"))
    kube.put(pod("goes"))
    # Equal jitter at 1.0: the backoff after the injected failure is exactly 0.5 s.
    cache = make_cache(timeout_seconds=1, jitter=lambda: 1.0)
    assert cache.wait_synced(5)
    wait_for(lambda: kube.watchers == 1, 5)

    # The next watch (after the open one times out) fails once; while the cache
    # backs off, nothing watches: delete a pod, add one and compact the history.
    before = len(watch_calls(kube))
    kube.inject_error(*LIST, 500, times=1, watch=True)
    wait_for(lambda: len(watch_calls(kube)) == before + 1, 5)
    kube.delete("pods", NS, "goes")
    kube.put(pod("new"))
    kube.compact()

    wait_for(lambda: names(cache) == {"stays", "new"}, 5)
    assert cache.relists_after_gone == 1
    assert list_count(kube) == 2
    assert ("DELETED", "goes") in changes.seen and ("ADDED", "new") in changes.seen

    # It watches on from the new list: no more 410s, no more lists.
    watches = len(watch_calls(kube))
    wait_for(lambda: len(watch_calls(kube)) >= watches + 2, 5)
    assert cache.relists_after_gone == 1
    assert list_count(kube) == 2
    assert cache.errors == 1  # the injected 500


# -- errors and backoff ------------------------------------------------------------------


def test_list_errors_back_off_then_sync(
    kube: FakeKube, make_cache: Callable[..., NodePodCache], caplog: pytest.LogCaptureFixture
) -> None:
    kube.put(pod("a-0"))
    kube.inject_error(*LIST, 500, times=2, watch=False)
    with caplog.at_level(logging.DEBUG, logger="agents.common.watchcache"):
        started = time.monotonic()
        cache = make_cache(jitter=lambda: 0.0)  # backoff at its shortest: 0.25 s, 0.5 s
        assert cache.wait_synced(10)
        took = time.monotonic() - started
    assert list_count(kube) == 3
    assert cache.errors == 2 and cache.lists == 3
    assert took >= 0.25 + 0.5
    assert names(cache) == {"a-0"}
    warnings = [
        r
        for r in caplog.records
        if r.name == "agents.common.watchcache" and r.levelno >= logging.WARNING
    ]
    (warning,) = warnings  # one per failure streak
    assert "HTTP 500" in warning.getMessage() and NODE in warning.getMessage()
    assert not warning.exc_info  # an API error is expected: no traceback
    assert "injected by FakeKube" in warning.getMessage()  # the Status message, one line
    assert "\n" not in warning.getMessage()


def test_backoff_grows_exponentially_to_the_cap_and_resets(api: Any) -> None:
    cache = NodePodCache(api, NODE, backoff_base=0.5, backoff_cap=30.0, jitter=lambda: 1.0)
    assert [cache._backoff(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert cache._backoff(10_000) == 30
    low = NodePodCache(api, NODE, jitter=lambda: 0.0)
    assert low._backoff(1) == 0.25 and low._backoff(8) == 15


def test_watch_errors_resume_without_a_relist(
    kube: FakeKube, make_cache: Callable[..., NodePodCache]
) -> None:
    cache = make_cache(timeout_seconds=1, jitter=lambda: 0.0)
    assert cache.wait_synced(5)
    kube.inject_error(*LIST, 503, times=2, watch=True)
    wait_for(lambda: cache.errors == 2, 5)
    wait_for(lambda: kube.watchers == 1, 5)
    added = kube.put(pod("a-0"))
    wait_for(lambda: cache.get(added["metadata"]["uid"]) is not None, 2)
    assert list_count(kube) == 1
    assert cache.relists_after_gone == 0


def test_an_unreachable_api_server_is_retried_and_stop_still_works(
    kube: FakeKube, make_cache: Callable[..., NodePodCache], caplog: pytest.LogCaptureFixture
) -> None:
    port = kube.port
    kube.close()  # connection refused from now on
    with caplog.at_level(logging.INFO):
        cache = make_cache(backoff_base=0.05, backoff_cap=0.1, jitter=lambda: 0.0)
        wait_for(lambda: cache.errors >= 3, 10)
        assert not cache.synced and not cache.wait_synced(0)
        # One line for the outage, for every user of this ApiClient (no urllib3 retries).
        (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert warning.name == "agents.common.kube" and "unreachable" in warning.getMessage()
        kube.start(port)
        assert cache.wait_synced(5)
        started = time.monotonic()
        assert cache.stop()
        assert time.monotonic() - started < 1.0
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(("agents", "urllib3"))]
    assert len(lines) == 2 and "answers again after" in lines[1]


def test_a_failing_callback_does_not_stop_the_watch(
    kube: FakeKube, make_cache: Callable[..., NodePodCache]
) -> None:
    def explode(type_: str, pod: Pod) -> None:
        raise RuntimeError("callback bug")

    cache = make_cache(on_change=explode)
    assert cache.wait_synced(5)
    wait_for(lambda: kube.watchers == 1, 5)
    added = kube.put(pod("a-0"))
    kube.put(pod("a-1"))
    wait_for(lambda: names(cache) == {"a-0", "a-1"}, 2)
    assert cache.get(added["metadata"]["uid"]) is not None
    assert cache.errors == 0


# -- stop and import cost ----------------------------------------------------------------


def test_stop_ends_an_open_watch_within_its_bound(
    kube: FakeKube, make_cache: Callable[..., NodePodCache]
) -> None:
    cache = make_cache()  # timeout_seconds=300: the watch would stay open for minutes
    assert cache.wait_synced(5)
    wait_for(lambda: kube.watchers == 1, 5)
    time.sleep(0.2)  # blocked in the read, not connecting
    started = time.monotonic()
    assert cache.stop(timeout=5.0)
    assert time.monotonic() - started < 0.5
    assert cache.errors == 0  # a deliberate stop is no failure
    wait_for(lambda: kube.watchers == 0, 2)  # the server saw the client go


def test_stop_right_after_start_is_bounded(kube: FakeKube, api: Any) -> None:
    for _ in range(5):
        cache = NodePodCache(api, NODE).start()
        started = time.monotonic()
        assert cache.stop(timeout=5.0)
        assert time.monotonic() - started < 1.0


def test_stop_before_start_and_twice(api: Any) -> None:
    cache = NodePodCache(api, NODE)
    assert cache.stop()
    assert cache.stop()


def test_importing_watchcache_does_not_import_kubernetes() -> None:
    code = (
        "import sys, agents.common.watchcache\n"
        "assert 'kubernetes' not in sys.modules, sorted(m for m in sys.modules if 'kube' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# -- what is stored ----------------------------------------------------------------------


def slim(obj: Pod) -> Pod:
    meta = obj["metadata"]
    return {
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion")},
        "labels": meta.get("labels") or {},
    }


def test_a_transform_slims_what_is_stored_and_heard(
    kube: FakeKube, make_cache: Callable[..., NodePodCache]
) -> None:
    heard: list[Pod] = []
    kube.put(pod("a-0", team="x"))
    cache = make_cache(transform=slim, on_change=lambda type_, obj: heard.append(obj))
    assert cache.wait_synced(5)
    kube.put(pod("a-1", team="y"))
    wait_for(lambda: len(cache.pods()) == 2, 5)
    assert sorted(cache.pods(), key=lambda p: p["metadata"]["name"]) == sorted(heard, key=str)
    assert {p["labels"]["team"] for p in cache.pods()} == {"x", "y"}
    assert all("spec" not in p for p in cache.pods())
    # named() still finds them: the transform kept name and namespace.
    assert cache.named(NS, "a-1") == slim(kube.get("pods", NS, "a-1") or {})


def test_a_list_in_pages_is_one_snapshot_of_every_page(
    kube: FakeKube, make_cache: Callable[..., NodePodCache], changes: Changes
) -> None:
    for i in range(7):
        kube.put(pod(f"a-{i}"))
    cache = make_cache(page_size=3)
    assert cache.wait_synced(5)
    assert names(cache) == {f"a-{i}" for i in range(7)}
    pages = kube.calls(*LIST, watch=False)
    assert [c.query.get("limit") for c in pages] == ["3", "3", "3"]
    assert [bool(c.query.get("continue")) for c in pages] == [False, True, True]
    # The watch resumes from the list's resourceVersion: an update is an event, no relist.
    kube.put(pod("a-7"))
    wait_for(lambda: "a-7" in names(cache), 5)
    assert cache.lists == 1
