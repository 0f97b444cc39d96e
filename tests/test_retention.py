"""Retention rules and the checkpoint meta record, without a repository: what forget would remove, and what a manifest's
meta may hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from session_manager.errors import UsageError
from session_manager.store.records import CheckpointInfo, CheckpointMeta
from session_manager.store.retention import Policy, to_forget

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def ckpt(n: int, age: timedelta, kind: str = "autosave", pinned: bool = False) -> CheckpointInfo:
    manifest = {"id": f"{n:032x}", "session": "s", "parent": None, "created": (NOW - age).isoformat(),
                "meta": {"kind": kind}, "memory": None, "disk": None, "thumbnail": None, "added_bytes": 0}
    return CheckpointInfo.from_manifest(manifest, {"pinned": True} if pinned else {})


def ids(infos: list[CheckpointInfo]) -> list[int]:
    return [int(c.id, 16) for c in infos]


def test_keep_last_within_and_hourly() -> None:
    # Oldest first, as Repository.checkpoints lists them: one every 20 minutes for 5 hours.
    history = [ckpt(n, timedelta(minutes=20 * (15 - n))) for n in range(16)]
    assert ids(to_forget(history, Policy(keep_last=3))) == list(range(13))
    assert ids(to_forget(history, Policy(keep_within=timedelta(minutes=45)))) == list(range(13))
    # The newest of each of the last 2 hours that have one (local time buckets): at least 13 other ones go.
    forgotten = ids(to_forget(history, Policy(keep_hourly=2)))
    assert 15 not in forgotten and len(forgotten) == 14


def test_pinned_manual_kept_ids_and_kinds_stay() -> None:
    history = [ckpt(0, timedelta(hours=5), pinned=True), ckpt(1, timedelta(hours=4), kind="manual"),
               ckpt(2, timedelta(hours=3)), ckpt(3, timedelta(hours=2), kind="stop"), ckpt(4, timedelta(hours=1))]
    assert ids(to_forget(history, Policy(keep_last=1))) == [2, 3]
    assert ids(to_forget(history, Policy(keep_last=1, keep_manual=False))) == [1, 2, 3]
    assert ids(to_forget(history, Policy(keep_last=1, keep_ids=[f"{2:032x}"]))) == [3]
    # With kinds, only autosaves are thinned: the stop checkpoint stays whatever the rules say.
    assert ids(to_forget(history, Policy(keep_last=1, kinds=["autosave"]))) == [2]


def test_a_policy_without_rules_is_refused() -> None:
    with pytest.raises(UsageError, match="at least one rule"):
        to_forget([ckpt(0, timedelta(0))], Policy(keep_manual=True))


def test_meta_round_trips_and_keeps_unknown_keys() -> None:
    written = {"kind": "manual", "note": "n", "live": True, "pause_ms": 4.5, "downtime_ms": 3, "wall_s": 0.2,
               "stream_bytes": 10, "disk_layer": "l", "qemu": "10.0.2", "config": {"name": "s"}, "future": [1]}
    meta = CheckpointMeta.from_json(written)
    assert meta.kind == "manual" and meta.live is True and meta.pause_ms == 4.5 and meta.config == {"name": "s"}
    assert meta.to_json() == written


@pytest.mark.parametrize("bad", [[], {"kind": 3}, {"live": "yes"}, {"pause_ms": True}, {"config": "x"},
                                 {"stream_bytes": 1.5}])
def test_meta_of_the_wrong_shape_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        CheckpointMeta.from_json(bad)
