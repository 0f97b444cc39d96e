"""Live checkpoints and exact restores of the real test guest under real QEMU (TCG)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from helpers.cli import Sm
from helpers.qemu import Serial, seq_records
from session_manager.vm.qemu import find_qemu, qemu_path
from session_manager.vm.snapshot import Route, choose_route

pytestmark = pytest.mark.qemu


def disk_records(sm: Sm, name: str, layer: str | None = None) -> list[int]:
    """The ``seq N`` records on the session's disk, read from its qcow2 chain on the host."""
    status = sm("status", name, "--json").json()
    disks = sm.home / "data" / "sessions" / name / "disks"
    state = (sm.home / "data" / "sessions" / name / "state.json").read_text()
    top = disks / (layer or re.search(r'"active_layer": "([^"]+)"', state)[1])
    assert status["name"] == name
    return seq_records(top)


def checkpoint(sm: Sm, name: str, note: str = "") -> dict:
    return sm("checkpoint", name, "-m", note, "--json").json()


def restore_and_first_counter(sm: Sm, serial: Serial, name: str, ckpt: str, *extra: str) -> int:
    """Restore, then return the first counter the restored guest prints."""
    sm("restore", name, ckpt, *extra)
    mark = serial.last_start()
    serial.wait_counter(2, since=mark)
    return serial.counters(since=mark)[0]


def test_checkpoint_then_restore_resumes_memory_and_disk_exactly(sm: Sm, guest: tuple[Path, Path]) -> None:
    sm.new_guest("desk", guest, fill=32)
    sm("start", "desk")
    serial = sm.serial("desk")
    serial.wait_for(r"^ready")
    serial.wait_counter(3)

    before = serial.counters()[-1]
    c = checkpoint(sm, "desk", "three")
    after = serial.counters()[-1]
    assert c["meta"]["live"] is True  # we are root here: background snapshot
    assert c["meta"]["pause_ms"] > 0  # measured and recorded
    assert c["meta"]["stream_bytes"] > 32 << 20  # the random fill is in it

    # The guest runs on, changing memory and disk.
    serial.wait_counter(after + 4)
    assert disk_records(sm, "desk")[-1] >= after + 3

    resumed = restore_and_first_counter(sm, serial, "desk", c["id"])
    # The checkpoint was taken between counters `before` and `after`; the restored
    # guest continues from exactly that value, not from where it ran on to.
    assert before + 1 <= resumed <= after + 1
    serial.wait_for(rf"^disk ok {resumed + 1}", since=serial.size() - 4000)
    assert "disk-mismatch" not in serial.text()
    # On the host too, the disk holds exactly the checkpoint's sequence then what followed.
    records = disk_records(sm, "desk")
    assert records == list(range(1, len(records) + 1))

    # Nothing was discarded: the state before the restore is a checkpoint of its own.
    listing = sm("checkpoints", "desk", "--json").json()
    assert [x["meta"]["kind"] for x in listing] == ["manual", "pre-restore"]
    assert listing[1]["parent"] == c["id"]
    assert sm("check", "--read-data").returncode == 0


def test_restore_branches_and_every_branch_restores(sm: Sm, guest: tuple[Path, Path]) -> None:
    sm.new_guest("tree", guest)
    sm("start", "tree")
    serial = sm.serial("tree")
    serial.wait_counter(3)
    a = checkpoint(sm, "tree", "a")
    a_value = serial.counters()[-1]
    serial.wait_counter(a_value + 3)
    b = checkpoint(sm, "tree", "b")
    b_value = serial.counters()[-1]

    back_to_a = restore_and_first_counter(sm, serial, "tree", a["id"])
    assert back_to_a <= a_value + 1
    mark = serial.size()
    serial.wait_counter(3, since=mark)
    c = checkpoint(sm, "tree", "c")  # a sibling of b: a branch
    c_value = serial.counters()[-1]
    assert c["parent"] == a["id"] and b["parent"] == a["id"]

    assert abs(restore_and_first_counter(sm, serial, "tree", b["id"]) - b_value) <= 1
    assert abs(restore_and_first_counter(sm, serial, "tree", c["id"]) - c_value) <= 1
    assert "disk-mismatch" not in serial.text()


