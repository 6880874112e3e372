"""The decision: which pods on a card are over their limit long enough to act on.

A sample over the hard limit starts a hold; the pod is acted on once it has
stayed over for `hold` seconds (a short spike is left alone), or at once above
the ceiling (gross overuse would OOM the neighbours before the hold ends). In
pressure-aware mode a pod may borrow above its share while the card has free
memory above the threshold; under pressure the pods furthest over their share
are reclaimed first, until the card is back above the threshold.

A pod with records whose usage NVML cannot tell (an MPS client, a process the
driver does not account) is judged on the known part: over when that alone
is over. Within the limit it is `usage-unknown`, not `ok`: its hold neither
starts nor ends, since its real usage may be above the limit.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from agents.gpu_enforcer.limits import Limit


class Verdict(StrEnum):
    OK = "ok"
    SOFT = "over-soft-limit"
    OVER = "over-limit"  # over the hard limit, hold not yet done
    BORROWING = "borrowing"  # over its share, the card has room (pressure-aware)
    ENFORCE = "enforce"
    NO_LIMIT = "no-limit"
    UNKNOWN = "usage-unknown"  # the known part is within the limit; the rest is not known


@dataclass(frozen=True)
class PolicyConfig:
    hold: float = 15.0
    """Seconds over the hard limit before acting (three samples at the default interval)."""
    ceiling_factor: float = 1.5
    """Act at once above this multiple of the hard limit."""
    pressure_aware: bool = False
    """Let pods borrow above their share while the card has free memory."""
    free_threshold: float = 0.1
    """Pressure-aware: the card is under pressure below this fraction of free memory."""


@dataclass(frozen=True)
class Usage:
    """One pod's memory on one card in this sample."""

    key: Hashable
    used_bytes: int
    """The known part: the sum over records whose usage NVML reported."""
    limit: Limit | None
    unknown: int = 0
    """Records of the pod whose usage is not available."""


@dataclass(frozen=True)
class Decision:
    key: Hashable
    verdict: Verdict
    reason: str = ""
    over_for: float = 0.0


class Policy:
    """Keeps, per pod and card, since when it has been over; decides per sample."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._over_since: dict[Hashable, float] = {}

    def decide(
        self, total_bytes: int, used_bytes: int, usages: Sequence[Usage], now: float
    ) -> list[Decision]:
        cfg = self.config
        threshold = int(total_bytes * cfg.free_threshold)
        free = total_bytes - used_bytes
        pressure = free < threshold
        decisions: dict[Hashable, Decision] = {}
        reclaimable: list[Usage] = []
        freed_by_ceiling = 0
        for usage in usages:
            limit = usage.limit
            if limit is None:
                decisions[usage.key] = Decision(usage.key, Verdict.NO_LIMIT)
                self._over_since.pop(usage.key, None)
                continue
            used = usage.used_bytes
            if used <= limit.hard_bytes and usage.unknown:
                # Keep a running hold as it is: releasing it on a sample that
                # lacks part of the usage would let a pod reset its hold.
                decisions[usage.key] = Decision(
                    usage.key,
                    Verdict.UNKNOWN,
                    f"usage not available for {usage.unknown} process(es); {used} bytes known",
                )
                continue
            if used <= limit.hard_bytes:
                self._over_since.pop(usage.key, None)
                verdict = Verdict.SOFT if used > limit.soft_bytes else Verdict.OK
                decisions[usage.key] = Decision(usage.key, verdict)
                continue
            ceiling = limit.hard_bytes * cfg.ceiling_factor
            if cfg.pressure_aware and not pressure and used <= ceiling:
                self._over_since.pop(usage.key, None)
                decisions[usage.key] = Decision(
                    usage.key, Verdict.BORROWING, f"card has {free} bytes free"
                )
                continue
            since = self._over_since.setdefault(usage.key, now)
            over_for = now - since
            if used > ceiling:
                freed_by_ceiling += used
                decisions[usage.key] = Decision(
                    usage.key,
                    Verdict.ENFORCE,
                    f"above the ceiling ({cfg.ceiling_factor:g}x)",
                    over_for,
                )
            elif over_for >= cfg.hold:
                reason = (
                    "over the limit under pressure"
                    if cfg.pressure_aware
                    else (f"over the limit for {over_for:.0f}s")
                )
                decisions[usage.key] = Decision(usage.key, Verdict.ENFORCE, reason, over_for)
                if cfg.pressure_aware:
                    reclaimable.append(usage)
            else:
                decisions[usage.key] = Decision(
                    usage.key, Verdict.OVER, f"hold {over_for:.0f}/{cfg.hold:.0f}s", over_for
                )
        if reclaimable:
            self._reclaim_only_enough(reclaimable, decisions, free + freed_by_ceiling, threshold)
        live = {u.key for u in usages}
        self._over_since = {k: v for k, v in self._over_since.items() if k in live}
        return list(decisions.values())

    @staticmethod
    def _reclaim_only_enough(
        reclaimable: list[Usage],
        decisions: dict[Hashable, Decision],
        projected_free: int,
        threshold: int,
    ) -> None:
        """Furthest over their share first, until the card would be above the threshold."""
        ordered = sorted(
            reclaimable,
            key=lambda u: u.used_bytes - (u.limit.hard_bytes if u.limit else 0),
            reverse=True,
        )
        for usage in ordered:
            if projected_free >= threshold:
                old = decisions[usage.key]
                decisions[usage.key] = Decision(
                    usage.key, Verdict.OVER, "not reclaimed: enough memory freed", old.over_for
                )
            else:
                projected_free += usage.used_bytes
