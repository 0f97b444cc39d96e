"""One session as the app sees it: its state, its checkpoints, and the operations on it.

Widgets never call the engine or QEMU: they call these methods and listen to the
signals.  Each operation runs as an asyncio task on Qt's loop (qasync); the
engine keeps hashing, compression and I/O in worker threads, and reports
progress from them, which Qt delivers to the UI thread as queued signals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from ..errors import SessionManagerError
from ..local import downloads
from ..local.engine import Engine, Status
from ..net.handover import open_display
from ..net.live_migration import describe, migrate
from ..rfb import RfbClient
from ..store.repo import CheckpointInfo
from ..vm.machine import Sockets
from ..vm.migrate import MigrationProgress
from .guest_channel import GuestChannel
from .watch import RepositoryWatcher

log = logging.getLogger(__name__)

POLL_MS = 1000


class State(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    RESTORING = "restoring"
    STOPPING = "stopping"
    EXPORTING = "exporting"
    MIGRATING = "migrating"
    COPYING = "copying"


class Cancelled(SessionManagerError):
    """The user cancelled an operation that can be cancelled safely."""


class SessionService(QObject):
    stateChanged = Signal(str)  # a State value
    checkpointsChanged = Signal()  # read .checkpoints and .head
    progressChanged = Signal(str, float)  # what, fraction 0..1 or -1 when unknown; ("", 1.0) when idle
    checkpointTaken = Signal(object)  # CheckpointInfo
    restored = Signal(object)  # CheckpointInfo restored to
    failed = Signal(str)  # one sentence for the user
    info = Signal(str)  # one sentence for the user
    crashed = Signal(str)  # why the session's machine stopped without being asked to
    migrated = Signal(str, object)  # peer, MigrationResult: the session runs there now

    def __init__(self, engine: Engine, name: str, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self.name = name
        self.state = State.STOPPED
        self.status: Status | None = None
        self.checkpoints: list[CheckpointInfo] = []
        self.head: str | None = None
        self.error: str | None = None  # the last operation's failure, until an operation succeeds
        self.crash: str | None = None  # why the machine stopped unexpectedly, until it runs again
        self._op: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # deletions: they wait for the session's lock, not for _op
        self._cancel = False
        self._poll = QTimer(self)
        self._poll.setInterval(POLL_MS)
        self._poll.timeout.connect(self._check_process)
        self._poll.start()
        self._check_process()
        self.reload_checkpoints()
        self._watcher = RepositoryWatcher(engine.home.repository, self)
        self._watcher.changed.connect(self.reload_checkpoints)
        # A desktop's clipboard and screen size (None for other sessions: their guests have no spice-vdagent).
        self.guest = GuestChannel(self._sockets().vdagent, self) if self._is_desktop() else None

    # -- what the widgets read ----------------------------------------------------------
    @property
    def vnc_socket(self) -> Path:
        return self._sockets().vnc

    def _sockets(self) -> Sockets:
        return self.engine.sockets(self.engine.session(self.name))

    def _is_desktop(self) -> bool:
        try:
            return self.engine.session(self.name).load_config().desktop
        except SessionManagerError:
            return False

    @property
    def busy(self) -> bool:
        return self._op is not None and not self._op.done()

    @property
    def can_cancel(self) -> bool:
        """Only an export can be stopped midway without leaving QEMU or the repository half-changed."""
        return self.busy and self.state == State.EXPORTING

    def thumbnail(self, ckpt_id: str) -> bytes | None:
        try:
            return self.engine.repo.thumbnail(ckpt_id)
        except SessionManagerError:
            return None

    def latest(self, count: int) -> list[CheckpointInfo]:
        return sorted(self.checkpoints, key=lambda c: c.created, reverse=True)[:count]

    # -- operations -------------------------------------------------------------------------
    def checkpoint_now(self, note: str = "") -> asyncio.Task[Any] | None:
        async def run() -> None:
            info = await self.engine.checkpoint(self.name, note, progress=self._progress)
            self.checkpointTaken.emit(info)

        return self._run(State.CHECKPOINTING, run)

    def restore(self, ckpt_id: str) -> asyncio.Task[Any] | None:
        async def run() -> None:
            await self.engine.restore(self.name, ckpt_id, progress=self._progress)
            self.restored.emit(self.engine.repo.get(ckpt_id))

        return self._run(State.RESTORING, run)

    @property
    def desktop(self) -> bool:
        """A desktop session: files dropped on it go into its Downloads."""
        try:
            return self.engine.session(self.name).load_config().desktop
        except SessionManagerError:
            return False

    def copy_in(self, files: list[Path]) -> asyncio.Task[Any] | None:
        """Copy files from this computer into the session's Downloads folder (never over a file already there)."""
        async def run() -> None:
            names = await downloads.copy_in(self.engine, self.name, downloads.plan(files), self._progress)
            self.info.emit(f"Copied into Downloads: {', '.join(names)}." if len(names) > 1 else
                           f"Copied {files[0].name} into Downloads as {names[0]!r}.")

        return self._run(State.COPYING, run)

    def start(self) -> asyncio.Task[Any] | None:
        """Boot or resume the session; after a crash this restores the latest checkpoint."""
        return self._run(State.STARTING, lambda: self.engine.start(self.name))

    def suspend(self) -> asyncio.Task[Any] | None:
        """Checkpoint and stop; the next start resumes exactly here."""
        async def run() -> None:
            self._progress("Saving the session", -1)
            await self.engine.stop(self.name, save=True)

        return self._run(State.STOPPING, run)

    def shut_down(self) -> asyncio.Task[Any] | None:
        """Checkpoint (so nothing is lost), then switch the machine off; the next start boots afresh."""
        async def run() -> None:
            await self.engine.checkpoint(self.name, "before shut down", kind="stop", progress=self._progress)
            await self.engine.stop(self.name, save=False)

        return self._run(State.STOPPING, run)

    def migrate(self, peer: str, postcopy: bool = False) -> asyncio.Task[Any] | None:
        """Move the running session to a paired peer; on failure before the switch it runs on here."""
        shown = 0.0

        def progress(p: MigrationProgress) -> None:  # QEMU's figures come 20 times a second; 5 are plenty
            nonlocal shown
            if time.monotonic() - shown >= 0.2 or p.phase in ("switchover", "completed"):
                shown = time.monotonic()
                self._progress(describe(p, peer), p.fraction)

        async def run() -> None:
            result = await migrate(self.engine, self.name, peer, lambda line: self._progress(line, -1), progress,
                                   postcopy=postcopy)
            self.migrated.emit(peer, result)

        return self._run(State.MIGRATING, run)

    @property
    def moved_to(self) -> str | None:
        try:
            return self.engine.session(self.name).load_state().moved_to
        except SessionManagerError:
            return None

    async def open_display_at(self, peer: str) -> RfbClient:
        """The session's screen at ``peer``, the paired installation it moved to (through its agent)."""
        return await open_display(self.engine.home, peer, self.name)

    def export(self, ckpt_id: str, out_dir: Path) -> asyncio.Task[Any] | None:
        def progress(what: str, fraction: float) -> None:
            if self._cancel:
                raise Cancelled("Export cancelled; no files were left behind.")
            self._progress(what, fraction)

        async def run() -> None:
            argv = await asyncio.to_thread(self.engine.export, self.name, ckpt_id, out_dir, progress)
            self.info.emit(f"Exported to {out_dir}; stock QEMU resumes it with: {' '.join(argv)}")

        return self._run(State.EXPORTING, run)

    def close(self) -> None:
        """Stop watching; the session itself keeps running."""
        self._poll.stop()
        self._watcher.stop()
        if self.guest is not None:
            self.guest.close()

    def cancel(self) -> None:
        if self.can_cancel:
            self._cancel = True

    def set_note(self, ckpt_id: str, note: str) -> None:
        self._edit(lambda: self.engine.repo.annotate(ckpt_id, note=note))

    def set_pinned(self, ckpt_id: str, pinned: bool) -> None:
        self._edit(lambda: self.engine.repo.annotate(ckpt_id, pinned=pinned))

    def cannot_delete(self, info: CheckpointInfo) -> str | None:
        """Why the engine would refuse to delete this checkpoint, so that the timeline need not ask first."""
        try:
            return self.engine.cannot_delete(self.name, info)
        except SessionManagerError as e:
            return str(e)

    def delete(self, ckpt_id: str) -> None:
        async def delete() -> None:
            try:
                await self.engine.delete_checkpoint(self.name, ckpt_id)
            except SessionManagerError as e:
                self.failed.emit(str(e))
            self.reload_checkpoints()

        self._tasks.add(task := asyncio.ensure_future(delete()))
        task.add_done_callback(self._tasks.discard)

    def reload_checkpoints(self) -> None:
        try:
            self.checkpoints = self.engine.checkpoints(self.name)
            self.head = self.engine.session(self.name).load_state().head
        except SessionManagerError as e:
            self.failed.emit(str(e))
            return
        self.checkpointsChanged.emit()

    # -- plumbing -----------------------------------------------------------------------------
    def _run(self, state: State, work: Callable[[], Awaitable[Any]]) -> asyncio.Task[Any] | None:
        if self.busy:
            self.failed.emit(f"The session is busy {self.state.value}; try again when it has finished.")
            return None
        self._cancel = False
        self._set_state(state)
        self._op = asyncio.ensure_future(self._guard(work()))
        return self._op

    async def _guard(self, work: Awaitable[Any]) -> None:
        try:
            await work
            self.error = None
        except SessionManagerError as e:
            log.warning("%s: %s", self.name, e)
            self._fail(str(e))
        except Exception as e:  # a bug: say so rather than leave the app half-working
            log.exception("%s failed", self.name)
            self._fail(f"Unexpected error: {e}; details are in the log.")
        finally:
            self._op = None
            self.progressChanged.emit("", 1.0)
            self._check_process()
            self.reload_checkpoints()

    def _edit(self, change: Callable[[], object]) -> None:
        try:
            change()
        except SessionManagerError as e:
            self.failed.emit(str(e))
        self.reload_checkpoints()

    def _fail(self, message: str) -> None:
        self.error = message
        self.failed.emit(message)

    def _progress(self, what: str, fraction: float) -> None:
        self.progressChanged.emit(what, fraction)  # from worker threads too: Qt queues it to the UI thread

    def _check_process(self) -> None:
        if self.busy:
            return
        try:
            pid = self._sockets().pid()
        except SessionManagerError:
            pid = None
        if pid is None and self.crash is None and self.engine.crashed(self.name):
            self.crash = self.engine.crash_reason(self.name)
            log.warning("%s stopped unexpectedly: %s", self.name, self.crash)
            self.crashed.emit(self.crash)
        elif pid is not None:
            self.crash = None
        self._set_state(State.RUNNING if pid is not None else State.STOPPED)

    def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self.stateChanged.emit(state.value)

