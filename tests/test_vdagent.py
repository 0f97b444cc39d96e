"""vm/vdagent.py against a fake guest agent on a unix socket: framing, chunking, the handshake, clipboard both
ways, the screen size, reconnecting, and a hostile guest."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from helpers.aio import until
from session_manager.vm import vdagent as va

Test = Callable[["FakeGuest", va.VDAgent, list[str], "asyncio.Task[None]"], Awaitable[None]]
GUEST_CAPS = (1 << va.CAP_CLIPBOARD_BY_DEMAND) | (1 << va.CAP_CLIPBOARD_SELECTION) | (1 << va.CAP_MONITORS_CONFIG)
SEL = bytes(4)  # selection CLIPBOARD and its 3 reserved bytes


def raw(type_: int, data: bytes, protocol: int = va.PROTOCOL) -> bytes:
    return struct.pack("<IIQI", protocol, type_, 0, len(data)) + data


def chunks(stream: bytes, size: int, port: int = va.CLIENT_PORT) -> bytes:
    """``stream`` cut into chunks of ``size`` bytes, regardless of where its messages begin."""
    return b"".join(struct.pack("<II", port, len(stream[i:i + size])) + stream[i:i + size]
                    for i in range(0, len(stream), size))


class FakeGuest:
    """The guest's spice-vdagentd, scripted by a test: what the client sends arrives as (type, data) in ``got``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.got: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.chunk_sizes: list[int] = []
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.connected.set()
        port = va._Port()
        try:
            while True:
                head = await reader.readexactly(8)
                _, size = struct.unpack("<II", head)
                self.chunk_sizes.append(size)
                for item in port.feed(await reader.readexactly(size)):
                    self.got.put_nowait(item)
        except asyncio.IncompleteReadError:
            pass

    async def close(self, server: asyncio.Server) -> None:
        if self.writer is not None:
            self.writer.close()
        server.close()
        await server.wait_closed()

    def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    async def expect(self, type_: int) -> bytes:
        """The next message of this type the client sends (others before it are dropped)."""
        while True:
            got_type, data = await asyncio.wait_for(self.got.get(), 10)
            if got_type == type_:
                return data


async def with_guest(path: Path, test: Test) -> None:
    """Run ``test`` with a fake guest on ``path`` and our client connected to it."""
    path.unlink(missing_ok=True)
    guest = FakeGuest(path)
    server = await asyncio.start_unix_server(guest._serve, str(guest.path))
    texts: list[str] = []
    agent = va.VDAgent(guest.path, texts.append)
    task = asyncio.create_task(agent.run())
    try:
        await test(guest, agent, texts, task)
    finally:
        task.cancel()
        await guest.close(server)


async def handshake(guest: FakeGuest, agent: va.VDAgent) -> None:
    caps = await guest.expect(va.ANNOUNCE_CAPABILITIES)
    assert struct.unpack("<II", caps) == (1, va.OUR_CAPS)
    guest.send(chunks(raw(va.ANNOUNCE_CAPABILITIES, struct.pack("<II", 0, GUEST_CAPS)), 7))
    await asyncio.wait_for(agent.ready.wait(), 10)


def test_a_long_message_goes_in_chunks_of_at_most_2048_bytes() -> None:
    data = bytes(range(256)) * 20
    out = va.message(va.CLIPBOARD, data)
    sizes, body, offset = [], b"", 0
    while offset < len(out):
        port, size = struct.unpack_from("<II", out, offset)
        assert port == va.CLIENT_PORT
        sizes.append(size)
        body += out[offset + 8:offset + 8 + size]
        offset += 8 + size
    assert sizes == [2048, 2048, 20 + len(data) - 4096]
    assert body == raw(va.CLIPBOARD, data)


def test_clipboard_both_ways_and_the_screen(tmp_path: Path) -> None:
    async def test(guest: FakeGuest, agent: va.VDAgent, texts: list[str], task: asyncio.Task[None]) -> None:
        agent.set_screen(1024, 700)  # before the guest answered: sent once it does
        await handshake(guest, agent)
        assert struct.unpack("<IIIIIii", await guest.expect(va.MONITORS_CONFIG)) == (1, 0, 700, 1024, 32, 0, 0)

        # The guest copies: it grabs, we ask, it answers (in a chunk that also holds the next message).
        guest.send(chunks(raw(va.CLIPBOARD_GRAB, SEL + struct.pack("<II", 2, va.TYPE_TEXT)), 5))
        assert await guest.expect(va.CLIPBOARD_REQUEST) == SEL + struct.pack("<I", va.TYPE_TEXT)
        text = "é" * 3000
        guest.send(chunks(raw(va.CLIPBOARD, SEL + struct.pack("<I", va.TYPE_TEXT) + text.encode())
                          + raw(va.REPLY, struct.pack("<II", va.MONITORS_CONFIG, 0)), 2048))
        await until(lambda: texts == [text], "the guest's text")

        # What came from the guest is not sent back to it; something new is, and the guest's request answered.
        agent.set_clipboard(text)
        agent.set_clipboard("from the host")
        assert await guest.expect(va.CLIPBOARD_GRAB) == SEL + struct.pack("<I", va.TYPE_TEXT)
        guest.send(chunks(raw(va.CLIPBOARD_REQUEST, SEL + struct.pack("<I", va.TYPE_TEXT)), 2048))
        assert await guest.expect(va.CLIPBOARD) == SEL + struct.pack("<I", va.TYPE_TEXT) + b"from the host"
        assert all(size <= va.CHUNK_DATA_MAX for size in guest.chunk_sizes)

        agent.set_screen(10, 100000)
        assert struct.unpack("<IIIIIii", await guest.expect(va.MONITORS_CONFIG))[2:4] == (8192, 320)
    asyncio.run(with_guest(tmp_path / "vdagent.sock", test))


