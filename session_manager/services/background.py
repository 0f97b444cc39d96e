"""What the app does by itself while it runs: autosave and backing up to the configured remotes.

Both are the daemon's parts (autosave.py, remotes.replicators) run on the app's qasync loop; this
class turns their callbacks, some from worker threads, into Qt signals.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from PySide6.QtCore import QObject, Signal

from ..local.autosave import AutosavePolicy, Autosaver
from ..local.engine import Engine
from ..local.settings import Settings
from ..net.remotes import Replicator, replicators
from ..store.replicate import Transfer
from ..store.repo import CheckpointInfo

log = logging.getLogger(__name__)


class BackgroundWork(QObject):
    autosaved = Signal(str, object)  # session, CheckpointInfo
    autosaveFailed = Signal(str, str)  # session, one sentence
    backupProgress = Signal(str, int, int)  # remote, bytes done, bytes to send
    backupFailed = Signal(str, str)  # remote, one sentence

    def __init__(self, engine: Engine, settings: Settings, session: str, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.autosaver = Autosaver(engine, AutosavePolicy.from_settings(settings), [session],
                                   on_saved=self._saved, on_failed=self.autosaveFailed.emit)
        self.replicators: list[Replicator] = replicators(engine, self.backupFailed.emit, self._progress,
                                                         self.autosaver.thin_copy)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = [asyncio.ensure_future(self.autosaver.run(self._stop))]
        self._tasks += [asyncio.ensure_future(r.run()) for r in self.replicators]

    def set_policy(self, settings: Settings) -> None:
        self.autosaver.policy = AutosavePolicy.from_settings(settings)

    def checkpoint_taken(self) -> None:
        """Back a new checkpoint up at once."""
        for r in self.replicators:
            r.wake.set()

    async def stop(self) -> None:
        """Let an autosave under way finish (cutting it short would leave QEMU mid-snapshot), stop the rest."""
        self._stop.set()
        for task in self._tasks[1:]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _saved(self, name: str, info: CheckpointInfo) -> None:
        self.checkpoint_taken()
        self.autosaved.emit(name, info)

    def _progress(self, remote: str, t: Transfer) -> None:
        self.backupProgress.emit(remote, t.bytes_done, t.bytes_total)  # from a worker thread: queued by Qt
