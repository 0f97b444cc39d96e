"""Screenshots of the app for docs/screenshots: run by tests/test_screenshots.py on Xvfb with a tray.

Usage: python tests/shoot.py HOME SESSION OUT_DIR   (DISPLAY and QT_QPA_PLATFORM=xcb set by the caller)
Prints one JSON line: what it wrote and whether a system tray was there.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import qasync
from PySide6.QtCore import QPoint
from PySide6.QtGui import QGuiApplication, QIcon
from PySide6.QtWidgets import QApplication, QSystemTrayIcon

from session_manager.app import App
from session_manager.local.engine import Engine
from session_manager.local.settings import Settings
from session_manager.paths import Home
from session_manager.resources import icon_path


async def settle(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def shoot(home: Path, name: str, out: Path) -> dict[str, object]:
    app = App(Engine(Home.locate(home)), name, Settings())
    app.show_window()
    window = app.window
    deadline = time.monotonic() + 30
    while not window.viewer.is_connected():
        assert time.monotonic() < deadline, "the viewer did not connect"
        await settle(0.1)
    await settle(8)  # a few frames, and a desktop's screen fitted to the window
    window.grab().save(str(out / "session-window.png"))

    app.timeline.resize(1100, 480)
    app.show_timeline()
    await settle(1)
    app.timeline.grab().save(str(out / "timeline.png"))
    app.timeline.hide()

    tray = app.tray
    assert tray is not None
    spot = tray.icon.geometry()
    menu = tray.menu
    menu.popup(QPoint(spot.right() - 360, spot.bottom() + 4))
    await settle(0.5)
    rollback = next(a for a in menu.actions() if a.text() == "Roll back to")
    menu.setActiveAction(rollback)
    rollback.menu().popup(menu.geometry().topLeft() + QPoint(-300, menu.actionGeometry(rollback).top()))
    await settle(1)
    area = menu.geometry().united(rollback.menu().geometry()).united(spot).adjusted(-8, -8, 8, 8)
    screen = QGuiApplication.primaryScreen()
    screen.grabWindow(0, area.x(), area.y(), area.width(), area.height()).save(str(out / "tray-menu.png"))
    menu.hide()
    await app.close()
    return {"tray": QSystemTrayIcon.isSystemTrayAvailable(), "files": sorted(p.name for p in out.glob("*.png"))}


def main() -> None:
    home, name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    qt = QApplication(sys.argv[:1])
    qt.setApplicationName("Session Manager")
    qt.setWindowIcon(QIcon(str(icon_path("session-manager"))))
    loop = qasync.QEventLoop(qt)
    asyncio.set_event_loop(loop)
    with loop:
        print(json.dumps(loop.run_until_complete(shoot(home, name, out))))


if __name__ == "__main__":
    main()
