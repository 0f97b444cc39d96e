"""``session-manager daemon``: autosave and crash watch for machines without a desktop.

One asyncio process runs an :class:`~.autosave.Autosaver` over the sessions, a crash watch that looks every
WATCH_EVERY seconds and reports (with ``recover``: recovers) each session whose QEMU died, and the
background work handed in, which is where continuous replication to a remote starts.  It rereads the
settings file when that changes.  SIGTERM or SIGINT stop it cleanly: an autosave, prune or recovery under
way finishes first (a checkpoint cut short would leave QEMU in the middle of a snapshot), then it exits 0.
packaging/session-manager.service runs it as a systemd user service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from ..errors import SessionManagerError
from ..store.repo import CheckpointInfo
from .autosave import AutosavePolicy, Autosaver, duration
from .engine import Engine
from .settings import Settings

log = logging.getLogger(__name__)

WATCH_EVERY = 0.5  # seconds between looks for crashed sessions
RECOVER_AGAIN_AFTER = 300.0  # seconds: a session that crashes again sooner after a recovery is left to the user

Background = Callable[[], Awaitable[None]]
"""Work that runs beside the autosaver until the daemon stops and cancels it.  Continuous replication goes
here: remotes.replicators() gives one replicate_forever per remote (store/replicate.py)."""


def crash_message(engine: Engine, name: str) -> str:
    return (f"Session {name} stopped unexpectedly ({engine.crash_reason(name)}); "
            f"recover it with `session-manager recover {name}`.")


def recovered_message(name: str, ckpt: CheckpointInfo) -> str:
    age = (datetime.now(UTC) - ckpt.created_at).total_seconds()
    return (f"Recovered {name} from its latest checkpoint {ckpt.id[:8]} "
            f"({ckpt.meta.kind or 'checkpoint'}, taken {duration(max(age, 0))} ago).")


class Daemon:
    """``sessions``: the names to look after (None: every session, also ones created later); ``interval_s``
    overrides the settings' autosave interval; ``background``: see :data:`Background`."""

    def __init__(self, engine: Engine, sessions: Sequence[str] | None = None, *, interval_s: float | None = None,
                 recover: bool = False, background: Sequence[Background] = ()) -> None:
        self.engine = engine
        self.sessions = sessions
        self.interval_s = interval_s
        self.recover = recover
        self.background = background
        self._stamp = self._settings_stamp()
        self.autosaver = Autosaver(engine, self._read_policy(), sessions, on_saved=self._saved,
                                   on_failed=lambda name, why: print(f"Autosave of {name} failed: {why}", flush=True))
        self.wakes: list[asyncio.Event] = []  # set after each autosave (for whoever copies checkpoints elsewhere)
        self._recovering: str | None = None
        self._recovered: dict[str, float] = {}  # session -> when the daemon last recovered it (monotonic)

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, stop, sig)
        names = ", ".join(self.sessions) if self.sessions else "every session"
        self._say(f"Daemon watching {names} for crashes{' and recovering them' if self.recover else ''}; "
                  f"{self.autosaver.policy.describe()}.")
        background = [asyncio.ensure_future(work()) for work in self.background]
        try:
            await asyncio.gather(self.autosaver.run(stop), self._watch(stop))
        finally:
            for task in background:
                task.cancel()
            for result in await asyncio.gather(*background, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("background work failed", exc_info=result)
        self._say("Daemon stopped.")

    def _stop(self, stop: asyncio.Event, sig: signal.Signals) -> None:
        if stop.is_set():
            return
        busy = (f" once the autosave of {self.autosaver.saving} has finished" if self.autosaver.saving else
                f" once the recovery of {self._recovering} has finished" if self._recovering else "")
        self._say(f"Stopping on {sig.name}{busy}.")
        stop.set()

    async def _watch(self, stop: asyncio.Event) -> None:
        reported: set[str] = set()
        while not stop.is_set():
            self._reload_policy()
            crashed = {name: why for name in self._names() if (why := self._crash(name))}
            fresh = sorted(set(crashed) - reported)
            for name in fresh:  # all first: a recovery takes a while
                self._say(crashed[name], logging.WARNING)
            reported = set(crashed)
            if self.recover:
                for name in fresh:
                    if not stop.is_set():
                        await self._recover(name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_EVERY)

    def _crash(self, name: str) -> str | None:
        """The crash message if the session crashed."""
        try:
            return crash_message(self.engine, name) if self.engine.crashed(name) else None
        except (SessionManagerError, OSError):  # deleted meanwhile
            return None

    async def _recover(self, name: str) -> None:
        last = self._recovered.get(name)
        if last is not None and time.monotonic() - last < RECOVER_AGAIN_AFTER:
            self._say(f"Not recovering {name} automatically again: it crashed within "
                      f"{duration(RECOVER_AGAIN_AFTER)} of its last recovery.", logging.WARNING)
            return
        self._recovering = name
        try:
            ckpt = await self.engine.recover(name)
        except (SessionManagerError, OSError) as e:
            self._say(f"Could not recover {name}: {e}", logging.ERROR)
            return
        finally:
            self._recovering = None
        self._recovered[name] = time.monotonic()
        self._say(recovered_message(name, ckpt))

    def _saved(self, name: str, ckpt: CheckpointInfo) -> None:
        for wake in self.wakes:
            wake.set()
        self._say(f"Autosaved {name}: checkpoint {ckpt.id[:8]}, paused {ckpt.meta.pause_ms or 0:.1f} ms.")

    def _names(self) -> list[str]:
        return list(self.sessions) if self.sessions else [s.name for s in self.engine.sessions()]

    def _read_policy(self) -> AutosavePolicy:
        policy = AutosavePolicy.from_settings(Settings.load(self.engine.home))
        return replace(policy, interval_s=self.interval_s, enabled=True) if self.interval_s else policy

    def _reload_policy(self) -> None:
        """Follow changes to the settings file; a broken one leaves the policy as it was."""
        stamp = self._settings_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.autosaver.policy = self._read_policy()
        except SessionManagerError as e:
            self._say(f"{e} Until then: {self.autosaver.policy.describe()}.", logging.ERROR)
            return
        self._say(f"Settings changed: {self.autosaver.policy.describe()}.")

    def _settings_stamp(self) -> int | None:
        try:
            return Settings.path(self.engine.home).stat().st_mtime_ns
        except OSError:
            return None

    @staticmethod
    def _say(text: str, level: int = logging.INFO) -> None:
        log.log(level, "%s", text)
        print(text, flush=True)
