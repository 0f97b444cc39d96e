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

from helpers.desktop import Desktop
from helpers.qemu import SessionQmp
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
    assert await asyncio.wait_for(copied.get(), TIMEOUT) == text, when

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
