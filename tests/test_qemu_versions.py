"""Two QEMUs side by side: the system's (Debian 12's 7.2) and a current one (10.0 from bookworm-backports, unpacked
by packaging/newer-qemu.sh into .cache/qemu-backports).  A session's state moves from the older to the newer in
every way it can move (restore, start, resume from a remote, send, live migration), and the other way is refused
in one sentence before anything moves."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import ROOT
from helpers.cli import Sm, one_sentence
from helpers.net import paired_homes, serving
from helpers.qemu import Serial, keeps_running
from session_manager.vm.qemu import Qemu, cannot_load, find_qemu, machine_type, release


@pytest.fixture(scope="module")
def qemus() -> tuple[Qemu, Qemu]:
    """(the system's QEMU, the newer one), unpacked on first use."""
    newer = subprocess.run([str(ROOT / "packaging" / "newer-qemu.sh"), str(ROOT / ".cache" / "qemu-backports")],
                           capture_output=True, text=True, check=True).stdout.strip()
    old, new = find_qemu(None), find_qemu(newer)
    if release(old.version_text) >= release(new.version_text):
        pytest.skip(f"the system's QEMU {old.version_text} is as new as the backports' {new.version_text}")
    return old, new


def with_qemu(sm: Sm, qemu: Qemu) -> Sm:
    sm.env["SESSION_MANAGER_QEMU"] = qemu.system
    return sm


def test_the_rule() -> None:
    assert cannot_load("10.0.2", {"pc-q35-7.2", "pc-q35-10.0"}, "7.2.22", "pc-q35-7.2") is None
    assert cannot_load("7.2.22", {"pc-q35-7.2"}, "7.2.1", "pc-q35-7.2") is None  # one release series
    assert "needs QEMU 10.0 or newer" in str(cannot_load("7.2.22", {"pc-q35-7.2"}, "10.0.2", "pc-q35-7.2"))
    assert "machine type pc-q35-6.0" in str(cannot_load("10.0.2", {"pc-q35-10.0"}, "7.2.22", "pc-q35-6.0"))


def test_a_private_prefix_finds_its_own_firmware_and_modules(qemus: tuple[Qemu, Qemu]) -> None:
    old, new = qemus
    prefix = Path(new.system).parent.parent
    assert new.data_dir == str(prefix / "share" / "qemu") and new.module_dir is not None
    assert old.data_dir is None and old.command == [old.system]
    assert machine_type(new) == f"pc-q35-{'.'.join(map(str, release(new.version_text)))}"


def test_checkpoints_move_up_to_the_newer_qemu_and_never_down(tmp_path: Path, guest: tuple[Path, Path],
                                                               qemus: tuple[Qemu, Qemu]) -> None:
    old, new = qemus
    sm = with_qemu(Sm(tmp_path / "home"), old)
    try:
        sm.new_guest("desk", guest)
        sm("start", "desk")
        assert sm("status", "desk", "--json").json()["qemu_version"] == old.version_text
        serial = sm.serial("desk")
        serial.wait_counter(3)
        on_old = sm("checkpoint", "desk", "--json").json()
        assert on_old["meta"]["qemu"] == old.version_text and on_old["meta"]["config"]["machine"] == machine_type(old)
        sm("stop", "desk")

        with_qemu(sm, new)("start", "desk")  # the newer QEMU resumes the state the older one saved
        status = sm("status", "desk", "--json").json()
        assert (status["qemu_version"], status["qemu"], status["run_state"]) == (new.version_text, new.system,
                                                                                 "running")
        assert f"QEMU {new.version_text} ({new.system})" in sm("status", "desk").stdout
        mark = serial.last_start()
        keeps_running(serial, mark)
        on_new = sm("checkpoint", "desk", "--json").json()  # and checkpoints it live, running on
        assert on_new["meta"]["qemu"] == new.version_text and on_new["meta"]["live"]
        keeps_running(serial, mark, count=2)

        with_qemu(sm, old)
        taken = sm("checkpoints", "desk", "--json").json()
        message = one_sentence(sm("restore", "desk", on_new["id"], check=False), on_new["id"][:8],
                               f"needs QEMU {'.'.join(map(str, release(new.version_text)))} or newer", "`qemu` setting")
        assert old.version_text in message
        assert sm("checkpoints", "desk", "--json").json() == taken  # nothing taken, nothing lost
        assert sm("status", "desk", "--json").json()["qemu_version"] == new.version_text  # still running there
        sm("restore", "desk", on_old["id"])  # an older QEMU's checkpoint is fine on the older QEMU
        assert sm("status", "desk", "--json").json()["qemu_version"] == old.version_text

        # A session made on the newer QEMU has its machine type, which the older one lacks.
        with_qemu(sm, new).new_guest("fresh", guest)
        one_sentence(with_qemu(sm, old)("start", "fresh", check=False), f"machine type {machine_type(new)}",
                     "does not have")
    finally:
        sm.kill_all()


def test_resume_from_a_remote_only_on_a_qemu_as_new(tmp_path: Path, guest: tuple[Path, Path],
                                                    qemus: tuple[Qemu, Qemu]) -> None:
    old, new = qemus
    share = tmp_path / "share"
    a = with_qemu(Sm(tmp_path / "a", env={"SESSION_MANAGER_NEW_PASSPHRASE": "pw"}), new)
    b = with_qemu(Sm(tmp_path / "b", env={"SESSION_MANAGER_PASSPHRASE": "pw"}), old)
    try:
        a.new_guest("desk", guest)
        a("start", "desk")
        a.serial("desk").wait_counter(2)
        a("checkpoint", "desk")
        a("key", "add")
        a("remote", "add", "share", str(share))
        a("push")
        one_sentence(b("resume", str(share), check=False), "needs QEMU", "`qemu` setting")
        assert b("list", "--json").json() == [] and b("check", "--json").json()["checkpoints"] == 0  # nothing pulled
        resumed = with_qemu(b, new)("resume", str(share), "--json").json()
        assert resumed["status"]["run_state"] == "running"
        serial = Serial(resumed["status"]["serial_log"])
        keeps_running(serial, serial.last_start())
    finally:
        a.kill_all()
        b.kill_all()


def test_send_and_live_migration_go_to_a_newer_qemu_only(tmp_path: Path, guest: tuple[Path, Path],
                                                         qemus: tuple[Qemu, Qemu]) -> None:
    old, new = qemus
    with paired_homes(tmp_path) as (a, b, port_b):
        with_qemu(a, old)
        with_qemu(b, new)
        a.new_guest("desk", guest, fill=16)
        a("start", "desk")
        here = a.serial("desk")
        here.wait_counter(3)
        with serving(b, f"127.0.0.1:{port_b}"):
            a("migrate", "desk", "b")  # 7.2 -> 10.0, live
        there_status = b("status", "desk", "--json").json()
        assert (there_status["run_state"], there_status["qemu_version"]) == ("running", new.version_text)
        there = Serial(there_status["serial_log"])
        keeps_running(there, there.last_start())

        # Back down to the older QEMU: refused before anything moves, and it runs on where it is.
        with serving(a, f"127.0.0.1:{_port_of(b, 'a')}"):
            one_sentence(b("migrate", "desk", "a", check=False), "cannot run on a", "needs QEMU", "nothing was sent")
            b("checkpoint", "desk")
            one_sentence(b("send", "desk", "a", check=False), "cannot run on a", "needs QEMU", "nothing was sent")
        assert b("status", "desk", "--json").json()["run_state"] == "running"
        assert a("status", "desk", "--json").json()["moved_to"] == "b"
        assert a("check", "--json").json()["checkpoints"] == 0  # nothing arrived
        keeps_running(there, there.last_start())


def _port_of(sm: Sm, peer: str) -> int:
    """The port ``sm`` knows its peer's agent by."""
    return int(next(p for p in sm("peers", "list", "--json").json() if p["name"] == peer)["address"].rsplit(":", 1)[1])
