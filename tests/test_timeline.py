"""The timeline widget: layout into lanes, signals from mouse, keyboard, menus and drops, zoom, thumbnails."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import (
    QBuffer,
    QByteArray,
    QIODevice,
    QMimeData,
    QPoint,
    QPointF,
    Qt,
)
from PySide6.QtGui import (
    QColor,
    QDragEnterEvent,
    QDropEvent,
    QFont,
    QImage,
    QPainter,
    QWheelEvent,
)
from PySide6.QtWidgets import QApplication

from session_manager.store.repo import CheckpointInfo, CheckpointMeta
from session_manager.ui import timeline
from session_manager.ui.timeline import (
    MIME_CHECKPOINT,
    NOW,
    TimelineView,
    assign_lanes,
    checkpoint_from_mime,
    checkpoint_mime,
)

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


def ckpt(cid: str, minutes: float, parent: str | None = None, kind: str = "manual", note: str = "",
         pinned: bool = False, added: int = 35 << 20, live: bool = True) -> CheckpointInfo:
    meta = CheckpointMeta(kind=kind, note=note, pause_ms=4.2, live=live)
    return CheckpointInfo(cid, "work", parent, (T0 + timedelta(minutes=minutes)).isoformat(), meta,
                          {"pinned": pinned}, added, 2 << 30, 20 << 30, manifest={})


def refuse_head_and_pinned(info: CheckpointInfo) -> str | None:
    """The engine's rule (tested for real in test_cli.py), as a timeline with head "g" would get it."""
    if info.pinned:
        return f"Checkpoint {info.id} is pinned, so it cannot be deleted; unpin it first."
    return f"The running session continues from {info.id}, so it cannot be deleted." if info.id == "g" else None


def tree() -> list[CheckpointInfo]:
    """a-b-c-d on the first lane; f branches from a (a restore) and ends; g branches from c later."""
    return [ckpt("a", 0, note="fresh install", pinned=True), ckpt("b", 20, "a", "autosave"),
            ckpt("c", 40, "b"), ckpt("d", 60, "c", "autosave"), ckpt("f", 30, "a", "pre-restore"),
            ckpt("g", 80, "c", note="after rollback")]


def png(color: str, text: str) -> bytes:
    img = QImage(1280, 720, QImage.Format.Format_RGB32)
    img.fill(QColor(color))
    p = QPainter(img)
    p.fillRect(0, 680, 1280, 40, QColor("#20242c"))
    p.fillRect(160, 110, 760, 460, QColor("#f4f4f5"))
    p.fillRect(160, 110, 760, 36, QColor("#3f3f46"))
    p.setPen(QColor("#18181b"))
    p.setFont(QFont("DejaVu Sans", 56))
    p.drawText(200, 330, text)
    p.end()
    data = QByteArray()
    buf = QBuffer(data)
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    img.save(buf, "PNG")
    return bytes(data.data())


@pytest.fixture
def view(qtbot: Any) -> TimelineView:
    v = TimelineView(refuse_head_and_pinned)
    qtbot.addWidget(v)
    v.resize(1000, 480)
    v.set_checkpoints(tree(), "g")
    v.show()
    qtbot.waitExposed(v)
    return v


def at(v: TimelineView, cid: str) -> QPoint:
    return v.canvas.dot_pos(cid).toPoint()


def test_lanes_branches_and_time_order(view: TimelineView) -> None:
    lanes = assign_lanes(tree(), "g")
    assert lanes["a"] == lanes["b"] == lanes["c"] == lanes["d"] == 0
    assert lanes["f"] == 1  # the branch from a restore gets its own lane
    assert lanes["g"] == 1 and lanes[NOW] == 1  # ... which is reused once f's branch has ended
    assert assign_lanes(tree(), "c")[NOW] == 2  # running from c, which has children: a new branch
    assert assign_lanes(tree(), "d")[NOW] == 0  # running from the end of a lane: the lane continues
    assert NOW not in assign_lanes(tree(), None)
    xs = [view.canvas.dot_pos(c).x() for c in ("a", "b", "f", "c", "d", "g")]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    assert view.canvas.dot_pos(NOW).x() > max(xs)
    assert view.canvas.dot_pos("f").y() > view.canvas.dot_pos("b").y()


def test_double_click_restores(view: TimelineView, qtbot: Any) -> None:
    with qtbot.waitSignal(view.restoreRequested) as sig:
        qtbot.mouseDClick(view.canvas.viewport(), Qt.MouseButton.LeftButton, pos=at(view, "c"))
    assert sig.args == ["c"]
    assert view.selected() == "c"


