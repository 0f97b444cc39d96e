"""The tray's "Migrate to" offers the paired machines whose agents answer, checked in the background."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PySide6.QtCore import QPoint

from helpers.cli import Sm
from helpers.net import pair_by_ids, serving
from session_manager.local.engine import Engine
from session_manager.net.peers import Peers
from session_manager.paths import Home
from session_manager.services.reachability import INTERVAL, PeerReachability
from session_manager.services.session_service import SessionService
from session_manager.ui.tray import Tray


def items(tray: Tray) -> list[tuple[str, bool]]:
    return [(a.text(), a.isEnabled()) for a in tray.migrate.actions()]


def test_migrate_to_offers_the_reachable_paired_machines(tmp_path: Path, guest: tuple[Path, Path], aloop,
                                                         qtbot) -> None:
    me, b, c = Sm(tmp_path / "me"), Sm(tmp_path / "b"), Sm(tmp_path / "c")
    with serving(me) as port_me, serving(b) as port_b, serving(c) as port_c:
        pair_by_ids(me, port_me, b, port_b)  # me calls b "b"
        pair_by_ids(c, port_c, me, port_me)  # me calls c "a"...
    home = Home.locate(me.home)
    Peers(home).add(dataclasses.replace(Peers(home).get("a"), name="c"))  # ...renamed
    me.new_guest("desk", guest)
    service = SessionService(Engine(home), "desk")
    clock = [1000.0]  # seconds, as time.monotonic() counts them
    peers = PeerReachability(home, clock=lambda: clock[0])
    with serving(b, f"127.0.0.1:{port_b}"):
        tray = Tray(service, peers, "Ctrl+Alt+S")
        tray.menu.popup(QPoint(0, 0))
        tray.migrate.popup(QPoint(0, 0))
        assert items(tray) == [("Checking paired machines…", False)]
        with qtbot.waitSignal(peers.changed):  # the open submenu fills itself when the check ends
            aloop.run_until_complete(peers._task)  # type: ignore[arg-type]
        assert tray.migrate.isVisible()
        tray.menu.close()
        assert items(tray) == [(f"b (127.0.0.1:{port_b})", True), ("c — not reachable", False)]
        why = tray.migrate.actions()[1].toolTip()  # the whole sentence
        assert why.startswith(f"Cannot reach c at 127.0.0.1:{port_c} (") and why.endswith(f"port {port_c} is open.")
        checked = peers._task
        tray.rebuild()  # opened again at once: the results stand
        assert peers._task is checked and items(tray)[1] == ("c — not reachable", False)

        with serving(c, f"127.0.0.1:{port_c}"):
            clock[0] += INTERVAL  # the results expire
            tray.rebuild()
            aloop.run_until_complete(peers._task)  # type: ignore[arg-type]
            assert items(tray) == [(f"b (127.0.0.1:{port_b})", True), (f"c (127.0.0.1:{port_c})", True)]

            # b is unpaired here and c unpairs this installation: checked again at once, whatever the interval
            c("peers", "remove", "b")
            Peers(home).remove("b")
            peers.interval = 3600
            tray.rebuild()
            assert items(tray) == [(f"c (127.0.0.1:{port_c})", True)]
            aloop.run_until_complete(peers._task)  # type: ignore[arg-type]
            assert items(tray) == [("c — not paired there", False)]
            assert "refuses this installation" in tray.migrate.actions()[0].toolTip()

            Peers(home).remove("c")
            tray.rebuild()
            assert items(tray) == [("No paired machines: session-manager peers add HOST", False)]
            aloop.run_until_complete(peers.close())
    service.close()
