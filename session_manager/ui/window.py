"""The session window (the embedded viewer, the session's controls, progress) and the timeline window."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, QEvent, QMimeData, QPropertyAnimation, Qt, QTimer, Signal
from PySide6.QtGui import (
    QAction,
    QClipboard,
    QCloseEvent,
    QDragEnterEvent,
    QDropEvent,
    QKeySequence,
)
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QGraphicsOpacityEffect,
    QLabel,
    QMainWindow,
    QProgressBar,
    QPushButton,
    QStackedWidget,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from ..services.session_service import SessionService, State
from ..store.repo import CheckpointInfo
from ..units import pause_text, size_text
from .dialogs import confirm_shut_down, when
from .timeline import TimelineView, checkpoint_from_mime
from .viewer import VncViewer

FULL_SCREEN = "Shift+F11"  # as remote-viewer: plain F11 belongs to the guest
SCREEN_DEBOUNCE_MS = 300  # a desktop's screen follows the window once it has stopped changing size this long


def _local_files(data: QMimeData) -> list[Path]:
    """The files of this computer a drag carries (none if it carries anything else too)."""
    urls = data.urls() if data.hasUrls() else []
    return [Path(url.toLocalFile()) for url in urls] if urls and all(url.isLocalFile() for url in urls) else []


class SessionWindow(QMainWindow):
    """The user's desktop: the viewer fills the window; checkpoints dropped on it roll the session back."""

    restoreRequested = Signal(str)  # a checkpoint id dropped here; the app confirms and restores
    timelineRequested = Signal()
    settingsRequested = Signal()
    closed = Signal()

    def __init__(self, service: SessionService) -> None:
        super().__init__()
        self.service = service
        self._following: str | None = None  # the peer whose copy of the session is shown (it moved there)
        self.setWindowTitle(f"{service.name} — Session Manager")
        self.setAcceptDrops(True)
        # The size a 1024x768 guest needs with the bars, but never more than the screen has room for (less its
        # panels and some margin for the window's frame): on a small screen the status line stays in sight.
        room = QApplication.primaryScreen().availableGeometry()
        self.resize(min(1040, room.width() * 9 // 10), min(860, room.height() * 9 // 10))

        self.viewer = VncViewer()
        self.stopped_page = self._stopped_page()
        self.pages = QStackedWidget()
        self.pages.addWidget(self.viewer)
        self.pages.addWidget(self.stopped_page)
        self.setCentralWidget(self.pages)
        self._flash = self._flash_overlay()

        bar = QToolBar("Session", self)
        bar.setMovable(False)
        bar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.addToolBar(bar)
        self.checkpoint_action = bar.addAction("Checkpoint now", lambda: service.checkpoint_now())
        bar.addAction("Timeline…", self.timelineRequested.emit)
        bar.addSeparator()
        self.cad_action = bar.addAction("Ctrl+Alt+Del", self.viewer.send_ctrl_alt_del)
        self.grab_action = bar.addAction("Grab keyboard")
        self.grab_action.setCheckable(True)
        self.grab_action.toggled.connect(self.viewer.set_keyboard_grab)
        self.viewer.keyboardGrabbed.connect(self.grab_action.setChecked)
        self.mute_action = bar.addAction("Mute")
        self.mute_action.setCheckable(True)
        self.mute_action.setToolTip("Stop the session's sound")
        self.mute_action.toggled.connect(self.viewer.set_muted)
        self.viewer.soundFailed.connect(lambda message: self.statusBar().showMessage(message, 15000))
        self.full_action = QAction("Full screen", self, checkable=True, shortcut=QKeySequence(FULL_SCREEN))
        self.full_action.toggled.connect(self._full_screen)
        bar.addAction(self.full_action)
        self.scale_action = QAction("Scale instead", self, checkable=True)
        self.scale_action.setToolTip("Keep the desktop's screen size and scale its picture to the window, instead "
                                     "of resizing the desktop to fit the window")
        self.scale_action.setVisible(service.guest is not None)
        self.scale_action.toggled.connect(self._follow_size)
        bar.addAction(self.scale_action)
        bar.addSeparator()
        self.suspend_action = bar.addAction("Suspend", lambda: service.suspend())
        self.shut_down_action = bar.addAction("Shut down", self._shut_down)
        bar.addAction("Settings…", self.settingsRequested.emit)

        self.state_label = QLabel()
        self.backup_label = QLabel()
        self.progress = QProgressBar(textVisible=True)
        self.progress.setMaximumWidth(260)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(service.cancel)
        self.statusBar().addWidget(self.state_label, 1)
        self.statusBar().addPermanentWidget(self.backup_label)
        self.statusBar().addPermanentWidget(self.progress)
        self.statusBar().addPermanentWidget(self.cancel_button)
        self.progress.hide()
        self.cancel_button.hide()

        service.stateChanged.connect(self._state_changed)
        service.progressChanged.connect(self._progress_changed)
        service.checkpointTaken.connect(self._checkpoint_taken)
        service.crashed.connect(lambda _: self._state_changed(service.state.value))
        service.failed.connect(lambda message: self.statusBar().showMessage(message, 15000))
        service.info.connect(lambda message: self.statusBar().showMessage(message, 15000))
        self._state_changed(service.state.value)

        # A desktop's screen follows the viewer's size, and its clipboard is shared while this window is active.
        self._screen_timer = QTimer(self, singleShot=True, interval=SCREEN_DEBOUNCE_MS)
        self._screen_timer.timeout.connect(self._send_screen)
        if service.guest is not None:
            self.viewer.areaResized.connect(self._follow_size)
            QApplication.clipboard().dataChanged.connect(self._host_copied)
            service.guest.clipboardChanged.connect(self._guest_copied)

    # -- a desktop's screen size and clipboard ------------------------------------------------------
    def _follow_size(self, *_: object) -> None:
        if not self.scale_action.isChecked():
            self._screen_timer.start()

    def _send_screen(self) -> None:
        size = self.viewer.device_size()
        if self.service.guest is not None and not self.scale_action.isChecked():
            self.service.guest.set_screen(size.width(), size.height())

    def _host_copied(self) -> None:
        """Only while this window is active: what is copied elsewhere (a password from a password manager, say)
        is not the guest's business, and would be kept in its checkpoints.  Activating the window sends it."""
        text = QApplication.clipboard().text(QClipboard.Mode.Clipboard)
        if self.service.guest is not None and self.isActiveWindow() and text:
            self.service.guest.set_clipboard(text)

    def _guest_copied(self, text: str) -> None:
        """Only while this window is active too: a guest may not write the computer's clipboard behind the
        user's back."""
        if self.isActiveWindow():
            QApplication.clipboard().setText(text, QClipboard.Mode.Clipboard)

    def changeEvent(self, event: QEvent) -> None:
        if event.type() == QEvent.Type.ActivationChange and self.isActiveWindow():
            self._host_copied()
        super().changeEvent(event)

    # -- pages ------------------------------------------------------------------------------
    def _stopped_page(self) -> QWidget:
        page = QWidget()
        page.setStyleSheet("background: #202428; color: #e8e8e8;")
        layout = QVBoxLayout(page)
        layout.addStretch()
        self.stopped_text = QLabel(alignment=Qt.AlignmentFlag.AlignCenter, wordWrap=True)
        self.stopped_text.setStyleSheet("font-size: 15pt;")
        layout.addWidget(self.stopped_text)
        self.start_button = QPushButton("Start the session")
        self.start_button.clicked.connect(lambda: self.service.start())
        self.start_button.setStyleSheet("font-size: 13pt; padding: 8px 24px; background: #2d7d46; color: white;")
        layout.addWidget(self.start_button, 0, Qt.AlignmentFlag.AlignCenter)
        self.follow_button = QPushButton()
        self.follow_button.clicked.connect(self.follow)
        self.follow_button.setStyleSheet("font-size: 13pt; padding: 8px 24px; background: #2d5f7d; color: white;")
        layout.addWidget(self.follow_button, 0, Qt.AlignmentFlag.AlignCenter)
        layout.addStretch()
        return page

    def _flash_overlay(self) -> QWidget:
        flash = QWidget(self.viewer)
        flash.setStyleSheet("background: white;")
        flash.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
        effect = QGraphicsOpacityEffect(flash, opacity=0.0)
        flash.setGraphicsEffect(effect)
        self._flash_animation = QPropertyAnimation(effect, QByteArray(b"opacity"), self)
        self._flash_animation.setDuration(450)
        self._flash_animation.setStartValue(0.7)
        self._flash_animation.setEndValue(0.0)
        self._flash_animation.finished.connect(flash.hide)
        flash.hide()
        return flash

    def flash(self) -> None:
        """A camera-like flash over the picture: the checkpoint was taken."""
        self._flash.setGeometry(self.viewer.rect())
        self._flash.show()
        self._flash.raise_()
        self._flash_animation.start()

    # -- reacting to the service ---------------------------------------------------------------
    def follow(self) -> None:
        """Show the session's screen from the peer it moved to; keyboard and mouse go there too."""
        peer = self.service.moved_to
        if peer is not None:
            self._following = peer
            self.viewer.follow(peer, lambda: self.service.open_display_at(peer))
            self._state_changed(self.service.state.value)

    def _state_changed(self, value: str) -> None:
        state = State(value)
        running = state not in (State.STOPPED, State.STARTING)
        moved_to = self.service.moved_to
        if self._following and (running or moved_to != self._following):
            self._following = None  # it runs here again, or has moved on
        if running:
            self.viewer.connect_to(str(self.service.vnc_socket))
            self.pages.setCurrentWidget(self.viewer)
        elif self._following:
            self.pages.setCurrentWidget(self.viewer)
        else:
            self.viewer.disconnect_()
            self.pages.setCurrentWidget(self.stopped_page)
            self.stopped_text.setText(self._stopped_text(state))
        self.start_button.setText("Restore the latest checkpoint" if self.service.crash else "Start the session")
        self.start_button.setEnabled(state == State.STOPPED and not moved_to)
        self.follow_button.setText(f"Follow to {moved_to}")
        self.follow_button.setVisible(state == State.STOPPED and moved_to is not None)
        for action in (self.checkpoint_action, self.suspend_action, self.shut_down_action):
            action.setEnabled(state == State.RUNNING)
        where = f" on {self._following}" if self._following else ""
        self.setWindowTitle(f"{self.service.name}{where} — Session Manager")
        self.state_label.setText(f"{self.service.name}: shown from {self._following}" if self._following else
                                 f"{self.service.name}: {value}")

    def _stopped_text(self, state: State) -> str:
        s = self.service
        if state == State.STARTING:
            return "Starting the session…"
        if s.moved_to:
            return (f"{s.name} now runs on {s.moved_to}.\nFollow it there to use it from this window, or close the "
                    "window. Its checkpoints up to the move stay on this computer; to bring it back, migrate it from "
                    "there.")
        if s.crash:
            latest = s.latest(1)
            since = f" of {when(latest[0])}" if latest else ""
            return (f"{s.name} stopped unexpectedly: {s.crash}.\nNothing after its latest checkpoint{since} "
                    "can be brought back; restoring it takes a moment.")
        return (f"{s.name} is not running.\nStart it to carry on where it was suspended, or roll back to a "
                "checkpoint from the timeline.")

    def _progress_changed(self, what: str, fraction: float) -> None:
        idle = not what
        self.progress.setVisible(not idle)
        self.cancel_button.setVisible(not idle and self.service.can_cancel)
        if idle:
            return
        if fraction < 0:
            self.progress.setRange(0, 0)
        else:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(fraction * 1000))
        self.progress.setFormat(f"{what} %p%" if fraction >= 0 else what)
        self.state_label.setText(f"{self.service.name}: {what}…")

    def _checkpoint_taken(self, info: CheckpointInfo) -> None:
        self.flash()
        self.statusBar().showMessage(
            f"Checkpoint taken at {when(info)}: the session paused {pause_text(info.meta.pause_ms or 0)}, "
            f"{size_text(info.added_bytes)} stored", 15000)

    def _shut_down(self) -> None:
        if confirm_shut_down(self, self.service.name):
            self.service.shut_down()

    def _full_screen(self, on: bool) -> None:
        for bar in self.findChildren(QToolBar):
            bar.setVisible(not on)
        self.statusBar().setVisible(not on)
        self.showFullScreen() if on else self.showNormal()

    # -- drag a checkpoint here to roll back; files go into a desktop session's Downloads ------------------------
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if self.service.state == State.RUNNING and (checkpoint_from_mime(event.mimeData()) or
                                                    (self.service.desktop and _local_files(event.mimeData()))):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        ckpt = checkpoint_from_mime(event.mimeData())
        files = _local_files(event.mimeData())
        if ckpt:
            event.acceptProposedAction()
            self.restoreRequested.emit(ckpt)
        elif files and self.service.desktop:
            event.acceptProposedAction()
            self.service.copy_in(files)

    def closeEvent(self, event: QCloseEvent) -> None:
        if self._following:  # no screen is watched from a closed window
            self._following = None
            self._state_changed(self.service.state.value)
        self.closed.emit()
        super().closeEvent(event)


class TimelineWindow(QMainWindow):
    """The session's checkpoints on a time axis; restores go through the app's confirmation."""

    restoreRequested = Signal(str)

    def __init__(self, service: SessionService) -> None:
        super().__init__()
        self.service = service
        self.setWindowTitle(f"Timeline of {service.name} — Session Manager")
        self.resize(1100, 520)
        self.view = TimelineView(service.cannot_delete)
        self.view.set_thumbnail_loader(service.thumbnail)
        self.setCentralWidget(self.view)
        self.view.restoreRequested.connect(self.restoreRequested)
        self.view.checkpointRequested.connect(lambda: service.checkpoint_now())
        self.view.noteEdited.connect(service.set_note)
        self.view.pinToggled.connect(service.set_pinned)
        self.view.deleteRequested.connect(service.delete)
        self.view.exportRequested.connect(self._export)
        service.checkpointsChanged.connect(self.reload)
        self.reload()

    def reload(self) -> None:
        self.view.set_checkpoints(self.service.checkpoints, self.service.head)

    def _export(self, ckpt_id: str) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export the checkpoint to a folder", str(Path.home()))
        if folder:
            self.service.export(ckpt_id, Path(folder))
