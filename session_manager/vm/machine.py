"""A QEMU process and its QMP connection.

QEMU runs as its own process in its own session, so it outlives the CLI or
the app that started it; anyone can reconnect through the QMP socket in the
session's 0700 runtime directory.  Display is VNC on a unix socket only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from ..errors import QemuError

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
DISK_DEVICE = "disk0"


def node_name(layer: str) -> str:
    """QEMU node name of an overlay file (node names are at most 31 characters)."""
    return "n" + layer.removeprefix("layer-").removesuffix(".qcow2")


def layer_of_node(node: str) -> str:
    return f"layer-{node[1:]}.qcow2"


class RunState(str, Enum):
    """QEMU's run states that matter here (QMP ``query-status``)."""

    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    POSTMIGRATE = "postmigrate"
    FINISH_MIGRATE = "finish-migrate"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"
    GUEST_PANICKED = "guest-panicked"
    OTHER = "other"

    @classmethod
    def parse(cls, value: str) -> RunState:
        try:
            return cls(value)
        except ValueError:
            return cls.OTHER


@dataclass(frozen=True)
class Sockets:
    """Where a running machine can be reached."""

    runtime: Path

    @property
    def qmp(self) -> Path:
        return self.runtime / "qmp.sock"

    @property
    def vnc(self) -> Path:
        return self.runtime / "vnc.sock"

    @property
    def pidfile(self) -> Path:
        return self.runtime / "qemu.pid"

    @property
    def account(self) -> Path:
        """A desktop's account for its first boot (fw_cfg): a file, so that no other user reads it in our argv."""
        return self.runtime / "account"

    @property
    def guest_agent(self) -> Path:
        """A desktop's qemu-guest-agent channel (vm/guestagent.py)."""
        return self.runtime / "qga.sock"

    @property
    def vdagent(self) -> Path:
        """A desktop's spice-vdagent channel: clipboard and screen size (vm/vdagent.py)."""
        return self.runtime / "vdagent.sock"

    def pid(self) -> int | None:
        """The pid of this session's QEMU if it is alive."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        # Guard against pid reuse: the process must be a QEMU using our QMP socket.
        return pid if str(self.qmp).encode() in cmdline else None


async def launch(argv: list[str], sockets: Sockets, log_file: Path) -> int:
    """Start QEMU detached from us and wait until its QMP socket is up; returns its pid.

    A shell starts QEMU in the background and exits, so init adopts QEMU: it outlives the CLI or
    the app, and a long-running app never keeps it as its child (no zombie, no pending Popen).
    """
    sockets.qmp.unlink(missing_ok=True)
    sockets.vnc.unlink(missing_ok=True)
    sockets.pidfile.unlink(missing_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log.info("starting QEMU: %s", " ".join(argv))
    with open(log_file, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
    shell = subprocess.run(["/bin/sh", "-c", '"$@" </dev/null >>"$SM_QEMU_LOG" 2>&1 & echo $!', "sh", *argv],
                           env={**os.environ, "SM_QEMU_LOG": str(log_file)}, capture_output=True, text=True,
                           start_new_session=True, close_fds=True)
    if shell.returncode != 0 or not shell.stdout.strip().isdigit():
        raise QemuError(f"Could not start QEMU: {shell.stderr.strip() or 'the shell failed'}.")
    pid = int(shell.stdout)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise QemuError(f"QEMU exited at start: {_last_line(log_file)}; the full log is {log_file}.")
        if sockets.qmp.exists() and sockets.pidfile.exists():
            return pid
        await asyncio.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    raise QemuError(f"QEMU did not start within {START_TIMEOUT:.0f} s; see {log_file}.")


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


class Machine:
    """A QMP connection to one running QEMU.  Use ``async with Machine.connect(...)``."""

    def __init__(self, client: QMPClient, sockets: Sockets) -> None:
        self.qmp = client
        self.sockets = sockets

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, sockets: Sockets, name: str = "session-manager") -> AsyncIterator[Machine]:
        client = QMPClient(name)
        # QEMU's monitor serves one client at a time: wait for another command to finish.
        deadline = time.monotonic() + 30
        while True:
            try:
                await client.connect(str(sockets.qmp))
                break
            except ConnectError as e:
                if sockets.pid() is None:
                    raise QemuError("The session is not running; start it with `session-manager start`.") from e
                if time.monotonic() > deadline:
                    raise QemuError(f"Could not connect to QEMU's monitor at {sockets.qmp}: {e}.") from e
                await asyncio.sleep(0.1)
        try:
            yield cls(client, sockets)
        finally:
            with contextlib.suppress(QMPError, EOFError, OSError):
                await client.disconnect()

    async def run(self, cmd: str, args: Mapping[str, Any] | None = None) -> Any:
        try:
            return await self.qmp.execute(cmd, args)
        except ExecuteError as e:
            raise QemuError(f"QEMU refused {cmd}: {e}.") from e
        except (QMPError, EOFError, ConnectionError) as e:
            raise QemuError(f"Lost the connection to QEMU during {cmd}; it may have exited.") from e

    async def status(self) -> RunState:
        return RunState.parse((await self.run("query-status"))["status"])

    async def pass_fd(self, fd: int, name: str) -> None:
        """Hand ``fd`` to QEMU under ``name`` (SCM_RIGHTS + getfd)."""
        with contextlib.suppress(QemuError):
            await self.run("closefd", {"fdname": name})
        self.qmp.send_fd_scm(fd)
        await self.run("getfd", {"fdname": name})

    async def screendump_png(self, path: Path) -> bytes | None:
        """A PNG of the screen, or None when the guest shows nothing yet."""
        try:
            await self.run("screendump", {"filename": str(path), "format": "png"})
            return path.read_bytes()
        except (QemuError, OSError) as e:
            log.warning("no screenshot: %s", e)
            return None
        finally:
            path.unlink(missing_ok=True)

    async def quit(self) -> None:
        """Ask QEMU to exit now (the guest's state is gone unless checkpointed)."""
        pid = self.sockets.pid()
        try:
            await self.qmp.execute("quit")
        except (QMPError, EOFError, ConnectionError):
            pass  # qemu.qmp reports the closed socket after quit as an error
        await wait_exit(pid)


async def wait_exit(pid: int | None, timeout: float = 15.0) -> None:
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
