"""The global keyboard shortcut: an X11 key grab where Qt runs on xcb, nothing elsewhere.

On X11 the shortcut is grabbed with ``XGrabKey`` on the root window through an X connection of
our own (python-xlib), read by a ``QSocketNotifier`` on Qt's event loop.  Wayland has no global
shortcuts without the XDG GlobalShortcuts portal, which Debian 12 ships only in KDE's portal
backend; there, and on any other platform, :attr:`GlobalHotkey.backend` is ``"none"`` and
:attr:`GlobalHotkey.reason` says so in one sentence the settings dialog can show.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial

from PySide6.QtCore import QObject, QSocketNotifier, Qt, Signal
from PySide6.QtGui import QGuiApplication, QKeySequence
from Xlib import XK, X
from Xlib.display import Display
from Xlib.error import (
    BadAccess,
    CatchError,
    ConnectionClosedError,
    DisplayError,
    XError,
)
from Xlib.protocol import rq

from session_manager.errors import UsageError

log = logging.getLogger(__name__)

_K = Qt.Key
_M = Qt.KeyboardModifier
_MOD_MASK = int(Qt.KeyboardModifier.KeyboardModifierMask.value)
_CTRL, _ALT, _SHIFT, _META, _KEYPAD = (int(m.value) for m in (_M.ControlModifier, _M.AltModifier,
                                                             _M.ShiftModifier, _M.MetaModifier,
                                                             _M.KeypadModifier))

# Keys that are modifiers or locks themselves: a shortcut needs a key besides these.
_MODIFIER_KEYS = {int(k.value) for k in (
    _K.Key_Shift, _K.Key_Control, _K.Key_Meta, _K.Key_Alt, _K.Key_AltGr, _K.Key_CapsLock, _K.Key_NumLock,
    _K.Key_ScrollLock, _K.Key_Super_L, _K.Key_Super_R, _K.Key_Hyper_L, _K.Key_Hyper_R, _K.Key_Mode_switch,
    _K.Key_unknown)} | {0}

# Qt's special keys (>= 0x01000000) that have an X keysym, by keysym name.
_SPECIAL_KEYSYMS = {int(k.value): name for k, name in (
    (_K.Key_Escape, "Escape"), (_K.Key_Tab, "Tab"), (_K.Key_Backtab, "ISO_Left_Tab"),
    (_K.Key_Backspace, "BackSpace"), (_K.Key_Return, "Return"), (_K.Key_Enter, "KP_Enter"),
    (_K.Key_Insert, "Insert"), (_K.Key_Delete, "Delete"), (_K.Key_Pause, "Pause"), (_K.Key_Print, "Print"),
    (_K.Key_SysReq, "Sys_Req"), (_K.Key_Clear, "Clear"), (_K.Key_Home, "Home"), (_K.Key_End, "End"),
    (_K.Key_Left, "Left"), (_K.Key_Up, "Up"), (_K.Key_Right, "Right"), (_K.Key_Down, "Down"),
    (_K.Key_PageUp, "Prior"), (_K.Key_PageDown, "Next"), (_K.Key_Menu, "Menu"), (_K.Key_Help, "Help"),
)} | {int(_K.Key_F1.value) + n: f"F{n + 1}" for n in range(35)}

# With Qt's keypad modifier ("Num+"), these keys are the keypad's own.
_KEYPAD_KEYSYMS = {ord(c): f"KP_{c}" for c in "0123456789"} | {
    ord("+"): "KP_Add", ord("-"): "KP_Subtract", ord("*"): "KP_Multiply", ord("/"): "KP_Divide",
    ord("."): "KP_Decimal", ord("="): "KP_Equal"}

_NO_KEY_REASON = "No global shortcut registered."


@dataclass(frozen=True)
class Shortcut:
    """One key plus modifiers, as parsed from a QKeySequence's portable text."""

    text: str       # normalised portable text, e.g. "Ctrl+Alt+S"
    modifiers: int  # Qt modifier bits: Ctrl, Alt, Shift, Meta only
    keysym: int     # the X keysym of the key (lower case for letters)
    key_name: str   # the key alone, for messages: "S"


