"""Which checkpoints a retention policy forgets: pure rules over a list, no repository (Repository.forget applies them).

Rules as in restic's ``forget``: the newest ``keep_last``; the newest checkpoint of each of the last ``keep_hourly``
hours (days, ISO weeks, months; local time) that have one; those within ``keep_within`` of the newest.  Pinned
checkpoints always stay, manual ones (meta kind "manual") while ``keep_manual``, and those in ``keep_ids``.  With
``kinds``, the rules see only checkpoints of those kinds and every other checkpoint stays.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta

from ..errors import UsageError
from .records import CheckpointInfo


@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_within: timedelta | None = None
    keep_manual: bool = True
    keep_ids: Collection[str] = ()
    kinds: Collection[str] | None = None

    def buckets(self) -> dict[str, int]:
        """strftime format of a time bucket -> how many of the newest buckets keep their newest checkpoint."""
        counts = {"%Y-%m-%d %H": self.keep_hourly, "%Y-%m-%d": self.keep_daily, "%G-W%V": self.keep_weekly,
                  "%Y-%m": self.keep_monthly}
        return {fmt: n for fmt, n in counts.items() if n}


def to_forget(checkpoints: Sequence[CheckpointInfo], policy: Policy) -> list[CheckpointInfo]:
    """The checkpoints (of one session, oldest first) that no rule keeps, oldest first; UsageError if the policy has
    no rule at all (which would forget everything it sees)."""
    if not policy.keep_last and not policy.keep_within and not policy.buckets():
        raise UsageError("Forget needs at least one rule (keep-last, keep-hourly, keep-daily, keep-weekly, "
                         "keep-monthly or keep-within); nothing was forgotten.")
    newest_first = [c for c in checkpoints[::-1] if policy.kinds is None or c.meta.kind in policy.kinds]
    keep = {c.id for c in newest_first[:policy.keep_last or 0]} | set(policy.keep_ids)
    keep |= {c.id for c in newest_first if c.pinned or (policy.keep_manual and c.meta.kind == "manual")}
    if policy.keep_within and newest_first:
        keep |= {c.id for c in newest_first if c.created_at >= newest_first[0].created_at - policy.keep_within}
    for fmt, count in policy.buckets().items():
        buckets: set[str] = set()
        for c in newest_first:
            if len(buckets) >= count:
                break
            bucket = c.created_at.astimezone().strftime(fmt)
            if bucket not in buckets:
                buckets.add(bucket)
                keep.add(c.id)
    return [c for c in newest_first[::-1] if c.id not in keep]
