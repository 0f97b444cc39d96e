"""A desktop session's spice-vdagent channel for the widgets: the guest's clipboard, and its screen size.

The channel (vm/vdagent.py) is connected for as long as the window lives, and again whenever it closes: a
checkpoint restored or the session restarted is a new QEMU on the same socket path; a stopped session simply
refuses until it runs.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from ..vm.vdagent import VDAgent, VDAgentError

log = logging.getLogger(__name__)

RECONNECT_S = 1.0


class GuestChannel(QObject):
    clipboardChanged = Signal(str)  # text copied in the guest

    def __init__(self, path: Path, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._agent = VDAgent(path, self.clipboardChanged.emit)
        self._task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        while True:
            try:
                await self._agent.run()
            except VDAgentError as e:
                log.debug("%s", e)
            except Exception:  # a bug: the channel stays down, the rest of the app carries on
                log.exception("the spice-vdagent channel failed")
                return
            await asyncio.sleep(RECONNECT_S)

    def set_clipboard(self, text: str) -> None:
        """The guest's clipboard holds ``text`` from now on."""
        self._agent.set_clipboard(text)

    def set_screen(self, width: int, height: int) -> None:
        """Ask the guest for a screen of this many pixels (again after each reconnection)."""
        self._agent.set_screen(width, height)

    def close(self) -> None:
        self._task.cancel()
