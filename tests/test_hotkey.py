"""The global shortcut: sequence parsing, the backend choice, and real X11 key grabs on Xvfb.

The X11 tests run the Qt side in a subprocess on the xcb platform (this process is offscreen, and
a QApplication's platform cannot change) and press keys with xdotool.  Needs apt: xvfb xdotool,
plus the xcb libraries Qt loads (see the notes).
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from Xlib import XK, X
from Xlib.display import Display
from Xlib.error import BadAccess, CatchError

from helpers import ROOT
from helpers.x11 import Xvfb, xlib_display
from session_manager.errors import UsageError
from session_manager.ui import hotkey
from session_manager.ui.hotkey import GlobalHotkey, parse_sequence


def grab_from_other_client(display: Display, key: str | int, mask: int) -> bool:
    """Grab ``key`` (keysym name or keycode) + ``mask`` on ``display`` (another client); False on BadAccess."""
    keycode = key if isinstance(key, int) else display.keysym_to_keycode(XK.string_to_keysym(key))
    catch = CatchError(BadAccess)
    display.screen().root.grab_key(keycode, mask, False, X.GrabModeAsync, X.GrabModeAsync, onerror=catch)
    display.sync()
    return catch.get_error() is None


# --- the app side, in its own process on xcb ----------------------------------------------------

PROBE = r"""
import logging, os, sys
import shiboken6
from PySide6.QtCore import QObject, QSocketNotifier
from PySide6.QtWidgets import QApplication
from session_manager.errors import UsageError
from session_manager.ui.hotkey import GlobalHotkey

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="log %(message)s")
app = QApplication([])
owner = QObject()
hk = GlobalHotkey(owner)
hk.activated.connect(lambda: print("activated", flush=True))
hk.destroyed.connect(lambda: print("destroyed", flush=True))
pending = b""

def on_stdin(*_):
    global pending
    data = os.read(0, 4096)
    if not data:
        app.quit()
        return
    pending += data
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        cmd, _, arg = line.decode().partition(" ")
        if cmd == "register":
            try:
                backend = hk.register(arg)
                print("backend", backend, hk.backend, hk.reason, flush=True)
            except UsageError as e:
                print("usage-error", e, flush=True)
        elif cmd == "unregister":
            hk.unregister()
            print("backend", hk.backend, hk.backend, hk.reason, flush=True)
        elif cmd == "delete-owner":
            shiboken6.delete(owner)
            print("deleted", flush=True)

