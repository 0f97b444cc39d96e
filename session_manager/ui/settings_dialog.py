"""Settings: the checkpoint shortcut (and which global-shortcut mechanism is active), confirmations, the viewer."""

from __future__ import annotations

from dataclasses import replace

from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QKeySequenceEdit,
    QLabel,
    QWidget,
)

from ..local.settings import Settings


class SettingsDialog(QDialog):
    def __init__(self, settings: Settings, hotkey_reason: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Settings — Session Manager")
        self._settings = settings
        form = QFormLayout(self)
        self.shortcut = QKeySequenceEdit(QKeySequence(settings.checkpoint_shortcut))
        self.shortcut.setMaximumSequenceLength(1)
        self.hotkey = QLabel(hotkey_reason, wordWrap=True)
        self.hotkey.setStyleSheet("color: palette(mid);")
        self.confirm = QCheckBox("Ask before rolling back")
        self.confirm.setChecked(settings.confirm_restore)
        self.grab_keyboard = QCheckBox("Grab the keyboard while the session window has focus")
        self.grab_keyboard.setChecked(settings.keyboard_grab)
        self.scale = QComboBox()
        self.scale.addItem("Fit the window", "fit")
        self.scale.addItem("Actual size (1:1)", "1:1")
        self.scale.setCurrentIndex(max(0, self.scale.findData(settings.scale)))
        self.notify = QCheckBox("Show a notification for each checkpoint")
        self.notify.setChecked(settings.show_notifications)
        self.autosave = QDoubleSpinBox(minimum=0, maximum=1440, decimals=1, singleStep=1, suffix=" min",
                                       value=settings.autosave_minutes)
        self.autosave.setSpecialValueText("Off")
        self.autosave.setToolTip("A live checkpoint pauses the session for milliseconds, so a short interval costs "
                                 "little. Autosaves are thinned like Time Machine's: all from the last hour, one an "
                                 "hour for a day, one a day for a month; manual and pinned checkpoints stay.")
        form.addRow("Checkpoint shortcut", self.shortcut)
        form.addRow("", self.hotkey)
        form.addRow(self.confirm)
        form.addRow(self.grab_keyboard)
        form.addRow("Picture", self.scale)
        form.addRow(self.notify)
        form.addRow("Autosave every", self.autosave)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def settings(self) -> Settings:
        shortcut = self.shortcut.keySequence().toString(QKeySequence.SequenceFormat.PortableText)
        return replace(self._settings,
                       checkpoint_shortcut=shortcut or self._settings.checkpoint_shortcut,
                       confirm_restore=self.confirm.isChecked(),
                       keyboard_grab=self.grab_keyboard.isChecked(),
                       scale=str(self.scale.currentData()),
                       show_notifications=self.notify.isChecked(),
                       autosave_minutes=self.autosave.value())
