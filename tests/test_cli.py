"""The CLI around a real session: the demo, the accelerator probe, repository commands, damaged data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers.cli import Sm, one_sentence
from session_manager.vm.qemu import boot_id, choose_accelerator, find_qemu, probe, qemu_path

pytestmark = pytest.mark.qemu


def test_demo_creates_and_starts_a_counting_session(sm: Sm) -> None:
    assert "No sessions yet" in sm("list").stdout
    run = sm("demo")
    assert "Session demo: running" in run.stdout
    sm.serial("demo").wait_counter(2)
    assert [s["name"] for s in sm("list", "--json").json()] == ["demo"]
    assert "running" in sm("demo").stdout  # a second run just reports it


def test_accelerator_probe_runs_a_guest_of_its_own(tmp_path: Path) -> None:
    qemu = find_qemu(qemu_path())
    accel = choose_accelerator(tmp_path, qemu)
    if accel.name == "tcg" and os.access("/dev/kvm", os.R_OK | os.W_OK):
        # On these machines /dev/kvm exists but guests crawl under it: the probe must notice.
        assert "KVM" in accel.reason
    else:
        assert accel.name == "kvm" or "/dev/kvm" in accel.reason
    assert choose_accelerator(tmp_path, qemu) == accel  # cached until the host reboots
    assert json.loads((tmp_path / "accelerator.json").read_text())["key"]["boot_id"] == boot_id()
    # The probe guest itself works: where it has time (TCG does not crawl), it says so.
    ran = probe(qemu, "tcg")
    assert ran.name == "tcg" and "booted under TCG" in ran.reason, ran.reason


def test_repository_commands(sm: Sm, guest: tuple[Path, Path]) -> None:
    sm.new_guest("repo", guest, dirty=2, window=8)
    sm("start", "repo")
    serial = sm.serial("repo")
    serial.wait_counter(2)
    ids = [sm("checkpoint", "repo", "-m", f"n{i}", "--json").json()["id"] for i in range(3)]
    sm("pin", "repo", ids[0])
    du = sm("du", "repo", "--json").json()
    assert du["checkpoints"] == 3 and du["stored_bytes"] < du["logical_bytes"]
    assert "dedup" in sm("du").stdout
    forgot = sm("forget", "repo", "--keep-last", "1", "--prune", "--json").json()
    assert forgot == [ids[1]]  # the pinned one and the last one stay
    assert [c["id"] for c in sm("checkpoints", "repo", "--json").json()] == [ids[0], ids[2]]
    assert sm("check", "--read-data").returncode == 0
    # One checkpoint by hand: never a pinned one, nor the one the running session continues from.
    one_sentence(sm("delete-checkpoint", "repo", ids[0], check=False), "pinned", "unpin it first")
    one_sentence(sm("delete-checkpoint", "repo", ids[2], check=False), "continues from", ids[2][:8])
    newest = sm("checkpoint", "repo", "--json").json()["id"]  # the session now continues from this one
    assert sm("delete-checkpoint", "repo", ids[2][:8], "--json").json() == {"deleted": ids[2]}
    assert [c["id"] for c in sm("checkpoints", "repo", "--json").json()] == [ids[0], newest]
    one_sentence(sm("delete-checkpoint", "repo", ids[2], check=False), "does not exist")


def test_damaged_checkpoint_is_refused_before_qemu_sees_a_byte(sm: Sm, guest: tuple[Path, Path]) -> None:
    sm.new_guest("dmg", guest)
    sm("start", "dmg")
    sm.serial("dmg").wait_counter(2)
    c = sm("checkpoint", "dmg", "--json").json()
    pid = sm("status", "dmg", "--json").json()["pid"]
    packs = sorted((sm.home / "data" / "repository" / "data").rglob("*"), key=lambda p: p.stat().st_size)
    pack = [p for p in packs if p.is_file()][-1]
    data = bytearray(pack.read_bytes())
    data[len(data) // 3] ^= 0xFF
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    run = sm("restore", "dmg", c["id"], check=False)
    assert run.returncode != 0 and c["id"][:8] in run.stderr
    assert sm("status", "dmg", "--json").json()["pid"] == pid  # the running session was not touched
    check = sm("check", "--read-data", check=False)
    assert check.returncode != 0 and c["id"][:8] in check.stdout + check.stderr