def test_context_menu_actions(view: TimelineView, qtbot: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def ask_text(parent: object, title: str, label: str, text: str) -> str:
        asked.append(text)
        return " new "

    def confirm(parent: object, title: str, text: str, action: str) -> bool:
        asked.append(text)
        return True

    monkeypatch.setattr(timeline, "ask_text", ask_text)
    monkeypatch.setattr(timeline, "confirm", confirm)

    def trigger(cid: str, text: str) -> None:
        menu = view.context_menu(cid)
        next(a for a in menu.actions() if a.text() == text).trigger()

    with qtbot.waitSignal(view.restoreRequested) as sig:
        trigger("b", "Restore")
    assert sig.args == ["b"]
    with qtbot.waitSignal(view.noteEdited) as sig:
        trigger("g", "Edit note…")
    assert sig.args == ["g", "new"] and asked == ["after rollback"]
    with qtbot.waitSignal(view.pinToggled) as sig:
        trigger("c", "Pin")
    assert sig.args == ["c", True]
    with qtbot.waitSignal(view.pinToggled) as sig:
        trigger("a", "Unpin")
    assert sig.args == ["a", False]
    with qtbot.waitSignal(view.deleteRequested) as sig:
        trigger("c", "Delete…")
    assert sig.args == ["c"]
    assert "can no longer be restored; space is freed at the next prune" in asked[-1]
    assert asked[-1].startswith("Delete checkpoint from ")


def test_delete_declined_and_refused(view: TimelineView, qtbot: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    told: list[str] = []

    def confirm(parent: object, title: str, text: str, action: str) -> bool:
        told.append(text)
        return False

    monkeypatch.setattr(timeline, "confirm", confirm)
    monkeypatch.setattr(timeline, "inform", lambda parent, title, text: told.append(text))
    with qtbot.assertNotEmitted(view.deleteRequested):
        view.delete("g")  # the head
        view.delete("a")  # pinned
        view.delete("f")  # declined
    assert "running session continues from" in told[0] and "cannot be deleted" in told[0]
    assert "pinned" in told[1] and "unpin it first" in told[1]
    assert "('fresh install')" not in told[2] and told[2].startswith("Delete checkpoint from")


def test_keyboard(view: TimelineView, qtbot: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "confirm", lambda *args: True)
    view.select("a")
    view.canvas.setFocus()
    qtbot.keyClick(view.canvas, Qt.Key.Key_Right)
    assert view.selected() == "b"
    qtbot.keyClick(view.canvas, Qt.Key.Key_Down)
    assert view.selected() == "f"
    qtbot.keyClick(view.canvas, Qt.Key.Key_End)
    assert view.selected() == "g"
    with qtbot.waitSignal(view.restoreRequested) as sig:
        qtbot.keyClick(view.canvas, Qt.Key.Key_Return)
    assert sig.args == ["g"]
    qtbot.keyClick(view.canvas, Qt.Key.Key_Left)
    with qtbot.waitSignal(view.deleteRequested) as sig:
        qtbot.keyClick(view.canvas, Qt.Key.Key_Delete)
    assert sig.args == ["d"]


def test_drag_carries_the_id(view: TimelineView, qtbot: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert checkpoint_from_mime(checkpoint_mime("c")) == "c"
    assert bytes(checkpoint_mime("c").data(MIME_CHECKPOINT).data()) == b"c"
    assert checkpoint_from_mime(QMimeData()) is None
    started: list[str | None] = []

    class Drag:
        def __init__(self, source: object) -> None:
            self.mime: QMimeData | None = None

        def setMimeData(self, mime: QMimeData) -> None:
            self.mime = mime

        def exec(self, action: Qt.DropAction) -> Qt.DropAction:
            assert self.mime is not None
            started.append(checkpoint_from_mime(self.mime))
            return action

    monkeypatch.setattr(timeline, "QDrag", Drag)
    start = at(view, "c")
    qtbot.mousePress(view.canvas.viewport(), Qt.MouseButton.LeftButton, pos=start)
    qtbot.mouseMove(view.canvas.viewport(), start + QPoint(30, 20))
    assert started == ["c"]


def test_drop_on_now_restores(view: TimelineView, qtbot: Any) -> None:
    def drop(pos: QPointF) -> None:
        args = (Qt.DropAction.CopyAction, checkpoint_mime("b"), Qt.MouseButton.LeftButton,
                Qt.KeyboardModifier.NoModifier)
        enter = QDragEnterEvent(pos.toPoint(), *args)
        QApplication.sendEvent(view.canvas.viewport(), enter)
        assert enter.isAccepted()
        QApplication.sendEvent(view.canvas.viewport(), QDropEvent(pos, *args))

    with qtbot.assertNotEmitted(view.restoreRequested):
        drop(view.canvas.dot_pos("d") + QPointF(0, 40))
    with qtbot.waitSignal(view.restoreRequested) as sig:
        drop(view.canvas.dot_pos(NOW))
    assert sig.args == ["b"]


def test_zoom_scales_and_keeps_the_anchor(qtbot: Any) -> None:
    v = TimelineView(refuse_head_and_pinned)
    qtbot.addWidget(v)
    v.resize(900, 400)
    items = [ckpt(f"c{i}", 10 * i, f"c{i - 1}" if i else None, "autosave" if i % 3 else "manual") for i in range(40)]
    v.set_checkpoints(items, "c39")
    v.show()
    qtbot.waitExposed(v)
    c = v.canvas
    gap = c.dot_pos("c31").x() - c.dot_pos("c30").x()
    v.select("c30")
    x = c.dot_pos("c30").x()
    v.zoom_in()
    assert c.dot_pos("c31").x() - c.dot_pos("c30").x() == pytest.approx(2 * gap, abs=1)
    assert c.dot_pos("c30").x() == pytest.approx(x, abs=1)
    v.set_zoom(3600)
    assert c.dot_pos("c31").x() - c.dot_pos("c30").x() == pytest.approx(100 / 6, abs=1)
    v.set_zoom(1e9)
    assert c.spp == timeline.MAX_ZOOM
    v.set_zoom(300)
    under = c.dot_pos("c28")  # Ctrl+wheel keeps what is under the pointer in place
    wheel = QWheelEvent(under, c.viewport().mapToGlobal(under), QPoint(), QPoint(0, 120), Qt.MouseButton.NoButton,
                        Qt.KeyboardModifier.ControlModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(c.viewport(), wheel)
    assert c.spp == pytest.approx(240)
    assert c.dot_pos("c28").x() == pytest.approx(under.x(), abs=1)
    v.zoom_to_fit()  # all 390 minutes on screen at once
    width = c.viewport().width()
    assert all(0 < c.dot_pos(f"c{i}").x() < width for i in range(40))
    assert c.dot_pos("c39").x() - c.dot_pos("c0").x() > width / 2


def test_thumbnails_load_lazily_once(qtbot: Any) -> None:
    calls: list[str] = []

    def load(cid: str) -> bytes:
        calls.append(cid)
        return png("#336699", cid)

    v = TimelineView(refuse_head_and_pinned)
    qtbot.addWidget(v)
    v.resize(900, 400)
    v.set_thumbnail_loader(load)
    v.set_checkpoints([ckpt(f"c{i}", 30 * i, f"c{i - 1}" if i else None) for i in range(30)], "c29")
    assert calls == []
    v.show()
    qtbot.waitExposed(v)
    qtbot.waitUntil(lambda: len(calls) > 0)
    v.canvas.viewport().repaint()
    assert 0 < len(calls) < 30 and len(set(calls)) == len(calls)
    assert "c29" in calls and "c0" not in calls  # the newest are in view
    v.select("c0")
    v.canvas.viewport().repaint()
    assert "c0" in calls and len(set(calls)) == len(calls)


def test_hover_preview(view: TimelineView, qtbot: Any) -> None:
    view.set_thumbnail_loader(lambda cid: png("#7c3aed", cid))
    qtbot.mouseMove(view.canvas.viewport(), at(view, "c") + QPoint(0, 40))
    preview = view.canvas.preview
    qtbot.waitUntil(preview.isVisible)
    assert preview.ckpt == "c"
    assert preview.image.pixmap().deviceIndependentSize().width() == timeline.PREVIEW_W
    assert "Manual checkpoint" in preview.text.text() and "4 ms" in preview.text.text()
    qtbot.mouseMove(view.canvas.viewport(), QPoint(5, view.canvas.viewport().height() - 5))
    assert not preview.isVisible()


def test_render(qtbot: Any, tmp_path: Path) -> None:
    """Renders sample data to PNGs in tmp_path, to look at."""
    v = TimelineView(refuse_head_and_pinned)
    qtbot.addWidget(v)
    v.resize(1100, 420)
    v.grab().save(str(tmp_path / "empty.png"))
    colors = ["#1e3a5f", "#14532d", "#581c87", "#7c2d12", "#0f766e", "#334155"]
    v.set_thumbnail_loader(lambda cid: png(colors[ord(cid[-1]) % len(colors)], f"Desktop {cid}"))
    story = [ckpt("a", 0, note="fresh install", pinned=True), ckpt("b", 10, "a", "autosave", added=3 << 20),
             ckpt("c", 25, "b", note="before the upgrade", added=412 << 20), ckpt("d", 40, "c", "autosave"),
             ckpt("e", 52, "d", "pre-restore"), ckpt("f", 65, "c", "autosave", added=900 << 10),
             ckpt("g", 80, "f", note="after rolling back the upgrade"), ckpt("h", 91, "g", "stop", live=False),
             ckpt("i", 100, "h", "autosave")]
    v.set_checkpoints(story, "i")
    v.show()
    qtbot.waitExposed(v)
    v.select("c")
    v.grab().save(str(tmp_path / "timeline.png"))
    qtbot.mouseMove(v.canvas.viewport(), at(v, "g") + QPoint(0, 40))
    qtbot.waitUntil(v.canvas.preview.isVisible)
    v.canvas.preview.grab().save(str(tmp_path / "preview.png"))
    v.set_zoom(6 * 3600)
    qtbot.wait(20)
    v.grab().save(str(tmp_path / "zoomed-out.png"))
    v.set_checkpoints(story, "c")  # running from c again: "now" starts a third branch
    v.set_zoom(300)
    qtbot.wait(20)
    v.grab().save(str(tmp_path / "branch.png"))
    assert (tmp_path / "timeline.png").stat().st_size > 10_000
