"""The tray icon: the session's state at a glance and a menu rebuilt from live state each time it opens."""

from __future__ import annotations

from functools import partial

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QMenu, QSystemTrayIcon

from ..resources import icon_path
from ..services.reachability import PeerReachability
from ..services.session_service import SessionService, State
from ..store.repo import CheckpointInfo
from ..units import pause_text, size_text
from .dialogs import when

ROLLBACK_ITEMS = 10
BUSY = (State.STARTING, State.CHECKPOINTING, State.RESTORING, State.STOPPING, State.EXPORTING, State.MIGRATING,
        State.COPYING)


def icon_name(service: SessionService) -> str:
    if service.state in BUSY:
        return "tray-checkpointing"
    if service.error or service.crash:
        return "tray-error"
    return "tray-running" if service.state == State.RUNNING else "tray-stopped"


def checkpoint_label(info: CheckpointInfo) -> str:
    kind = info.meta.kind or "manual"
    extra = {"autosave": " · autosave", "stop": " · saved on stop", "pre-restore": " · before a restore"}.get(kind, "")
    return f"{when(info)}{' — ' + info.note if info.note else ''}{extra}"


def short_reason(reason: str) -> str:
    """A few words for the menu from a peer check's sentence (the item's tooltip shows all of it)."""
    words = {"refuses this installation": "not paired there", "presented certificate": "certificate changed"}
    return next((short for key, short in words.items() if key in reason), "not reachable")


class Tray(QObject):
    """Owns the QSystemTrayIcon; asks the app (through signals) for anything that opens a window."""

    openRequested = Signal()
    timelineRequested = Signal()
    settingsRequested = Signal()
    restoreRequested = Signal(str)
    shutDownRequested = Signal()
    migrateRequested = Signal(str)  # a paired peer's name
    quitRequested = Signal()

    def __init__(self, service: SessionService, peers: PeerReachability, shortcut: str,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.service = service
        self.peers = peers
        self.shortcut = shortcut
        self.notifications = True
        self.menu = QMenu()
        self.menu.aboutToShow.connect(self.rebuild)
        self.migrate = QMenu("Migrate to", self.menu)  # kept across rebuilds: filled again when the peers' check ends
        self.migrate.setToolTipsVisible(True)
        peers.changed.connect(self._fill_migrate)
        self.icon = QSystemTrayIcon(self)
        self.icon.setContextMenu(self.menu)
        self.icon.activated.connect(self._activated)
        service.stateChanged.connect(self.refresh)
        service.progressChanged.connect(self._progress)
        service.checkpointTaken.connect(self._checkpoint_taken)
        service.failed.connect(self._failed)
        service.crashed.connect(lambda why: self._failed(f"{service.name} stopped unexpectedly ({why}); open it "
                                                         "to restore its latest checkpoint."))
        self.rebuild()
        self.refresh()

    def show(self) -> None:
        self.icon.show()

    def refresh(self) -> None:
        self.icon.setIcon(QIcon(str(icon_path(icon_name(self.service)))))
        latest = self.service.latest(1)
        last = f"; last checkpoint {when(latest[0])}" if latest else ""
        self.icon.setToolTip(f"Session Manager — {self.service.name}: {self.service.state.value}{last}")

    def rebuild(self) -> None:
        """Fill the menu from the session's state now (called each time it opens)."""
        s, menu = self.service, self.menu
        running, idle = s.state == State.RUNNING, not s.busy
        menu.clear()
        menu.addAction(f"Open {s.name}", self.openRequested.emit)
        menu.addAction(f"Checkpoint now\t{self.shortcut}", lambda: s.checkpoint_now()).setEnabled(running and idle)
        rollback = menu.addMenu("Roll back to")
        rollback.setToolTipsVisible(True)
        for info in s.latest(ROLLBACK_ITEMS):
            action = rollback.addAction(checkpoint_label(info), partial(self.restoreRequested.emit, info.id))
            action.setToolTip(f"paused {pause_text(info.meta.pause_ms or 0)}, {size_text(info.added_bytes)} stored")
        rollback.setEnabled(bool(s.checkpoints) and idle)
        menu.addAction("Timeline…", self.timelineRequested.emit)
        menu.addSeparator()
        menu.addAction("Restore the latest checkpoint" if s.crash else "Start session",
                       lambda: s.start()).setEnabled(s.state == State.STOPPED)
        menu.addAction("Suspend session", lambda: s.suspend()).setEnabled(running and idle)
        menu.addAction("Shut down session", self.shutDownRequested.emit).setEnabled(running and idle)
        self.peers.refresh()
        self._fill_migrate()
        menu.addMenu(self.migrate).setEnabled(running and idle)
        menu.addSeparator()
        menu.addAction("Settings…", self.settingsRequested.emit)
        menu.addAction("Quit (the session keeps running)" if running else "Quit", self.quitRequested.emit)

    def _fill_migrate(self) -> None:
        """The paired machines that answer, and the others disabled with why not."""
        self.migrate.clear()
        results = self.peers.results()
        if results is None:
            self.migrate.addAction("Checking paired machines…").setEnabled(False)
        for peer, reason in results or []:
            action = self.migrate.addAction(f"{peer.name} ({peer.address})" if reason is None else
                                            f"{peer.name} — {short_reason(reason)}",
                                            partial(self.migrateRequested.emit, peer.name))
            action.setEnabled(reason is None)
            action.setToolTip(reason or "")
        if self.migrate.isEmpty():
            self.migrate.addAction("No paired machines: session-manager peers add HOST").setEnabled(False)

    def _activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason == QSystemTrayIcon.ActivationReason.Trigger:
            self.openRequested.emit()

    def _progress(self, what: str, fraction: float) -> None:
        self.refresh()
        if what:
            done = f" {fraction:.0%}" if fraction >= 0 else ""
            self.icon.setToolTip(f"Session Manager — {self.service.name}: {what}{done}")

    def _checkpoint_taken(self, info: CheckpointInfo) -> None:
        self.refresh()
        if self.notifications:
            self.icon.showMessage("Checkpoint taken",
                                  f"{self.service.name} paused {pause_text(info.meta.pause_ms or 0)}; "
                                  f"{size_text(info.added_bytes)} stored.",
                                  QSystemTrayIcon.MessageIcon.Information, 4000)

    def _failed(self, message: str) -> None:
        self.refresh()
        self.icon.showMessage("Session Manager", message, QSystemTrayIcon.MessageIcon.Critical, 10000)
