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
from helpers.cli import Sm
from helpers.x11 import Xvfb


def distinct_colours(image: QImage) -> int:
    step = max(1, image.width() // 64)
    return len({image.pixel(x, y) for x in range(0, image.width(), step) for y in range(0, image.height(), step)})


@pytest.mark.qemu
@pytest.mark.xvfb_screen("1280x960x24")
def test_screenshots(sm: Sm, guest: tuple[Path, Path], xvfb: Xvfb, tmp_path: Path) -> None:
    out = Path(os.environ.get("SM_SCREENSHOTS", tmp_path / "screenshots"))
    sm.new_guest("desktop", guest)
    sm("start", "desktop")
    serial = sm.serial("desktop")
    serial.wait_counter(3)
    sm("checkpoint", "desktop", "-m", "before the upgrade")
    sm("checkpoint", "desktop")
    first = sm("checkpoints", "desktop", "--json").json()[0]["id"]
    sm("restore", "desktop", first)  # a branch, and a "before restoring" checkpoint
    serial.wait_counter(2, since=serial.last_start())
    sm("checkpoint", "desktop", "-m", "tried the other way")

    trayer = subprocess.Popen(["trayer", "--edge", "top", "--align", "right", "--widthtype", "request",
                               "--height", "28", "--transparent", "false", "--tint", "0x303438"],
                              env=xvfb.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        assert trayer.poll() is None, "trayer exited"
        shot = subprocess.run([sys.executable, str(ROOT / "tests" / "shoot.py"), str(sm.home), "desktop", str(out)],
                              env={**xvfb.env, "SESSION_MANAGER_ACCEL": "tcg"}, cwd=ROOT, capture_output=True,
                              text=True, timeout=180)
    finally:
        trayer.terminate()
        trayer.wait(10)
    assert shot.returncode == 0, shot.stderr
    result = json.loads(shot.stdout.splitlines()[-1])
    assert result["tray"], "no system tray: trayer did not provide one"
    assert result["files"] == ["session-window.png", "timeline.png", "tray-menu.png"]
    for name in result["files"]:
        image = QImage(str(out / name))
        assert not image.isNull() and image.width() >= 200 and image.height() >= 100, name
        assert distinct_colours(image) > 8, f"{name} is nearly blank"
