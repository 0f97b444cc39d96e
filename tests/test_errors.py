"""Every error a user can meet: one clear sentence, a non-zero exit, nothing damaged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from helpers.cli import Sm, one_sentence

pytestmark = pytest.mark.qemu


def test_bad_input_is_refused_with_one_sentence(sm: Sm, guest: tuple[Path, Path], tmp_path: Path) -> None:
    one_sentence(sm("new", "x", "--disk", str(tmp_path / "missing.qcow2"), check=False), "does not exist")
    one_sentence(sm("new", "bad/name", "--kernel", str(guest[0]), check=False), "not a valid session name")
    one_sentence(sm("new", "name\n", "--kernel", str(guest[0]), check=False), "not a valid session name")
    one_sentence(sm("new", "x", "--kernel", str(guest[0]), "--memory", "lots", check=False), "not a size")
    assert sm("list", "--json").json() == []  # nothing was created
    one_sentence(sm("start", "nope", check=False), "no session named 'nope'")
    one_sentence(sm("checkpoint", "nope", check=False), "no session named 'nope'")
    for bad in ("-1", "0", "-3", "two"):  # would forget everything that is not pinned
        one_sentence(sm("forget", "nope", "--keep-daily", bad, check=False), "not a number of checkpoints to keep")


def test_users_image_is_never_written(sm: Sm, guest: tuple[Path, Path], tmp_path: Path) -> None:
    image = tmp_path / "mine.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    before = image.read_bytes()
    sm("new", "mine", "--disk", str(image), "--kernel", str(guest[0]), check=False)  # one source only
    sm("new", "mine", "--disk", str(image), "--memory", "128M")
    one_sentence(sm("new", "mine", "--disk", str(image), check=False), "already exists")
    assert image.read_bytes() == before


def test_qemu_missing_or_too_old(sm: Sm, guest: tuple[Path, Path], tmp_path: Path) -> None:
    sm.new_guest("q", guest)
    missing = Sm(sm.home, env={"SESSION_MANAGER_QEMU": str(tmp_path / "no-qemu")})
    one_sentence(missing("start", "q", check=False), "SESSION_MANAGER_QEMU", "not an executable")
    old = tmp_path / "qemu-system-x86_64"
    old.write_text("#!/bin/sh\necho 'QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2)'\n")
    old.chmod(0o755)
    one_sentence(Sm(sm.home, env={"SESSION_MANAGER_QEMU": str(old)})("start", "q", check=False), "6.2.0", "too old")
    assert sm("status", "q", "--json").json()["pid"] is None


def test_already_running_and_unknown_checkpoint(sm: Sm, guest: tuple[Path, Path]) -> None:
    sm.new_guest("r", guest)
    sm("start", "r")
    one_sentence(sm("start", "r", check=False), "already running")
    one_sentence(sm("restore", "r", "0123456789abcdef", check=False), "0123456789abcdef")
    assert sm("status", "r", "--json").json()["run_state"] == "running"


def _interrupted_checkpoint(sm: Sm, guest: tuple[Path, Path], interrupt) -> tuple[str, dict]:
    """Start a checkpoint, interrupt it mid-stream; return the CLI's error and the earlier checkpoint."""
    sm.new_guest("i", guest, fill=160, memory="320M")
    sm("start", "i")
    serial = sm.serial("i")
    serial.wait_for(r"^ready")
    first = sm("checkpoint", "i", "-m", "good", "--json").json()
    proc = sm.popen_until("checkpoint: streaming memory", "checkpoint", "i", "-m", "interrupted")
    interrupt(proc)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert len(err.strip().splitlines()) == 1, err
    ids = [c["id"] for c in sm("checkpoints", "i", "--json").json()]
    assert ids == [first["id"]]  # the interrupted checkpoint is simply absent
    assert sm("check", "--read-data").returncode == 0
    return err, first


def test_ctrl_c_mid_checkpoint_keeps_the_guest_running(sm: Sm, guest: tuple[Path, Path]) -> None:
    err, _ = _interrupted_checkpoint(sm, guest, lambda p: p.send_signal(signal.SIGINT))
    assert "interrupted" in err
    serial = sm.serial("i")
    n = serial.counters()[-1]
    serial.wait_counter(n + 2)  # still counting
    assert sm("status", "i", "--json").json()["run_state"] == "running"


