"""The decision: hold, ceiling, soft limit, and pressure-aware borrowing and reclaim."""

from __future__ import annotations

from agents.gpu_enforcer.limits import Limit
from agents.gpu_enforcer.policy import Policy, PolicyConfig, Usage, Verdict

GIB = 1024**3
TOTAL = 40 * GIB
SHARE = Limit(hard_bytes=10 * GIB, soft_bytes=9 * GIB, source="share 1/4")


def verdicts(policy: Policy, usages: list[Usage], now: float, used: int | None = None) -> dict:
    card_used = sum(u.used_bytes for u in usages) if used is None else used
    return {d.key: d.verdict for d in policy.decide(TOTAL, card_used, usages, now)}


def test_under_soft_is_ok_between_soft_and_hard_is_soft() -> None:
    policy = Policy(PolicyConfig(hold=15))
    result = verdicts(policy, [Usage("a", 5 * GIB, SHARE), Usage("b", int(9.5 * GIB), SHARE)], 0.0)
    assert result == {"a": Verdict.OK, "b": Verdict.SOFT}


def test_over_the_limit_acts_only_after_the_hold() -> None:
    policy = Policy(PolicyConfig(hold=15))
    over = [Usage("a", 11 * GIB, SHARE)]
    assert verdicts(policy, over, 0.0)["a"] is Verdict.OVER
    assert verdicts(policy, over, 10.0)["a"] is Verdict.OVER
    assert verdicts(policy, over, 15.0)["a"] is Verdict.ENFORCE


def test_a_spike_shorter_than_the_hold_is_forgotten() -> None:
    policy = Policy(PolicyConfig(hold=15))
    assert verdicts(policy, [Usage("a", 11 * GIB, SHARE)], 0.0)["a"] is Verdict.OVER
    assert verdicts(policy, [Usage("a", 8 * GIB, SHARE)], 10.0)["a"] is Verdict.OK
    # Over again: the hold starts from zero.
    assert verdicts(policy, [Usage("a", 11 * GIB, SHARE)], 20.0)["a"] is Verdict.OVER
    assert verdicts(policy, [Usage("a", 11 * GIB, SHARE)], 30.0)["a"] is Verdict.OVER


def test_above_the_ceiling_acts_at_once() -> None:
    policy = Policy(PolicyConfig(hold=15, ceiling_factor=1.5))
    decision = policy.decide(TOTAL, 16 * GIB, [Usage("a", 16 * GIB, SHARE)], 0.0)[0]
    assert decision.verdict is Verdict.ENFORCE and "ceiling" in decision.reason


def test_no_limit_is_never_enforced() -> None:
    policy = Policy(PolicyConfig(hold=0))
    assert verdicts(policy, [Usage("a", 39 * GIB, None)], 0.0)["a"] is Verdict.NO_LIMIT


def test_pressure_aware_borrows_while_the_card_has_room() -> None:
    policy = Policy(PolicyConfig(hold=0, pressure_aware=True, free_threshold=0.1))
    # 14 GiB used of 40: plenty free, a is over its 10 GiB share but below the ceiling.
    assert verdicts(policy, [Usage("a", 14 * GIB, SHARE)], 0.0)["a"] is Verdict.BORROWING
    # Gross overuse still acts.
    assert verdicts(policy, [Usage("a", 16 * GIB, SHARE)], 1.0)["a"] is Verdict.ENFORCE


def test_pressure_reclaims_the_furthest_over_first_and_only_enough() -> None:
    policy = Policy(PolicyConfig(hold=0, pressure_aware=True, free_threshold=0.1))
    usages = [
        Usage("a", 12 * GIB, SHARE),  # 2 GiB over
        Usage("b", 14 * GIB, SHARE),  # 4 GiB over: reclaimed first
        Usage("c", 11 * GIB, SHARE),  # 1 GiB over
        Usage("d", 2 * GIB, SHARE),
    ]
    # 39 of 40 GiB used: 1 GiB free < 4 GiB threshold. Freeing b (14) is enough.
    result = verdicts(policy, usages, 0.0)
    assert result == {
        "a": Verdict.OVER,
        "b": Verdict.ENFORCE,
        "c": Verdict.OVER,
        "d": Verdict.OK,
    }


def test_pressure_reclaims_more_when_one_is_not_enough() -> None:
    policy = Policy(PolicyConfig(hold=0, pressure_aware=True, free_threshold=0.5))
    usages = [Usage("a", 12 * GIB, SHARE), Usage("b", 14 * GIB, SHARE), Usage("c", 13 * GIB, SHARE)]
    # 1 GiB free, 20 GiB must be free: b (14) then c (13).
    result = verdicts(policy, usages, 0.0)
    assert result == {"a": Verdict.OVER, "b": Verdict.ENFORCE, "c": Verdict.ENFORCE}


def test_pressure_respects_the_hold() -> None:
    policy = Policy(PolicyConfig(hold=10, pressure_aware=True, free_threshold=0.1))
    usages = [Usage("a", 14 * GIB, SHARE), Usage("b", 25 * GIB, None)]
    assert verdicts(policy, usages, 0.0)["a"] is Verdict.OVER
    assert verdicts(policy, usages, 10.0)["a"] is Verdict.ENFORCE


def test_state_of_pods_that_left_is_dropped() -> None:
    policy = Policy(PolicyConfig(hold=15))
    verdicts(policy, [Usage("a", 11 * GIB, SHARE)], 0.0)
    verdicts(policy, [], 5.0)
    # Back after leaving: a new hold.
    assert verdicts(policy, [Usage("a", 11 * GIB, SHARE)], 20.0)["a"] is Verdict.OVER


def test_the_known_part_alone_over_the_limit_is_over() -> None:
    policy = Policy(PolicyConfig(hold=0))
    result = verdicts(policy, [Usage("a", 11 * GIB, SHARE, unknown=1)], 0.0)
    assert result["a"] is Verdict.ENFORCE


def test_a_record_without_usage_never_makes_a_pod_over_nor_releases_its_hold() -> None:
    policy = Policy(PolicyConfig(hold=15))
    assert verdicts(policy, [Usage("a", 11 * GIB, SHARE)], 0.0)["a"] is Verdict.OVER
    # Part of the usage is unknown: within the limit on what is known, not "ok".
    partial = [Usage("a", 2 * GIB, SHARE, unknown=1)]
    assert verdicts(policy, partial, 10.0)["a"] is Verdict.UNKNOWN
    # Known again and still over: the hold ran all along, from 0 s.
    assert verdicts(policy, [Usage("a", 11 * GIB, SHARE)], 15.0)["a"] is Verdict.ENFORCE
    # Unknown from the first sample: no hold starts.
    fresh = Policy(PolicyConfig(hold=0))
    assert verdicts(fresh, [Usage("b", 0, SHARE, unknown=2)], 0.0)["b"] is Verdict.UNKNOWN
