"""Notices checkpoints appearing or changing in the local repository, from any process (CLI, daemon, a pull)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

WATCHED = ("checkpoints", "annotations")  # manifests appear last in a checkpoint's write order
SETTLE_MS = 150


class RepositoryWatcher(QObject):
    """Emits ``changed`` (on the UI thread, at most every SETTLE_MS) when a checkpoint is added, annotated or
    removed."""

    changed = Signal()
    _poked = Signal()  # from watchdog's thread; Qt queues it to this object's thread

    def __init__(self, repository: Path, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._settle = QTimer(self, singleShot=True, interval=SETTLE_MS)
        self._settle.timeout.connect(self.changed)
        self._poked.connect(self._settle.start)
        handler = _Handler(self._poked.emit)
        self._observer = Observer()
        for sub in WATCHED:
            (repository / sub).mkdir(parents=True, exist_ok=True)
            self._observer.schedule(handler, str(repository / sub))
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(5)


class _Handler(FileSystemEventHandler):
    def __init__(self, poke: Callable[[], None]) -> None:
        self._poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("created", "moved", "deleted") and ".tmp" not in str(event.src_path):
            self._poke()