def test_the_caps_request_is_repeated_until_the_guest_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(va, "CAPS_RETRY", 0.05)

    async def test(guest: FakeGuest, agent: va.VDAgent, texts: list[str], task: asyncio.Task[None]) -> None:
        for _ in range(3):  # a guest whose port was closed lost them
            assert struct.unpack("<II", await guest.expect(va.ANNOUNCE_CAPABILITIES)) == (1, va.OUR_CAPS)
        # The guest asks too (its agent restarted): we answer without asking back.
        guest.send(chunks(raw(va.ANNOUNCE_CAPABILITIES, struct.pack("<II", 1, GUEST_CAPS)), 2048))
        await asyncio.wait_for(agent.ready.wait(), 10)
        while (await guest.expect(va.ANNOUNCE_CAPABILITIES))[:4] != struct.pack("<I", 0):
            pass
    asyncio.run(with_guest(tmp_path / "vdagent.sock", test))


def test_it_reconnects_and_asks_for_the_screen_again(tmp_path: Path) -> None:
    async def test() -> None:
        path = tmp_path / "vdagent.sock"
        agent = va.VDAgent(path, lambda text: None)
        with pytest.raises(va.VDAgentError, match="cannot be opened"):
            await agent.run()  # QEMU not there (yet)
        agent.set_screen(800, 600)
        for _ in range(2):  # the same QEMU after the app restarted, or a new one on the same path
            guest = FakeGuest(path)
            server = await asyncio.start_unix_server(guest._serve, str(path))
            task = asyncio.create_task(agent.run())
            await handshake(guest, agent)
            assert struct.unpack("<IIIIIii", await guest.expect(va.MONITORS_CONFIG))[2:4] == (600, 800)
            await guest.close(server)
            await asyncio.wait_for(task, 10)  # the channel closed: run returns
            assert not agent.ready.is_set()
            path.unlink()
    asyncio.run(test())


def test_a_hostile_guest_is_ignored_or_disconnected_never_obeyed(tmp_path: Path) -> None:
    async def test(guest: FakeGuest, agent: va.VDAgent, texts: list[str], task: asyncio.Task[None]) -> None:
        await handshake(guest, agent)
        guest.send(chunks(
            raw(va.CLIPBOARD_GRAB, SEL + struct.pack("<I", va.TYPE_TEXT))
            + raw(va.CLIPBOARD, SEL + struct.pack("<I", va.TYPE_TEXT) + b"x" * (va.CLIPBOARD_MAX + 1))  # too big
            + raw(99, b"unknown") + raw(va.CLIPBOARD, b"") + raw(va.CLIPBOARD_REQUEST, SEL)  # unknown, too short
            + raw(va.CLIPBOARD, bytes((1, 0, 0, 0)) + struct.pack("<I", va.TYPE_TEXT) + b"primary")  # ignored
            + raw(va.ANNOUNCE_CAPABILITIES, b"\1")
            + raw(va.CLIPBOARD, SEL + struct.pack("<I", va.TYPE_TEXT) + b"\xffok\0"), 2048))
        await until(lambda: texts == ["\ufffdok"], "the good message after the bad ones")
        assert agent.ready.is_set()
    asyncio.run(with_guest(tmp_path / "vdagent.sock", test))

    for bad in (chunks(raw(va.REPLY, bytes(8), protocol=2), 2048), struct.pack("<II", 1, 1 << 30)):
        async def broken(guest: FakeGuest, agent: va.VDAgent, texts: list[str], task: asyncio.Task[None],
                         bad: bytes = bad) -> None:
            await guest.connected.wait()
            guest.send(bad)
            with pytest.raises(va.VDAgentError, match="reconnected"):
                await asyncio.wait_for(task, 10)
        asyncio.run(with_guest(tmp_path / "vdagent.sock", broken))
