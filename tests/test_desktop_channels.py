"""The desktop's spice-vdagent channel (issue #14) with the real guest: text copied in the guest arrives here, text
set here is pasted there, and the guest's screen (X and QEMU's display) takes the size asked for; all of it again
after a checkpoint and a restore (a new QEMU on the same socket) and after the app restarted (a new connection to
the same QEMU)."""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from PySide6.QtWidgets import QApplication

from helpers.aio import until
from helpers.desktop import Desktop
from helpers.qemu import SessionQmp
from session_manager.app import App
from session_manager.local.engine import Engine
from session_manager.local.settings import Settings
from session_manager.paths import Home
from session_manager.services.guest_channel import GuestChannel

pytestmark = [pytest.mark.qemu, pytest.mark.desktop]

T = TypeVar("T")
TIMEOUT = 120  # the guest is slow under TCG, slower still while the other core boots another guest


async def eventually(get: Callable[[], T], want: T, what: str) -> None:
    """Poll ``get`` (blocking: it runs in a thread, so that the channel keeps being served) until it returns
    ``want``."""
    deadline = time.monotonic() + TIMEOUT
    while (got := await asyncio.to_thread(get)) != want:
        assert time.monotonic() < deadline, f"{what}: {got!r}, not {want!r}, after {TIMEOUT} s"
        await asyncio.sleep(0.5)


async def check(desktop: Desktop, channel: GuestChannel, copied: asyncio.Queue[str], tmp: Path, when: str,
                size: tuple[int, int]) -> None:
    width, height = size
    channel.set_screen(width, height)
    await eventually(lambda: desktop.out("xrandr").split(",")[1].strip(), f"current {width} x {height}",
                     f"the guest's X screen {when}")
    await eventually(lambda: SessionQmp(desktop.sm, desktop.name).screen(tmp)[:2], size,
                     f"QEMU's display {when}")

    text = f"copied in the guest {when}: ünïcode\nand a second line"
    pipeline = f"printf %s {shlex.quote(text)} | xclip -selection clipboard >/dev/null 2>&1"
    await asyncio.to_thread(desktop.out, f"sh -c {shlex.quote(pipeline)}")
    deadline = time.monotonic() + TIMEOUT
    while await asyncio.wait_for(copied.get(), max(0.1, deadline - time.monotonic())) != text:
        pass  # what the guest held before (it offers it when we connect)

    text = f"copied on the computer {when}: ünïcode\nand a second line"
    channel.set_clipboard(text)
    await eventually(lambda: desktop.out("xclip -o -selection clipboard"), text, f"pasted in the guest {when}")


def test_clipboard_and_screen_size_also_after_a_restore_and_an_app_restart(desktop: Desktop, tmp_path: Path) -> None:
    async def go() -> None:
        copied: asyncio.Queue[str] = asyncio.Queue()
        channel = GuestChannel(desktop.sockets.vdagent)
        channel.clipboardChanged.connect(copied.put_nowait)
        await check(desktop, channel, copied, tmp_path, "at first", (1024, 700))

        run = await asyncio.to_thread(desktop.sm, "checkpoint", desktop.name, "-m", "channels", "--json")
        await asyncio.to_thread(desktop.sm, "restore", desktop.name, run.json()["id"])
        await check(desktop, channel, copied, tmp_path, "after a restore", (1152, 720))

        channel.close()  # the app quits; QEMU runs on
        channel = GuestChannel(desktop.sockets.vdagent)
        channel.clipboardChanged.connect(copied.put_nowait)
        await check(desktop, channel, copied, tmp_path, "after the app restarted", (1280, 800))
        channel.close()
    asyncio.run(go())


def test_the_window_resizes_the_desktop_unless_told_to_scale_and_shares_the_clipboard(
        desktop: Desktop, aloop, qtbot) -> None:
    home = Home.locate(desktop.sm.home)
    app = App(Engine(home), desktop.name, Settings())
    window = app.window
    qtbot.addWidget(window)
    qtbot.addWidget(app.timeline)
    window.show()
    window.activateWindow()
    qtbot.waitActive(window)
    clipboard = QApplication.clipboard()

    def guest_size() -> tuple[int, int]:
        width, _, height = desktop.out("xrandr").split(",")[1].split()[1:4]
        return int(width), int(height)

    async def follows(what: str) -> None:
        """The guest's screen takes the viewer's size (X rounds the width down to a multiple of 8)."""
        size = window.viewer.device_size()
        await eventually(lambda: guest_size()[1], size.height(), what)
        width = (await asyncio.to_thread(guest_size))[0]
        assert size.width() - 8 < width <= size.width(), (what, width, size)

    async def scenario() -> None:
        window.resize(900, 640)
        await follows("the desktop following the window")
        window.scale_action.setChecked(True)  # scale instead: the desktop keeps its size
        kept = await asyncio.to_thread(guest_size)
        window.resize(1000, 700)
        await asyncio.sleep(3)
        assert await asyncio.to_thread(guest_size) == kept
        assert Settings.load(home).scale_desktop  # remembered
        window.scale_action.setChecked(False)
        await follows("the desktop following the window again")

        # While the window is active, what is copied on the computer is pasted in the guest, and the other way.
        clipboard.setText("copied on the computer, pasted in the guest")
        await eventually(lambda: desktop.out("xclip -o -selection clipboard"),
                         "copied on the computer, pasted in the guest", "the guest's clipboard")
        pipeline = "printf %s 'copied in the guest' | xclip -selection clipboard >/dev/null 2>&1"
        await asyncio.to_thread(desktop.out, f"sh -c {shlex.quote(pipeline)}")
        await until(lambda: clipboard.text() == "copied in the guest", "the computer's clipboard", TIMEOUT)

    aloop.run_until_complete(scenario())
    aloop.run_until_complete(app.close())
