"""The tray application: ``session-manager`` with no subcommand.

One instance per home: a second start asks the first (over a unix socket in the
0700 runtime directory) to bring its window forward, then exits.  Quitting the
app leaves the session's QEMU running; the next start reconnects to it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QIcon
from PySide6.QtNetwork import QLocalServer, QLocalSocket
from PySide6.QtWidgets import QApplication, QDialog, QMessageBox, QSystemTrayIcon

from .errors import SessionManagerError, UsageError
from .guests.testguest import build as build_guest
from .local.engine import Engine
from .local.settings import Settings
from .net.agent import Agent
from .net.live_migration import Receiver
from .net.peers import DEFAULT_PORT, parse_address
from .net.remotes import Credentials, Remote, Remotes, normalize_url, open_backend, open_remote, remote_sessions, resume
from .net.send import CheckpointReceiver
from .paths import Home, make_private_dir
from .resources import APP_ID, icon_path
from .services.background import BackgroundWork
from .services.reachability import PeerReachability
from .services.session_service import SessionService
from .store.repo import CheckpointInfo
from .ui.dialogs import confirm_migrate, confirm_restore, when
from .ui.firstrun import FirstRunDialog, ResumeFrom
from .ui.hotkey import GlobalHotkey
from .ui.settings_dialog import SettingsDialog
from .ui.tray import Tray
from .ui.window import FULL_SCREEN, SessionWindow, TimelineWindow
from .units import pause_text, size_text
from .vm.migrate import MigrationResult

log = logging.getLogger(__name__)


class SingleInstance(QObject):
    """Claims the app's socket, or tells the instance holding it to show itself."""

    raiseRequested = Signal()

    def __init__(self, home: Home) -> None:
        super().__init__()
        self.path = str(make_private_dir(home.runtime) / "app.sock")  # gone after every reboot (a tmpfs)
        self.server = QLocalServer(self)
        self.server.newConnection.connect(self._connection)

    def claim(self) -> bool:
        other = QLocalSocket()
        other.connectToServer(self.path)
        if other.waitForConnected(1000):
            other.write(b"raise\n")
            other.waitForBytesWritten(1000)
            other.disconnectFromServer()
            return False
        QLocalServer.removeServer(self.path)  # a stale socket from an app that died
        if not self.server.listen(self.path):
            raise SessionManagerError(f"Cannot listen on {self.path}: {self.server.errorString()}; check the "
                                      "runtime directory's permissions.")
        return True

    def _connection(self) -> None:
        while (conn := self.server.nextPendingConnection()) is not None:
            conn.readyRead.connect(lambda c=conn: self._read(c))

    def _read(self, conn: QLocalSocket) -> None:
        if bytes(conn.readAll().data()).startswith(b"raise"):
            log.info("another start asked for the window")
            self.raiseRequested.emit()
        conn.disconnectFromServer()


