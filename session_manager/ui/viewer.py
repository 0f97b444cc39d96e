"""The embedded display: a widget that shows the session's screen and sends it keyboard and pointer input.

Like virt-manager's viewer, it knows nothing about QEMU's monitor: it is given the path of the VNC
socket and speaks RFB to it, or a way to open a display at another installation (a session that moved
there).  While a target is set it keeps (re)connecting, so the picture comes back by itself when the
machine restarts or a checkpoint is restored.  The session's sound comes along (unless muted) and plays
through services/sound.py.  Everything runs on the asyncio loop that qasync puts on
Qt's event loop; nothing blocks the UI thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import shiboken6
from PySide6.QtCore import QEvent, QKeyCombination, QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import (
    QColor,
    QCursor,
    QFocusEvent,
    QGuiApplication,
    QImage,
    QKeyEvent,
    QKeySequence,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QResizeEvent,
    QWheelEvent,
)
from PySide6.QtWidgets import QApplication, QWidget

from ..errors import SessionManagerError
from ..rfb import RfbClient, RfbError
from ..services.sound import SoundOut
from . import keymap

log = logging.getLogger(__name__)

CONNECTING = "Connecting to the session…"
NOT_RUNNING = "The session is not running"
RECONNECTING = "Reconnecting…"

BACKGROUND = QColor(0x20, 0x20, 0x24)
STATUS_COLOUR = QColor(0xC8, 0xC8, 0xC8)

SHIFT_L = 0x2A
SHIFT_R = 0x36
SHIFT_KEYSYM = 0xFFE1

_MODIFIERS = (Qt.KeyboardModifier.ShiftModifier | Qt.KeyboardModifier.ControlModifier
              | Qt.KeyboardModifier.AltModifier | Qt.KeyboardModifier.MetaModifier)
_BUTTONS = {Qt.MouseButton.LeftButton: 1, Qt.MouseButton.MiddleButton: 2, Qt.MouseButton.RightButton: 4}
WHEEL_UP = 8
WHEEL_DOWN = 16
WHEEL_STEP = 120  # angleDelta units of one notch


class _Tasks:
    """The viewer's asyncio task, kept outside the widget so it can be cancelled when the widget is destroyed."""

    def __init__(self) -> None:
        self.task: asyncio.Future[None] | None = None

    def cancel(self, *_: object) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None


def native_keycodes_are_x11() -> bool:
    """Whether ``QKeyEvent.nativeScanCode()`` is an X11/xkb keycode (evdev + 8) on this platform."""
    return QGuiApplication.platformName() in ("xcb", "wayland")


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the viewer's connection task failed", exc_info=task.exception())


