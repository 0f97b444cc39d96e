"""The test guest's pointer echo, display mode switch and full-frame painter, driven over QMP (real QEMU, TCG)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers.cli import Sm
from helpers.qemu import Serial, SessionQmp

pytestmark = pytest.mark.qemu


def changed(a: bytes, b: bytes) -> float:
    """Fraction of the pixels that differ between two RGB screens of the same size."""
    assert len(a) == len(b)
    return sum(a[i:i + 3] != b[i:i + 3] for i in range(0, len(a), 3)) / (len(a) // 3)


def booted(sm: Sm, guest: tuple[Path, Path], name: str) -> tuple[Serial, SessionQmp]:
    sm.new_guest(name, guest)
    sm("start", name)
    serial = sm.serial(name)
    serial.wait_for(r"^ready")
    return serial, SessionQmp(sm, name)


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