def parse_sequence(sequence: str) -> Shortcut:
    """Parse ``sequence`` (e.g. "Ctrl+Alt+S") or raise a one-sentence :class:`UsageError`."""
    seq = QKeySequence.fromString(sequence, QKeySequence.SequenceFormat.PortableText)
    text = seq.toString(QKeySequence.SequenceFormat.PortableText)
    if seq.count() == 0 or not text:
        raise UsageError(f"{sequence!r} is not a key combination; write one such as Ctrl+Alt+S.")
    if seq.count() > 1:
        raise UsageError(f"{text} is {seq.count()} key presses in a row; a global shortcut is one key "
                         "with modifiers, such as Ctrl+Alt+S.")
    # PySide6's stubs lack QKeySequence.__getitem__, which exists at runtime.
    combined: int = seq[0].toCombined()  # type: ignore[index]
    key, mods = combined & ~_MOD_MASK, combined & _MOD_MASK
    if key in _MODIFIER_KEYS:
        raise UsageError(f"{text} has no key besides modifiers; add one, as in Ctrl+Alt+S.")
    key_name = QKeySequence(key).toString(QKeySequence.SequenceFormat.PortableText)
    if mods & _KEYPAD and key in _KEYPAD_KEYSYMS:
        keysym = XK.string_to_keysym(_KEYPAD_KEYSYMS[key])
    elif key < 0x01000000:  # a character
        if not mods & (_CTRL | _ALT | _META):
            raise UsageError(f"{text} would take the key {key_name} away from every application; "
                             "add Ctrl, Alt or Meta.")
        char = chr(key).lower()
        keysym = ord(char) if len(char) == 1 and ord(char) <= 0xFF else 0x01000000 | key
    elif key in _SPECIAL_KEYSYMS:
        keysym = XK.string_to_keysym(_SPECIAL_KEYSYMS[key])
    else:
        raise UsageError(f"{text} uses a key that cannot be grabbed as a global shortcut; choose another key.")
    return Shortcut(text, mods & (_CTRL | _ALT | _SHIFT | _META), keysym, key_name)


class _X11Grab:
    """Our own X connection and the passive key grabs made through it."""

    def __init__(self, display_name: str) -> None:
        self.display = Display(display_name)
        self.display.set_error_handler(self._on_error)
        self.roots = [self.display.screen(n).root for n in range(self.display.screen_count())]
        self.shortcut: Shortcut | None = None
        self.keycode = 0
        self.mask = 0
        self._grabbed: set[int] = set()  # the masks grabbed for keycode: mask with Lock/NumLock variants
        self._read_masks()
        self._last_release = -1

    @staticmethod
    def _on_error(error: XError, request: object) -> None:
        log.warning("X error on the global-shortcut connection: %s", error)

    def _read_masks(self) -> None:
        """Which ModN masks Alt, Meta (Super) and NumLock are on, from the server's modifier mapping."""
        mapping = self.display.get_modifier_mapping()

        def mask_of(names: tuple[str, ...], default: int) -> int:
            for name in names:
                for keycode, _index in self.display.keysym_to_keycodes(XK.string_to_keysym(name)):
                    for bit, keycodes in enumerate(mapping):
                        if keycode in keycodes:
                            return 1 << bit
            return default

        self.alt = mask_of(("Alt_L", "Alt_R", "Meta_L"), X.Mod1Mask)
        self.meta = mask_of(("Super_L", "Super_R"), X.Mod4Mask)
        self.numlock = mask_of(("Num_Lock",), 0)
        # State bits a press may carry without changing which shortcut it is.
        self.ignored = X.LockMask | self.numlock

    def resolve(self, shortcut: Shortcut) -> tuple[int, int]:
        """The keycode and X modifier mask for ``shortcut`` on this server's keyboard mapping."""
        levels = sorted((index, keycode) for keycode, index in self.display.keysym_to_keycodes(shortcut.keysym)
                        if index < 2)  # 0: plain, 1: with Shift; higher levels need AltGr or another group
        if not levels:
            raise UsageError(f"No key on this keyboard types {shortcut.key_name} directly; choose another key.")
        index, keycode = levels[0]
        mods = shortcut.modifiers
        mask = ((X.ControlMask if mods & _CTRL else 0) | (self.alt if mods & _ALT else 0)
                | (X.ShiftMask if mods & _SHIFT or index == 1 else 0) | (self.meta if mods & _META else 0))
        return keycode, mask

    def _variants(self, mask: int) -> set[int]:
        return {mask | extra for extra in (0, X.LockMask, self.numlock, X.LockMask | self.numlock)}

    def grab(self, shortcut: Shortcut, keycode: int, mask: int) -> bool:
        """Grab ``keycode`` + ``mask`` with every Lock/NumLock variant; False if another client holds it."""
        self.ungrab()
        catch = CatchError(BadAccess)
        for root in self.roots:
            for variant in self._variants(mask):
                root.grab_key(keycode, variant, False, X.GrabModeAsync, X.GrabModeAsync, onerror=catch)
        self.display.sync()
        if catch.get_error() is not None:
            for root in self.roots:
                for variant in self._variants(mask):
                    root.ungrab_key(keycode, variant)
            self.display.sync()
            return False
        self.shortcut, self.keycode, self.mask, self._grabbed = shortcut, keycode, mask, self._variants(mask)
        return True

    def ungrab(self) -> None:
        """Release the grab and forget the shortcut."""
        self._release()
        self.shortcut = None

    def _release(self) -> None:
        """Release the grab but keep the shortcut, to grab it again when the keyboard mapping changes."""
        if self.keycode:
            for root in self.roots:
                for variant in self._grabbed:
                    root.ungrab_key(self.keycode, variant)
            self.display.sync()
        self.keycode, self.mask, self._grabbed = 0, 0, set()

    def read(self) -> int:
        """Handle every event the server has sent; return how many presses of the shortcut they hold."""
        presses = 0
        while self.display.pending_events():
            event = self.display.next_event()
            if event.type == X.MappingNotify:
                self._remap(event)
            elif event.type in (X.KeyPress, X.KeyRelease) and event.detail == self.keycode and self.keycode:
                if event.type == X.KeyRelease:
                    self._last_release = event.time
                # Autorepeat sends release + press with the same time: only a real press counts.
                elif event.time != self._last_release and event.state & ~self.ignored & 0xFF == self.mask:
                    presses += 1
        return presses

    def _remap(self, event: rq.Event) -> None:
        """The keyboard mapping changed: look the shortcut's key up again and move the grab if needed."""
        self.display.refresh_keyboard_mapping(event)
        self._read_masks()
        shortcut = self.shortcut
        if shortcut is None:
            return
        try:
            keycode, mask = self.resolve(shortcut)
        except UsageError as e:  # perhaps only for now, between two steps of a layout change
            log.warning("global shortcut %s is off after a keyboard mapping change: %s", shortcut.text, e)
            self._release()
            return
        if (keycode, mask, self._variants(mask)) != (self.keycode, self.mask, self._grabbed):
            if self.grab(shortcut, keycode, mask):
                log.info("global shortcut %s grabbed again after a keyboard mapping change", shortcut.text)
            else:
                self.shortcut = shortcut  # try again on the next mapping change
                log.warning("global shortcut %s is taken by another application after a keyboard mapping change",
                            shortcut.text)

    def close(self) -> None:
        try:
            self.ungrab()
        except (ConnectionClosedError, OSError):
            pass
        self.display.close()


