"""Waiting in a coroutine, on plain asyncio and on Qt's loop (qasync) alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Return once ``condition()`` is true; fail, naming ``what``, if it is not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.01)
