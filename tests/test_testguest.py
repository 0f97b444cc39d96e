"""The test guest's pointer echo, display mode switch and full-frame painter, driven over QMP (real QEMU, TCG)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Serial, Sm

from session_manager.vm.machine import Machine, Sockets

pytestmark = pytest.mark.qemu


class Qmp:
    """One QMP command per connection, so the test itself stays synchronous."""

    def __init__(self, sm: Sm, name: str) -> None:
        self.sockets = Sockets(Path(sm("status", name, "--json").json()["qmp_socket"]).parent)

    def __call__(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        async def go() -> Any:
            async with Machine.connect(self.sockets) as m:
                return await m.run(cmd, args)
        return asyncio.run(go())

    def pointer(self, x: int | None = None, y: int | None = None, left: bool | None = None) -> None:
        events: list[dict[str, Any]] = [{"type": "abs", "data": {"axis": axis, "value": v}}
                                        for axis, v in (("x", x), ("y", y)) if v is not None]
        if left is not None:
            events.append({"type": "btn", "data": {"down": left, "button": "left"}})
        self("input-send-event", {"events": events})

    def type_upper(self, letter: str) -> None:
        self("send-key", {"keys": [{"type": "qcode", "data": "shift"}, {"type": "qcode", "data": letter}]})

    def screen(self, tmp: Path) -> tuple[int, int, bytes]:
        """Width, height and RGB bytes of the screen."""
        path = tmp / "screen.ppm"
        self("screendump", {"filename": str(path), "format": "ppm"})
        magic, size, _maxval, rgb = path.read_bytes().split(b"\n", 3)
        assert magic == b"P6"
        width, height = map(int, size.split())
        return width, height, rgb


def changed(a: bytes, b: bytes) -> float:
    """Fraction of the pixels that differ between two RGB screens of the same size."""
    assert len(a) == len(b)
    return sum(a[i:i + 3] != b[i:i + 3] for i in range(0, len(a), 3)) / (len(a) // 3)


def booted(sm: Sm, guest: tuple[Path, Path], name: str) -> tuple[Serial, Qmp]:
    sm.new_guest(name, guest)
    sm("start", name)
    serial = sm.serial(name)
    serial.wait_for(r"^ready")
    return serial, Qmp(sm, name)


def test_tablet_positions_and_left_clicks_are_echoed(sm: Sm, guest: tuple[Path, Path]) -> None:
    serial, qmp = booted(sm, guest, "pointer")
    qmp.pointer(1234, 5678)
    serial.wait_for(r"^pointer 1234 5678\r?$", timeout=20)

    qmp.pointer(32767, 0, left=True)  # one report: the click carries the new position
    serial.wait_for(r"^pointer 32767 0\r?\nclick 32767 0\r?$", timeout=20)
    qmp.pointer(left=False)
    qmp.pointer(y=777)  # only Y changes: X is kept
    serial.wait_for(r"^pointer 32767 777\r?$", timeout=20)
    assert serial.text().count("click") == 1  # the release printed nothing


def test_mode_switch_then_full_frame_painter(sm: Sm, guest: tuple[Path, Path], tmp_path: Path) -> None:
    serial, qmp = booted(sm, guest, "display")
    assert qmp.screen(tmp_path)[:2] == (720, 400)  # VGA text mode

    qmp.type_upper("m")
    mode = serial.wait_for(r"^mode (\d+)x(\d+)\r?$", timeout=60)
    assert (int(mode[1]), int(mode[2])) == (1024, 768)
    width, height, still = qmp.screen(tmp_path)
    assert (width, height) == (1024, 768)

    qmp.type_upper("p")
    serial.wait_for(r"^paint on\r?$", timeout=20)
    # Two screendumps in a row that both show painted frames (unlike the console) and differ almost everywhere.
    painted: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(painted) < 2 or changed(painted[-2], painted[-1]) < 0.9:
        assert time.monotonic() < deadline, "the painter did not keep repainting the screen"
        screen = qmp.screen(tmp_path)[2]
        painted = painted + [screen] if changed(still, screen) > 0.9 else []
    counter = serial.counters()[-1]

    qmp.type_upper("p")
    serial.wait_for(r"^paint off\r?$", timeout=20)
    serial.wait_counter(counter + 3)  # the counter ran on; the console has redrawn the whole screen since
    time.sleep(0.3)
    assert changed(still, qmp.screen(tmp_path)[2]) < 0.2  # the console again: only its counter digits differ
