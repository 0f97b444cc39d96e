"""The disk chain stays short however many checkpoints are taken, and every checkpoint still restores."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers.cli import Sm
from session_manager.local.engine import MAX_CHAIN


def chain_length(sm: Sm, name: str) -> int:
    disks = sm.home / "data" / "sessions" / name / "disks"
    active = json.loads((disks.parent / "state.json").read_text())["active_layer"]
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(disks / active)],
                         capture_output=True, text=True, check=True).stdout
    return len(json.loads(out))


@pytest.mark.qemu
def test_chain_is_merged_and_old_checkpoints_still_restore(sm: Sm, guest: tuple[Path, Path]) -> None:
    sm.new_guest("chain", guest)
    sm("start", "chain")
    serial = sm.serial("chain")
    serial.wait_counter(3)
    ids, counters = [], []
    for _ in range(MAX_CHAIN + 3):
        ids.append(sm("checkpoint", "chain", "--json").json()["id"])
        counters.append(serial.counters()[-1])
        assert chain_length(sm, "chain") <= MAX_CHAIN
    log = (sm.home / "state" / "session-manager.log").read_text()
    assert "merged" in log
    assert log.count("chunks changed since") == len(ids) - 1  # every disk after the first stored incrementally
    disks = sm.home / "data" / "sessions" / "chain" / "disks"
    assert len(list(disks.iterdir())) <= MAX_CHAIN + 1  # merged layers are gone

    # The first checkpoint's disk file was merged away: it is rebuilt from the repository.
    sm("restore", "chain", ids[0])
    start = serial.last_start()
    serial.wait_for(r"^disk ok", since=start)
    assert serial.counters(start)[0] <= counters[0] + 1
    assert "disk-mismatch" not in serial.text(start)
    # The newest one is still a local file.
    sm("restore", "chain", ids[-1])
    start = serial.last_start()
    serial.wait_for(r"^disk ok", since=start)
    assert counters[-2] <= serial.counters(start)[0] <= counters[-1] + 1
    # Checkpoints on the new branches keep working (a branch's shared layers are never merged into).
    sm("checkpoint", "chain")
    sm("restore", "chain", ids[len(ids) // 2])
    serial.wait_for(r"^disk ok", since=serial.last_start())
