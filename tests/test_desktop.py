"""The desktop session (issue #14): built from Debian's packages, logged in automatically, kept whole by a checkpoint
and a restore; a second desktop shares the first one's base image."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers.cli import Sm, one_sentence
from helpers.desktop import PASSWORD, USER, Desktop, give_base
from session_manager.local.sessions import Session
from session_manager.paths import Home

pytestmark = [pytest.mark.qemu, pytest.mark.desktop]


def test_the_desktop_is_up_with_its_account_logged_in(desktop: Desktop) -> None:
    assert desktop.out("id -un").strip() == USER
    # Xfce runs as the account, on the X screen QEMU shows
    assert desktop.out(f"pgrep -u {USER} -x xfce4-session", user=False).strip()
    assert desktop.out(f"pgrep -u {USER} -x xfce4-panel", user=False).strip()
    assert " connected" in desktop.out("xrandr")
    for program in ("firefox-esr", "xfce4-terminal", "mousepad", "spice-vdagent"):
        assert desktop.out(f"command -v {program}").strip(), program
    # the password given at `new` is the account's (sudo asks for it)
    assert desktop.run(f"echo {PASSWORD!r} | sudo -S -k true").exitcode == 0
    assert desktop.run("echo wrong | sudo -S -k true").exitcode != 0
    assert desktop.out(f"stat -c %U /home/{USER}/Downloads").strip() == USER


def test_a_checkpoint_and_restore_keep_the_open_window_and_its_text(desktop: Desktop) -> None:
    desktop.kill("mousepad")
    desktop.run("mousepad --disable-server >/dev/null 2>&1 &")
    desktop.out("xdotool search --sync --onlyvisible --name Mousepad windowactivate --sync")
    desktop.out("xdotool type --delay 20 'written before the checkpoint'")
    ckpt = desktop.sm("checkpoint", desktop.name, "-m", "editor open", "--json").json()["id"]
    # After it: the text changes and the editor goes
    desktop.out("xdotool type --delay 20 ' and after it'")
    desktop.kill("mousepad")
    assert not desktop.window_ids("Mousepad")

    desktop.sm("restore", desktop.name, ckpt)
    windows = desktop.window_ids("Mousepad")
    assert windows, "the editor's window is gone after the restore"
    desktop.out(f"xdotool windowactivate --sync {windows[0]} key --delay 50 ctrl+a ctrl+c")
    assert desktop.out("xclip -o -selection clipboard") == "written before the checkpoint"
    desktop.kill("mousepad")


def test_a_second_desktop_shares_the_base_image(desktop: Desktop) -> None:
    Desktop(desktop.sm, "desk2").create(memory="1G")  # no build: the base exists
    home = Home.locate(desktop.sm.home)
    configs = [Session(home, name).load_config() for name in (desktop.name, "desk2")]
    assert configs[0].base_image == configs[1].base_image and configs[0].kernel == configs[1].kernel
    [layer] = (home.session_data("desk2") / "disks").glob("*.qcow2")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(layer)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["full-backing-filename"] == configs[0].base_image
    # ten desktops cost one base plus ten overlays: a new one is an empty overlay
    assert layer.stat().st_size < 1 << 20
    desktop.sm("delete", "desk2", "--yes")


def test_new_desktop_refuses_bad_input_in_one_sentence(tmp_path: Path) -> None:
    sm = Sm(tmp_path / "home")
    give_base(sm)
    sm.env["SESSION_MANAGER_DESKTOP_PASSWORD"] = PASSWORD
    one_sentence(sm("new", "d", "--desktop", "--user", "Bad Name!", check=False), "account name")
    del sm.env["SESSION_MANAGER_DESKTOP_PASSWORD"]
    run = subprocess.run(sm.argv("new", "d", "--desktop", "--user", "bob"), capture_output=True, text=True,
                         env=sm.env, stdin=subprocess.DEVNULL)
    assert run.returncode != 0 and "SESSION_MANAGER_DESKTOP_PASSWORD" in run.stderr
    assert sm("list", "--json").json() == []
