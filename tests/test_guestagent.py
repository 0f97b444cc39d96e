"""The guest agent's channel is the guest's: whatever it answers, the client fails in one sentence (a
GuestAgentError), never with a crash or a wrong value (unit tests against a fake guest on a unix socket)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from session_manager.vm.guestagent import GuestAgent, GuestAgentError


def hostile(tmp_path: Path, answer: Callable[[dict[str, object]], bytes]) -> None:
    """A fake agent that resynchronises properly, then answers every command with ``answer(command)``; the
    client's guest-ping must fail in one sentence."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                command = json.loads(line)
                if command["execute"] == "guest-sync-delimited":
                    writer.write(b"stale half of an old reply\xff"
                                 + json.dumps({"return": command["arguments"]["id"]}).encode() + b"\n")
                else:
                    writer.write(answer(command))
                await writer.drain()
        finally:
            writer.close()

    async def go() -> str:
        server = await asyncio.start_unix_server(serve, path=str(tmp_path / "qga"))
        async with server:
            async with GuestAgent.connect(tmp_path / "qga") as agent:
                with pytest.raises(GuestAgentError) as caught:
                    await agent.call("guest-ping", timeout=2)
        return str(caught.value)

    message = asyncio.run(go())
    assert message.endswith(".") and "\n" not in message, message


@pytest.mark.parametrize("reply", [
    b"not json at all\n",
    b"[1, 2, 3]\n",
    b'{"neither": "return nor error"}\n',
    b'{"error": "a string, not an object"}\n',
    b'{"error": {"desc": "' + b"x" * 5000 + b'"}}\n',
    b"",  # silence
])
def test_a_hostile_or_silent_agent_fails_in_one_sentence(tmp_path: Path, reply: bytes) -> None:
    hostile(tmp_path, lambda command: reply)
