"""Screenshots of the real app on Xvfb with a system tray (trayer): the session window, the timeline, the tray menu.

The PNGs go to $SM_SCREENSHOTS (default: the test's temporary directory); docs/screenshots holds a
checked-in set for the README.  Needs apt: xvfb trayer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PySide6.QtGui import QImage

from helpers import ROOT
from helpers.desktop import Desktop
from helpers.x11 import Xvfb


def distinct_colours(image: QImage) -> int:
    step = max(1, image.width() // 64)
    return len({image.pixel(x, y) for x in range(0, image.width(), step) for y in range(0, image.height(), step)})


@pytest.mark.qemu
@pytest.mark.desktop
@pytest.mark.xvfb_screen("1280x960x24")
def test_screenshots(desktop: Desktop, xvfb: Xvfb, tmp_path: Path) -> None:
    out = Path(os.environ.get("SM_SCREENSHOTS", tmp_path / "screenshots"))
    sm, name = desktop.sm, desktop.name
    desktop.kill("mousepad")
    desktop.run("xfce4-terminal --disable-server --geometry 90x24+60+60 >/dev/null 2>&1 &")
    desktop.out("xdotool search --sync --onlyvisible --class xfce4-terminal")
    sm("checkpoint", name, "-m", "before the upgrade")
    desktop.run("mousepad --disable-server >/dev/null 2>&1 &")
    desktop.out("xdotool search --sync --onlyvisible --name Mousepad windowactivate --sync")
    desktop.out("xdotool type --delay 10 'Notes for Monday: everything here survives a crash.'")
    sm("checkpoint", name)
    first = sm("checkpoints", name, "--json").json()[-2]["id"]
    sm("restore", name, first)  # a branch, and a "before restoring" checkpoint
    desktop.out("xdotool type --delay 10 'ls ~/Downloads'")
    sm("checkpoint", name, "-m", "tried the other way")

    trayer = subprocess.Popen(["trayer", "--edge", "top", "--align", "right", "--widthtype", "request",
                               "--height", "28", "--transparent", "false", "--tint", "0x303438"],
                              env=xvfb.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        assert trayer.poll() is None, "trayer exited"
        shot = subprocess.run([sys.executable, str(ROOT / "tests" / "shoot.py"), str(sm.home), name, str(out)],
                              env={**xvfb.env, "SESSION_MANAGER_ACCEL": "tcg"}, cwd=ROOT, capture_output=True,
                              text=True, timeout=180)
    finally:
        trayer.terminate()
        trayer.wait(10)
        desktop.kill("xfce4-terminal")
    assert shot.returncode == 0, shot.stderr
    result = json.loads(shot.stdout.splitlines()[-1])
    assert result["tray"], "no system tray: trayer did not provide one"
    assert result["files"] == ["session-window.png", "timeline.png", "tray-menu.png"]
    for name in result["files"]:
        image = QImage(str(out / name))
        assert not image.isNull() and image.width() >= 200 and image.height() >= 100, name
        assert distinct_colours(image) > 8, f"{name} is nearly blank"