notifier = QSocketNotifier(0, QSocketNotifier.Type.Read)
notifier.activated.connect(on_stdin)
print("platform", app.platformName(), flush=True)
app.exec()
"""


class Probe:
    """The probe process: send a command, read its reply; count "activated" lines as they come."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.replies: queue.Queue[str] = queue.Queue()
        self.activations = 0
        self.logs: list[str] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            assert self.reply() == "platform xcb"
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "activated":
                with self.lock:
                    self.activations += 1
            elif line.startswith("log "):
                with self.lock:
                    self.logs.append(line[4:].rstrip("\n"))
            else:
                self.replies.put(line.rstrip("\n"))
        self.replies.put("<eof>")

    def reply(self, timeout: float = 20) -> str:
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply from the probe in {timeout} s") from None
        if line == "<eof>":
            assert self.proc.stderr is not None
            raise AssertionError(f"the probe exited ({self.proc.wait()}): {self.proc.stderr.read()}")
        return line

    def send(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def register(self, sequence: str) -> tuple[str, str]:
        """Register ``sequence``; return (backend, reason) and check register()'s return value agrees."""
        reply = self.send(f"register {sequence}")
        word, returned, backend, reason = reply.split(" ", 3)
        assert (word, returned) == ("backend", backend), reply
        return backend, reason

    def wait_log(self, message: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while message not in self.logs:
            assert time.monotonic() < deadline, f"{message!r} not logged; the log: {self.logs}"
            time.sleep(0.01)

    def count(self) -> int:
        with self.lock:
            return self.activations

    def expect(self, total: int, timeout: float = 10, quiet: float = 0.4) -> None:
        """Wait until ``total`` activations have arrived, then make sure no more follow."""
        deadline = time.monotonic() + timeout
        while self.count() < total and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(quiet)
        assert self.count() == total

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.reader.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def probe(xvfb: Xvfb) -> Iterator[Probe]:
    p = Probe(xvfb.env)
    yield p
    p.close()


@pytest.fixture
def other_client(xvfb: Xvfb) -> Iterator[Display]:
    d = xlib_display(xvfb.display)
    yield d
    d.close()


CTRL_ALT = X.ControlMask | X.Mod1Mask


# --- X11 ----------------------------------------------------------------------------------------

def test_x11_shortcut_activates_once_per_press(xvfb: Xvfb, probe: Probe) -> None:
    assert probe.register("Ctrl+Alt+S") == ("x11", "Global shortcut active (X11 key grab).")
    for n in range(1, 4):
        xvfb.xdotool("key", "ctrl+alt+s")
        probe.expect(n)
    # Other combinations of the same key, and other keys, do nothing; the X events arrive in order,
    # so a wrong activation would show before the next right one.
    for combo in ("ctrl+alt+d", "ctrl+s", "alt+s", "s", "ctrl+alt+shift+s"):
        xvfb.xdotool("key", combo)
    xvfb.xdotool("key", "ctrl+alt+s")
    probe.expect(4)


def test_x11_shortcut_with_numlock_and_capslock_on(xvfb: Xvfb, probe: Probe) -> None:
    assert probe.register("ctrl+alt+s")[0] == "x11"
    xvfb.xdotool("key", "Num_Lock")
    xvfb.xdotool("key", "ctrl+alt+s")
    probe.expect(1)
    xvfb.xdotool("key", "Caps_Lock")
    xvfb.xdotool("key", "ctrl+alt+s")
    probe.expect(2)
    xvfb.xdotool("key", "Num_Lock")
    xvfb.xdotool("key", "ctrl+alt+s")
    probe.expect(3)


def test_x11_held_shortcut_activates_once(xvfb: Xvfb, probe: Probe) -> None:
    """Xvfb autorepeats a held key (release + press pairs); that is still one press."""
    assert probe.register("Ctrl+Alt+S")[0] == "x11"
    xvfb.xdotool("keydown", "ctrl+alt+s")
    time.sleep(1.2)  # the server's autorepeat starts after 660 ms
    xvfb.xdotool("keyup", "s", "alt", "ctrl")
    xvfb.xdotool("key", "ctrl+alt+s")
    probe.expect(2)


def test_x11_reregister_replaces_the_grab(xvfb: Xvfb, probe: Probe, other_client: Display) -> None:
    assert probe.register("Ctrl+Alt+S")[0] == "x11"
    assert probe.register("Ctrl+Shift+K") == ("x11", "Global shortcut active (X11 key grab).")
    xvfb.xdotool("key", "ctrl+alt+s")
    xvfb.xdotool("key", "ctrl+shift+k")
    probe.expect(1)
    assert grab_from_other_client(other_client, "s", CTRL_ALT)  # the old grab is gone
    assert not grab_from_other_client(other_client, "k", X.ControlMask | X.ShiftMask)

    # A sequence that cannot be grabbed raises and leaves the current shortcut alone.
    assert probe.send("register Ctrl+Alt") == \
        "usage-error Ctrl+Alt has no key besides modifiers; add one, as in Ctrl+Alt+S."
    assert probe.send("register Ctrl+S, Ctrl+D").startswith("usage-error Ctrl+S, Ctrl+D is 2 key presses")
    xvfb.xdotool("key", "ctrl+shift+k")
    probe.expect(2)


def test_x11_taken_by_another_application(xvfb: Xvfb, probe: Probe) -> None:
    blocker = xlib_display(xvfb.display)
    assert grab_from_other_client(blocker, "s", CTRL_ALT)
    assert probe.register("Ctrl+Alt+S") == ("none", "Ctrl+Alt+S is already taken by another application.")
    xvfb.xdotool("key", "ctrl+alt+s")
    # The variants it managed to grab before the conflict were released again.
    assert grab_from_other_client(blocker, "s", CTRL_ALT | X.Mod2Mask)
    assert grab_from_other_client(blocker, "s", CTRL_ALT | X.LockMask | X.Mod2Mask)
    blocker.close()

    assert probe.register("Ctrl+Alt+S")[0] == "x11"
    xvfb.xdotool("key", "ctrl+alt+s")
    probe.expect(1)


def test_x11_unregister_and_destruction_release_the_grab(xvfb: Xvfb, probe: Probe, other_client: Display) -> None:
    assert probe.register("Ctrl+Alt+S")[0] == "x11"
    assert not grab_from_other_client(other_client, "s", CTRL_ALT)
    assert probe.send("unregister") == "backend none none No global shortcut registered."
    xvfb.xdotool("key", "ctrl+alt+s")
    probe.expect(0)
    assert grab_from_other_client(other_client, "s", CTRL_ALT)
    other_client.screen().root.ungrab_key(other_client.keysym_to_keycode(XK.string_to_keysym("s")), CTRL_ALT)
    other_client.sync()

    assert probe.register("Ctrl+Alt+S")[0] == "x11"  # after unregister, register opens a new connection
    xvfb.xdotool("key", "ctrl+alt+s")
    probe.expect(1)
    assert probe.send("delete-owner") == "destroyed"
    assert probe.reply() == "deleted"
    assert grab_from_other_client(other_client, "s", CTRL_ALT)
    assert probe.proc.poll() is None  # the grab went with the object, not with the process


def test_x11_follows_a_keyboard_mapping_change(xvfb: Xvfb, probe: Probe, other_client: Display) -> None:
    """When the key for S moves to another keycode (a layout change), the grab moves with it."""
    assert probe.register("Ctrl+Alt+S")[0] == "x11"
    d = other_client
    old = d.keysym_to_keycode(XK.string_to_keysym("s"))
    first, last = d.display.info.min_keycode, d.display.info.max_keycode
    mapping = d.get_keyboard_mapping(first, last - first + 1)
    free = next(first + i for i, syms in enumerate(mapping) if not any(syms) and first + i > old)
    width = len(mapping[0])
    s_syms = mapping[old - first]
    d.change_keyboard_mapping(old, [[X.NoSymbol] * width])
    d.change_keyboard_mapping(free, [list(s_syms)])
    d.sync()
    probe.wait_log("global shortcut Ctrl+Alt+S grabbed again after a keyboard mapping change")
    assert not grab_from_other_client(d, free, CTRL_ALT)
    assert grab_from_other_client(d, old, CTRL_ALT)
    xvfb.xdotool("key", "ctrl+alt+s")
    probe.expect(1)


# --- without X11 (this process runs Qt offscreen) -------------------------------------------------

def test_offscreen_has_no_global_shortcut(qapp) -> None:
    hk = GlobalHotkey()
    fired: list[None] = []
    hk.activated.connect(lambda: fired.append(None))
    assert hk.backend == "none"
    assert hk.register("Ctrl+Alt+S") == "none"
    assert hk.backend == "none"
    assert hk.reason == ("No global shortcuts on the offscreen platform; Ctrl+Alt+S works inside the viewer, "
                         "or use the tray menu.")
    with pytest.raises(UsageError, match="no key besides modifiers"):
        hk.register("Ctrl+Alt")
    hk.unregister()
    assert (hk.backend, hk.reason) == ("none", "No global shortcut registered.")
    assert fired == []


def test_wayland_reason(qapp, monkeypatch: pytest.MonkeyPatch) -> None:
    class Wayland:
        @staticmethod
        def platformName() -> str:
            return "wayland"

    monkeypatch.setattr(hotkey, "QGuiApplication", Wayland)
    hk = GlobalHotkey()
    assert hk.register("Ctrl+Alt+S") == "none"
    assert hk.reason == ("No global shortcuts on Wayland without the GlobalShortcuts portal; "
                         "Ctrl+Alt+S works inside the viewer, or use the tray menu.")


@pytest.mark.parametrize(("sequence", "message"), [
    ("Ctrl+Alt", "Ctrl+Alt has no key besides modifiers; add one, as in Ctrl+Alt+S."),
    ("Shift", "Shift has no key besides modifiers"),
    ("", "'' is not a key combination"),
    ("Ctrl+Foo", "'Ctrl+Foo' is not a key combination"),
    ("Ctrl+S, Ctrl+D", "Ctrl+S, Ctrl+D is 2 key presses in a row"),
    ("S", "S would take the key S away from every application; add Ctrl, Alt or Meta."),
    ("Shift+1", "Shift+1 would take the key 1 away"),
    ("Ctrl+Volume Up", "Ctrl+Volume Up uses a key that cannot be grabbed"),
])
def test_parse_rejects(sequence: str, message: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_sequence(sequence)
    assert str(e.value).startswith(message)
    assert str(e.value).endswith(".")


def test_parse_accepts() -> None:
    s = parse_sequence("ctrl+alt+s")
    assert (s.text, s.keysym, s.key_name) == ("Ctrl+Alt+S", ord("s"), "S")
    assert s.modifiers == (hotkey._CTRL | hotkey._ALT)
    assert parse_sequence("Meta+F5").keysym == XK.string_to_keysym("F5")
    assert parse_sequence("Alt+Print").keysym == XK.string_to_keysym("Print")
    assert parse_sequence("Ctrl+Num+1").keysym == XK.string_to_keysym("KP_1")
    assert parse_sequence("Ctrl+Alt+Ä").keysym == XK.string_to_keysym("adiaeresis")
    assert parse_sequence("F12").keysym == XK.string_to_keysym("F12")  # function keys need no modifier
