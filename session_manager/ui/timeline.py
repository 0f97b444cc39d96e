"""The timeline: a session's checkpoints on a horizontal time axis, branches as lanes (like a git graph).

Widgets only: the view gets checkpoints and a thumbnail loader and emits signals; the services act.
"""

from __future__ import annotations

import bisect
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from PySide6.QtCore import (
    QEvent,
    QMimeData,
    QPoint,
    QPointF,
    QRectF,
    QSize,
    Qt,
    QTimer,
    Signal,
)
from PySide6.QtGui import (
    QBrush,
    QColor,
    QContextMenuEvent,
    QDrag,
    QDragEnterEvent,
    QDragLeaveEvent,
    QDragMoveEvent,
    QDropEvent,
    QFont,
    QFontMetrics,
    QKeyEvent,
    QMouseEvent,
    QPainter,
    QPainterPath,
    QPaintEvent,
    QPen,
    QPixmap,
    QResizeEvent,
    QWheelEvent,
)
from PySide6.QtWidgets import (
    QAbstractScrollArea,
    QApplication,
    QFrame,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMenu,
    QMessageBox,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..store.repo import CheckpointInfo
from ..units import pause_text, size_text
from .dialogs import when

MIME_CHECKPOINT = "application/x-session-manager-checkpoint"
NOW = ""  # the lane key of the "now" marker (the running session), a virtual child of the head

MIN_ZOOM, MAX_ZOOM, DEFAULT_ZOOM = 1.0, 14 * 86400.0, 600.0  # seconds per 100 px
AXIS_H, LANE_H, BASE_Y, STEM = 24, 148, 14, 10
MARGIN_L, MARGIN_R, NOW_GAP, CARD_GAP = 80, 50, 90, 14
PREVIEW_W = 480
LANE_COLORS = ("#3b82f6", "#a855f7", "#10b981", "#f59e0b", "#ef4444", "#06b6d4")
NOW_COLOR = QColor("#16a34a")
TICKS = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 3 * 3600, 6 * 3600, 12 * 3600,
         86400, 2 * 86400, 7 * 86400, 14 * 86400, 28 * 86400)
KIND_BADGES = {"pre-restore": "before restore", "stop": "at stop"}
KIND_NAMES = {"manual": "Manual checkpoint", "autosave": "Autosave", "stop": "Saved when the session stopped",
              "pre-restore": "Saved before a restore"}


@dataclass(frozen=True)
class _Card:
    width: int
    thumb_h: int
    dot: float

    @property
    def height(self) -> int:
        return 4 + self.thumb_h + 4 + 32 + 3


BIG, SMALL = _Card(136, 72, 6.0), _Card(104, 54, 4.0)


@dataclass
class _Node:
    info: CheckpointInfo | None  # None: the "now" marker
    t: float
    lane: int
    x: float = 0.0
    card: bool = False

    @property
    def style(self) -> _Card:
        return SMALL if self.info is not None and self.info.meta.kind == "autosave" else BIG


def checkpoint_mime(ckpt_id: str) -> QMimeData:
    data = QMimeData()
    data.setData(MIME_CHECKPOINT, ckpt_id.encode())
    return data


def checkpoint_from_mime(data: QMimeData) -> str | None:
    return bytes(data.data(MIME_CHECKPOINT).data()).decode() if data.hasFormat(MIME_CHECKPOINT) else None


def assign_lanes(items: Sequence[CheckpointInfo], head: str | None) -> dict[str, int]:
    """Lane per checkpoint id (and NOW when the head is known): a parent's oldest child continues its lane,
    later children (restores) start branches, each in the lowest lane that is free from its fork on."""
    ids = {c.id for c in items}
    ordered = sorted(items, key=lambda c: (c.created_at, c.id))
    t = {c.id: c.created_at.timestamp() for c in ordered}
    parent = {c.id: c.parent if c.parent in ids else None for c in ordered}
    keys = [c.id for c in ordered]
    if head in ids:
        t[NOW], parent[NOW] = math.inf, head
        keys.append(NOW)
    children: dict[str, list[str]] = {}
    for key in keys:
        if (p := parent[key]) is not None:
            children.setdefault(p, []).append(key)
    lanes: dict[str, int] = {}
    lane_end: list[float] = []
    for key in keys:
        if key in lanes:
            continue
        chain = [key]
        while (kids := children.get(chain[-1])) and kids[0] not in lanes:
            chain.append(kids[0])
        p = parent[key]
        start = t[p] if p is not None else t[key]
        lane = next((i for i, end in enumerate(lane_end) if end < start), len(lane_end))
        if lane == len(lane_end):
            lane_end.append(0.0)
        lane_end[lane] = t[chain[-1]]
        lanes.update(dict.fromkeys(chain, lane))
    return lanes