def test_export_loads_in_stock_qemu(sm: Sm, guest: tuple[Path, Path], tmp_path: Path) -> None:
    sm.new_guest("exp", guest)
    sm("start", "exp")
    serial = sm.serial("exp")
    serial.wait_counter(3)
    c = checkpoint(sm, "exp")
    value = serial.counters()[-1]
    out = tmp_path / "export"
    argv = sm("export", "exp", c["id"], str(out), "--json").json()["command"]
    sm("stop", "exp", "--no-save")
    assert (out / f"exp-{c['id'][:8]}.qcow2").is_file()
    # Stock QEMU, exactly the printed command, minus a window.
    proc = subprocess.Popen([*argv, "-display", "none"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        exported = Serial(out / "exp-serial.log")
        exported.wait_counter(2)
        first = exported.counters()[0]
        assert value - 1 <= first <= value + 2
        exported.wait_for(rf"^disk ok {first + 1}")
        assert "disk-mismatch" not in exported.text()
    finally:
        proc.kill()
        proc.communicate()


def test_cli_can_die_while_qemu_keeps_running_and_reconnects(sm: Sm, guest: tuple[Path, Path]) -> None:
    sm.new_guest("alive", guest, fill=64)
    sm("start", "alive")
    serial = sm.serial("alive")
    serial.wait_counter(2)
    pid = sm("status", "alive", "--json").json()["pid"]
    # Kill a checkpointing CLI mid-way: QEMU and the guest carry on, nothing half-written is visible.
    proc = sm.popen_until("checkpoint: streaming memory", "checkpoint", "alive")
    proc.kill()
    proc.communicate()
    n = serial.counters()[-1]
    serial.wait_counter(n + 2)
    st = sm("status", "alive", "--json").json()
    assert st["pid"] == pid and st["run_state"] == "running"
    assert sm("check").returncode == 0
    # A fresh process reconnects and checkpoints.
    c = checkpoint(sm, "alive", "after the crash")
    assert [x["id"] for x in sm("checkpoints", "alive", "--json").json()][-1] == c["id"]


def test_stop_saves_and_start_resumes(sm: Sm, guest: tuple[Path, Path]) -> None:
    sm.new_guest("save", guest)
    sm("start", "save")
    serial = sm.serial("save")
    serial.wait_counter(3)
    sm("stop", "save")
    before = serial.counters()
    assert sm("status", "save", "--json").json()["pid"] is None
    mark = serial.size()
    sm("start", "save")
    serial.wait_counter(1, since=mark)
    # The guest runs on while its state is being saved (a live checkpoint), so it may print a counter or two that
    # the saved state has not reached: it resumes right after a counter it had printed, never beyond the last.
    first = serial.counters(since=mark)[0]
    assert first - 1 in before and first <= before[-1] + 1, (before, first)
    assert "ready" not in serial.text(since=mark)  # resumed, not rebooted


# -- issue #15: every checkpoint, by whichever route this QEMU takes (vm/snapshot.py) --------------------------

def test_the_route_follows_the_qemu_and_the_accelerator() -> None:
    assert choose_route("10.0.2", "tcg", userfaultfd=False) == Route.PRECOPY
    assert choose_route("9.0.0", "tcg", userfaultfd=True) == Route.PRECOPY
    assert choose_route("7.2.22", "kvm", userfaultfd=False) == Route.PRECOPY
    assert choose_route("8.2.2", "tcg", userfaultfd=True) == Route.BACKGROUND  # TCG loses writes in pre-copy
    assert choose_route("7.2.22", "tcg", userfaultfd=False) == Route.STOP_AND_COPY


def test_later_checkpoints_of_a_busy_guest_restore_exactly(sm: Sm, guest: tuple[Path, Path]) -> None:
    sm.new_guest("busy", guest, memory="512M", fill=256, dirty=4, window=32)
    sm("start", "busy")
    serial = sm.serial("busy")
    serial.wait_counter(3)
    taken = []
    for _ in range(4):
        before = serial.counters()[-1]
        c = checkpoint(sm, "busy")
        taken.append((c, before, serial.counters()[-1]))
        assert c["meta"]["live"] is True and 0 < c["meta"]["pause_ms"] < 1000
        serial.wait_counter(serial.counters()[-1] + 2)
    route = choose_route(find_qemu(qemu_path()).version_text, "tcg", userfaultfd=True).value
    assert sum(f"({route})" in line for line in (sm.home / "state" / "session-manager.log").read_text().splitlines()
               if "checkpoint " in line and " pause " in line) == 4
    for c, before, after in taken[1:]:  # each later one, restored and checked: memory (the counter), disk, no panic
        resumed = restore_and_first_counter(sm, serial, "busy", c["id"])
        assert before + 1 <= resumed <= after + 1
        serial.wait_for(rf"^disk ok {resumed + 1}", since=serial.size() - 4000)
        serial.wait_counter(resumed + 4, since=serial.last_start())
        text = serial.text(since=serial.last_start())
        assert "disk-mismatch" not in text and "Kernel panic" not in text and "BUG" not in text
    records = disk_records(sm, "busy")
    assert records == list(range(1, len(records) + 1))
