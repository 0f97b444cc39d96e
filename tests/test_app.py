"""The desktop app with a real session: the shortcut checkpoints, dropping a checkpoint rolls back, one instance."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PySide6.QtCore import QMimeData, QPointF, Qt
from PySide6.QtGui import QDropEvent
from PySide6.QtWidgets import QApplication, QPushButton

from helpers import ROOT
from helpers.aio import until
from helpers.cli import Sm
from helpers.net import paired_homes
from helpers.qemu import Serial
from session_manager.app import App, _create
from session_manager.local.engine import Engine
from session_manager.local.settings import Settings
from session_manager.paths import Home
from session_manager.services.session_service import State
from session_manager.ui.firstrun import FirstRunDialog, NewSessionDialog, ResumeDialog
from session_manager.ui.timeline import MIME_CHECKPOINT
from session_manager.ui.tray import Tray


@pytest.mark.qemu
def test_shortcut_checkpoints_and_dropping_it_rolls_back(sm: Sm, guest: tuple[Path, Path], aloop, qtbot,
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         confirmations: list[str]) -> None:
    monkeypatch.setenv("SESSION_MANAGER_ACCEL", "tcg")
    sm.new_guest("desk", guest)
    sm("start", "desk")
    serial = sm.serial("desk")
    serial.wait_counter(3)
    app = App(Engine(Home.locate(sm.home)), "desk", Settings())
    window, service = app.window, app.service
    qtbot.addWidget(window)
    qtbot.addWidget(app.timeline)
    window.show()
    assert service.state == State.RUNNING

    async def scenario() -> None:
        await until(lambda: window.viewer.is_connected(), "the viewer connecting", 30)
        with qtbot.waitSignal(service.checkpointTaken, timeout=120_000) as taken:
            qtbot.keyClick(window.viewer, Qt.Key.Key_S,
                           Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.AltModifier)
            await until(lambda: taken.signal_triggered, "the checkpoint", 120)
        ckpt = taken.args[0]
        at = serial.counters()[-1]
        assert "Checkpoint taken" in window.statusBar().currentMessage()
        await until(lambda: not service.busy, "the checkpoint finishing", 30)
        assert [c.id for c in service.checkpoints] == [ckpt.id]
        assert service.head == ckpt.id

        # A checkpoint taken by another process (the CLI here) appears by itself (the repository is watched).
        await asyncio.to_thread(sm, "checkpoint", "desk", "-m", "from the command line")
        await until(lambda: any(c.note == "from the command line" for c in service.checkpoints),
                    "the CLI's checkpoint in the app", 10)
        canvas = app.timeline.view.canvas
        assert "from the command line" in [canvas.nodes[k].info.note for k in canvas.order]

        # The tray menu, rebuilt when opened, offers both for rolling back.
        tray = Tray(service, app.peers, "Ctrl+Alt+S")
        tray.rebuild()
        rollback = next(a for a in tray.menu.actions() if a.text() == "Roll back to").menu()
        assert len(rollback.actions()) == 2 and rollback.isEnabled()

        await until(lambda: serial.counters()[-1] >= at + 5, "the guest counting on", 60)
        before = serial.counters()[-1]
        mime = QMimeData()
        mime.setData(MIME_CHECKPOINT, ckpt.id.encode())
        drop = QDropEvent(QPointF(300, 300), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                          Qt.KeyboardModifier.NoModifier)
        with qtbot.waitSignal(service.restored, timeout=120_000) as restored:
            window.dropEvent(drop)
            await until(lambda: restored.signal_triggered, "the restore", 120)
        assert "checkpointed first" in confirmations[-1]
        start = serial.last_start()
        await until(lambda: len(serial.counters(start)) >= 2, "the guest counting after the restore", 60)
        after = serial.counters(start)[0]
        assert ckpt.meta.kind == "manual"
        assert after <= at + 2 < before, (at, before, after)
        await until(lambda: not service.busy, "the restore finishing", 30)
        kinds = sorted(str(c.meta.kind) for c in service.checkpoints)
        assert kinds == ["manual", "manual", "pre-restore"]  # the replaced state was kept
        assert service.head == ckpt.id
        await until(lambda: window.viewer.is_connected(), "the viewer reconnecting after the restore", 30)

        # Export shows progress and can be cancelled without leaving files behind.
        progress: list[str] = []
        service.progressChanged.connect(lambda what, _: progress.append(what))
        with qtbot.waitSignal(service.info, timeout=120_000) as exported:
            service.export(ckpt.id, tmp_path / "out")
            await until(lambda: exported.signal_triggered, "the export", 120)
        assert "Exporting memory" in progress and "stock QEMU resumes it with" in exported.args[0]
        assert len(list((tmp_path / "out").iterdir())) == 2
        with qtbot.waitSignal(service.failed, timeout=60_000) as cancelled:
            service.export(ckpt.id, tmp_path / "cancelled")
            assert service.can_cancel
            service.cancel()
            await until(lambda: cancelled.signal_triggered, "the cancel", 60)
        assert cancelled.args[0] == "Export cancelled; no files were left behind."
        assert not list((tmp_path / "cancelled").glob("*"))

    aloop.run_until_complete(scenario())
    assert "key s" not in serial.text()  # the shortcut went to the app, not to the guest
    aloop.run_until_complete(app.close())


def test_tray_menu_of_a_stopped_session(sm: Sm, guest: tuple[Path, Path], aloop, qtbot) -> None:
    sm.new_guest("idle", guest)
    app = App(Engine(Home.locate(sm.home)), "idle", Settings())
    qtbot.addWidget(app.window)
    tray = Tray(app.service, app.peers, "Ctrl+Alt+S")
    tray.rebuild()
    enabled = {a.text().split("\t")[0]: a.isEnabled() for a in tray.menu.actions() if a.text()}
    assert enabled["Start session"] and not enabled["Checkpoint now"] and not enabled["Suspend session"]
    assert not enabled["Roll back to"]
    assert "stopped" in tray.icon.toolTip()
    app.window.show()
    assert app.window.pages.currentWidget() is app.window.stopped_page
    assert app.window.start_button.isEnabled()
    aloop.run_until_complete(app.close())


def test_the_window_opens_within_a_small_screen(sm: Sm, guest: tuple[Path, Path], aloop, qtbot) -> None:
    """On a screen smaller than the window would like (the offscreen screen: 800x600), it opens inside the screen,
    its status line in sight."""
    sm.new_guest("idle", guest)
    app = App(Engine(Home.locate(sm.home)), "idle", Settings())
    qtbot.addWidget(app.window)
    app.window.show()
    room = QApplication.primaryScreen().availableGeometry()
    assert room.height() < 860, room  # smaller than the window's natural size: the point of the test
    assert room.contains(app.window.frameGeometry()), (app.window.frameGeometry(), room)
    status = app.window.statusBar()
    assert status.isVisible() and room.contains(status.mapToGlobal(status.rect().bottomRight()))
    aloop.run_until_complete(app.close())


def test_first_run_offers_the_demo_and_checks_a_new_session(qtbot, tmp_path: Path) -> None:
    dialog = FirstRunDialog()
    qtbot.addWidget(dialog)
    demo = next(b for b in dialog.findChildren(QPushButton) if b.text() == "Try the demo session")
    demo.click()
    assert dialog.choice == "demo"

    new = NewSessionDialog()
    qtbot.addWidget(new)
    new.image.setText(str(tmp_path / "missing.iso"))
    new._check()
    assert new.error.text() == "Choose an existing ISO or disk image file."
    (tmp_path / "debian.iso").write_bytes(b"\0" * 4096)
    new.image.setText(str(tmp_path / "debian.iso"))
    new._check()
    assert new.result() == NewSessionDialog.DialogCode.Accepted
    assert new.result_session().is_iso


def test_second_start_brings_the_first_forward(sm: Sm, guest: tuple[Path, Path]) -> None:
    sm.new_guest("one", guest)
    env = {**sm.env, "QT_QPA_PLATFORM": "offscreen"}
    first = subprocess.Popen(sm.argv(), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = sm.home / "state" / "session-manager.log"
        deadline = time.monotonic() + 60
        while not (sm.home / "run" / "app.sock").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the app never listened"
            time.sleep(0.1)
        second = subprocess.run(sm.argv(), env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        assert "already running" in second.stdout
        deadline = time.monotonic() + 10
        while "another start asked for the window" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert first.poll() is None
    finally:
        first.terminate()
        first.communicate(timeout=30)


@pytest.mark.parametrize("where", ["login", "home"])
def test_starts_on_a_fresh_login(tmp_path: Path, where: str) -> None:
    """As the desktop entry starts it (`session-manager`, no arguments) after a reboot: the runtime directory is a
    new empty tmpfs directory, and nothing of ours exists yet (or a new --home).  Short paths, as real ones are
    (a long one would have its sockets moved to a directory of ours in /tmp)."""
    short = Path(tempfile.mkdtemp(prefix="sm-", dir="/tmp"))
    runtime = short / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "SESSION_MANAGER_"))}
    env.update(HOME=str(tmp_path / "user"), XDG_RUNTIME_DIR=str(runtime), QT_QPA_PLATFORM="offscreen")
    argv = [sys.executable, "-m", "session_manager.cli"] + (["--home", str(short / "home")] if where == "home" else [])
    socket = (short / "home" / "run" if where == "home" else runtime / "session-manager") / "app.sock"
    first = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not socket.exists():  # it waits in its first-run dialog, answering later starts
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the app never listened"
            time.sleep(0.1)
        assert socket.parent.stat().st_mode & 0o777 == 0o700
        second = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0 and "already running" in second.stdout, second.stderr
        assert first.poll() is None
    finally:
        first.terminate()
        first.communicate(timeout=30)
        shutil.rmtree(short)


@pytest.mark.qemu
def test_a_killed_session_is_noticed_and_restored_from_its_latest_checkpoint(
        sm: Sm, guest: tuple[Path, Path], aloop, qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_MANAGER_ACCEL", "tcg")
    sm.new_guest("fragile", guest)
    sm("start", "fragile")
    serial = sm.serial("fragile")
    serial.wait_counter(2)
    ckpt = sm("checkpoint", "fragile", "--json").json()
    at = serial.counters()[-1]
    app = App(Engine(Home.locate(sm.home)), "fragile", Settings(autosave_minutes=0))
    window, service = app.window, app.service
    window.show()

    async def scenario() -> None:
        await until(lambda: serial.counters()[-1] >= at + 3, "the guest counting on", 60)
        with qtbot.waitSignal(service.crashed, timeout=10_000) as crashed:
            killed = time.monotonic()
            os.kill(sm("status", "fragile", "--json").json()["pid"], signal.SIGKILL)
            await until(lambda: crashed.signal_triggered, "the crash being noticed", 10)
        assert time.monotonic() - killed < 3  # the promise is 2 s; a loaded test machine gets a little more
        assert "QEMU was killed" in crashed.args[0]
        assert window.pages.currentWidget() is window.stopped_page
        assert "stopped unexpectedly" in window.stopped_text.text()
        assert window.start_button.text() == "Restore the latest checkpoint"
        window.start_button.click()
        await until(lambda: service.state == State.RUNNING and not service.busy, "the recovery", 120)
        start = serial.last_start()
        await until(lambda: serial.counters(start), "the guest counting after the recovery", 60)
        assert ckpt["id"] in serial.text()[start:start + 200]  # the marker names the restored checkpoint
        assert serial.counters(start)[0] <= at + 1
        assert service.crash is None and window.pages.currentWidget() is window.viewer

    aloop.run_until_complete(scenario())
    aloop.run_until_complete(app.close())


@pytest.mark.qemu
def test_first_run_resumes_a_session_from_a_server(sm: Sm, guest: tuple[Path, Path], tmp_path: Path, aloop, qtbot,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_MANAGER_ACCEL", "tcg")
    sm.new_guest("roaming", guest)
    sm("start", "roaming")
    serial = sm.serial("roaming")
    serial.wait_counter(3)
    before = serial.counters()[-1]
    ckpt = sm("checkpoint", "roaming", "--json").json()
    at = serial.counters()[-1]  # the checkpoint's instant lies between the two
    share = tmp_path / "share"
    Sm(sm.home, env={"SESSION_MANAGER_NEW_PASSPHRASE": "correct horse"})("key", "add")
    sm("remote", "add", "share", str(share))
    sm("push")
    sm("stop", "roaming", "--no-save")  # this computer is gone; the session lives on the share

    dialog = FirstRunDialog()
    qtbot.addWidget(dialog)
    form = ResumeDialog(dialog)
    form.url.setText(str(share))
    form._check()
    assert form.error.text() == "Give the passphrase you set with `session-manager key add`."
    form.passphrase.setText("correct horse")
    form._check()
    assert form.result() == ResumeDialog.DialogCode.Accepted
    dialog.resume_from, dialog.choice = form.result_source(), "resume"

    other = Sm(tmp_path / "elsewhere")
    name = aloop.run_until_complete(_create(Engine(Home.locate(other.home)), dialog))
    try:
        assert name == "roaming"
        status = other("status", "roaming", "--json").json()
        assert status["run_state"] == "running" and status["head"] == ckpt["id"]
        there = Serial(status["serial_log"])
        there.wait_for(r"^disk ok", since=there.last_start())
        assert before + 1 <= there.counters(there.last_start())[0] <= at + 1  # it carries on from the checkpoint
        assert [r["name"] for r in other("remote", "list", "--json").json()] == ["server"]  # backs up there now
    finally:
        other.kill_all()


@pytest.mark.qemu
def test_the_open_app_takes_a_session_sent_to_it(tmp_path: Path, guest: tuple[Path, Path], aloop,
                                                 qtbot) -> None:
    """With the app open (and no `serve`), a paired machine's `send` arrives, as it does at `serve`."""
    with paired_homes(tmp_path) as (a, b, port_b):
        b.new_guest("mine", guest)
        a.new_guest("visitor", guest)
        a("start", "visitor")
        a.serial("visitor").wait_counter(2)
        taken = a("checkpoint", "visitor", "--json").json()["id"]
        app = App(Engine(Home.locate(b.home)), "mine", Settings(autosave_minutes=0), listen=f"127.0.0.1:{port_b}")

        async def scenario() -> None:
            await until(lambda: (b.home / "state" / "session-manager.log").exists() and app._agent_server is not None
                        and app._agent_server.done(), "the app's agent listening", 30)
            proc = await asyncio.create_subprocess_exec(*a.argv("send", "visitor", "b", "--json"), env=a.env, cwd=ROOT,
                                                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()

        aloop.run_until_complete(scenario())
        aloop.run_until_complete(app.close())
        arrived = [s for s in b("list", "--json").json() if s["name"] == "visitor"]
        assert arrived and arrived[0]["state"] == "saved" and arrived[0]["head"] == taken