class VncViewer(QWidget):
    """Shows a VNC display, given by its unix socket path or at another installation, and forwards input to it."""

    connected = Signal()
    disconnected = Signal(str)
    resized = Signal(int, int)  # the remote screen's new size
    areaResized = Signal()  # this widget changed size: see device_size()
    keyboardGrabbed = Signal(bool)
    shortcutPressed = Signal(str)
    soundFailed = Signal(str)  # the sentence saying why the session's sound cannot play

    RETRY_INTERVAL = 0.5
    """Seconds between connection attempts while the display cannot be reached."""
    PEER_RETRY_INTERVAL = 3.0
    """The same for a display at another installation (each attempt is a call to its agent)."""
    CONNECT_TIMEOUT = 10.0
    """Seconds one attempt (connect + RFB handshake) may take."""
    GIVE_UP_HOPE = 5.0
    """After this many seconds of refused connections the status says the session is not running."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setMouseTracking(True)
        self.setAttribute(Qt.WidgetAttribute.WA_OpaquePaintEvent)
        self.setAttribute(Qt.WidgetAttribute.WA_InputMethodEnabled, False)
        self._tasks = _Tasks()
        self._closing: list[asyncio.Future[None]] = []
        self.destroyed.connect(self._tasks.cancel)
        self._sound = SoundOut(self.soundFailed.emit)
        self.destroyed.connect(self._sound.stop)
        self._muted = False
        self._path: str | None = None
        self._client: RfbClient | None = None
        self._status = ""
        self._fb: bytearray | None = None
        self._view: memoryview | None = None
        self._image: QImage | None = None
        self._down: dict[tuple[str, int], tuple[int, int | None]] = {}
        self._shortcuts: list[QKeySequence] = []
        self._buttons = 0
        self._wheel = 0
        self._scaled = True
        self._grabbed = False
        self._absolute = False

    # -- public API ----------------------------------------------------------------
    def connect_to(self, path: str | Path) -> None:
        """Show the VNC display at ``path``; keep reconnecting to it until :meth:`disconnect_`."""
        path = str(path)
        self._show(path, lambda: RfbClient.open_unix(path), None)

    def follow(self, peer: str, open_display: Callable[[], Awaitable[RfbClient]]) -> None:
        """Show a display at the installation ``peer``, opened by ``open_display``, and keep reconnecting to it as
        to a socket; while it cannot be reached the widget says why (the SessionManagerError's sentence)."""
        self._show(peer, open_display, peer)

    def _show(self, target: str, open_display: Callable[[], Awaitable[RfbClient]], peer: str | None) -> None:
        if target == self._path and self._tasks.task is not None:
            return
        self.disconnect_()
        self._path = target
        self._set_status(f"Connecting to {peer}…" if peer else CONNECTING)
        self._tasks.task = asyncio.ensure_future(self._run(target, open_display, peer))
        self._tasks.task.add_done_callback(_log_failure)

    def disconnect_(self) -> None:
        """Stop showing the display (emits ``disconnected`` if it was connected).

        The socket is closed in the background; ``await viewer.wait_closed()`` waits for that.
        """
        self._path = None
        if self._tasks.task is not None:
            self._closing.append(self._tasks.task)
        self._tasks.cancel()
        client = self._client
        if client is not None:
            self._detach()
            self._closing.append(asyncio.ensure_future(client.close()))
            self.disconnected.emit("Disconnected.")
        self._set_status("")

    async def wait_closed(self) -> None:
        """Wait until the connections dropped by :meth:`disconnect_` are closed."""
        closing, self._closing = self._closing, []
        await asyncio.gather(*closing, return_exceptions=True)

    def target(self) -> str | None:
        """The socket path, or the peer, being shown or waited for."""
        return self._path

    def is_connected(self) -> bool:
        return self._client is not None

    def status_text(self) -> str:
        """What the widget says instead of a picture while it is not connected ("" when connected)."""
        return "" if self._client is not None else self._status

    def framebuffer_size(self) -> QSize:
        """The remote screen's size, or an empty size while not connected."""
        c = self._client
        return QSize(c.width, c.height) if c is not None else QSize()

    def set_scaled(self, scaled: bool) -> None:
        """Scale the picture to the widget keeping its aspect (the default), or show it 1:1."""
        self._scaled = scaled
        self.updateGeometry()
        self.update()

    def is_scaled(self) -> bool:
        return self._scaled

    def set_shortcuts(self, shortcuts: Iterable[QKeySequence | str]) -> None:
        """Key combinations kept from the guest: pressing one emits ``shortcutPressed`` instead."""
        self._shortcuts = [s if isinstance(s, QKeySequence) else QKeySequence(s) for s in shortcuts]

    def shortcuts(self) -> list[QKeySequence]:
        return list(self._shortcuts)

    def set_keyboard_grab(self, grab: bool) -> None:
        """Send every key to this widget (and so the guest), even those the desktop would take."""
        if grab:
            self.grabKeyboard()
        else:
            self.releaseKeyboard()
        if grab != self._grabbed:
            self._grabbed = grab
            self.keyboardGrabbed.emit(grab)

    def keyboard_grabbed(self) -> bool:
        return self._grabbed

    def set_muted(self, muted: bool) -> None:
        """Stop the session's sound: the server is told to send none, and the player stops (or start it again)."""
        self._muted = muted
        if self._client is not None:
            self._client.set_audio(not muted)
        if muted:
            self._sound.stop()

    def is_muted(self) -> bool:
        return self._muted

    def send_ctrl_alt_del(self) -> None:
        if self._client is not None:
            self._client.send_ctrl_alt_del()

    def picture_rect(self) -> QRectF:
        """Where the remote screen is drawn, in widget coordinates (letterboxed when scaled)."""
        c = self._client
        if c is None or c.width <= 0 or c.height <= 0:
            return QRectF()
        w, h = self.width(), self.height()
        if self._scaled:
            scale = min(w / c.width, h / c.height)
        else:
            scale = 1.0
        pw, ph = c.width * scale, c.height * scale
        return QRectF(max((w - pw) / 2, 0.0), max((h - ph) / 2, 0.0), pw, ph)

    def to_framebuffer(self, pos: QPointF) -> tuple[int, int]:
        """A widget position as framebuffer coordinates, clamped to the screen."""
        c = self._client
        r = self.picture_rect()
        if c is None or r.isEmpty():
            return 0, 0
        x = int((pos.x() - r.x()) * c.width / r.width())
        y = int((pos.y() - r.y()) * c.height / r.height())
        return min(max(x, 0), c.width - 1), min(max(y, 0), c.height - 1)

    # -- connection ------------------------------------------------------------------
    async def _run(self, target: str, open_display: Callable[[], Awaitable[RfbClient]], peer: str | None) -> None:
        """Show the display ``target`` (a socket path, or ``peer``) until cancelled, reconnecting when it goes."""
        failing_since: float | None = None
        while True:
            try:
                client = await asyncio.wait_for(open_display(), self.CONNECT_TIMEOUT)
            except (TimeoutError, OSError, SessionManagerError) as e:
                now = time.monotonic()
                failing_since = failing_since or now
                log.debug("display %s not reachable: %s", target, e)
                if peer is not None:
                    self._set_status(str(e) if isinstance(e, SessionManagerError) else f"{peer} did not show the "
                                     f"session's screen ({str(e) or 'no answer'}); trying again.")
                elif not Path(target).exists() or now - failing_since > self.GIVE_UP_HOPE:
                    self._set_status(NOT_RUNNING)
                await asyncio.sleep(self.PEER_RETRY_INTERVAL if peer else self.RETRY_INTERVAL)
                continue
            failing_since = None
            self._attach(client)
            reason = "The session closed its display."
            try:
                await client.run()
            except RfbError as e:
                reason = str(e)
            except OSError as e:
                reason = f"The display connection broke: {e}."
            finally:
                if self._client is client and shiboken6.isValid(self):
                    self._detach()
                with contextlib.suppress(RfbError, OSError):
                    await client.close()
            log.info("display %s lost: %s", target, reason)
            self._set_status(RECONNECTING)
            self.disconnected.emit(reason)
            await asyncio.sleep(self.RETRY_INTERVAL / 5)

    def _attach(self, client: RfbClient) -> None:
        self._client = client
        client.on_update = self._on_update
        client.on_resize = self._on_resize
        client.on_pointer_mode = self._on_pointer_mode
        client.on_bell = QApplication.beep
        client.on_audio = self._sound.play
        client.set_audio(not self._muted)
        self._wrap_framebuffer()
        self._down.clear()
        self._buttons = 0
        self._on_pointer_mode(bool(client.absolute_pointer))
        self.updateGeometry()
        self.update()
        self.connected.emit()
        self.resized.emit(client.width, client.height)

    def _detach(self) -> None:
        client = self._client
        if client is not None:
            client.on_update = client.on_resize = client.on_pointer_mode = client.on_bell = None
            client.on_audio = None
        self._sound.stop()
        self._client = None
        self._down.clear()
        self._unwrap_framebuffer()
        self._on_pointer_mode(False)
        self.update()

    def _set_status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self.update()

    # -- picture -----------------------------------------------------------------------
    def _wrap_framebuffer(self) -> None:
        """A QImage over the client's framebuffer, without copying it.

        The memoryview pins the bytearray's buffer: while it exists the bytearray cannot be resized
        (the client allocates a new one on a resize), so the QImage never points at freed memory.
        """
        self._unwrap_framebuffer()
        c = self._client
        if c is None or c.width <= 0 or c.height <= 0:
            return
        self._fb = c.framebuffer
        self._view = memoryview(self._fb)
        self._image = QImage(self._view, c.width, c.height, c.width * 4, QImage.Format.Format_RGB32)

    def _unwrap_framebuffer(self) -> None:
        self._image = None  # the QImage goes before the buffer it points into
        if self._view is not None:
            self._view.release()
        self._view = None
        self._fb = None

    def _on_update(self, x: int, y: int, w: int, h: int) -> None:
        c = self._client
        r = self.picture_rect()
        if c is None or r.isEmpty():
            return
        sx, sy = r.width() / c.width, r.height() / c.height
        dirty = QRectF(r.x() + x * sx, r.y() + y * sy, w * sx, h * sy)
        self.update(dirty.toAlignedRect().adjusted(-1, -1, 1, 1))  # smooth scaling reads one pixel around

    def _on_resize(self, width: int, height: int) -> None:
        self._wrap_framebuffer()
        self.updateGeometry()
        self.update()
        self.resized.emit(width, height)

    def _on_pointer_mode(self, absolute: bool) -> None:
        self._absolute = absolute
        self._update_cursor(self.mapFromGlobal(QCursor.pos()).toPointF())

    def _update_cursor(self, pos: QPointF) -> None:
        """No local cursor over the picture while the guest draws its own (absolute pointer)."""
        hide = self._absolute and self.picture_rect().contains(pos)
        if hide and self.cursor().shape() != Qt.CursorShape.BlankCursor:
            self.setCursor(Qt.CursorShape.BlankCursor)
        elif not hide and self.testAttribute(Qt.WidgetAttribute.WA_SetCursor):
            self.unsetCursor()

    def pointer_absolute(self) -> bool:
        """Whether the server takes absolute pointer positions (a tablet); the local cursor is hidden then."""
        return self._absolute

    def paintEvent(self, event: QPaintEvent) -> None:
        p = QPainter(self)
        c = self._client
        if c is None:
            p.fillRect(self.rect(), BACKGROUND)
            if self._status:
                p.setPen(STATUS_COLOUR)
                font = p.font()
                font.setPointSizeF(font.pointSizeF() * 1.3)
                p.setFont(font)
                p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, self._status)
            return
        if self._fb is not c.framebuffer or self._image is None:
            self._wrap_framebuffer()  # a client that reallocated without telling
        target = self.picture_rect()
        outer = QRectF(self.rect())
        # Letterbox bars: the system clip keeps this to the exposed area.
        for bar in (QRectF(0, 0, outer.width(), target.top()),
                    QRectF(0, target.bottom(), outer.width(), outer.height() - target.bottom()),
                    QRectF(0, target.top(), target.left(), target.height()),
                    QRectF(target.right(), target.top(), outer.width() - target.right(), target.height())):
            if bar.width() > 0 and bar.height() > 0:
                p.fillRect(bar, BACKGROUND)
        if self._image is not None:
            p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, target.width() != c.width)
            p.drawImage(target, self._image)  # drawn only inside the exposed region

    def sizeHint(self) -> QSize:
        c = self._client
        return QSize(c.width, c.height) if c is not None and c.width > 0 else QSize(1024, 768)

    def minimumSizeHint(self) -> QSize:
        return QSize(160, 120)

    def resizeEvent(self, event: QResizeEvent) -> None:
        self.update()
        super().resizeEvent(event)
        self.areaResized.emit()

    def device_size(self) -> QSize:
        """This widget's size in device pixels: a remote screen of this size is shown sharp, unscaled."""
        ratio = self.devicePixelRatioF()
        return QSize(round(self.width() * ratio), round(self.height() * ratio))

    # -- keyboard ----------------------------------------------------------------------
    def focusNextPrevChild(self, next: bool) -> bool:
        return False  # Tab and Shift+Tab belong to the guest

    def event(self, event: QEvent) -> bool:
        # Keys pressed over the picture go to the guest, not to the window's shortcuts (except ours).
        if event.type() == QEvent.Type.ShortcutOverride and self._client is not None:
            assert isinstance(event, QKeyEvent)
            if self._matching_shortcut(event) is None:
                event.accept()
                return True
        return super().event(event)

    def _matching_shortcut(self, event: QKeyEvent) -> QKeySequence | None:
        mods = event.modifiers() & _MODIFIERS
        try:
            combined = QKeyCombination(mods, Qt.Key(event.key())).toCombined()
        except ValueError:
            return None
        for seq in self._shortcuts:
            # PySide6's stubs lack QKeySequence.__getitem__, which exists at runtime.
            if seq.count() == 1 and seq[0].toCombined() == combined:  # type: ignore[index]
                return seq
        return None

    def keyPressEvent(self, event: QKeyEvent) -> None:
        seq = self._matching_shortcut(event)
        if seq is not None:
            if not event.isAutoRepeat():
                self._release_all_keys()
                self.shortcutPressed.emit(seq.toString(QKeySequence.SequenceFormat.PortableText))
            event.accept()
            return
        self._key(event, True)
        event.accept()

    def keyReleaseEvent(self, event: QKeyEvent) -> None:
        if not event.isAutoRepeat():  # X11 auto-repeat comes as release+press pairs: keep the key down
            self._key(event, False)
        event.accept()

    def focusOutEvent(self, event: QFocusEvent) -> None:
        self._release_all_keys()  # the guest must not see a key stuck down
        super().focusOutEvent(event)

    def _release_all_keys(self) -> None:
        c = self._client
        down, self._down = self._down, {}
        if c is None:
            return
        for sym, scancode in reversed(list(down.values())):
            c.key_event(False, sym, scancode)

    def _key(self, event: QKeyEvent, down: bool) -> None:
        c = self._client
        if c is None:
            return
        native = event.nativeScanCode()
        use_native = native > keymap.X_KEYCODE_OFFSET and native_keycodes_are_x11()
        ident = ("native", native) if use_native else ("qt", event.key())
        if not down:
            sent = self._down.pop(ident, None)
            if sent is not None:
                c.key_event(False, *sent)
            return
        key, text = event.key(), event.text()
        keypad = bool(event.modifiers() & Qt.KeyboardModifier.KeypadModifier)
        shift = bool(event.modifiers() & Qt.KeyboardModifier.ShiftModifier)
        sym = keymap.keysym(key, text, keypad, shift)
        need_shift = False
        if use_native:
            scancode = keymap.x_keycode_to_xt(native)
        else:
            scancode = keymap.qt_key_to_xt(key, keypad)
            if len(text) == 1 and key not in keymap.SPECIAL_KEYS and not keypad:
                hit = keymap.char_to_xt(text)
                if hit is not None:
                    scancode, need_shift = hit
        if sym is None and (scancode is None or not c.supports_ext_keys):
            return
        # Without a native scancode the key comes from the typed character (US layout): give it the
        # Shift it needs if the guest does not have one down already.
        wrap = need_shift and not any(sc in (SHIFT_L, SHIFT_R) for _, sc in self._down.values())
        if wrap:
            c.key_event(True, SHIFT_KEYSYM, SHIFT_L)
        c.key_event(True, sym or 0, scancode)
        if wrap:
            c.key_event(False, SHIFT_KEYSYM, SHIFT_L)
        self._down[ident] = (sym or 0, scancode)

    # -- pointer -----------------------------------------------------------------------
    def _pointer(self, pos: QPointF, buttons: int) -> None:
        c = self._client
        if c is None:
            return
        x, y = self.to_framebuffer(pos)
        c.pointer_event(x, y, buttons)

    def _mask(self, event: QMouseEvent | QWheelEvent) -> int:
        mask = 0
        for button, bit in _BUTTONS.items():
            if event.buttons() & button:
                mask |= bit
        return mask

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        self._update_cursor(event.position())
        self._buttons = self._mask(event)
        self._pointer(event.position(), self._buttons)

    def mousePressEvent(self, event: QMouseEvent) -> None:
        self.setFocus(Qt.FocusReason.MouseFocusReason)
        self._buttons = self._mask(event)
        self._pointer(event.position(), self._buttons)

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        self._buttons = self._mask(event)
        self._pointer(event.position(), self._buttons)

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:
        self.mousePressEvent(event)  # the guest sees two clicks and decides for itself

    def wheelEvent(self, event: QWheelEvent) -> None:
        self._wheel += event.angleDelta().y()
        buttons = self._mask(event)
        while abs(self._wheel) >= WHEEL_STEP:
            bit = WHEEL_UP if self._wheel > 0 else WHEEL_DOWN
            self._wheel -= WHEEL_STEP if self._wheel > 0 else -WHEEL_STEP
            self._pointer(event.position(), buttons | bit)
            self._pointer(event.position(), buttons)
        event.accept()


__all__ = ["CONNECTING", "NOT_RUNNING", "RECONNECTING", "VncViewer"]
