"""qemu-guest-agent: the desktop guest's own hands, over its virtio-serial channel (Sockets.guest_agent).

The protocol is QMP's JSON, one object per line, with no greeting and no negotiation.  The channel is a byte pipe
that outlives any one client: a reply meant for an earlier client, or half of one, may still be in it.  So every
connection starts with ``guest-sync-delimited`` and a random id: the agent answers with a 0xFF byte and then
``{"return": id}``, and everything before that answer is thrown away.

What is used here, and since which agent (all in Debian 12's 7.2):
- guest-sync-delimited, guest-ping
- guest-exec (path, arg, input-data, capture-output), guest-exec-status: run a program, collect exit code and output
- guest-file-open / guest-file-write / guest-file-close: write a file, base64 chunks
- guest-set-time (time: ns since the epoch): set the guest's clock, which the agent also writes to the RTC (with the
  guest's /sbin/hwclock: without it the agent refuses the command)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import QemuError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
CALL_TIMEOUT = 10.0
WRITE_CHUNK = 512 << 10  # bytes per guest-file-write; 4 MiB into the desktop under TCG: 2.3 s (256 KiB: 5.1 s)
CLOCK_PATIENCE = 20.0  # seconds sync_clock waits for an agent that does not answer yet


class GuestAgentError(QemuError):
    """The guest's agent is not there, did not answer, or refused."""


@dataclass(frozen=True)
class ExecResult:
    exitcode: int
    stdout: bytes
    stderr: bytes


class GuestAgent:
    """One connection to a guest's qemu-guest-agent.  Use ``async with GuestAgent.connect(path)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: Path, timeout: float = CONNECT_TIMEOUT) -> AsyncIterator[GuestAgent]:
        """Connect and resynchronise; GuestAgentError if the agent does not answer within ``timeout`` (not running
        in the guest, or the guest not up yet)."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
        except OSError as e:
            raise GuestAgentError(f"The guest agent's channel {path} cannot be opened ({e.strerror}); is the session "
                                  "running?") from None
        agent = cls(reader, writer)
        try:
            await asyncio.wait_for(agent._sync(), timeout)
            yield agent
        except TimeoutError:
            raise GuestAgentError("The guest's agent (qemu-guest-agent) did not answer; it starts with the guest, so "
                                  "wait for the guest to boot, or install qemu-guest-agent in it.") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _sync(self) -> None:
        token = secrets.randbelow(1 << 31)
        await self._send("guest-sync-delimited", {"id": token})
        while True:
            await self._reader.readuntil(b"\xff")
            line = await self._reader.readline()
            with contextlib.suppress(ValueError):
                if json.loads(line).get("return") == token:
                    return

    async def _send(self, command: str, arguments: dict[str, Any] | None) -> None:
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self._writer.write(json.dumps(message).encode() + b"\n")
        await self._writer.drain()

    async def call(self, command: str, arguments: dict[str, Any] | None = None,
                   timeout: float = CALL_TIMEOUT) -> Any:
        """Run one command; its ``return`` value.  GuestAgentError if it fails or takes longer than ``timeout``."""
        await self._send(command, arguments)
        try:
            line = await asyncio.wait_for(self._reader.readline(), timeout)
        except TimeoutError:
            raise GuestAgentError(f"The guest's agent did not answer {command} within {timeout:.0f} s.") from None
        if not line:
            raise GuestAgentError(f"The guest's agent channel closed during {command}.")
        try:
            reply = json.loads(line)
        except ValueError:
            raise GuestAgentError(f"The guest's agent answered {command} with something that is not JSON.") from None
        if not isinstance(reply, dict) or ("return" not in reply and "error" not in reply):
            raise GuestAgentError(f"The guest's agent answered {command} with something unexpected.")
        if "error" in reply:
            desc = reply["error"].get("desc", "unknown error") if isinstance(reply["error"], dict) else "unknown"
            raise GuestAgentError(f"The guest's agent refused {command}: {str(desc)[:200]}.")
        return reply["return"]

    async def ping(self) -> None:
        await self.call("guest-ping")

    async def exec(self, argv: list[str], input: bytes | None = None, timeout: float = 60.0) -> ExecResult:
        """Run a program in the guest (as root) and wait for it; its exit code and output."""
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        pid = (await self.call("guest-exec", args))["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            status = await self.call("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                return ExecResult(int(status.get("exitcode", -1)), base64.b64decode(status.get("out-data", "")),
                                  base64.b64decode(status.get("err-data", "")))
            if time.monotonic() > deadline:
                raise GuestAgentError(f"{argv[0]} did not finish in the guest within {timeout:.0f} s.")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def write_file(self, path: str, data: bytes | BinaryIO,
                         progress: Callable[[int], None] | None = None) -> None:
        """Create (or replace) the guest file ``path`` with ``data`` (bytes, or a file read to its end), owned by root
        (the caller chowns it); ``progress`` is told the bytes written so far after each chunk."""
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        handle = await self.call("guest-file-open", {"path": path, "mode": "w"})
        try:
            done = 0
            while chunk := source.read(WRITE_CHUNK):
                await self.call("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()})
                done += len(chunk)
                if progress is not None:
                    progress(done)
        finally:
            await self.call("guest-file-close", {"handle": handle})

    async def set_time(self, ns: int | None = None) -> None:
        """Set the guest's clock to ``ns`` since the epoch (default: this computer's clock now)."""
        await self.call("guest-set-time", {"time": time.time_ns() if ns is None else ns})


async def sync_clock(path: Path, patience: float = CLOCK_PATIENCE) -> bool:
    """Set the guest's clock to this computer's after a jump in time (it ran on from a checkpoint's time), trying
    again for ``patience`` seconds while its agent does not answer yet.  Best effort: False, logged, if it never
    did; the session runs all the same."""
    began = time.monotonic()
    deadline = began + patience
    while True:
        try:
            async with GuestAgent.connect(path, timeout=min(CONNECT_TIMEOUT, max(deadline - time.monotonic(), 1))) \
                    as agent:
                await agent.set_time()
            log.info("set the guest's clock (its agent answered after %.1f s)", time.monotonic() - began)
            return True
        except GuestAgentError as e:
            if time.monotonic() >= deadline:
                log.warning("could not set the guest's clock: %s", e)
                return False
            await asyncio.sleep(1)
