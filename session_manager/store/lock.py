"""Repository locks, as restic does them: files in ``locks/``.

Writers and readers hold a shared lock; prune holds an exclusive one.  Taking a lock writes
its file first and then looks at the others, so of two conflicting lockers at least one sees
the other and backs off.  A lock is stale when its process is gone (same host) or when it
was not refreshed for STALE_SECONDS; stale locks are ignored and removed.  A holder refreshes
its lock every REFRESH_SECONDS by writing a new file and deleting the old one.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

from ..errors import NotFoundError, RepositoryError
from .backend import Backend
from .codec import MasterKey, decode, encode

STALE_SECONDS = 30 * 60
REFRESH_SECONDS = 5 * 60


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid``, to tell a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


class Lock:
    """A held lock; use as a context manager or call release()."""

    def __init__(self, backend: Backend, master: MasterKey, exclusive: bool, purpose: str, wait: float) -> None:
        self.backend = backend
        self.master = master
        self.exclusive = exclusive
        self.purpose = purpose
        self.name = ""
        self._stop = threading.Event()
        deadline = time.monotonic() + wait
        while True:
            self._write()
            holder = self._conflict()
            if holder is None:
                break
            self.backend.delete(self.name)
            if time.monotonic() >= deadline:
                raise RepositoryError(
                    f"The repository is locked by {holder.get('purpose', 'another process')} "
                    f"(pid {holder.get('pid')} on {holder.get('host')}); wait for it to finish and try again."
                )
            time.sleep(0.2)
        self._refresher = threading.Thread(target=self._refresh_loop, name="repo-lock", daemon=True)
        self._refresher.start()

    def _write(self) -> None:
        pid = os.getpid()
        info = {"exclusive": self.exclusive, "purpose": self.purpose, "host": socket.gethostname(), "pid": pid,
                "pid_start": _start_time(pid), "time": datetime.now(UTC).isoformat()}
        name = f"locks/{secrets.token_hex(16)}"
        self.backend.save(name, encode(self.master, name.encode(), json.dumps(info).encode()))
        self.name = name

    def _conflict(self) -> dict[str, Any] | None:
        for name in self.backend.list("locks/"):
            if name == self.name:
                continue
            info = read_lock(self.backend, self.master, name)
            if info is None:
                continue
            if is_stale(info):
                self.backend.delete(name)
            elif self.exclusive or info.get("exclusive"):
                return info
        return None

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            old = self.name
            self._write()
            self.backend.delete(old)

    def release(self) -> None:
        self._stop.set()
        if self._refresher.is_alive() and self._refresher is not threading.current_thread():
            self._refresher.join()
        self.backend.delete(self.name)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lock(backend: Backend, master: MasterKey, name: str) -> dict[str, Any] | None:
    """A lock's content, or None if it vanished or cannot be read (a torn write is not possible)."""
    try:
        info = json.loads(decode(master, name.encode(), backend.load(name), None, f"The lock {name}"))
    except NotFoundError:
        return None
    except (RepositoryError, ValueError):
        return {"purpose": "an unreadable lock", "time": "1970-01-01T00:00:00+00:00"}
    return info if isinstance(info, dict) else None


def is_stale(info: dict[str, Any]) -> bool:
    try:
        age = time.time() - datetime.fromisoformat(info["time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return True
    if age > STALE_SECONDS:
        return True
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        start = _start_time(info["pid"])
        return start is None or (info.get("pid_start") is not None and start != info["pid_start"])
    return False
