"""Autosave: checkpoint running sessions every few minutes and thin the autosaves the way Time Machine does.

No Qt here: the app runs an :class:`Autosaver` on its qasync loop, ``session-manager daemon`` on plain asyncio.

When.  A session's next autosave is due one interval after its state file last changed, which every
checkpoint (a manual one too, from any process), restore and start rewrites.  So a manual checkpoint
postpones the next autosave, a session that has just started waits an interval, and the app and the
daemon autosaving the same session take turns instead of saving twice.  Stopped and crashed sessions are
skipped.  The engine's per-session lock serialises an autosave with any other operation on the session.

What stays.  Retention thins autosaves only (meta kind "autosave").  Manual checkpoints, pinned ones and
those taken on stop, on shut down and before a restore stay until the user removes them: each comes from
something the user did, and a pre-restore checkpoint may be the only copy of a state they left.  The
session's head and saved state stay too (the engine's forget keeps them).

Space.  Forgetting drops manifests; prune reclaims their space but takes the repository's exclusive lock,
which makes checkpoints wait, so it runs only after a forget removed something, at most once per PRUNE_EVERY.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..errors import SessionManagerError
from ..store.repo import CheckpointInfo, Repository
from .engine import Engine
from .settings import Settings

log = logging.getLogger(__name__)

KIND = "autosave"
TICK = 1.0  # seconds between looks at the sessions
PRUNE_EVERY = 3600.0  # seconds
REMOTE_PRUNE_EVERY = 86400.0  # seconds: pruning a remote may download and upload packs to repack them


@dataclass(frozen=True)
class AutosavePolicy:
    """How often to autosave and which autosaves to keep (0 turns a rule off; with none on, all stay)."""

    interval_s: float = 120.0
    enabled: bool = True
    keep_last: int = 0  # the newest N autosaves
    keep_within: timedelta = timedelta(hours=1)  # every autosave this close to the newest one
    keep_hourly: int = 24  # the newest autosave of each of the last N hours that have one
    keep_daily: int = 30  # ... and of each of the last N days

    def __post_init__(self) -> None:
        if self.enabled and self.interval_s <= 0:
            raise ValueError("an enabled autosave needs an interval above 0")

    @classmethod
    def from_settings(cls, s: Settings) -> AutosavePolicy:
        return cls(interval_s=s.autosave_minutes * 60, enabled=s.autosave_minutes > 0, keep_last=s.autosave_keep_last,
                   keep_within=timedelta(minutes=s.autosave_keep_minutes), keep_hourly=s.autosave_keep_hourly,
                   keep_daily=s.autosave_keep_daily)

    def forget_rules(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`Engine.forget`; empty when no rule is on (nothing is forgotten then)."""
        rules = {"keep_last": self.keep_last, "keep_within": self.keep_within, "keep_hourly": self.keep_hourly,
                 "keep_daily": self.keep_daily}
        on = {k: v for k, v in rules.items() if v}
        return {**on, "kinds": (KIND,)} if on else {}

    def describe(self) -> str:
        if not self.enabled:
            return "autosave is off"
        kept = [f"the newest {self.keep_last}" if self.keep_last else "",
                f"all from the last {duration(self.keep_within.total_seconds())}" if self.keep_within else "",
                f"one an hour for {self.keep_hourly} hours" if self.keep_hourly else "",
                f"one a day for {self.keep_daily} days" if self.keep_daily else ""]
        kept = [k for k in kept if k]
        return (f"autosaving every {duration(self.interval_s)}, keeping "
                + (", ".join(kept) if kept else "every autosave"))


Saved = Callable[[str, CheckpointInfo], None]
Failed = Callable[[str, str], None]


def _ignore(name: str, what: object) -> None:
    pass