class App(QObject):
    """Wires one session's service to its windows, the tray, the shortcut and the settings."""

    def __init__(self, engine: Engine, name: str, settings: Settings, listen: str | None = None) -> None:
        """``listen``: where the host agent answers paired machines (None: no agent in this app)."""
        super().__init__()
        self.engine, self.settings = engine, settings
        self.service = SessionService(engine, name, self)
        self.window = SessionWindow(self.service)
        self.timeline = TimelineWindow(self.service)
        self.hotkey = GlobalHotkey(self)
        self.peers = PeerReachability(engine.home, parent=self)  # which paired machines answer, for the tray
        self.tray = Tray(self.service, self.peers, settings.checkpoint_shortcut, self) \
            if QSystemTrayIcon.isSystemTrayAvailable() else None
        self.background = BackgroundWork(engine, settings, name, self)
        self.finished: asyncio.Future[None] = asyncio.get_event_loop().create_future()
        self.agent = Agent(engine.home, say=lambda text, level: self._notify(text))
        Receiver(engine).register(self.agent)  # as `serve` does: live migrations and sent checkpoints arrive here
        CheckpointReceiver(engine).register(self.agent)
        self._agent_server: asyncio.Task[asyncio.Server | None] | None = \
            asyncio.ensure_future(self._serve_agent(listen)) if listen else None

        self.window.restoreRequested.connect(self.request_restore)
        self.window.timelineRequested.connect(self.show_timeline)
        self.window.settingsRequested.connect(self.show_settings)
        self.window.closed.connect(self._window_closed)
        self.window.mute_action.toggled.connect(self._muted)
        self.window.viewer.shortcutPressed.connect(self._viewer_shortcut)
        self.window.scale_action.toggled.connect(self._remember_scale_desktop)
        self.timeline.restoreRequested.connect(self.request_restore)
        self.hotkey.activated.connect(lambda: self.service.checkpoint_now())
        self.service.checkpointTaken.connect(lambda _: self.background.checkpoint_taken())
        self.background.autosaved.connect(self._autosaved)
        self.service.migrated.connect(self._migrated)
        self.background.autosaveFailed.connect(lambda _, why: self.window.statusBar().showMessage(why, 30000))
        self.background.backupProgress.connect(self._backup_progress)
        self.background.backupFailed.connect(lambda _, why: self.window.backup_label.setText(why))
        if self.tray:
            self.tray.openRequested.connect(self.show_window)
            self.tray.timelineRequested.connect(self.show_timeline)
            self.tray.settingsRequested.connect(self.show_settings)
            self.tray.restoreRequested.connect(self.request_restore)
            self.tray.shutDownRequested.connect(self.window.shut_down_action.trigger)
            self.tray.migrateRequested.connect(self.request_migrate)
            self.tray.quitRequested.connect(self.quit)
            self.tray.show()
        self.apply_settings()

    def apply_settings(self) -> None:
        s = self.settings
        self.window.viewer.set_shortcuts([s.checkpoint_shortcut, FULL_SCREEN])
        self.window.grab_action.setChecked(s.keyboard_grab)
        self.window.mute_action.setChecked(s.sound_muted)
        self.window.viewer.set_scaled(s.scale == "fit")
        self.window.scale_action.setChecked(s.scale_desktop)
        try:
            self.hotkey.register(s.checkpoint_shortcut)
        except SessionManagerError as e:
            self.service.failed.emit(str(e))
        log.info("checkpoint shortcut %s: %s", s.checkpoint_shortcut, self.hotkey.reason)
        if self.tray:
            self.tray.shortcut = s.checkpoint_shortcut
            self.tray.notifications = s.show_notifications

    async def _serve_agent(self, listen: str) -> asyncio.Server | None:
        try:
            return await self.agent.start(*parse_address(listen))
        except OSError as e:  # e.g. the agent's systemd unit already answers there
            log.info("not answering other machines on %s (%s); an agent may already run there", listen, e)
            return None

    def _notify(self, text: str) -> None:
        self.window.statusBar().showMessage(text, 30000)
        if self.tray:
            self.tray.icon.showMessage("Session Manager", text)

    def request_migrate(self, peer: str) -> None:
        go, postcopy = confirm_migrate(self.window, self.service.name, peer)
        if go:
            self.service.migrate(peer, postcopy)

    def _migrated(self, peer: str, result: MigrationResult) -> None:
        self._notify(f"{self.service.name} now runs on {peer}: it paused {pause_text(result.downtime_ms)}, "
                     f"{size_text(result.bytes_sent)} sent in {result.total_s:.1f} s.")

    def _autosaved(self, _: str, info: CheckpointInfo) -> None:
        self.window.statusBar().showMessage(
            f"Autosaved at {when(info)}: paused {pause_text(info.meta.pause_ms or 0)}", 10000)
        if self.tray:
            self.tray.refresh()

    def _backup_progress(self, remote: str, done: int, total: int) -> None:
        self.window.backup_label.setText(f"Backed up to {remote}" if done >= total else
                                         f"Backing up to {remote}: {done / max(total, 1):.0%}")

    def _viewer_shortcut(self, sequence: str) -> None:
        if sequence == FULL_SCREEN:
            self.window.full_action.toggle()
        else:
            self.service.checkpoint_now()

    def show_window(self) -> None:
        self.window.show()
        self.window.raise_()
        self.window.activateWindow()

    def show_timeline(self) -> None:
        self.service.reload_checkpoints()
        first = not self.timeline.isVisible()
        self.timeline.show()
        if first:
            self.timeline.view.zoom_to_fit()
        self.timeline.raise_()
        self.timeline.activateWindow()

    def _remember_scale_desktop(self, on: bool) -> None:
        if on != self.settings.scale_desktop:
            self.settings.scale_desktop = on
            self.settings.save(self.engine.home)

    def show_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self.hotkey.reason, self.window)
        if dialog.exec() == QDialog.DialogCode.Accepted:
            self.settings = dialog.settings()
            self.settings.save(self.engine.home)
            self.apply_settings()
            self.background.set_policy(self.settings)

    def _muted(self, muted: bool) -> None:
        if muted != self.settings.sound_muted:
            self.settings.sound_muted = muted
            self.settings.save(self.engine.home)

    def request_restore(self, ckpt_id: str) -> None:
        """Every way of rolling back (drop, double-click, menus) ends here: confirm, then restore."""
        try:
            info = self.engine.repo.get(ckpt_id)
        except SessionManagerError as e:
            self.service.failed.emit(str(e))
            return
        go, ask_again = confirm_restore(self.window, info, self.settings.confirm_restore)
        if ask_again != self.settings.confirm_restore:
            self.settings.confirm_restore = ask_again
            self.settings.save(self.engine.home)
        if go:
            self.service.restore(ckpt_id)

    def _window_closed(self) -> None:
        if self.tray is None:  # no tray to come back from: closing the window quits (the session runs on)
            self.quit()

    def quit(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    async def close(self) -> None:
        """Stop everything the app does; the session itself keeps running."""
        self.hotkey.unregister()
        self.service.close()
        self.window.viewer.disconnect_()
        await self.background.stop()
        await self.peers.close()
        if self._agent_server is not None:
            server = await self._agent_server
            if server is not None:
                await self.agent.close(server)
        await self.window.viewer.wait_closed()


def _first_run() -> FirstRunDialog | None:
    dialog = FirstRunDialog()
    if dialog.exec() != QDialog.DialogCode.Accepted or dialog.choice is None:
        return None
    return dialog


async def _create(engine: Engine, first: FirstRunDialog) -> str:
    """Make the first session as chosen; returns its name."""
    if first.choice == "resume" and first.resume_from is not None:
        return await _resume(engine, first.resume_from)
    new = first.new_session
    if first.choice == "demo" or new is None:
        status = await engine.demo(build_guest)
        return status.name
    kind: dict[str, Any] = {"iso": new.image} if new.is_iso else {"disk": new.image}
    engine.new_session(new.name, memory_mib=new.memory_mib, cpus=new.cpus, disk_size=new.disk_gib << 30, **kind)
    await engine.start(new.name)
    return new.name


async def _resume(engine: Engine, source: ResumeFrom) -> str:
    """Bring the newest checkpoint of the latest session in a remote here and start it; the remote stays
    configured, so the app backs up there from now on."""
    url = normalize_url(source.url)
    credentials = Credentials(source.access_key, source.secret_key) if url.startswith("s3://") else None
    backend = open_backend(url, source.endpoint, None, credentials, create=False)
    repo = await asyncio.to_thread(open_remote, engine.home, backend, source.passphrase)
    sessions = await asyncio.to_thread(remote_sessions, repo)
    if not sessions:
        raise UsageError(f"{backend} holds no checkpoints; back a session up there first.")
    latest = max((cs[-1] for cs in sessions.values()), key=lambda c: c.created)
    await resume(engine, repo, latest)
    Remotes(engine.home).add(Remote("server", url, source.endpoint), credentials)
    return latest.session


def run(home: Home, session: str | None = None) -> int:
    import qasync

    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    app.setApplicationName("Session Manager")
    app.setDesktopFileName(APP_ID)
    app.setWindowIcon(QIcon(str(icon_path("session-manager"))))
    app.setQuitOnLastWindowClosed(False)
    instance = SingleInstance(home)
    if not instance.claim():
        print("Session Manager is already running; its window was brought forward.")
        return 0
    engine = Engine(home)
    settings = Settings.load(home)
    names = [s.name for s in engine.sessions()]
    name = session or (settings.session if settings.session in names else names[0] if names else None)
    first = None
    if name is None:
        first = _first_run()
        if first is None:
            return 0
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)

    async def main() -> str | None:
        """Runs until the user quits; returns why it could not start, if it could not."""
        nonlocal name
        if first is not None:
            try:
                name = await _create(engine, first)
            except SessionManagerError as e:
                return str(e)
        assert name is not None
        controller = App(engine, engine.session(name).name, settings, listen=f"0.0.0.0:{DEFAULT_PORT}")
        instance.raiseRequested.connect(controller.show_window)
        controller.show_window()
        await controller.finished
        await controller.close()
        return None

    with loop:
        error = loop.run_until_complete(main())
    if error:
        QMessageBox.critical(None, "Session Manager", error)
        raise SessionManagerError(error)
    return 0
