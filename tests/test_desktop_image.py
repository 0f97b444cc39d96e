"""The desktop image's recipe and the checks before a build: unit tests (the build and boot are in test_desktop.py)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from session_manager.guests import desktop
from session_manager.local.sessions import SessionConfig
from session_manager.vm.qemu import account_line

HASH = "$6$abcdefgh$" + "x" * 86


def test_account_lines_carry_a_name_and_a_hash_and_nothing_else() -> None:
    assert account_line("alice", HASH) == f"alice {HASH}"
    assert account_line("_svc-2", "!") == "_svc-2 !"
    for name in ("Alice", "al ice", "1abc", "a" * 33, "", "alice\nroot", "ali:ce"):
        with pytest.raises(ValueError, match="account name"):
            account_line(name, HASH)
    for bad_hash in ("plain text", "$6$salt$a b", "$6$salt$x\n", "$6$salt$x:0:0", ""):
        with pytest.raises(ValueError):
            account_line("alice", bad_hash)


def test_a_session_config_from_elsewhere_keeps_its_desktop_fields_only_when_well_formed() -> None:
    fields = {"name": "d", "machine": "pc-q35-7.2", "memory_mib": 2048, "cpus": 2, "boot": "kernel",
              "disk_size": 1 << 30, "desktop": True, "account": f"alice {HASH}"}
    config = SessionConfig.from_json(fields)
    assert config.desktop and config.account == f"alice {HASH}"
    for bad in ({"desktop": "yes"}, {"desktop": 1}, {"account": "alice\nroot x"}, {"account": "alice $6$a$b c"}):
        with pytest.raises(ValueError):
            SessionConfig.from_json({**fields, **bad})
    assert not SessionConfig.from_json({k: v for k, v in fields.items() if k not in ("desktop", "account")}).desktop


def test_the_recipe_names_its_build() -> None:
    assert desktop.recipe_id() == desktop.recipe_id()
    assert desktop.recipe_id().startswith(f"{desktop.SUITE}-xfce-")
    for needed in ("spice-vdagent", "qemu-guest-agent", "firefox-esr", "xfce4-terminal", "mousepad"):
        assert needed in desktop.PACKAGES


def test_an_ordinary_user_is_told_what_is_missing_before_a_build(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setattr(desktop.os, "geteuid", lambda: 4242)
    monkeypatch.setattr(desktop, "_user_name", lambda: "bob")
    which = shutil.which
    monkeypatch.setattr(desktop.shutil, "which", lambda tool: None if tool == "newuidmap" else which(tool))
    assert "sudo apt-get install uidmap" in (desktop.missing_tools() or "")
    monkeypatch.setattr(desktop.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536\n")
    subgid.write_text("alice:100000:65536\nbob:165536:65536\n")
    monkeypatch.setattr(desktop, "SUBID_FILES", (str(subuid), str(subgid)))
    why = desktop.missing_tools() or ""
    assert "usermod --add-subuids" in why and "bob" in why and str(subuid) in why
    subuid.write_text("bob:165536:65536\n")
    assert desktop.missing_tools() is None or "user namespaces" in (desktop.missing_tools() or "")
    with pytest.raises(desktop.BuildError):
        subuid.write_text("")
        desktop.build(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_files_laid_over_the_image_leave_its_folders_open_whatever_the_umask(tmp_path: Path) -> None:
    """The CLI runs with umask 077: folders made under it, copied over the image with their modes, made /etc and
    /usr root's alone, and the desktop's account could start nothing (seen in a fresh `setup.sh run`)."""
    old = os.umask(0o077)
    try:
        desktop.write_guest_files(tmp_path / "files")
    finally:
        os.umask(old)
    for folder in ("files", "files/etc", "files/usr", "files/usr/local/sbin", "files/etc/systemd/system"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o755, folder
    assert stat.S_IMODE((tmp_path / "files/usr/local/sbin/sm-firstboot").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "files/etc/fstab").stat().st_mode) == 0o644