def confirm(parent: QWidget, title: str, text: str, action: str) -> bool:
    box = QMessageBox(QMessageBox.Icon.Warning, title, text, QMessageBox.StandardButton.Cancel, parent)
    go = box.addButton(action, QMessageBox.ButtonRole.DestructiveRole)
    box.setDefaultButton(QMessageBox.StandardButton.Cancel)
    box.exec()
    return box.clickedButton() is go


def inform(parent: QWidget, title: str, text: str) -> None:
    QMessageBox.information(parent, title, text)


def ask_text(parent: QWidget, title: str, label: str, text: str) -> str | None:
    value, ok = QInputDialog.getText(parent, title, label, QLineEdit.EchoMode.Normal, text)
    return value if ok else None


class TimelineView(QWidget):
    restoreRequested = Signal(str)
    noteEdited = Signal(str, str)
    pinToggled = Signal(str, bool)
    deleteRequested = Signal(str)
    exportRequested = Signal(str)  # id: write it out for a stock QEMU
    checkpointRequested = Signal()

    def __init__(self, cannot_delete: Callable[[CheckpointInfo], str | None], parent: QWidget | None = None) -> None:
        """``cannot_delete``: the engine's rule (SessionService.cannot_delete), asked before the confirmation."""
        super().__init__(parent)
        self.cannot_delete = cannot_delete
        self.checkpoint_button = QPushButton("Checkpoint now")
        self.checkpoint_button.setToolTip("Take a checkpoint of the running session (Ctrl+Alt+S)")
        self.checkpoint_button.clicked.connect(lambda: self.checkpointRequested.emit())
        self.canvas = _Canvas(self)
        bar = QHBoxLayout()
        bar.setContentsMargins(6, 4, 6, 0)
        bar.addWidget(self.checkpoint_button)
        bar.addStretch()
        for text, tip, slot in (("−", "Zoom out (Ctrl+wheel, -)", self.zoom_out),
                                ("+", "Zoom in (Ctrl+wheel, +)", self.zoom_in)):
            button = QToolButton()
            button.setText(text)
            button.setToolTip(tip)
            button.setAutoRaise(True)
            button.clicked.connect(slot)
            bar.addWidget(button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addLayout(bar)
        layout.addWidget(self.canvas)

    def set_checkpoints(self, items: Sequence[CheckpointInfo], head: str | None) -> None:
        self.canvas.set_data(items, head)

    def set_thumbnail_loader(self, load: Callable[[str], bytes | None]) -> None:
        self.canvas.loader = load
        self.canvas.thumbs.clear()
        self.canvas.viewport().update()

    def set_zoom(self, seconds_per_100px: float) -> None:
        self.canvas.zoom(seconds_per_100px)

    def zoom_to_fit(self) -> None:
        """The zoom that shows every checkpoint at once, with room for a card at each end (within the limits)."""
        c = self.canvas
        span = c.nodes[c.order[-1]].t - c.t0 if c.order else 0.0
        room = c.viewport().width() - MARGIN_L - MARGIN_R - NOW_GAP - BIG.width
        self.set_zoom(span / max(room, 100.0) * 100 if span else DEFAULT_ZOOM)

    def zoom_in(self) -> None:
        self.canvas.zoom(self.canvas.spp / 2)

    def zoom_out(self) -> None:
        self.canvas.zoom(self.canvas.spp * 2)

    def select(self, ckpt_id: str) -> None:
        self.canvas.select(ckpt_id if ckpt_id in self.canvas.nodes else None)

    def selected(self) -> str | None:
        return self.canvas.selected

    def context_menu(self, ckpt_id: str) -> QMenu:
        info = self._info(ckpt_id)
        menu = QMenu(self)
        menu.addAction("Restore", lambda: self.restoreRequested.emit(ckpt_id))
        menu.addAction("Edit note…", lambda: self.edit_note(ckpt_id))
        menu.addAction("Unpin" if info.pinned else "Pin", lambda: self.pinToggled.emit(ckpt_id, not info.pinned))
        menu.addAction("Export for stock QEMU…", lambda: self.exportRequested.emit(ckpt_id))
        menu.addSeparator()
        menu.addAction("Delete…", lambda: self.delete(ckpt_id))
        return menu

    def edit_note(self, ckpt_id: str) -> None:
        info = self._info(ckpt_id)
        note = ask_text(self, "Edit note", f"Note for the checkpoint from {when(info)}:", info.note)
        if note is not None and note.strip() != info.note:
            self.noteEdited.emit(ckpt_id, note.strip())

    def delete(self, ckpt_id: str) -> None:
        info = self._info(ckpt_id)
        title = f"Delete checkpoint from {when(info)}" + (f" ('{info.note}')" if info.note else "")
        refused = self.cannot_delete(info)
        if refused:
            inform(self, "Checkpoint cannot be deleted", refused)
        elif confirm(self, "Delete checkpoint?", f"{title}? Its memory and disk state can no longer be restored; "
                     "space is freed at the next prune.", "Delete"):
            self.deleteRequested.emit(ckpt_id)

    def _info(self, ckpt_id: str) -> CheckpointInfo:
        info = self.canvas.nodes[ckpt_id].info
        assert info is not None
        return info


class _Preview(QFrame):
    """The hover popup: a large thumbnail and the checkpoint's details."""

    def __init__(self, parent: QWidget) -> None:
        super().__init__(parent, Qt.WindowType.ToolTip | Qt.WindowType.WindowTransparentForInput)
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.image, self.text = QLabel(), QLabel()
        self.text.setTextFormat(Qt.TextFormat.RichText)
        self.text.setWordWrap(True)
        self.text.setFixedWidth(PREVIEW_W)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self.image)
        layout.addWidget(self.text)
        self.ckpt: str | None = None

    def show_for(self, info: CheckpointInfo, pix: QPixmap | None, head: bool, pointer: QPoint) -> None:
        self.ckpt = info.id
        self.image.setVisible(pix is not None)
        if pix is not None:
            self.image.setPixmap(pix)
        m = info.meta
        facts = [KIND_NAMES.get(str(m.kind), "Checkpoint")] + ["pinned"] * info.pinned
        facts += ["the running session continues from here"] * head
        stats = [] if m.pause_ms is None else [
            f"paused {pause_text(m.pause_ms)} ({'live' if m.live else 'stop-and-copy'})"]
        stats += [f"{size_text(info.added_bytes)} added", f"{size_text(info.stream_bytes)} memory stream"]
        stats += [] if info.disk_size is None else [f"{size_text(info.disk_size)} disk"]
        created = info.created_at.astimezone()
        lines = [f"<b>{created:%A} {created.day} {created:%B %Y, %H:%M:%S}</b>"]
        lines += [f"<i>{html.escape(info.note)}</i>"] * bool(info.note)
        lines += [" · ".join(facts), " · ".join(stats)]
        self.text.setText("<br>".join(lines))
        self.adjustSize()
        screen = (QApplication.screenAt(pointer) or QApplication.primaryScreen()).availableGeometry()
        px, py, w, h = pointer.x(), pointer.y(), self.width(), self.height()
        x = px + 16 if px + 16 + w <= screen.right() else px - 16 - w
        y = py + 20 if py + 20 + h <= screen.bottom() else py - 12 - h
        self.move(max(x, screen.left()), max(y, screen.top()))
        self.show()


