"""The CLI around a real session: the demo, the accelerator probe, repository commands, damaged data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import Sm
from session_manager.vm.qemu import choose_accelerator

pytestmark = pytest.mark.qemu


def test_demo_creates_and_starts_a_counting_session(sm: Sm) -> None:
    assert "No sessions yet" in sm("list").stdout
    run = sm("demo")
    assert "Session demo: running" in run.stdout
    sm.serial("demo").wait_counter(2)
    assert [s["name"] for s in sm("list", "--json").json()] == ["demo"]
    assert "running" in sm("demo").stdout  # a second run just reports it


def test_accelerator_probe_boots_a_real_guest(tmp_path: Path, guest: tuple[Path, Path]) -> None:
    accel = choose_accelerator(tmp_path, lambda: guest)
    if accel.name == "tcg" and os.access("/dev/kvm", os.R_OK | os.W_OK):
        # On these machines /dev/kvm exists but guests hang under it: the probe must notice.
        assert "KVM" in accel.reason
    else:
        assert accel.name == "kvm" or "/dev/kvm" in accel.reason
    assert choose_accelerator(tmp_path, lambda: guest) == accel  # cached until the host reboots


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
