"""Which paired machines answer, checked in the background when the tray's menu opens."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from PySide6.QtCore import QObject, Signal

from ..errors import SessionManagerError
from ..net.agent import check
from ..net.peers import Peer, Peers
from ..paths import Home

INTERVAL = 10.0  # seconds a check's results stand before the next request checks again


class PeerReachability(QObject):
    """The paired peers, each with None when its agent answers as the paired installation and has us paired, else
    the one sentence saying what is wrong.  :meth:`refresh` checks them all at once on Qt's loop."""

    changed = Signal()  # read .results()

    def __init__(self, home: Home, interval: float = INTERVAL, parent: QObject | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(parent)
        self.home = home
        self.interval = interval
        self._clock = clock
        self._results: dict[Peer, str | None] | None = None  # None until the first check ends
        self._checked = -math.inf  # clock() when the last check ended
        self._task: asyncio.Task[None] | None = None

    def results(self) -> list[tuple[Peer, str | None]] | None:
        """The peers paired now that have been checked, with what their check said; None until the first check
        ends (unless no peer is paired)."""
        peers = Peers(self.home).all()
        if self._results is None:
            return None if peers else []
        return [(p, self._results[p]) for p in peers if p in self._results]

    def refresh(self) -> None:
        """Check again in the background, unless a check runs, or the last one covered exactly the peers paired now
        and is recent."""
        if self._task is not None and not self._task.done():
            return
        peers = Peers(self.home).all()
        if self._clock() - self._checked < self.interval and set(peers) == set(self._results or {}):
            return
        self._task = asyncio.ensure_future(self._check(peers))

    async def close(self) -> None:
        """Stop a check under way."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _check(self, peers: list[Peer]) -> None:
        try:
            reasons = await check(self.home, peers)
        except SessionManagerError as e:  # e.g. this installation's identity cannot be read
            reasons = [str(e)] * len(peers)
        self._checked = self._clock()
        results = dict(zip(peers, reasons))
        if results != self._results:
            self._results = results
            self.changed.emit()
