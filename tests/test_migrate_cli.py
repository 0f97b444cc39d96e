"""`session-manager migrate NAME PEER`: a running session moves live to a paired installation's agent.

Two homes on loopback, each its own installation, paired through their `serve` processes (as test_peers.py does).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers.cli import log_text, one_sentence
from helpers.net import paired_homes, serving
from helpers.qemu import Serial, keeps_running

pytestmark = pytest.mark.qemu


def test_migrate_moves_a_running_session_to_a_paired_peer(tmp_path: Path, guest: tuple[Path, Path]) -> None:
    with paired_homes(tmp_path) as (a, b, port_b):
        a.new_guest("desk", guest, fill=16)
        a("start", "desk")
        here = a.serial("desk")
        here.wait_for(r"^ready")
        here.wait_counter(3)

        # b's agent is not running: one sentence, and the session runs on here.
        one_sentence(a("migrate", "desk", "b", check=False), "Cannot reach", "serve")
        assert a("status", "desk", "--json").json()["run_state"] == "running"
        keeps_running(here, here.last_start(), count=2)

        taken = a("checkpoint", "desk", "-m", "before the move", "--json").json()["id"]
        with serving(b, f"127.0.0.1:{port_b}"):
            run = a("migrate", "desk", "b", "--json")
        last_here = here.counters()[-1]
        result = run.json()
        assert result["peer"] == "b" and result["bytes_sent"] > 16 << 20 and result["downtime_ms"] > 0

        there_status = b("status", "desk", "--json").json()
        assert there_status["run_state"] == "running"
        there = Serial(there_status["serial_log"])
        since = there.last_start()
        there.wait_counter(3, since=since)
        first = there.counters(since)[0]
        assert last_here < first <= last_here + 2  # on from where it stopped here: no step back, no jump
        keeps_running(there, since)  # consecutive, and its disk checks pass ("disk ok")

        # Its timeline went along: the checkpoint taken here is in b's repository, under the same session.
        assert [(c["id"], c["note"]) for c in b("checkpoints", "desk", "--json").json()] == [(taken, "before the move")]
        gone = a("status", "desk", "--json").json()
        assert gone["pid"] is None and gone["moved_to"] == "b" and not gone["crashed"]
        assert "Session desk: running on b" in a("status", "desk").stdout
        assert [r["state"] for r in a("list", "--json").json()] == ["running on b"]
        assert not list(a.home.glob("run/desk/qemu.pid"))
        assert here.counters()[-1] == last_here  # nothing runs here any more
        one_sentence(a("start", "desk", check=False), "runs on b")
        one_sentence(a("restore", "desk", taken, check=False), "runs on b")  # it would run twice


def test_the_tray_migrates_the_session_and_the_window_says_where_it_went(
        tmp_path: Path, guest: tuple[Path, Path], aloop, qtbot, monkeypatch: pytest.MonkeyPatch,
        confirmations: list[str]) -> None:
    from session_manager.app import App
    from session_manager.local.engine import Engine
    from session_manager.local.settings import Settings
    from session_manager.paths import Home
    from session_manager.ui.tray import Tray

    monkeypatch.setenv("SESSION_MANAGER_ACCEL", "tcg")
    with paired_homes(tmp_path) as (a, b, port_b):
        a.new_guest("desk", guest)
        a("start", "desk")
        a.serial("desk").wait_counter(2)
        app = App(Engine(Home.locate(a.home)), "desk", Settings(autosave_minutes=0))
        with serving(b, f"127.0.0.1:{port_b}"):
            tray = Tray(app.service, app.peers, "Ctrl+Alt+S")
            tray.migrateRequested.connect(app.request_migrate)
            migrate = next(x for x in tray.menu.actions() if x.text() == "Migrate to").menu()
            assert [x.text() for x in migrate.actions()] == ["Checking paired machines…"]
            aloop.run_until_complete(app.peers._task)  # type: ignore[arg-type]
            assert [(x.text(), x.isEnabled()) for x in migrate.actions()] == [(f"b (127.0.0.1:{port_b})", True)]
            with qtbot.waitSignal(app.service.migrated, timeout=120_000) as moved:
                migrate.actions()[0].trigger()
                aloop.run_until_complete(app.service._op)  # type: ignore[arg-type]
        assert moved.args[0] == "b" and moved.args[1].downtime_ms > 0
        assert confirmations[0].startswith("Move desk to b? It keeps running")
        assert not moved.args[1].postcopy  # the post-copy box was left unticked
        assert "now runs on b" in app.window.statusBar().currentMessage()
        app.service._check_process()
        assert "now runs on b" in app.window.stopped_text.text() and not app.window.start_button.isEnabled()
        assert b("status", "desk", "--json").json()["run_state"] == "running"
        aloop.run_until_complete(app.close())


def test_a_migration_whose_driver_dies_leaves_both_sides_clean(tmp_path: Path, guest: tuple[Path, Path]) -> None:
    """kill -9 of `migrate` during the memory copy: the destination drops its half-made session by itself (the
    agent connection ended), the session runs on here, checkpoints work again, and a new migration succeeds."""
    with paired_homes(tmp_path) as (a, b, port_b):
        a.new_guest("desk", guest, fill=16, dirty=4)
        a("start", "desk")
        here = a.serial("desk")
        here.wait_counter(3)
        started = here.last_start()
        with serving(b, f"127.0.0.1:{port_b}"):
            driver = a.popen("migrate", "desk", "b", "--limit", "8M")
            assert driver.stdout is not None
            while "Copying memory" not in (line := driver.stdout.readline()):
                assert line, driver.communicate()[1]
            assert b("list", "--json").json()[0]["name"] == "desk"  # the half-made session waits there
            driver.kill()
            driver.communicate()
            deadline = time.monotonic() + 20
            while b("list", "--json").json():
                assert time.monotonic() < deadline, "the destination kept the half-made session"
                time.sleep(0.2)

            keeps_running(here, started)  # never stopped, never restarted
            assert here.last_start() == started
            a("checkpoint", "desk", "-m", "after the interrupted migration")  # QEMU was tidied up for it
            assert "tidied up after an interrupted migration" in log_text(a)

            run = a("migrate", "desk", "b", "--json")
        assert run.json()["peer"] == "b"
        assert a("status", "desk", "--json").json()["moved_to"] == "b"


def test_postcopy_moves_a_busy_guest_over_a_slow_link(tmp_path: Path, guest: tuple[Path, Path]) -> None:
    """`migrate --postcopy --limit`: a guest changing 16 MiB/s over an 8 MiB/s link switches over after two
    passes and runs on at the peer, its counter continuing."""
    with paired_homes(tmp_path) as (a, b, port_b):
        a.new_guest("busy", guest, fill=0, dirty=16, window=32)
        a("start", "busy")
        here = a.serial("busy")
        here.wait_counter(3)
        with serving(b, f"127.0.0.1:{port_b}"):
            run = a("migrate", "busy", "b", "--postcopy", "--limit", "8M")
        last_here = here.counters()[-1]
        assert "Copying memory, pass 2" in run.stdout and "the rest of its memory follows" in run.stdout
        assert "Copied to b" in run.stdout or "Starting busy on b" in run.stdout
        there = Serial(b("status", "busy", "--json").json()["serial_log"])
        since = there.last_start()
        there.wait_counter(3, since=since)
        assert last_here < there.counters(since)[0] <= last_here + 2
        keeps_running(there, since)
        assert a("status", "busy", "--json").json()["moved_to"] == "b"
