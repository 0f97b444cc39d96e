"""Confirmations that say exactly what will happen (virt-manager's rule), and how checkpoints read."""

from __future__ import annotations

from datetime import datetime

from PySide6.QtWidgets import QCheckBox, QMessageBox, QWidget

from ..store.repo import CheckpointInfo


def when(info: CheckpointInfo) -> str:
    """A checkpoint's local time, with the date only when it is not today."""
    at = info.created_at.astimezone()
    return f"{at:%H:%M}" if at.date() == datetime.now().astimezone().date() else f"{at.day} {at:%b %Y %H:%M}"


def describe(info: CheckpointInfo) -> str:
    note = f" ({info.note})" if info.note else ""
    return f"the checkpoint of {when(info)}{note}"


def confirm_restore(parent: QWidget | None, info: CheckpointInfo, ask: bool) -> tuple[bool, bool]:
    """Ask before rolling back; returns (go ahead, ask again next time)."""
    if not ask:
        return True, False
    box = QMessageBox(QMessageBox.Icon.Question, "Roll back the session?",
                      f"Roll the session back to {describe(info)}?", parent=parent)
    box.setInformativeText("The current state is checkpointed first, so nothing is lost: it stays on the "
                           "timeline and you can come back to it.")
    box.addButton("Roll back", QMessageBox.ButtonRole.AcceptRole)
    box.addButton(QMessageBox.StandardButton.Cancel)
    dont_ask = QCheckBox("Don't ask again")
    box.setCheckBox(dont_ask)
    box.exec()
    accepted = box.buttonRole(box.clickedButton()) == QMessageBox.ButtonRole.AcceptRole
    return accepted, not (accepted and dont_ask.isChecked())


def confirm_migrate(parent: QWidget | None, name: str, peer: str) -> tuple[bool, bool]:
    """Ask before moving the session to another computer; returns (go ahead, with post-copy)."""
    box = QMessageBox(QMessageBox.Icon.Question, "Move the session?", f"Move {name} to {peer}?", parent=parent)
    box.setInformativeText("It keeps running while its disk and memory are copied and pauses for a moment at the "
                           "switch; if anything fails before the switch, it simply goes on running here.")
    box.addButton("Move", QMessageBox.ButtonRole.AcceptRole)
    box.addButton(QMessageBox.StandardButton.Cancel)
    early = QCheckBox("Switch over early if it changes memory faster than the network carries it (post-copy: if "
                      "the network fails after the switch, it goes back to its latest checkpoint)")
    box.setCheckBox(early)
    box.exec()
    accepted = box.buttonRole(box.clickedButton()) == QMessageBox.ButtonRole.AcceptRole
    return accepted, accepted and early.isChecked()


def confirm_shut_down(parent: QWidget | None, name: str) -> bool:
    answer = QMessageBox.question(
        parent, "Shut down the session?",
        f"Shut down {name}? Its state is checkpointed first and stays on the timeline; the next start boots "
        "the machine afresh. (Suspend instead resumes exactly where you are.)",
        QMessageBox.StandardButton.Ok | QMessageBox.StandardButton.Cancel)
    return answer == QMessageBox.StandardButton.Ok