def test_qemu_dying_mid_checkpoint_leaves_earlier_checkpoints_intact(sm: Sm, guest: tuple[Path, Path]) -> None:
    def kill_qemu(_: subprocess.Popen) -> None:
        os.kill(int((sm.home / "run" / "i" / "qemu.pid").read_text()), signal.SIGKILL)

    err, first = _interrupted_checkpoint(sm, guest, kill_qemu)
    assert "QEMU" in err
    serial = sm.serial("i")
    sm("restore", "i", first["id"])  # QEMU is gone: nothing to save first
    mark = serial.last_start()
    serial.wait_counter(2, since=mark)
    assert "disk-mismatch" not in serial.text(since=mark)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem to fill needs root")
def test_disk_full_mid_checkpoint(sm: Sm, guest: tuple[Path, Path]) -> None:
    sm.new_guest("full", guest, fill=64, dirty=4, window=16)
    sm("start", "full")
    serial = sm.serial("full")
    serial.wait_for(r"^ready")
    repo = sm.home / "data" / "repository"
    repo.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256M", "tmpfs", str(repo)], check=True)
    try:
        first = sm("checkpoint", "full", "--json").json()
        free = os.statvfs(repo).f_bavail * os.statvfs(repo).f_frsize
        filler = repo / "filler"  # leave 64 KiB: less than the next checkpoint's new pages
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64K", f"count={(free >> 16) - 1}"],
                       capture_output=True, check=True)
        one_sentence(sm("checkpoint", "full", check=False), "full", "free space")
        assert sm("status", "full", "--json").json()["run_state"] == "running"
        filler.unlink()
        assert [c["id"] for c in sm("checkpoints", "full", "--json").json()] == [first["id"]]
        assert sm("check", "--read-data").returncode == 0
        sm("restore", "full", first["id"], "--discard-current")
        mark = serial.last_start()
        serial.wait_counter(2, since=mark)
    finally:
        sm.kill_all()
        subprocess.run(["umount", "-l", str(repo)], check=False)


def test_a_reader_that_stops_reading_ends_the_command_quietly(sm: Sm) -> None:
    """`session-manager ... | head`: when the pipe's reader is gone, exit as other tools do, without a message."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        p = subprocess.run(sm.argv("id"), stdout=write_end, stderr=subprocess.PIPE, text=True, env=sm.env, timeout=60)
    finally:
        os.close(write_end)
    assert p.returncode == 128 + signal.SIGPIPE and p.stderr == ""


def test_everything_in_the_home_is_private_whatever_the_umask(sm: Sm, guest: tuple[Path, Path]) -> None:
    previous = os.umask(0o002)  # a permissive caller: the CLI and QEMU still make everything the user's alone
    try:
        sm.new_guest("mine", guest)
        sm("start", "mine")
        sm.serial("mine").wait_counter(2)
        sm("checkpoint", "mine")
    finally:
        os.umask(previous)
    shared = [f"{p} {p.lstat().st_mode & 0o777:o}" for p in sm.home.rglob("*")
              if not p.is_symlink() and p.lstat().st_mode & 0o077]
    assert shared == []
    disks = list((sm.home / "data" / "sessions" / "mine").rglob("*.qcow2"))
    assert disks and all(d.stat().st_mode & 0o777 == 0o600 for d in disks)  # the whole disk, in plain text


def test_a_damaged_session_file_affects_only_its_session(sm: Sm, guest: tuple[Path, Path]) -> None:
    for name in ("good", "badconfig", "badstate"):
        sm.new_guest(name, guest)
    (sm.home / "data" / "sessions" / "badconfig" / "config.toml").write_text("memory_mib = \n")
    (sm.home / "data" / "sessions" / "badstate" / "state.json").write_text("{\"active_layer\": ")
    run = sm("list", "--json", check=False)
    assert run.returncode != 0 and json.loads(run.stdout)[1]["name"] == "badstate"
    assert [(r["name"], r["state"]) for r in json.loads(run.stdout)] == [
        ("badconfig", "damaged"), ("badstate", "damaged"), ("good", "stopped")]
    message = one_sentence(run, "config.toml is damaged", "state.json is damaged",
                           "the other sessions are not affected")
    assert "Traceback" not in message
    assert sm("status", "good", "--json").json()["run_state"] is None
    one_sentence(sm("start", "badconfig", check=False), "badconfig", "config.toml is damaged")


def test_a_failing_command_on_a_new_home_makes_no_repository(sm: Sm, guest: tuple[Path, Path]) -> None:
    sm.new_guest("fresh", guest)
    assert sm("list", "--json").json()[0]["checkpoints"] == 0
    assert sm("checkpoints", "fresh", "--json").json() == []
    one_sentence(sm("restore", "fresh", "0123abcd", check=False), "Checkpoint 0123abcd does not exist")
    one_sentence(sm("pin", "fresh", "0123abcd", check=False), "0123abcd")
    assert not (sm.home / "data" / "repository").exists()  # nor its key in a keyring or key file
