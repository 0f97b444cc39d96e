"""The embedded viewer: key translation, a scripted RFB server, and the real QEMU with the test guest."""

from __future__ import annotations

import asyncio
import re
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QEvent, QPoint, QPointF, Qt
from PySide6.QtGui import QAction, QColor, QImage, QKeyEvent, QKeySequence, QMouseEvent, QWheelEvent
from PySide6.QtWidgets import QApplication, QLineEdit, QWidget

from helpers.cli import Sm
from helpers.qemu import Serial
from session_manager import rfb
from session_manager.services import sound
from session_manager.ui import keymap
from session_manager.ui import viewer as viewer_module
from session_manager.ui.viewer import BACKGROUND, NOT_RUNNING, RECONNECTING, VncViewer

K = Qt.Key
CTRL, ALT = Qt.KeyboardModifier.ControlModifier, Qt.KeyboardModifier.AltModifier


# -- key translation ----------------------------------------------------------------------------

def test_evdev_to_xt() -> None:
    assert keymap.evdev_to_xt(1) == 0x01  # Esc
    assert keymap.evdev_to_xt(30) == 0x1E  # A
    assert keymap.evdev_to_xt(28) == 0x1C  # Return
    assert keymap.evdev_to_xt(87) == 0x57  # F11
    assert keymap.evdev_to_xt(86) == 0x56  # the ISO key left of Z
    assert keymap.x_keycode_to_xt(38) == 0x1E  # X keycode of A = evdev 30 + 8
    assert keymap.x_keycode_to_xt(0) is None and keymap.evdev_to_xt(0) is None


def test_extended_keys_carry_the_qnum_bit() -> None:
    assert keymap.evdev_to_xt(103) == 0x80 | 0x48  # Up: e0 48
    assert keymap.evdev_to_xt(105) == 0x80 | 0x4B  # Left
    assert keymap.evdev_to_xt(97) == 0x80 | 0x1D  # right Ctrl: e0 1d
    assert keymap.evdev_to_xt(100) == 0x80 | 0x38  # right Alt
    assert keymap.evdev_to_xt(96) == 0x80 | 0x1C  # keypad Enter
    assert keymap.evdev_to_xt(29) == 0x1D  # left Ctrl is not extended
    assert keymap.qt_key_to_xt(K.Key_Right.value) == 0xCD
    assert keymap.qt_key_to_xt(K.Key_Delete.value) == 0xD3
    assert keymap.qt_key_to_xt(K.Key_Enter.value) == 0x9C
    # Every code is a qnum: one byte, the extended ones with 0x80 set.
    assert all(0 < xt <= 0xFF for xt in keymap.EVDEV_TO_XT.values())
    assert rfb.qnum(keymap.qt_key_to_xt(K.Key_Up.value) or 0) == 0xC8


def test_qt_key_to_xt() -> None:
    assert keymap.qt_key_to_xt(K.Key_A.value) == 0x1E
    assert keymap.qt_key_to_xt(K.Key_Z.value) == 0x2C
    assert keymap.qt_key_to_xt(K.Key_1.value) == 0x02
    assert keymap.qt_key_to_xt(K.Key_0.value) == 0x0B
    assert keymap.qt_key_to_xt(K.Key_Escape.value) == 0x01
    assert keymap.qt_key_to_xt(K.Key_Tab.value) == 0x0F
    assert keymap.qt_key_to_xt(K.Key_Space.value) == 0x39
    assert keymap.qt_key_to_xt(K.Key_F1.value) == 0x3B
    assert keymap.qt_key_to_xt(K.Key_F10.value) == 0x44
    assert keymap.qt_key_to_xt(K.Key_F12.value) == 0x58
    assert keymap.qt_key_to_xt(K.Key_Exclam.value) == 0x02  # Shift+1 on a US layout
    assert keymap.qt_key_to_xt(K.Key_Slash.value) == 0x35
    assert keymap.qt_key_to_xt(K.Key_5.value, keypad=True) == 0x4C
    assert keymap.qt_key_to_xt(K.Key_Slash.value, keypad=True) == 0xB5
    assert keymap.char_to_xt("?") == (0x35, True)
    assert keymap.char_to_xt("'") == (0x28, False)
    assert keymap.char_to_xt("é") is None


