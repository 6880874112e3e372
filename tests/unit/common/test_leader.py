"""Leader election over a coordination.k8s.io Lease, against the fake API server."""

from __future__ import annotations

from typing import Any

import pytest

from agents.common.leader import LeaderElector
from tests.support.fake_kube import FakeKube

pytest.importorskip("kubernetes")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(api: Any, identity: str, clock: Clock, **kw: Any) -> LeaderElector:
    return LeaderElector(
        api,
        name="demo",
        namespace="default",
        identity=identity,
        lease_duration=15,
        renew_interval=2,
        monotonic=clock,
        **kw,
    )


def lease(kube: FakeKube) -> dict[str, Any]:
    found = kube.get("leases", "default", "demo")
    assert found is not None
    return found


def test_the_first_candidate_creates_the_lease_and_renews_it(kube: FakeKube, api: Any) -> None:
    clock = Clock()
    calls: list[tuple[str, str]] = []
    a = elector(api, "a", clock, on_api_call=lambda verb, res: calls.append((verb, res)))
    assert a.try_acquire_or_renew() and a.is_leader()
    spec = lease(kube)["spec"]
    assert spec["holderIdentity"] == "a" and spec["leaseDurationSeconds"] == 15
    assert spec["leaseTransitions"] == 0
    acquired = spec["acquireTime"]
    clock.now += 2
    assert a.try_acquire_or_renew()
    spec = lease(kube)["spec"]
    assert spec["acquireTime"] == acquired and spec["renewTime"] != acquired
    assert calls == [
        ("get", "leases"),
        ("create", "leases"),
        ("get", "leases"),
        ("replace", "leases"),
    ]


def test_a_live_holder_keeps_it_and_a_silent_one_is_replaced_after_the_duration(
    kube: FakeKube, api: Any
) -> None:
    clock_a, clock_b = Clock(), Clock()
    a, b = elector(api, "a", clock_a), elector(api, "b", clock_b)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew() and not b.is_leader()
    # a renews: b sees the record change and keeps waiting, however long.
    for _ in range(10):
        clock_a.now += 2
        clock_b.now += 2
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew()
    # a falls silent (crashed, partitioned): b waits a full duration on its own clock.
    clock_b.now += 14
    assert not b.try_acquire_or_renew()
    clock_b.now += 2
    assert b.try_acquire_or_renew() and b.is_leader()
    spec = lease(kube)["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    # a comes back: the Lease is b's now, and a knows it at its next attempt.
    clock_a.now += 20
    assert not a.is_leader()  # its own lease ran out on its clock
    assert not a.try_acquire_or_renew()


def test_on_leading_is_called_once_per_takeover_not_per_renewal(kube: FakeKube, api: Any) -> None:
    clock = Clock()
    became: list[str] = []
    a = elector(api, "a", clock, on_leading=lambda: became.append("a"))
    assert a.try_acquire_or_renew()
    clock.now += 2
    assert a.try_acquire_or_renew()
    assert became == ["a"]


def test_holds_counts_from_the_last_successful_renewal(kube: FakeKube, api: Any) -> None:
    clock = Clock()
    a = elector(api, "a", clock)
    assert a.try_acquire_or_renew()
    assert a.holds(14) and not a.holds(15)
    # The API fails: leadership lasts until the lease would run out, then ends.
    kube.inject_error("*", r"/apis/coordination.k8s.io/.*", 503, None)
    clock.now += 10
    assert a.try_acquire_or_renew() and a.holds(4) and not a.holds(6)
    clock.now += 6
    assert not a.try_acquire_or_renew() and not a.is_leader()


def test_two_candidates_racing_for_a_free_lease_never_both_win(kube: FakeKube, api: Any) -> None:
    clock = Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    a.stop()  # releases: empty holder
    assert lease(kube)["spec"]["holderIdentity"] == ""
    # b read the released Lease, then a wrote first: b's conditional PUT gets 409.
    kube.inject_error("PUT", r"/apis/coordination.k8s.io/v1/namespaces/default/leases/demo", 409, 1)
    assert not b.try_acquire_or_renew() and not b.is_leader()
    assert b.try_acquire_or_renew() and lease(kube)["spec"]["holderIdentity"] == "b"


def test_stop_releases_the_lease_for_an_immediate_handover(kube: FakeKube, api: Any) -> None:
    clock = Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    a.stop()
    assert not a.is_leader()
    spec = lease(kube)["spec"]
    assert spec["holderIdentity"] == "" and spec["leaseDurationSeconds"] == 1
    assert b.try_acquire_or_renew()  # no wait for the old duration
    assert lease(kube)["spec"]["leaseTransitions"] == 1


def test_a_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="identity"):
        LeaderElector(None, name="x", namespace="d", identity="")
    with pytest.raises(ValueError, match="shorter"):
        LeaderElector(None, name="x", namespace="d", identity="a", renew_interval=30)


def test_an_unhealthy_leader_stops_renewing_without_releasing_and_a_candidate_takes_over(
    kube: FakeKube, api: Any
) -> None:
    clock = Clock()
    problem: list[str] = []
    a = elector(api, "a", clock, health=lambda: problem[0] if problem else None)
    b = elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    renewed = lease(kube)["spec"]["renewTime"]
    problem.append("the refresh pass made no progress for 40 s (limit 30 s)")
    clock.now += 2
    writes = kube.count("PUT", r".*/leases/demo")
    assert not a.try_acquire_or_renew()
    # Not leading at once (no new IdP call), the Lease neither renewed nor released.
    assert not a.is_leader() and a.unhealthy.startswith("the refresh pass")
    assert kube.count("PUT", r".*/leases/demo") == writes
    assert lease(kube)["spec"]["holderIdentity"] == "a"
    assert lease(kube)["spec"]["renewTime"] == renewed
    assert not b.try_acquire_or_renew()  # the Lease has not run out yet
    clock.now += 16
    assert b.try_acquire_or_renew() and lease(kube)["spec"]["holderIdentity"] == "b"
    problem.clear()
    assert not a.try_acquire_or_renew() and a.unhealthy == ""  # campaigns again: b holds it