class _Connection:
    """The live X connection and its notifier; separate from the QObject so destruction can close it."""

    def __init__(self) -> None:
        self.grab: _X11Grab | None = None
        self.notifier: QSocketNotifier | None = None

    def close(self) -> None:
        if self.notifier is not None:
            self.notifier.setEnabled(False)
            self.notifier.deleteLater()
            self.notifier = None
        if self.grab is not None:
            grab, self.grab = self.grab, None
            try:
                grab.close()
            except Exception:
                log.debug("closing the global-shortcut X connection failed", exc_info=True)


def _close_on_destroyed(conn: _Connection, *_: object) -> None:
    conn.close()


class GlobalHotkey(QObject):
    """A keyboard shortcut that works while any application has the focus (X11 only)."""

    activated = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.backend = "none"
        self.reason = _NO_KEY_REASON
        self._conn = _Connection()
        self.destroyed.connect(partial(_close_on_destroyed, self._conn))

    def register(self, sequence: str) -> str:
        """Grab ``sequence`` instead of any earlier one; return the backend now active ("x11" or "none").

        Raises :class:`UsageError` (and keeps the earlier shortcut) when ``sequence`` is not one key
        with modifiers, or no key of the keyboard types it.
        """
        shortcut = parse_sequence(sequence)
        works_elsewhere = f"{shortcut.text} works inside the viewer, or use the tray menu."
        platform = QGuiApplication.platformName()
        display_name = os.environ.get("DISPLAY", "")
        if platform != "xcb":
            self._conn.close()
            if platform.startswith("wayland"):
                return self._off(f"No global shortcuts on Wayland without the GlobalShortcuts portal; "
                                 f"{works_elsewhere}")
            return self._off(f"No global shortcuts on the {platform or 'current'} platform; {works_elsewhere}")
        if not display_name:
            self._conn.close()
            return self._off(f"No global shortcuts because $DISPLAY is not set; {works_elsewhere}")
        grab = self._conn.grab
        opened = grab is None
        if grab is None:
            try:
                grab = _X11Grab(display_name)
            except (DisplayError, ConnectionClosedError, OSError) as e:
                return self._off(f"No global shortcuts because the X display {display_name} "
                                 f"cannot be reached ({e}).")
        try:
            keycode, mask = grab.resolve(shortcut)
        except UsageError:
            if opened:
                grab.close()
            raise
        if opened:
            self._conn.grab = grab
            notifier = QSocketNotifier(grab.display.fileno(), QSocketNotifier.Type.Read, self)
            notifier.activated.connect(self._on_readable)
            self._conn.notifier = notifier
        if not grab.grab(shortcut, keycode, mask):
            self._conn.close()
            return self._off(f"{shortcut.text} is already taken by another application.")
        self.backend, self.reason = "x11", "Global shortcut active (X11 key grab)."
        log.info("global shortcut %s grabbed on X display %s", shortcut.text, display_name)
        self._on_readable()  # events read while waiting for replies are queued already
        return self.backend

    def unregister(self) -> None:
        """Release the grab and close the X connection."""
        self._conn.close()
        self.backend, self.reason = "none", _NO_KEY_REASON

    def _off(self, reason: str) -> str:
        self.backend, self.reason = "none", reason
        log.info("%s", reason)
        return self.backend

    def _on_readable(self, *_: object) -> None:
        grab = self._conn.grab
        if grab is None:
            return
        try:
            presses = grab.read()
        except (ConnectionClosedError, OSError) as e:
            log.warning("lost the X connection of the global shortcut: %s", e)
            self._conn.close()
            self._off("No global shortcuts because the connection to the X server was lost.")
            return
        for _press in range(presses):
            self.activated.emit()