def test_keysyms() -> None:
    assert keymap.keysym(K.Key_A.value, "a") == ord("a")
    assert keymap.keysym(K.Key_A.value, "A", shift=True) == ord("A")
    assert keymap.keysym(K.Key_A.value, "\x01") == ord("a")  # Ctrl+A has no printable text
    assert keymap.keysym(K.Key_Return.value, "\r") == 0xFF0D
    assert keymap.keysym(K.Key_Left.value) == 0xFF51
    assert keymap.keysym(K.Key_F5.value) == 0xFFC2
    assert keymap.keysym(K.Key_Eacute.value, "é") == 0xE9  # Latin-1 keysyms are the code point
    assert keymap.keysym(0, "€") == 0x010020AC  # others are Unicode keysyms
    assert keymap.keysym(K.Key_unknown.value) is None


# -- the widget against a scripted RFB server ---------------------------------------------------

RED = b"\x00\x00\xff\x00"  # B, G, R, unused: Format_RGB32 in little-endian memory
GREEN = b"\x00\xff\x00\x00"


class FakeVnc:
    """An RFB 3.8 server on a unix socket that records what the client sends."""

    def __init__(self, path: Path, width: int = 64, height: int = 48) -> None:
        self.path = path
        self.width, self.height = width, height
        self.events: list[tuple[Any, ...]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def stop(self) -> None:
        self.drop_clients()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        self.path.unlink(missing_ok=True)

    def drop_clients(self) -> None:
        for w in self.writers:
            w.close()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            writer.write(b"RFB 003.008\n")
            await reader.readexactly(12)
            writer.write(b"\x01\x01")  # one security type: None
            await reader.readexactly(1)
            writer.write(b"\0\0\0\0")  # SecurityResult OK
            await reader.readexactly(1)  # shared flag
            name = b"fake"
            writer.write(struct.pack(">HH16sI", self.width, self.height, rfb.PIXEL_FORMAT, len(name)) + name)
            self.update([(0, 0, 0, 0, rfb.QEMU_EXTENDED_KEY_EVENT, b""),
                         (1, 0, 0, 0, rfb.QEMU_POINTER_MOTION_CHANGE, b""),
                         (0, 0, self.width, self.height, rfb.RAW, RED * (self.width * self.height))])
            await self._read(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        read = reader.readexactly
        while True:
            kind = (await read(1))[0]
            if kind == 0:  # SetPixelFormat
                await read(19)
            elif kind == 2:  # SetEncodings
                (n,) = struct.unpack(">xH", await read(3))
                await read(4 * n)
            elif kind == 3:  # FramebufferUpdateRequest
                await read(9)
            elif kind == 4:  # KeyEvent
                down, sym = struct.unpack(">BxxI", await read(7))
                self.events.append(("key", bool(down), sym, None))
            elif kind == 5:  # PointerEvent
                self.events.append(("pointer", *struct.unpack(">BHH", await read(5))))
            elif kind == 255 and (await read(1))[0] == 1:  # QEMU audio: 0 enable, 1 disable, 2 set format
                (operation,) = struct.unpack(">H", await read(2))
                self.events.append(("audio", operation, await read(6) if operation == 2 else b""))
            elif kind == 255:  # QEMU Extended Key Event
                down, sym, code = struct.unpack(">HII", await read(10))
                self.events.append(("key", bool(down), sym, code))
            else:
                raise AssertionError(f"unexpected client message {kind}")

    def update(self, rects: list[tuple[int, int, int, int, int, bytes]]) -> None:
        msg = struct.pack(">BxH", 0, len(rects))
        for x, y, w, h, encoding, payload in rects:
            msg += struct.pack(">HHHHi", x, y, w, h, encoding) + payload
        for writer in self.writers:
            writer.write(msg)

    def send(self, data: bytes) -> None:
        for writer in self.writers:
            writer.write(data)

    def audio(self) -> list[int]:
        return [e[1] for e in self.events if e[0] == "audio"]

    def key_events(self) -> list[tuple[bool, int, int | None]]:
        return [e[1:] for e in self.events if e[0] == "key"]

    def pointers(self) -> list[tuple[int, int, int]]:
        return [(e[2], e[3], e[1]) for e in self.events if e[0] == "pointer"]


def wait(aloop: asyncio.AbstractEventLoop, cond: Callable[[], object], what: str, timeout: float = 10) -> None:
    """Run the loop until ``cond()`` holds."""
    async def poll() -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.02)
    aloop.run_until_complete(poll())


def settle(aloop: asyncio.AbstractEventLoop, seconds: float = 0.2) -> None:
    aloop.run_until_complete(asyncio.sleep(seconds))


class Record:
    """Every emission of a viewer's signals, in order."""

    def __init__(self, v: VncViewer) -> None:
        self.seen: list[tuple[Any, ...]] = []
        v.connected.connect(lambda: self.seen.append(("connected",)))
        v.disconnected.connect(lambda reason: self.seen.append(("disconnected", reason)))
        v.resized.connect(lambda w, h: self.seen.append(("resized", w, h)))
        v.keyboardGrabbed.connect(lambda on: self.seen.append(("grabbed", on)))
        v.shortcutPressed.connect(lambda s: self.seen.append(("shortcut", s)))

    def names(self) -> list[str]:
        return [s[0] for s in self.seen]


@pytest.fixture
def viewer(qtbot: Any, aloop: asyncio.AbstractEventLoop) -> Iterator[VncViewer]:
    # In a window with another focusable widget, so that Tab could move the focus away.
    # Not qtbot.addWidget: pytest-qt would delete it before this fixture disconnects the viewer.
    window = QWidget()
    window.resize(900, 600)
    QLineEdit(window).move(0, 560)
    v = VncViewer(window)
    v.resize(640, 480)
    window.show()
    v.setFocus()
    yield v
    v.disconnect_()
    aloop.run_until_complete(v.wait_closed())
    window.close()
    window.deleteLater()


@pytest.fixture
def fake(tmp_path: Path, aloop: asyncio.AbstractEventLoop) -> Iterator[FakeVnc]:
    server = FakeVnc(tmp_path / "vnc.sock")
    aloop.run_until_complete(server.start())
    yield server
    aloop.run_until_complete(server.stop())


def connected(aloop: asyncio.AbstractEventLoop, v: VncViewer, fake: FakeVnc) -> None:
    v.connect_to(str(fake.path))
    wait(aloop, lambda: v.is_connected() and fake.writers, "the viewer to connect")
    wait(aloop, lambda: v.grab().toImage().pixelColor(320, 240) == QColor(255, 0, 0), "the first frame")


def colour_at(v: VncViewer, x: int, y: int) -> QColor:
    return v.grab().toImage().pixelColor(x, y)


def test_paints_the_frame_letterboxed(viewer: VncViewer, fake: FakeVnc, aloop: asyncio.AbstractEventLoop) -> None:
    rec = Record(viewer)
    connected(aloop, viewer, fake)
    assert rec.seen[:2] == [("connected",), ("resized", 64, 48)]
    viewer.resize(800, 480)  # wider than 4:3: bars left and right
    settle(aloop, 0.05)
    assert viewer.picture_rect().toRect().getRect() == (80, 0, 640, 480)
    img = viewer.grab().toImage()
    assert img.pixelColor(40, 240) == BACKGROUND and img.pixelColor(760, 240) == BACKGROUND
    assert img.pixelColor(85, 5) == QColor(255, 0, 0) and img.pixelColor(715, 475) == QColor(255, 0, 0)

    # A small update repaints only its own part of the picture.
    fake.update([(0, 0, 8, 8, rfb.RAW, GREEN * 64)])
    wait(aloop, lambda: colour_at(viewer, 85, 5) == QColor(0, 255, 0), "the update to show")
    assert colour_at(viewer, 400, 240) == QColor(255, 0, 0)

    viewer.set_scaled(False)  # 1:1, centred
    assert viewer.picture_rect().toRect().getRect() == (368, 216, 64, 48)
    assert colour_at(viewer, 370, 218) == QColor(0, 255, 0) and colour_at(viewer, 300, 240) == BACKGROUND


def test_resize_from_the_server(viewer: VncViewer, fake: FakeVnc, aloop: asyncio.AbstractEventLoop) -> None:
    connected(aloop, viewer, fake)
    rec = Record(viewer)
    fake.update([(0, 0, 120, 30, rfb.DESKTOP_SIZE, b""), (0, 0, 120, 30, rfb.RAW, GREEN * 3600)])
    wait(aloop, lambda: ("resized", 120, 30) in rec.seen, "resized(120, 30)")
    assert viewer.framebuffer_size().toTuple() == (120, 30)
    r = viewer.picture_rect()
    assert r.width() / r.height() == pytest.approx(4.0) and r.width() == 640
    wait(aloop, lambda: colour_at(viewer, 320, 240) == QColor(0, 255, 0), "the new frame")
    assert colour_at(viewer, 320, 150) == BACKGROUND


def test_typing_sends_scancodes(viewer: VncViewer, fake: FakeVnc, aloop: asyncio.AbstractEventLoop,
                                qtbot: Any) -> None:
    connected(aloop, viewer, fake)
    qtbot.keyClicks(viewer, "a?")
    qtbot.keyClick(viewer, K.Key_Up)
    qtbot.keyClick(viewer, K.Key_Tab)
    qtbot.keyClick(viewer, K.Key_Backtab, Qt.KeyboardModifier.ShiftModifier)
    wait(aloop, lambda: len(fake.key_events()) >= 14, "14 key events")
    assert fake.key_events() == [
        (True, ord("a"), 0x1E), (False, ord("a"), 0x1E),
        # "?" is Shift+/ on a US layout: Shift is added around the press
        (True, 0xFFE1, 0x2A), (True, ord("?"), 0x35), (False, 0xFFE1, 0x2A), (False, ord("?"), 0x35),
        (True, 0xFF52, 0xC8), (False, 0xFF52, 0xC8),
        (True, 0xFF09, 0x0F), (False, 0xFF09, 0x0F),
        (True, 0xFFE1, 0x2A), (True, 0xFE20, 0x0F), (False, 0xFE20, 0x0F), (False, 0xFFE1, 0x2A),
    ]
    assert QApplication.focusWidget() is viewer  # Tab did not move the focus away

    # Auto-repeat (on X11 a release and a press, both marked as repeats) sends more presses, one release.
    fake.events.clear()
    qtbot.keyPress(viewer, K.Key_B)
    for kind in (QEvent.Type.KeyRelease, QEvent.Type.KeyPress):
        QApplication.sendEvent(viewer, QKeyEvent(kind, K.Key_B, Qt.KeyboardModifier.NoModifier, "b", True))
    qtbot.keyRelease(viewer, K.Key_B)
    wait(aloop, lambda: len(fake.key_events()) >= 3, "3 key events")
    settle(aloop, 0.05)
    assert fake.key_events() == [(True, ord("b"), 0x30), (True, ord("b"), 0x30), (False, ord("b"), 0x30)]


def test_native_keycodes_give_the_physical_key(viewer: VncViewer, fake: FakeVnc, aloop: asyncio.AbstractEventLoop,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On X11 and Wayland the scancode comes from the key's position, whatever the layout made of it."""
    monkeypatch.setattr(viewer_module, "native_keycodes_are_x11", lambda: True)
    connected(aloop, viewer, fake)
    nomod = Qt.KeyboardModifier.NoModifier
    # On an AZERTY layout the key right of Tab (X keycode 24, evdev 16: US Q) types "a".
    for kind in (QEvent.Type.KeyPress, QEvent.Type.KeyRelease):
        QApplication.sendEvent(viewer, QKeyEvent(kind, K.Key_A, nomod, 24, 0, 0, "a"))
    # Right Ctrl (X keycode 105, evdev 97) is an extended key.
    QApplication.sendEvent(viewer, QKeyEvent(QEvent.Type.KeyPress, K.Key_Control, nomod, 105, 0, 0))
    QApplication.sendEvent(viewer, QKeyEvent(QEvent.Type.KeyRelease, K.Key_Control, nomod, 105, 0, 0))
    wait(aloop, lambda: len(fake.key_events()) >= 4, "4 key events")
    assert fake.key_events() == [(True, ord("a"), 0x10), (False, ord("a"), 0x10),
                                 (True, 0xFFE3, 0x9D), (False, 0xFFE3, 0x9D)]


def test_shortcut_is_kept_from_the_guest(viewer: VncViewer, fake: FakeVnc, aloop: asyncio.AbstractEventLoop,
                                         qtbot: Any) -> None:
    connected(aloop, viewer, fake)
    rec = Record(viewer)
    viewer.set_shortcuts(["Ctrl+Alt+S"])
    qtbot.keyPress(viewer, K.Key_S, CTRL | ALT)  # QTest presses Ctrl, Alt, then S
    wait(aloop, lambda: len(fake.key_events()) >= 4, "4 key events")
    settle(aloop, 0.05)
    assert rec.seen == [("shortcut", "Ctrl+Alt+S")]
    assert fake.key_events() == [
        (True, 0xFFE3, 0x1D), (True, 0xFFE9, 0x38),  # Ctrl and Alt went down before S was pressed ...
        (False, 0xFFE9, 0x38), (False, 0xFFE3, 0x1D),  # ... and are released at once: none sticks
    ]
    qtbot.keyRelease(viewer, K.Key_S, CTRL | ALT)  # also releases Alt and Ctrl: nothing more is sent
    fake.events.clear()
    qtbot.keyClick(viewer, K.Key_S, CTRL)  # not a shortcut: reaches the guest
    wait(aloop, lambda: len(fake.key_events()) >= 4, "4 key events")
    settle(aloop, 0.05)
    assert fake.key_events() == [(True, 0xFFE3, 0x1D), (True, ord("s"), 0x1F), (False, ord("s"), 0x1F),
                           (False, 0xFFE3, 0x1D)]
    assert rec.seen == [("shortcut", "Ctrl+Alt+S")]

    # The window's own shortcuts do not take keys meant for the guest.
    action = QAction(viewer.window())
    action.setShortcut(QKeySequence("Ctrl+W"))
    viewer.window().addAction(action)
    fired: list[bool] = []
    action.triggered.connect(lambda: fired.append(True))
    fake.events.clear()
    qtbot.keyClick(viewer, K.Key_W, CTRL)
    wait(aloop, lambda: len(fake.key_events()) >= 4, "4 key events")
    assert (True, ord("w"), 0x11) in fake.key_events() and not fired


def test_pointer_maps_through_the_letterbox(viewer: VncViewer, fake: FakeVnc, aloop: asyncio.AbstractEventLoop,
                                            qtbot: Any) -> None:
    connected(aloop, viewer, fake)
    viewer.resize(800, 480)  # picture at x 80..720, 10 widget pixels per framebuffer pixel
    settle(aloop, 0.05)
    assert viewer.pointer_absolute()
    qtbot.mouseMove(viewer, QPoint(400, 240))  # over the picture: the guest draws the cursor
    assert viewer.cursor().shape() == Qt.CursorShape.BlankCursor
    qtbot.mouseMove(viewer, QPoint(40, 240))  # over the bar: the local one
    assert viewer.cursor().shape() == Qt.CursorShape.ArrowCursor
    wait(aloop, lambda: len(fake.pointers()) >= 2, "2 motion events")
    fake.events.clear()
    qtbot.mouseClick(viewer, Qt.MouseButton.LeftButton, pos=QPoint(80 + 10 * 16 + 5, 10 * 12 + 5))
    qtbot.mouseClick(viewer, Qt.MouseButton.RightButton, pos=QPoint(10, 479))  # in the left bar: clamped
    wait(aloop, lambda: len(fake.pointers()) >= 4, "4 pointer events")
    assert fake.pointers()[:4] == [(16, 12, 1), (16, 12, 0), (0, 47, 4), (0, 47, 0)]
    fake.events.clear()
    corner = QPointF(719, 0)  # sent directly: QTest's synthesized moves are sometimes dropped under load
    QApplication.sendEvent(viewer, QMouseEvent(QEvent.Type.MouseMove, corner, viewer.mapToGlobal(corner),
                                               Qt.MouseButton.NoButton, Qt.MouseButton.NoButton,
                                               Qt.KeyboardModifier.NoModifier))
    wait(aloop, lambda: fake.pointers(), "a motion event")
    assert fake.pointers()[-1] == (63, 0, 0)

    fake.events.clear()
    pos = QPointF(400, 240)
    for delta in (120, -240):
        viewer.wheelEvent(QWheelEvent(pos, viewer.mapToGlobal(pos), QPoint(), QPoint(0, delta),
                                      Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier,
                                      Qt.ScrollPhase.NoScrollPhase, False))
    wait(aloop, lambda: len(fake.pointers()) >= 6, "6 wheel events")
    assert [b for _, _, b in fake.pointers()] == [8, 0, 16, 0, 16, 0]
    assert {(x, y) for x, y, _ in fake.pointers()} == {(32, 24)}


def test_destroyed_viewer_hangs_up(fake: FakeVnc, aloop: asyncio.AbstractEventLoop, qtbot: Any,
                                   caplog: pytest.LogCaptureFixture) -> None:
    v = VncViewer()  # not shown: deleting the last window would quit the application
    v.connect_to(fake.path)
    wait(aloop, lambda: v.is_connected(), "the viewer to connect")
    (writer,) = fake.writers
    gone: list[bool] = []
    v.destroyed.connect(lambda: gone.append(True))
    v.deleteLater()
    wait(aloop, lambda: gone and writer.is_closing(), "the server to see the client go")
    settle(aloop, 0.1)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_sound_plays_until_muted(viewer: VncViewer, fake: FakeVnc, aloop: asyncio.AbstractEventLoop,
                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    played = tmp_path / "played.raw"
    monkeypatch.setattr(sound, "PLAYERS", [("sh", "-c", f"cat > {played}")])
    connected(aloop, viewer, fake)
    fake.update([(0, 0, 64, 48, rfb.QEMU_AUDIO, b"")])  # QEMU acknowledges its audio extension
    wait(aloop, lambda: fake.audio() == [2, 0], "the format, then enable")
    assert [e[2] for e in fake.events if e[0] == "audio"][0] == struct.pack(">BBI", 3, 2, 44100)  # S16 stereo
    pcm = bytes(range(256)) * 4
    fake.send(struct.pack(">BBHI", 255, 1, 2, len(pcm)) + pcm)
    wait(aloop, lambda: played.exists() and played.read_bytes() == pcm, "the sound at the player")

    viewer.set_muted(True)
    wait(aloop, lambda: fake.audio() == [2, 0, 1], "disable")
    viewer.set_muted(False)
    wait(aloop, lambda: fake.audio() == [2, 0, 1, 2, 0], "enable again")
    assert not viewer.is_muted()


def test_keyboard_grab(viewer: VncViewer) -> None:
    rec = Record(viewer)
    viewer.set_keyboard_grab(True)
    assert QWidget.keyboardGrabber() is viewer and viewer.keyboard_grabbed()
    viewer.set_keyboard_grab(False)
    assert QWidget.keyboardGrabber() is None and not viewer.keyboard_grabbed()
    assert rec.seen == [("grabbed", True), ("grabbed", False)]


def uniform(img: QImage) -> bool:
    """Whether every 8th pixel of the image has the same colour."""
    first = img.pixel(0, 0)
    return all(img.pixel(x, y) == first for x in range(0, img.width(), 8) for y in range(0, img.height(), 8))


def test_waits_for_the_server_and_reconnects(viewer: VncViewer, tmp_path: Path,
                                             aloop: asyncio.AbstractEventLoop) -> None:
    rec = Record(viewer)
    path = tmp_path / "later.sock"
    viewer.connect_to(str(path))
    wait(aloop, lambda: viewer.status_text() == NOT_RUNNING, "the not-running status")
    img = viewer.grab().toImage()
    assert img.pixelColor(5, 5) == BACKGROUND and not uniform(img)  # dark, with the status text
    assert not rec.seen

    server = FakeVnc(path)
    aloop.run_until_complete(server.start())
    try:
        wait(aloop, lambda: rec.names() == ["connected", "resized"], "connected")
        wait(aloop, lambda: colour_at(viewer, 320, 240) == QColor(255, 0, 0), "the frame")

        server.drop_clients()  # as when QEMU exits or is replaced by a restore
        wait(aloop, lambda: "disconnected" in rec.names(), "disconnected")
        assert viewer.status_text() in (RECONNECTING, NOT_RUNNING)
        wait(aloop, lambda: rec.names().count("connected") == 2, "the second connection")
        assert rec.names() == ["connected", "resized", "disconnected", "connected", "resized"]
        wait(aloop, lambda: colour_at(viewer, 320, 240) == QColor(255, 0, 0), "the frame again")
    finally:
        aloop.run_until_complete(server.stop())
    viewer.disconnect_()
    assert rec.names()[-1] == "disconnected" and not viewer.is_connected() and viewer.target() is None


# -- against QEMU and the test guest -------------------------------------------------------------

BOOT_TIMEOUT = 180


def boot(sm: Sm, guest: tuple[Path, Path], name: str) -> tuple[str, Serial]:
    sm.new_guest(name, guest)
    sm("start", name)
    status = sm("status", name, "--json").json()
    serial = Serial(status["serial_log"])
    serial.wait_for(r"^counter 1\r?$", timeout=BOOT_TIMEOUT)
    return status["vnc_socket"], serial


def wait_serial(aloop: asyncio.AbstractEventLoop, serial: Serial, pattern: str, since: int,
                timeout: float = 30) -> re.Match[str]:
    """Wait for a serial line while the event loop (and so the viewer) keeps running."""
    found: list[re.Match[str]] = []

    def check() -> bool:
        m = re.search(pattern, serial.text(since), re.MULTILINE)
        if m:
            found.append(m)
        return m is not None

    try:
        wait(aloop, check, repr(pattern), timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}; the guest printed:\n{serial.text(since)[-1500:]}") from None
    return found[0]


def show(aloop: asyncio.AbstractEventLoop, v: VncViewer, socket: str) -> Record:
    rec = Record(v)
    v.connect_to(socket)
    wait(aloop, lambda: v.is_connected(), "the viewer to connect", 30)
    wait(aloop, lambda: not uniform(v.grab().toImage()), "a picture that is not one colour", 30)
    return rec


def changes(aloop: asyncio.AbstractEventLoop, v: VncViewer, timeout: float = 15) -> None:
    before = v.grab().toImage()
    wait(aloop, lambda: v.grab().toImage() != before, "the picture to change", timeout)


@pytest.mark.qemu
def test_qemu_picture_keys_and_shortcut(sm: Sm, guest: tuple[Path, Path], viewer: VncViewer,
                                        aloop: asyncio.AbstractEventLoop, qtbot: Any) -> None:
    socket, serial = boot(sm, guest, "view")
    show(aloop, viewer, socket)
    changes(aloop, viewer)  # the counter ticks

    since = serial.size()
    qtbot.keyClicks(viewer, "hi!")
    qtbot.keyClick(viewer, K.Key_Tab)
    wait_serial(aloop, serial, r"^key h\r?\n(.*\n)*key i\r?\n(.*\n)*key !\r?\n(.*\n)*key #9\r?$", since)

    viewer.set_shortcuts(["Ctrl+Alt+S"])
    rec = Record(viewer)
    since = serial.size()
    qtbot.keyPress(viewer, K.Key_Control)
    qtbot.keyPress(viewer, K.Key_Alt, CTRL)
    qtbot.keyClick(viewer, K.Key_S, CTRL | ALT)
    qtbot.keyRelease(viewer, K.Key_Alt, CTRL)
    qtbot.keyRelease(viewer, K.Key_Control)
    qtbot.keyClicks(viewer, "z")  # Ctrl is not stuck: a plain z arrives
    wait_serial(aloop, serial, r"^key z\r?$", since)
    assert rec.seen == [("shortcut", "Ctrl+Alt+S")]
    assert re.findall(r"^key [^\r\n]*", serial.text(since), re.MULTILINE) == ["key z"]


def tablet(v: VncViewer, pos: QPoint) -> tuple[int, int]:
    """Where QEMU's USB tablet puts a framebuffer position (0..32767 across the screen)."""
    x, y = v.to_framebuffer(QPointF(pos))
    size = v.framebuffer_size()
    return x * 0x7FFF // size.width(), y * 0x7FFF // size.height()


@pytest.mark.qemu
def test_qemu_click_lands_where_clicked(sm: Sm, guest: tuple[Path, Path], viewer: VncViewer,
                                        aloop: asyncio.AbstractEventLoop, qtbot: Any) -> None:
    socket, serial = boot(sm, guest, "point")
    show(aloop, viewer, socket)
    viewer.resize(900, 400)
    settle(aloop, 0.05)
    r = viewer.picture_rect()
    size = viewer.framebuffer_size()
    assert r.width() / r.height() == pytest.approx(size.width() / size.height(), rel=0.01)
    wait(aloop, viewer.pointer_absolute, "absolute pointer mode", 30)

    for pos in (QPoint(int(r.left() + r.width() / 4), int(r.top() + r.height() * 3 / 4)),
                QPoint(int(r.right() - 3), int(r.top() + 2)),
                QPoint(2, 200)):  # outside the picture, in the bar: the left edge
        since = serial.size()
        qtbot.mouseClick(viewer, Qt.MouseButton.LeftButton, pos=pos)
        m = wait_serial(aloop, serial, r"^click (\d+) (\d+)\r?$", since)
        want = tablet(viewer, pos)
        step = (0x7FFF // size.width() + 1, 0x7FFF // size.height() + 1)  # one framebuffer pixel
        got = int(m[1]), int(m[2])
        assert abs(got[0] - want[0]) <= step[0] and abs(got[1] - want[1]) <= step[1], (pos, got, want)
    assert int(m[1]) <= step[0]


@pytest.mark.qemu
def test_qemu_mode_change_resizes(sm: Sm, guest: tuple[Path, Path], viewer: VncViewer,
                                  aloop: asyncio.AbstractEventLoop, qtbot: Any) -> None:
    socket, serial = boot(sm, guest, "mode")
    rec = show(aloop, viewer, socket)
    before = viewer.framebuffer_size().toTuple()
    since = serial.size()
    qtbot.keyClicks(viewer, "M")
    m = wait_serial(aloop, serial, r"^mode (\d+)x(\d+)\r?$", since, timeout=60)
    new = int(m[1]), int(m[2])
    assert new != before
    wait(aloop, lambda: ("resized", *new) in rec.seen, f"resized{new}")
    assert viewer.framebuffer_size().toTuple() == new
    viewer.resize(new[0] // 2 + 100, new[1] // 2)  # wider than the picture: bars left and right
    settle(aloop, 0.05)
    r = viewer.picture_rect()
    assert r.toRect().getRect() == (50, 0, new[0] // 2, new[1] // 2)
    img = viewer.grab().toImage()
    assert img.pixelColor(10, 10) == BACKGROUND and img.pixelColor(viewer.width() - 10, 10) == BACKGROUND

    since = serial.size()
    qtbot.keyClicks(viewer, "P")  # the guest paints whole random frames
    wait_serial(aloop, serial, r"^paint on\r?$", since)
    changes(aloop, viewer)
    assert not uniform(viewer.grab().toImage().copy(r.toRect()))


@pytest.mark.qemu
def test_qemu_picture_comes_back_after_restore(sm: Sm, guest: tuple[Path, Path], viewer: VncViewer,
                                               aloop: asyncio.AbstractEventLoop, qtbot: Any) -> None:
    socket, serial = boot(sm, guest, "back")
    rec = show(aloop, viewer, socket)
    ckpt = sm("checkpoint", "back", "--json").json()["id"]
    serial.wait_counter(serial.counters()[-1] + 2)

    restore = aloop.run_until_complete(asyncio.to_thread(sm, "restore", "back", ckpt))
    assert restore.returncode == 0
    wait(aloop, lambda: rec.names().count("connected") >= 2, "the viewer to connect again", 60)
    names = rec.names()
    assert names[0] == "connected" and names.index("connected", names.index("disconnected")) > 0
    assert viewer.status_text() == ""
    changes(aloop, viewer)  # frames resume: the restored guest's counter ticks on screen

    since = serial.size()
    qtbot.keyClicks(viewer, "k")
    wait_serial(aloop, serial, r"^key k\r?$", since)

    # The machine goes away and comes back: the viewer says so, then shows it again.
    sm.kill_all()
    wait(aloop, lambda: not viewer.is_connected(), "the viewer to notice", 30)
    assert rec.names()[-1] == "disconnected"
    img = viewer.grab().toImage()
    assert img.pixelColor(5, 5) == BACKGROUND
    sm("start", "back")
    wait(aloop, lambda: viewer.is_connected(), "the viewer to connect to the new machine", 60)
    wait(aloop, lambda: not uniform(viewer.grab().toImage()), "a picture", 60)
    changes(aloop, viewer, 60)
