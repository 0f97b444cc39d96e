"""Hand-over: after a live migration the source's window follows the session to the peer, its screen tunneled
through the peer's agent (handover.py).

Two homes on loopback paired through their `serve` processes; the real test guest moves from a to b with
`session-manager migrate desk b` (as in test_migrate_cli.py), once for the module.  b's agent runs only where a
test serves it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from helpers.aio import until
from helpers.cli import Sm, log_text, wait_log
from helpers.net import paired_homes, serving
from helpers.qemu import Serial
from helpers.rfb import Events, assert_matches_screendump, type_text, wait_serial
from session_manager.app import App
from session_manager.errors import PeerError
from session_manager.local.engine import Engine
from session_manager.local.settings import Settings
from session_manager.net.agent import _open
from session_manager.net.handover import DISPLAY, open_display
from session_manager.net.identity import load_identity
from session_manager.paths import Home
from session_manager.vm.machine import Machine, Sockets

pytestmark = pytest.mark.qemu

GONE = "a no longer shows the screen of session desk"  # b's log, when a relay ends


@dataclass
class Moved:
    a: Sm  # where desk ran, and says it runs on b
    b: Sm  # where it runs now; it also has a stopped session, idle
    port_b: int
    there: Serial  # desk's serial log at b


@pytest.fixture(scope="module")
def moved(tmp_path_factory: pytest.TempPathFactory, guest: tuple[Path, Path]) -> Iterator[Moved]:
    with paired_homes(tmp_path_factory.mktemp("handover")) as (a, b, port_b):
        a.new_guest("desk", guest)
        a("start", "desk")
        a.serial("desk").wait_counter(2)
        b.new_guest("idle", guest)
        with serving(b, f"127.0.0.1:{port_b}"):
            a("migrate", "desk", "b")
        assert a("status", "desk", "--json").json()["moved_to"] == "b"
        there = Serial(b("status", "desk", "--json").json()["serial_log"])
        there.wait_counter(2, since=there.last_start())
        yield Moved(a, b, port_b, there)


def test_the_peer_shows_the_session_to_paired_installations_only(moved: Moved, tmp_path: Path) -> None:
    home_a = Home.locate(moved.a.home)
    qmp = Path(moved.b("status", "desk", "--json").json()["qmp_socket"])

    async def scenario() -> None:
        client = await open_display(home_a, "b", "desk")
        events = Events()
        events.attach(client)
        task = asyncio.create_task(client.run())
        try:
            assert client.name == "QEMU (desk)"
            async with Machine.connect(Sockets(qmp.parent)) as m:
                await until(lambda: (0, 0, client.width, client.height) in events.updates, "a first full frame")
                await assert_matches_screendump(client, events, m, tmp_path / "shot.ppm")  # b's screen, exactly
            since = moved.there.size()
            await type_text(client, "hi")
            await wait_serial(moved.there, r"^key h\r?\n(.*\n)*key i\r?$", since)  # b's guest got the keys
        finally:
            await client.close()
            await task

        with pytest.raises(PeerError) as missing:
            await open_display(home_a, "b", "nosuch")
        assert re.fullmatch(r"\S+ has no session named 'nosuch' from a\.", str(missing.value))
        with pytest.raises(PeerError) as own:  # b's own session is not a's to see: as if it did not exist
            await open_display(home_a, "b", "idle")
        assert re.fullmatch(r"\S+ has no session named 'idle' from a\.", str(own.value))

        stranger = await _open(f"127.0.0.1:{moved.port_b}", load_identity(Home.locate(tmp_path / "c")), "b")
        try:
            assert (await stranger.hello())["paired"] is False
            with pytest.raises(PeerError, match=r"^\S+ \(\S+\) refuses an installation it has not paired with: "):
                await stranger.call(DISPLAY, name="desk")
        finally:
            await stranger.close()

    with serving(moved.b, f"127.0.0.1:{moved.port_b}"):
        seen = log_text(moved.b).count(GONE)
        asyncio.run(scenario())
        wait_log(moved.b, re.escape(GONE), count=seen + 1, timeout=20)  # once more
        assert "Refused display from 127.0.0.1" in log_text(moved.b)


def test_the_window_follows_the_session_to_the_peer(moved: Moved, aloop, qtbot,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_MANAGER_ACCEL", "tcg")
    app = App(Engine(Home.locate(moved.a.home)), "desk", Settings(autosave_minutes=0))
    window, viewer = app.window, app.window.viewer
    qtbot.addWidget(window)
    window.show()
    assert window.pages.currentWidget() is window.stopped_page and "now runs on b" in window.stopped_text.text()
    assert window.follow_button.isVisible() and window.follow_button.text() == "Follow to b"

    # b's agent is not running: the viewer says so in one sentence, and keeps trying.
    qtbot.mouseClick(window.follow_button, Qt.MouseButton.LeftButton)
    assert window.pages.currentWidget() is viewer and viewer.status_text() == "Connecting to b…"
    assert window.state_label.text() == "desk: shown from b" and window.windowTitle().startswith("desk on b ")
    aloop.run_until_complete(until(lambda: viewer.status_text().startswith("Cannot reach b at "), "the sentence"))
    assert len(viewer.status_text().splitlines()) == 1 and "serve" in viewer.status_text()

    seen = log_text(moved.b).count(GONE)
    with serving(moved.b, f"127.0.0.1:{moved.port_b}"):
        aloop.run_until_complete(until(viewer.is_connected, "the viewer showing b's screen", 60))
        assert viewer.framebuffer_size().toTuple() == (720, 400) and viewer.target() == "b"
        since = moved.there.size()
        qtbot.keyClicks(viewer, "ok")  # typed here, they reach the guest at b
        aloop.run_until_complete(wait_serial(moved.there, r"^key o\r?\n(.*\n)*key k\r?$", since))

        window.close()  # closing the window stops following
        assert not viewer.is_connected() and viewer.target() is None
        assert window.pages.currentWidget() is window.stopped_page and window.windowTitle().startswith("desk — ")
        aloop.run_until_complete(viewer.wait_closed())
        wait_log(moved.b, re.escape(GONE), count=seen + 1, timeout=20)  # once more
        aloop.run_until_complete(app.close())

    # At b, the app shows the session as its own: running, on its local display.
    there = App(Engine(Home.locate(moved.b.home)), "desk", Settings(autosave_minutes=0))
    qtbot.addWidget(there.window)
    there.window.show()
    assert there.service.state.value == "running" and there.window.pages.currentWidget() is there.window.viewer
    aloop.run_until_complete(until(there.window.viewer.is_connected, "b's own viewer", 60))
    assert there.window.viewer.target() == str(there.service.vnc_socket)
    assert there.window.state_label.text() == "desk: running" and not there.window.follow_button.isVisible()
    aloop.run_until_complete(there.close())
