"""An RFB client against real servers: what its callbacks reported, typing, and QEMU's own picture of the screen to
compare its framebuffer with."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

from helpers.aio import until
from helpers.qemu import Serial
from session_manager.rfb import RfbClient
from session_manager.vm.machine import Machine


@dataclass
class Events:
    """What the client's callbacks reported."""

    updates: list[tuple[int, int, int, int]] = field(default_factory=list)
    frames: int = 0
    resizes: list[tuple[int, int]] = field(default_factory=list)
    leds: list[int] = field(default_factory=list)
    pointer_modes: list[bool] = field(default_factory=list)
    bells: int = 0

    def attach(self, client: RfbClient) -> None:
        client.on_update = lambda x, y, w, h: self.updates.append((x, y, w, h))
        client.on_frame = self._frame
        client.on_resize = lambda w, h: self.resizes.append((w, h))
        client.on_leds = self.leds.append
        client.on_pointer_mode = self.pointer_modes.append
        client.on_bell = self._bell

    def _frame(self) -> None:
        self.frames += 1

    def _bell(self) -> None:
        self.bells += 1


# -- the keyboard ---------------------------------------------------------------------------------------------------

SCANCODES = {**{c: 0x10 + i for i, c in enumerate("qwertyuiop")}, **{c: 0x1E + i for i, c in enumerate("asdfghjkl")},
             **{c: 0x2C + i for i, c in enumerate("zxcvbnm")}, **{c: 0x02 + i for i, c in enumerate("1234567890")}}
SHIFT = (0xFFE1, 0x2A)


async def tap(client: RfbClient, keysym: int, scancode: int | None) -> None:
    client.key_event(True, keysym, scancode)
    await asyncio.sleep(0.03)
    client.key_event(False, keysym, scancode)
    await asyncio.sleep(0.03)


async def type_text(client: RfbClient, text: str) -> None:
    for ch in text:
        if ch.isupper():
            client.key_event(True, *SHIFT)
        await tap(client, ord(ch), SCANCODES[ch.lower()])
        if ch.isupper():
            client.key_event(False, *SHIFT)


# -- QEMU's screen and serial log -----------------------------------------------------------------------------------

async def wait_serial(serial: Serial, pattern: str, since: int = 0, timeout: float = 60) -> re.Match[str]:
    return await asyncio.to_thread(serial.wait_for, pattern, since, timeout)


async def screendump(m: Machine, path: Path) -> tuple[int, int, bytes]:
    """QEMU's own picture of the screen: width, height, RGB bytes."""
    await m.run("screendump", {"filename": str(path), "format": "ppm"})
    data = path.read_bytes()
    path.unlink()
    magic, width, height, depth, pixels = data.split(maxsplit=4)
    assert (magic, depth) == (b"P6", b"255")
    return int(width), int(height), pixels


async def assert_matches_screendump(client: RfbClient, events: Events, m: Machine, path: Path) -> None:
    """With the guest stopped, a full update must equal QEMU's screendump byte for byte."""
    await m.run("stop")
    try:
        tries = 20
        for _ in range(tries):  # QEMU's VNC copy of the screen catches up within its refresh interval
            await asyncio.sleep(0.2)
            def full_update(since: int = len(events.updates)) -> bool:
                return (0, 0, client.width, client.height) in events.updates[since:]
            client.request_full_update()
            await until(full_update, "a full update")
            width, height, rgb = await screendump(m, path)
            fb = client.framebuffer
            assert (width, height) == (client.width, client.height)
            if rgb[0::3] == fb[2::4] and rgb[1::3] == fb[1::4] and rgb[2::3] == fb[0::4]:
                return
        raise AssertionError(f"the framebuffer never matched QEMU's screendump ({tries} tries)")
    finally:
        await m.run("cont")