class _Canvas(QAbstractScrollArea):
    """Lays out, paints and handles the input of the timeline; the view owns signals and dialogs."""

    def __init__(self, view: TimelineView) -> None:
        super().__init__(view)
        self.view = view
        self.nodes: dict[str, _Node] = {}  # by id, NOW for the marker
        self.order: list[str] = []  # checkpoint ids by time
        self.head: str | None = None
        self.selected: str | None = None
        self.spp = DEFAULT_ZOOM
        self.t0 = 0.0
        self.lanes = 0
        self._xs: list[float] = []  # x of self.order
        self._width = 0.0  # of the content
        self.loader: Callable[[str], bytes | None] | None = None
        self.thumbs: dict[str, tuple[QPixmap, QPixmap] | None] = {}  # id -> (card, preview)
        self.preview = _Preview(self)
        self.hover: str | None = None
        self._hover_at = QPoint()  # global
        self.drop_hover = False
        self._press: tuple[QPointF, str] | None = None
        self._hover_timer = QTimer(self, singleShot=True, interval=350)
        self._hover_timer.timeout.connect(self._show_preview)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.viewport().setMouseTracking(True)
        self.viewport().setAcceptDrops(True)
        self.setMinimumHeight(AXIS_H + LANE_H)

    def sizeHint(self) -> QSize:
        return QSize(900, AXIS_H + 2 * LANE_H + 4)

    # -- data and geometry ------------------------------------------------------------------------

    def set_data(self, items: Sequence[CheckpointInfo], head: str | None) -> None:
        bar = self.horizontalScrollBar()
        follow = not self.nodes or bar.value() >= bar.maximum()
        lanes = assign_lanes(items, head)
        self.nodes = {c.id: _Node(c, c.created_at.timestamp(), lanes[c.id]) for c in items}
        self.order = sorted(self.nodes, key=lambda i: (self.nodes[i].t, i))
        if NOW in lanes:
            self.nodes[NOW] = _Node(None, math.inf, lanes[NOW])
        self.head = head if head in self.nodes else None
        self.selected = self.selected if self.selected in self.nodes else None
        self.t0 = self.nodes[self.order[0]].t if self.order else 0.0
        self.lanes = max(lanes.values(), default=-1) + 1
        self._relayout()
        if follow:
            bar.setValue(bar.maximum())
        self._hide_preview()
        self.viewport().update()

    def _relayout(self) -> None:
        """Positions for the zoom; each lane shows the cards that fit (head, then manual, then autosaves)."""
        for node in self.nodes.values():
            node.x = self._x_of(node.t) if node.info else 0.0
        self._xs = [self.nodes[i].x for i in self.order]
        self._width = (self._xs[-1] if self._xs else 0.0) + MARGIN_R + (NOW_GAP if NOW in self.nodes else 70)
        if NOW in self.nodes:
            self.nodes[NOW].x = self._xs[-1] + NOW_GAP
        placed: dict[int, tuple[list[float], list[float]]] = {}  # lane -> sorted card starts, ends

        def rank(key: str) -> tuple[bool, bool, float]:
            info = self.nodes[key].info
            assert info is not None
            return key != self.head, info.meta.kind == "autosave" and not info.pinned, self.nodes[key].t

        for key in sorted(self.order, key=rank):
            node = self.nodes[key]
            a, b = node.x - node.style.width / 2, node.x + node.style.width / 2
            starts, ends = placed.setdefault(node.lane, ([], []))
            k = bisect.bisect(starts, a)
            node.card = (k == 0 or ends[k - 1] + CARD_GAP <= a) and (k == len(starts) or b + CARD_GAP <= starts[k])
            if node.card:
                starts.insert(k, a)
                ends.insert(k, b)
        self._update_scrollbars()

    def _x_of(self, t: float) -> float:
        return MARGIN_L + (t - self.t0) / self.spp * 100

    def _pad(self) -> float:
        """Content narrower than the viewport is right-aligned: the now marker sits at the right edge."""
        return max(0.0, self.viewport().width() - self._width)

    def _between(self, vx0: float, vx1: float) -> list[str]:
        """The checkpoints (by time) whose x lies in a viewport x range."""
        shift = self._pad() - self.horizontalScrollBar().value()
        return self.order[bisect.bisect_left(self._xs, vx0 - shift):bisect.bisect_right(self._xs, vx1 - shift)]

    def _update_scrollbars(self) -> None:
        vw, vh = self.viewport().width(), self.viewport().height()
        self.horizontalScrollBar().setRange(0, max(0, math.ceil(self._width - vw)))
        self.horizontalScrollBar().setPageStep(vw)
        self.verticalScrollBar().setRange(0, max(0, self.lanes * LANE_H - (vh - AXIS_H)))
        self.verticalScrollBar().setPageStep(max(vh - AXIS_H, 1))

    def _vx(self, x: float) -> float:
        return x + self._pad() - self.horizontalScrollBar().value()

    def _t_at(self, vx: float) -> float:
        return self.t0 + (vx - self._pad() + self.horizontalScrollBar().value() - MARGIN_L) * self.spp / 100

    def dot_pos(self, key: str) -> QPointF:
        node = self.nodes[key]
        return QPointF(self._vx(node.x), AXIS_H + node.lane * LANE_H + BASE_Y - self.verticalScrollBar().value())

    def _card_rect(self, node: _Node, dot: QPointF) -> QRectF:
        s = node.style
        return QRectF(dot.x() - s.width / 2, dot.y() + STEM, s.width, s.height)

    def _now_rect(self) -> QRectF:
        dot = self.dot_pos(NOW)
        w = 120 if self.drop_hover else 52
        return QRectF(dot.x() + 26 - w, dot.y() - 11, w, 22)

    def hit(self, pos: QPointF) -> str | None:
        for key in reversed(self._between(pos.x() - BIG.width / 2, pos.x() + BIG.width / 2)):
            node, dot = self.nodes[key], self.dot_pos(key)
            if abs(pos.x() - dot.x()) <= 8 and abs(pos.y() - dot.y()) <= 8:
                return key
            if node.card and self._card_rect(node, dot).contains(pos):
                return key
        return None

    def on_now(self, pos: QPointF) -> bool:
        return NOW in self.nodes and self._now_rect().adjusted(-6, -6, 6, 6).contains(pos)

    # -- selection and zoom -----------------------------------------------------------------------

    def select(self, key: str | None) -> None:
        self.selected = key
        if key is not None:
            node, dot = self.nodes[key], self.dot_pos(key)
            rect = self._card_rect(node, dot) if node.card else QRectF(dot.x() - 8, dot.y() - 8, 16, 16)
            rect = rect.united(QRectF(dot.x(), dot.y() - 10, 1, 1))
            for bar, lo, hi, size in ((self.horizontalScrollBar(), rect.left(), rect.right(), self.viewport().width()),
                                      (self.verticalScrollBar(), rect.top() - AXIS_H, rect.bottom() - AXIS_H,
                                       self.viewport().height() - AXIS_H)):
                if lo < 0:
                    bar.setValue(bar.value() + math.floor(lo) - 8)
                elif hi > size:
                    bar.setValue(bar.value() + math.ceil(min(hi - size, lo)) + 8)
        self.viewport().update()

    def zoom(self, spp: float, anchor: float | None = None) -> None:
        """Zoom keeping the time under ``anchor`` (a viewport x; by default the selection or the centre) in place."""
        vw = self.viewport().width()
        if anchor is None:
            sel = self.dot_pos(self.selected).x() if self.selected else -1.0
            anchor = sel if 0 <= sel <= vw else vw / 2
        t = self._t_at(anchor)
        self.spp = min(max(spp, MIN_ZOOM), MAX_ZOOM)
        self._relayout()
        self.horizontalScrollBar().setValue(round(self._x_of(t) + self._pad() - anchor))
        self._hide_preview()
        self.viewport().update()

    # -- thumbnails -------------------------------------------------------------------------------

    def thumb(self, key: str, preview: bool = False) -> QPixmap | None:
        if self.loader is None:
            return None
        if key not in self.thumbs:
            data, pix = self.loader(key), QPixmap()
            dpr = self.devicePixelRatioF()
            if data and pix.loadFromData(data):
                card, big = (pix.scaledToWidth(round(w * dpr), Qt.TransformationMode.SmoothTransformation)
                             for w in (BIG.width - 8, PREVIEW_W))
                card.setDevicePixelRatio(dpr)
                big.setDevicePixelRatio(dpr)
                self.thumbs[key] = (card, big)
            else:
                self.thumbs[key] = None
        pair = self.thumbs[key]
        return None if pair is None else pair[preview]

    # -- painting ---------------------------------------------------------------------------------

    def paintEvent(self, event: QPaintEvent) -> None:
        p = QPainter(self.viewport())
        p.setRenderHints(QPainter.RenderHint.Antialiasing | QPainter.RenderHint.SmoothPixmapTransform)
        pal = self.palette()
        vw, vh = self.viewport().width(), self.viewport().height()
        p.fillRect(0, 0, vw, vh, pal.base())
        if not self.order:
            p.setPen(pal.placeholderText().color())
            p.drawText(QRectF(0, 0, vw, vh), Qt.AlignmentFlag.AlignCenter,
                       "No checkpoints yet — press Ctrl+Alt+S or Checkpoint now")
            return
        top = self.verticalScrollBar().value()
        for lane in range(self.lanes):
            if lane % 2:
                p.fillRect(QRectF(0, AXIS_H + lane * LANE_H - top, vw, LANE_H), pal.alternateBase())
        step, ticks = self._ticks(vw)
        p.setPen(QPen(pal.mid().color(), 1, Qt.PenStyle.DotLine))
        for vx, _, _ in ticks:
            p.drawLine(QPointF(vx, AXIS_H), QPointF(vx, vh))
        ends = self._between(-BIG.width, math.inf) + [NOW] * (NOW in self.nodes)  # edges end at their child
        for key in sorted(ends, key=self._continues_lane):  # branch-offs under the lanes' own lines
            self._paint_edge(p, key, vw)
        visible = self._between(-BIG.width, vw + BIG.width)
        for key in visible:
            if self.nodes[key].card:
                self._paint_card(p, key)
        for key in visible:
            self._paint_dot(p, key)
        if NOW in self.nodes:
            self._paint_now(p)
        self._paint_axis(p, step, ticks, vw)

    def _lane_color(self, lane: int) -> QColor:
        return QColor(LANE_COLORS[lane % len(LANE_COLORS)])

    def _continues_lane(self, key: str) -> bool:
        node = self.nodes[key]
        parent = self.head if node.info is None else node.info.parent
        return parent in self.nodes and self.nodes[parent].lane == node.lane  # type: ignore[index]

    def _paint_edge(self, p: QPainter, key: str, vw: int) -> None:
        node = self.nodes[key]
        parent = self.head if node.info is None else node.info.parent
        if parent is None or parent not in self.nodes:
            return
        a, b = self.dot_pos(parent), self.dot_pos(key)
        if b.x() < -BIG.width or a.x() > vw + BIG.width:
            return
        path = QPainterPath(a)
        if a.y() != b.y():
            half = self.nodes[parent].style.width / 2 if self.nodes[parent].card else 0
            turn = max(a.x(), min(a.x() + half + CARD_GAP / 2, b.x() - 24))
            end, mid = min(b.x(), turn + 24), (turn + min(b.x(), turn + 24)) / 2
            path.lineTo(turn, a.y())
            path.cubicTo(QPointF(mid, a.y()), QPointF(mid, b.y()), QPointF(end, b.y()))
        path.lineTo(b)
        color = NOW_COLOR if node.info is None else self._lane_color(node.lane)
        p.setPen(QPen(color, 2, Qt.PenStyle.DashLine if node.info is None else Qt.PenStyle.SolidLine))
        p.setBrush(Qt.BrushStyle.NoBrush)
        p.drawPath(path)

    def _paint_dot(self, p: QPainter, key: str) -> None:
        node, dot = self.nodes[key], self.dot_pos(key)
        assert node.info is not None
        r, color = node.style.dot, self._lane_color(node.lane)
        if key == self.selected:
            p.setPen(Qt.PenStyle.NoPen)
            p.setBrush(self.palette().highlight())
            p.drawEllipse(dot, r + 4, r + 4)
        if key == self.head:
            p.setPen(QPen(NOW_COLOR, 2))
            p.setBrush(Qt.BrushStyle.NoBrush)
            p.drawEllipse(dot, r + 3, r + 3)
        hollow = node.info.meta.kind in KIND_BADGES
        p.setPen(QPen(color, 2))
        p.setBrush(self.palette().base() if hollow else QBrush(color))
        p.drawEllipse(dot, r, r)

    def _paint_card(self, p: QPainter, key: str) -> None:
        node, pal = self.nodes[key], self.palette()
        info, s = node.info, node.style
        assert info is not None
        rect = self._card_rect(node, self.dot_pos(key))
        p.save()
        if s is SMALL:
            p.setOpacity(0.8)
        border = (QPen(pal.highlight().color(), 2.5) if key == self.selected else
                  QPen(NOW_COLOR, 2) if key == self.head else QPen(pal.mid().color(), 1))
        p.setPen(border)
        p.setBrush(pal.window() if s is SMALL else pal.base())
        p.drawRoundedRect(rect, 6, 6)
        thumb = QRectF(rect.left() + 4, rect.top() + 4, s.width - 8, s.thumb_h)
        clip = QPainterPath()
        clip.addRoundedRect(thumb, 3, 3)
        p.setClipPath(clip)
        pix = self.thumb(key)
        if pix is None:
            p.fillRect(thumb, self._lane_color(node.lane).darker(300))
        else:
            size = pix.deviceIndependentSize().scaled(thumb.size(), Qt.AspectRatioMode.KeepAspectRatioByExpanding)
            p.drawPixmap(QRectF(thumb.center().x() - size.width() / 2, thumb.center().y() - size.height() / 2,
                                size.width(), size.height()), pix, QRectF(pix.rect()))
        p.setClipping(False)
        small = QFont(self.font())
        small.setPointSizeF(small.pointSizeF() * 0.82)
        p.setFont(small)
        badge = KIND_BADGES.get(str(info.meta.kind))
        if badge:
            w = QFontMetrics(small).horizontalAdvance(badge) + 8
            p.setPen(Qt.PenStyle.NoPen)
            p.setBrush(QColor(0, 0, 0, 170))
            p.drawRoundedRect(QRectF(thumb.left() + 3, thumb.top() + 3, w, 15), 3, 3)
            p.setPen(QColor("white"))
            p.drawText(QRectF(thumb.left() + 3, thumb.top() + 3, w, 15), Qt.AlignmentFlag.AlignCenter, badge)
        if info.pinned:
            self._paint_pin(p, QPointF(thumb.right() - 9, thumb.top() + 9))
        # line 1: time, added size; line 2: the note (or the kind), the pause (amber when not live)
        left, right = Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, \
            Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
        line = QRectF(rect.left() + 5, thumb.bottom() + 3, s.width - 10, 16)
        dim = pal.placeholderText().color()
        p.setPen(dim)
        p.drawText(line, right, size_text(info.added_bytes))
        bold = QFont(self.font())
        bold.setBold(True)
        bold.setPointSizeF(small.pointSizeF() if s is SMALL else bold.pointSizeF() * 0.92)
        p.setFont(bold)
        p.setPen(pal.text().color())
        p.drawText(line, left, f"{info.created_at.astimezone():%H:%M}")
        p.setFont(small)
        line.translate(0, 15)
        pause = pause_text(info.meta.pause_ms) if info.meta.pause_ms is not None else ""
        p.setPen(QColor("#d97706") if info.meta.live is False else dim)
        p.drawText(line, right, pause)
        p.setPen(pal.text().color() if info.note else dim)
        room = round(line.width() - QFontMetrics(small).horizontalAdvance(pause) - 6)
        note = info.note or KIND_NAMES.get(str(info.meta.kind), "")
        p.drawText(line, left, QFontMetrics(small).elidedText(note, Qt.TextElideMode.ElideRight, room))
        p.restore()

    @staticmethod
    def _paint_pin(p: QPainter, c: QPointF) -> None:
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(QColor("#f59e0b"))
        p.drawEllipse(c, 8, 8)
        p.setPen(QPen(QColor("white"), 1.6, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap))
        p.drawLine(c + QPointF(-1, 1), c + QPointF(-4.5, 4.5))
        p.setBrush(QColor("white"))
        p.setPen(Qt.PenStyle.NoPen)
        p.drawEllipse(c + QPointF(1.2, -1.2), 3.2, 3.2)

    def _paint_now(self, p: QPainter) -> None:
        rect = self._now_rect()
        p.setPen(QPen(QColor("white"), 2) if self.drop_hover else Qt.PenStyle.NoPen)
        p.setBrush(NOW_COLOR.lighter(120) if self.drop_hover else NOW_COLOR)
        p.drawRoundedRect(rect, 11, 11)
        bold = QFont(self.font())
        bold.setBold(True)
        p.setFont(bold)
        p.setPen(QColor("white"))
        p.drawText(rect, Qt.AlignmentFlag.AlignCenter, "Restore here" if self.drop_hover else "now")

    def _ticks(self, vw: int) -> tuple[int, list[tuple[float, str, bool]]]:
        """The step and (viewport x, label, major) of the axis ticks: local time, at least 90 px apart."""
        step = next((s for s in TICKS if s / self.spp * 100 >= 90), TICKS[-1])
        lo, hi = self._t_at(0), self._t_at(vw)
        if step < 86400:
            midnight = datetime.combine(datetime.fromtimestamp(lo).date(), datetime.min.time()).timestamp()
            times = [midnight + k * step for k in range(math.ceil((lo - midnight) / step),
                                                          math.floor((hi - midnight) / step) + 1)]
        else:
            days, d = step // 86400, datetime.fromtimestamp(lo).date()
            d -= timedelta(days=(d.toordinal() - 1) % days)
            times = []
            while (ts := datetime.combine(d, datetime.min.time()).timestamp()) <= hi:
                times.append(ts)
                d += timedelta(days=days)
        out = []
        for ts in times:
            at = datetime.fromtimestamp(ts)
            major = step < 86400 and at.hour == 0 and at.minute == 0
            if step < 60:
                label = f"{at:%H:%M:%S}"
            elif step < 86400 and not major:
                label = f"{at:%H:%M}"
            else:
                label = f"{at:%a} {at.day} {at:%b}" if step < 7 * 86400 else f"{at.day} {at:%b}"
            out.append((self._vx(self._x_of(ts)), label, major))
        return step, out

    def _paint_axis(self, p: QPainter, step: int, ticks: list[tuple[float, str, bool]], vw: int) -> None:
        pal = self.palette()
        p.fillRect(QRectF(0, 0, vw, AXIS_H), pal.window())
        p.setPen(pal.mid().color())
        p.drawLine(QPointF(0, AXIS_H - 0.5), QPointF(vw, AXIS_H - 0.5))
        font = QFont(self.font())
        font.setPointSizeF(font.pointSizeF() * 0.85)
        sticky = 0.0
        if step < 86400:  # name the day at the left, unless a midnight label is about to take over
            day = datetime.fromtimestamp(self._t_at(0))
            label = "Today" if day.date() == date.today() else f"{day:%a} {day.day} {day:%b}"
            font.setBold(True)
            sticky = QFontMetrics(font).horizontalAdvance(label) + 12
            if not any(major and vx < sticky + 10 for vx, _, major in ticks):
                p.setFont(font)
                p.setPen(pal.text().color())
                p.drawText(QRectF(6, 0, sticky, AXIS_H - 3), Qt.AlignmentFlag.AlignBottom, label)
        for vx, label, major in ticks:
            font.setBold(major)
            p.setFont(font)
            p.setPen(pal.mid().color())
            p.drawLine(QPointF(vx, AXIS_H - (8 if major else 5)), QPointF(vx, AXIS_H))
            if vx > sticky or major:
                p.setPen(pal.text().color() if major else pal.placeholderText().color())
                p.drawText(QRectF(vx + 3, 0, 120, AXIS_H - 3), Qt.AlignmentFlag.AlignBottom, label)

    # -- input ------------------------------------------------------------------------------------

    def resizeEvent(self, event: QResizeEvent) -> None:
        bar = self.horizontalScrollBar()
        follow = bar.value() >= bar.maximum()
        self._update_scrollbars()
        if follow:
            bar.setValue(bar.maximum())
        super().resizeEvent(event)

    def scrollContentsBy(self, dx: int, dy: int) -> None:
        self._hide_preview()
        self.viewport().update()

    def mousePressEvent(self, event: QMouseEvent) -> None:
        key = self.hit(event.position())
        self._hide_preview()
        self.select(key)
        self._press = (event.position(), key) if key and event.button() == Qt.MouseButton.LeftButton else None

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        self._press = None

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:
        key = self.hit(event.position())
        if key and event.button() == Qt.MouseButton.LeftButton:
            self.select(key)
            self.view.restoreRequested.emit(key)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        pos = event.position()
        if self._press and (pos - self._press[0]).manhattanLength() >= QApplication.startDragDistance():
            key, self._press = self._press[1], None
            self._hide_preview()
            drag = QDrag(self)
            drag.setMimeData(checkpoint_mime(key))
            if (pix := self.thumb(key)) is not None:
                drag.setPixmap(pix)
                drag.setHotSpot(QPoint(round(pix.deviceIndependentSize().width() / 2), 10))
            drag.exec(Qt.DropAction.CopyAction)
            return
        over, self._hover_at = self.hit(pos), event.globalPosition().toPoint()
        self.viewport().setCursor(Qt.CursorShape.PointingHandCursor if over else Qt.CursorShape.ArrowCursor)
        if over != self.hover:
            self._hide_preview()
            self.hover = over
            if over:
                self._hover_timer.start()

    def leaveEvent(self, event: QEvent) -> None:
        self._hide_preview()

    def _show_preview(self) -> None:
        if self.hover in self.nodes and self.hover != NOW:
            info = self.nodes[self.hover].info
            assert info is not None
            self.preview.show_for(info, self.thumb(info.id, preview=True), info.id == self.head, self._hover_at)

    def _hide_preview(self) -> None:
        self._hover_timer.stop()
        self.hover = None
        self.preview.hide()

    def wheelEvent(self, event: QWheelEvent) -> None:
        delta = event.angleDelta()
        if event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            self.zoom(self.spp * 0.8 ** (delta.y() / 120), event.position().x())
        elif event.modifiers() & Qt.KeyboardModifier.ShiftModifier:
            self.verticalScrollBar().setValue(self.verticalScrollBar().value() - delta.y() // 2)
        else:
            bar = self.horizontalScrollBar()
            bar.setValue(bar.value() - (delta.x() or delta.y()) // 2)
        event.accept()

    def contextMenuEvent(self, event: QContextMenuEvent) -> None:
        key = self.hit(QPointF(event.pos()))
        if key is None and event.reason() == QContextMenuEvent.Reason.Keyboard:
            key = self.selected
        if key:
            self.select(key)
            menu = self.view.context_menu(key)
            menu.exec(event.globalPos())
            menu.deleteLater()

    def keyPressEvent(self, event: QKeyEvent) -> None:
        k, sel, K = event.key(), self.selected, Qt.Key
        if k in (K.Key_Return, K.Key_Enter) and sel:
            self.view.restoreRequested.emit(sel)
        elif k == K.Key_Delete and sel:
            self.view.delete(sel)
        elif k in (K.Key_Plus, K.Key_Equal, K.Key_Minus):
            self.zoom(self.spp * 2 if k == K.Key_Minus else self.spp / 2)
        elif k in (K.Key_Left, K.Key_Right, K.Key_Home, K.Key_End) and self.order:
            i = self.order.index(sel) if sel else len(self.order)
            i = 0 if k == K.Key_Home else len(self.order) - 1 if k == K.Key_End else i + (1 if k == K.Key_Right else -1)
            self.select(self.order[min(max(i, 0), len(self.order) - 1)])
        elif k in (K.Key_Up, K.Key_Down) and sel:
            lane = self.nodes[sel].lane + (1 if k == K.Key_Down else -1)
            near = [i for i in self.order if self.nodes[i].lane == lane]
            if near:
                self.select(min(near, key=lambda i: abs(self.nodes[i].x - self.nodes[sel].x)))
        else:
            super().keyPressEvent(event)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if checkpoint_from_mime(event.mimeData()) and NOW in self.nodes:
            event.acceptProposedAction()

    def dragMoveEvent(self, event: QDragMoveEvent) -> None:
        hover = self.on_now(event.position())
        if hover != self.drop_hover:
            self.drop_hover = hover
            self.viewport().update()
        if hover:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragLeaveEvent(self, event: QDragLeaveEvent) -> None:
        self.drop_hover = False
        self.viewport().update()

    def dropEvent(self, event: QDropEvent) -> None:
        key, hit = checkpoint_from_mime(event.mimeData()), self.on_now(event.position())
        self.drop_hover = False
        self.viewport().update()
        if key and hit:
            event.acceptProposedAction()
            self.view.restoreRequested.emit(key)
