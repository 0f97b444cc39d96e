"""First run: no session yet, so offer the demo or a new session from an ISO or a disk image."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)


@dataclass
class NewSession:
    name: str
    image: Path  # an ISO to install from, or a disk image to run (used read-only, as a backing file)
    memory_mib: int
    cpus: int
    disk_gib: int  # for an ISO install: the size of the new disk

    @property
    def is_iso(self) -> bool:
        return self.image.suffix.lower() == ".iso"


def default_memory_mib() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    return max(1024, min(8192, total // 4 // 512 * 512))


class NewSessionDialog(QDialog):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("New session")
        form = QFormLayout(self)
        self.name = QLineEdit("desktop")
        self.image = QLineEdit(placeholderText="an installer .iso, or a disk image (.qcow2, .img, .raw)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.image, 1)
        row.addWidget(browse)
        self.memory = QSpinBox(minimum=256, maximum=262144, singleStep=512, suffix=" MiB", value=default_memory_mib())
        self.cpus = QSpinBox(minimum=1, maximum=os.cpu_count() or 1, value=min(4, os.cpu_count() or 1))
        self.disk = QSpinBox(minimum=1, maximum=16384, suffix=" GiB", value=32)
        self.error = QLabel(wordWrap=True)
        self.error.setStyleSheet("color: #c0392b;")
        form.addRow("Name", self.name)
        form.addRow("Install from or run", row)
        form.addRow("Memory", self.memory)
        form.addRow("Processors", self.cpus)
        form.addRow("Disk (for an install)", self.disk)
        form.addRow(self.error)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Create and start")
        buttons.accepted.connect(self._check)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Installer ISO or disk image", str(Path.home()),
                                              "Images (*.iso *.qcow2 *.img *.raw *.vmdk *.vdi);;All files (*)")
        if path:
            self.image.setText(path)

    def _check(self) -> None:
        image = Path(self.image.text().strip()).expanduser()
        if not self.name.text().strip():
            self.error.setText("Give the session a name.")
        elif not image.is_file():
            self.error.setText("Choose an existing ISO or disk image file.")
        else:
            self.accept()

    def result_session(self) -> NewSession:
        return NewSession(self.name.text().strip(), Path(self.image.text().strip()).expanduser(),
                          self.memory.value(), self.cpus.value(), self.disk.value())


@dataclass
class ResumeFrom:
    url: str  # s3://bucket/prefix, or a directory (a mounted share)
    endpoint: str | None
    access_key: str
    secret_key: str
    passphrase: str


class ResumeDialog(QDialog):
    """Where the sessions were backed up, and what opens them."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Resume a session from a server")
        form = QFormLayout(self)
        self.url = QLineEdit(placeholderText="s3://bucket/prefix, or a folder on a mounted share")
        self.endpoint = QLineEdit(placeholderText="https://backup.example.net:9000 (S3 only)")
        self.access_key = QLineEdit()
        self.secret_key = QLineEdit(echoMode=QLineEdit.EchoMode.Password)
        self.passphrase = QLineEdit(echoMode=QLineEdit.EchoMode.Password)
        self.error = QLabel(wordWrap=True)
        self.error.setStyleSheet("color: #c0392b;")
        form.addRow("Backed up to", self.url)
        form.addRow("Server address", self.endpoint)
        form.addRow("Access key", self.access_key)
        form.addRow("Secret key", self.secret_key)
        form.addRow("Passphrase", self.passphrase)
        form.addRow(QLabel("The newest checkpoint of your latest session is brought here and started; only what "
                           "it needs is downloaded.", wordWrap=True))
        form.addRow(self.error)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Resume")
        buttons.accepted.connect(self._check)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def _check(self) -> None:
        s3 = self.url.text().strip().startswith("s3://")
        if not self.url.text().strip():
            self.error.setText("Say where the sessions were backed up.")
        elif s3 and not (self.endpoint.text().strip() and self.access_key.text() and self.secret_key.text()):
            self.error.setText("An S3 server needs its address, an access key and a secret key.")
        elif not self.passphrase.text():
            self.error.setText("Give the passphrase you set with `session-manager key add`.")
        else:
            self.accept()

    def result_source(self) -> ResumeFrom:
        return ResumeFrom(self.url.text().strip(), self.endpoint.text().strip() or None, self.access_key.text(),
                          self.secret_key.text(), self.passphrase.text())


class FirstRunDialog(QDialog):
    """Returns (via .choice) "demo", "new" (then .new_session), "resume" (then .resume_from) or None."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Welcome to Session Manager")
        self.choice: str | None = None
        self.new_session: NewSession | None = None
        self.resume_from: ResumeFrom | None = None
        layout = QVBoxLayout(self)
        text = QLabel(
            "<h2>Your desktop, never lost</h2>"
            "<p>Session Manager runs a whole desktop in a virtual machine, checkpoints it live every few "
            "minutes or when you press the shortcut, and lets you roll back to any checkpoint.</p>"
            "<p>You have no session yet.</p>", wordWrap=True, textFormat=Qt.TextFormat.RichText)
        layout.addWidget(text)
        demo = QPushButton("Try the demo session")
        demo.clicked.connect(lambda: self._choose("demo"))
        demo.setToolTip("A tiny machine that counts on its screen: checkpoint it, let it count, roll it back.")
        new = QPushButton("New session from an ISO or a disk image…")
        new.clicked.connect(self._new)
        resume = QPushButton("Resume a session from a server…")
        resume.clicked.connect(self._resume)
        for button in (demo, new, resume):
            button.setMinimumHeight(40)
            layout.addWidget(button)
        not_now = QPushButton("Not now")
        not_now.clicked.connect(self.reject)
        layout.addWidget(not_now)

    def _choose(self, choice: str) -> None:
        self.choice = choice
        self.accept()

    def _resume(self) -> None:
        dialog = ResumeDialog(self)
        if dialog.exec() == QDialog.DialogCode.Accepted:
            self.resume_from = dialog.result_source()
            self._choose("resume")

    def _new(self) -> None:
        dialog = NewSessionDialog(self)
        if dialog.exec() == QDialog.DialogCode.Accepted:
            self.new_session = dialog.result_session()
            self._choose("new")