class Autosaver:
    """Autosaves sessions while they run: ``await autosaver.run(stop)`` until the event ``stop`` is set.

    ``sessions``: the names to look after; None: every session, including ones created later.  ``policy``
    may be replaced at any time (the app does when its settings change) and applies from the next look.
    ``on_saved(name, checkpoint)`` hears of each autosave, ``on_failed(name, one sentence)`` of each failure
    (the autosave is tried again an interval later).
    """

    def __init__(self, engine: Engine, policy: AutosavePolicy, sessions: Collection[str] | None = None, *,
                 on_saved: Saved = _ignore, on_failed: Failed = _ignore,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.policy = policy
        self.sessions = sessions
        self.on_saved = on_saved
        self.on_failed = on_failed
        self.clock = clock
        self.saving: str | None = None  # the session being autosaved right now
        self._tried: dict[str, float] = {}  # session -> when its latest autosave began
        self._pruned = -PRUNE_EVERY  # when prune last ran
        self._remote_pruned: dict[str, float] = {}  # remote -> when prune last ran there

    def due_in(self, name: str) -> float | None:
        """Seconds until the session's next autosave (0 or less: now); None while autosave is off or it is not
        running."""
        session = self.engine.session(name)
        if not self.policy.enabled or self.engine.sockets(session).pid() is None:
            return None
        changed = max(session.state_file.stat().st_mtime, self._tried.get(name, 0.0))
        return changed + self.policy.interval_s - self.clock()

    async def save(self, name: str) -> CheckpointInfo | None:
        """Autosave a session now, thin its autosaves and prune if it is time; None when it failed."""
        self._tried[name] = self.clock()
        self.saving = name
        try:
            info = await self.engine.checkpoint(name, kind=KIND, note="")
        except (SessionManagerError, OSError) as e:
            self._failed(name, e)
            return None
        finally:
            self.saving = None
        self.on_saved(name, info)
        rules = self.policy.forget_rules()
        try:
            removed = await asyncio.to_thread(self.engine.forget, name, **rules) if rules else []
            if removed:
                log.info("autosave of %s: forgot %d older autosaves", name, len(removed))
            if removed and self.clock() - self._pruned >= PRUNE_EVERY:
                stats = await asyncio.to_thread(self.engine.repo.prune)
                self._pruned = self.clock()
                log.info("autosave: %s", stats.summary())
        except (SessionManagerError, OSError) as e:  # the autosave itself is kept; the next one tries again
            self._failed(name, e)
        return info

    def thin_copy(self, remote: Repository) -> None:
        """After a push to a remote: thin the autosaves in its copy by the same policy (every session in it; what
        a session here runs from or resumes to stays), and prune it at most every REMOTE_PRUNE_EVERY when that
        forgot something.  Blocking: for a worker thread."""
        rules = self.policy.forget_rules()
        if not self.policy.enabled or not rules:
            return
        removed = [c for session in sorted({c.session for c in remote.checkpoints()})
                   for c in remote.forget(session, keep_ids=self.engine.keep_ids(session), **rules)]
        if not removed:
            return
        where = str(remote.backend)
        log.info("autosave: forgot %d older autosaves in %s", len(removed), where)
        if self.clock() - self._remote_pruned.get(where, -REMOTE_PRUNE_EVERY) >= REMOTE_PRUNE_EVERY:
            stats = remote.prune()
            self._remote_pruned[where] = self.clock()
            log.info("autosave: %s: %s", where, stats.summary())

    async def run(self, stop: asyncio.Event) -> None:
        """Autosave until ``stop`` is set; an autosave under way then finishes first, for cutting a checkpoint
        short would leave QEMU in the middle of a snapshot."""
        while not stop.is_set():
            for name in self._names():
                if stop.is_set():
                    break
                try:
                    due = self.due_in(name)
                except (SessionManagerError, OSError):  # deleted meanwhile
                    continue
                if due is not None and due <= 0:
                    await self.save(name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK)

    def _names(self) -> list[str]:
        return [s.name for s in self.engine.sessions()] if self.sessions is None else list(self.sessions)

    def _failed(self, name: str, e: SessionManagerError | OSError) -> None:
        message = str(e) if isinstance(e, SessionManagerError) else f"{e.strerror or e} ({e.filename or 'no file'})."
        log.warning("autosave of %s failed: %s", name, message)
        self.on_failed(name, message)


def duration(seconds: float) -> str:
    """For people: '45 s', '2 min', '1.5 h', '30 days'."""
    for unit, size, below in (("s", 1, 120), ("min", 60, 2 * 3600), ("h", 3600, 2 * 86400)):
        if seconds < below:
            return f"{round(seconds / size, 1):g} {unit}"
    return f"{round(seconds / 86400, 1):g} days"
