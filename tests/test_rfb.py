"""The RFB client: scripted fake servers for the protocol's corners, QEMU with the test guest, Xvnc."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import subprocess
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers.aio import until
from helpers.cli import Sm
from helpers.net import free_port
from helpers.qemu import Serial
from helpers.rfb import SCANCODES, Events, assert_matches_screendump, tap, type_text, wait_serial
from helpers.x11 import xlib_display
from session_manager.rfb import (
    AUDIO_CHANNELS,
    AUDIO_RATE,
    LOCAL_ENCODINGS,
    MAX_AUDIO_CHUNK,
    NETWORK_ENCODINGS,
    PIXEL_FORMAT,
    RfbClient,
    RfbError,
    des_encrypt,
    qnum,
    vnc_auth_response,
)
from session_manager.vm.machine import Machine, Sockets


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(180):
            return await coro
    return asyncio.run(bounded())


def px(rgb: int) -> bytes:
    """One pixel in the client's framebuffer byte order (QImage.Format_RGB32: B, G, R, 0)."""
    return bytes([rgb & 0xFF, (rgb >> 8) & 0xFF, rgb >> 16, 0])


# -- fake servers -------------------------------------------------------------------------------

class Fake:
    """The server end of a socketpair, scripted by a test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def pair(cls) -> tuple[socket.socket, Fake]:
        ours, theirs = socket.socketpair()
        return ours, cls(*await asyncio.open_connection(sock=theirs))

    async def send(self, *parts: bytes) -> None:
        self.writer.write(b"".join(parts))
        await self.writer.drain()

    async def recv(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def handshake(self, width: int = 4, height: int = 3, name: bytes = b"fake",
                        encodings: tuple[int, ...] = LOCAL_ENCODINGS) -> None:
        await self.send(b"RFB 003.008\n")
        assert await self.recv(12) == b"RFB 003.008\n"
        await self.send(b"\x01\x01")  # one security type: None
        assert await self.recv(1) == b"\x01"
        await self.send(b"\0\0\0\0")  # SecurityResult OK
        assert await self.recv(1) == b"\x01"  # ClientInit: shared
        await self.send(struct.pack(">HH16sI", width, height, bytes(16), len(name)), name)
        assert await self.recv(20) == b"\0\0\0\0" + PIXEL_FORMAT
        kind, count = struct.unpack(">BxH", await self.recv(4))
        assert kind == 2
        assert struct.unpack(f">{count}i", await self.recv(4 * count)) == encodings
        assert await self.recv(10) == request(False, width, height)


def request(incremental: bool, width: int, height: int) -> bytes:
    return struct.pack(">BBHHHH", 3, incremental, 0, 0, width, height)


def rect(x: int, y: int, w: int, h: int, encoding: int, payload: bytes = b"") -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, encoding) + payload


def update(*rects: bytes) -> bytes:
    return struct.pack(">BxH", 0, len(rects)) + b"".join(rects)


async def connected(encodings: tuple[int, ...] = LOCAL_ENCODINGS) -> tuple[RfbClient, Fake]:
    ours, fake = await Fake.pair()
    client, _ = await asyncio.gather(RfbClient.open_socket(ours, encodings=encodings),
                                     fake.handshake(encodings=encodings))
    return client, fake


def test_des_matches_the_standard_and_tigervnc() -> None:
    # FIPS 46 worked example, and TigerVNC's `vncpasswd -f` for "secret" (its fixed obfuscation key).
    assert des_encrypt(bytes.fromhex("133457799bbcdff1"), bytes.fromhex("0123456789abcdef")).hex() == "85e813540f0ab405"
    assert des_encrypt(bytes.fromhex("e84ad660c4721ae0"), b"secret\0\0").hex() == "2e2dbf576eb06c9e"
    challenge = bytes(range(16))
    assert vnc_auth_response("secret", challenge) == vnc_auth_response("secret\0", challenge)
    assert vnc_auth_response("secret", challenge) != vnc_auth_response("secreT", challenge)


def test_updates_of_every_encoding_land_in_the_framebuffer() -> None:
    async def scenario() -> None:
        client, fake = await connected(NETWORK_ENCODINGS)
        assert (client.name, client.width, client.height) == ("fake", 4, 3)
        assert client.framebuffer == bytearray(4 * 3 * 4)
        events = Events()
        events.attach(client)
        task = asyncio.create_task(client.run())

        a, b, c = px(0x336699), px(0xFF8000), px(0x00FF00)
        await fake.send(update(rect(0, 0, 4, 3, 0, a * 12)))
        assert await fake.recv(10) == request(True, 4, 3)  # the next request follows each update
        assert client.framebuffer == a * 12 and events.updates == [(0, 0, 4, 3)] and events.frames == 1

        # Two Zlib rectangles from one stream: the second only inflates with the first's history.
        z = zlib.compressobj(1)
        one = z.compress(b * 2) + z.flush(zlib.Z_SYNC_FLUSH)
        two = z.compress(c * 4) + z.flush(zlib.Z_SYNC_FLUSH)
        await fake.send(update(rect(1, 1, 2, 1, 6, struct.pack(">I", len(one)) + one),
                               rect(0, 2, 4, 1, 6, struct.pack(">I", len(two)) + two)))
        assert await fake.recv(10) == request(True, 4, 3)
        assert client.framebuffer == a * 4 + a + b * 2 + a + c * 4
        assert events.updates[1:] == [(1, 1, 2, 1), (0, 2, 4, 1)] and events.frames == 2

        await fake.send(update(rect(0, 0, 2, 2, 1, struct.pack(">HH", 1, 1))))  # CopyRect of 1,1 2x2
        assert await fake.recv(10) == request(True, 4, 3)
        assert client.framebuffer == b * 2 + a * 2 + c * 2 + b + a + c * 4

        # QEMU's pseudo-encodings, then a resize: the next request asks for the whole new screen.
        await fake.send(update(rect(0, 0, 4, 3, -258), rect(1, 0, 0, 0, -257), rect(0, 0, 0, 0, -261, b"\x05"),
                               rect(0, 0, 2, 2, -223)))
        assert await fake.recv(10) == request(False, 2, 2)
        assert client.supports_ext_keys and events.pointer_modes == [True] and events.leds == [5]
        assert events.resizes == [(2, 2)] and (client.width, client.height) == (2, 2)
        assert client.framebuffer == bytearray(2 * 2 * 4)

        screen = struct.pack(">IHHHHI", 0, 0, 0, 3, 1, 0)
        await fake.send(update(rect(0, 0, 3, 1, -308, struct.pack(">B3x", 1) + screen), rect(0, 0, 3, 1, 0, c * 3)),
                        b"\x02",  # Bell
                        struct.pack(">BxHH", 1, 0, 1) + bytes(6),  # SetColourMapEntries, ignored
                        struct.pack(">B3xI", 3, 5) + b"hello")  # ServerCutText, ignored
        assert await fake.recv(10) == request(False, 3, 1)
        await until(lambda: events.bells == 1, "the bell rang")
        assert events.resizes == [(2, 2), (3, 1)] and client.framebuffer == c * 3
        # The same size again (QEMU repeats it after a full request) keeps the picture.
        await fake.send(update(rect(0, 0, 3, 1, -308, struct.pack(">B3x", 1) + screen)))
        assert await fake.recv(10) == request(True, 3, 1)
        assert events.resizes == [(2, 2), (3, 1)] and client.framebuffer == c * 3

        await fake.close()
        await task  # a clean end of the connection is no error
        await client.close()

    run(scenario())


def test_messages_split_and_joined_across_socket_reads() -> None:
    """Big payloads, and messages cut at every odd place or packed many to one read, decode the same."""
    async def scenario() -> None:
        ours, fake = await Fake.pair()
        client, _ = await asyncio.gather(RfbClient.open_socket(ours), fake.handshake(700, 500))
        events = Events()
        events.attach(client)
        task = asyncio.create_task(client.run())
        first = os.urandom(700 * 500 * 4)  # 1.4 MB: more than the receive buffer
        z = zlib.compressobj(1)
        part = os.urandom(100 * 30 * 4)
        zpart = z.compress(part) + z.flush(zlib.Z_SYNC_FLUSH)
        raw_part = os.urandom(3 * 2 * 4)
        stream = (update(rect(0, 0, 700, 500, 0, first))
                  + update(rect(10, 20, 100, 30, 6, struct.pack(">I", len(zpart)) + zpart),
                           rect(5, 5, 3, 2, 0, raw_part))
                  + b"\x02" * 3)
        sizes = [1, 2, 3, 5, 8, 13, 65536, 7, 300_000]
        at = i = 0
        while at < len(stream):
            n = sizes[i % len(sizes)]
            await fake.send(stream[at:at + n])
            at, i = at + n, i + 1
            if n < 100:
                await asyncio.sleep(0.001)  # let the client see the small pieces one by one
        await until(lambda: events.bells == 3, "all three messages")
        expect = bytearray(first)
        for r in range(30):
            expect[((20 + r) * 700 + 10) * 4:((20 + r) * 700 + 110) * 4] = part[r * 400:(r + 1) * 400]
        for r in range(2):
            expect[((5 + r) * 700 + 5) * 4:((5 + r) * 700 + 8) * 4] = raw_part[r * 12:(r + 1) * 12]
        assert client.framebuffer == expect and events.frames == 2
        assert await fake.recv(20) == request(True, 700, 500) * 2
        await fake.close()
        await task
        await client.close()

    run(scenario())


def test_input_events_on_the_wire() -> None:
    async def scenario() -> None:
        client, fake = await connected()
        task = asyncio.create_task(client.run())
        client.key_event(True, 0x61, 0x1E)  # no extended key events yet: the keysym alone
        assert await fake.recv(8) == struct.pack(">BBxxI", 4, 1, 0x61)
        await fake.send(update(rect(0, 0, 4, 3, -258)))
        assert await fake.recv(10) == request(True, 4, 3)
        client.key_event(False, 0x61, 0x1E)
        assert await fake.recv(12) == struct.pack(">BBHII", 255, 0, 0, 0x61, 0x1E)
        client.key_event(True, 0xFF52, 0xE048)  # Up: 0xE0-prefixed scancodes go as 0x80 | code
        assert await fake.recv(12) == struct.pack(">BBHII", 255, 0, 1, 0xFF52, 0xC8)
        client.key_event(True, 0x62)  # no scancode known: the keysym alone
        assert await fake.recv(8) == struct.pack(">BBxxI", 4, 1, 0x62)
        client.send_ctrl_alt_del()
        sent = [struct.unpack(">BBHII", await fake.recv(12)) for _ in range(6)]
        assert [(down, sym, code) for _, _, down, sym, code in sent] == [
            (1, 0xFFE3, 0x1D), (1, 0xFFE9, 0x38), (1, 0xFFFF, 0xD3),
            (0, 0xFFFF, 0xD3), (0, 0xFFE9, 0x38), (0, 0xFFE3, 0x1D)]
        client.pointer_event(2, 1, 1)
        client.pointer_event(99, -5, 0)  # clamped to the screen
        assert await fake.recv(12) == struct.pack(">BBHH", 5, 1, 2, 1) + struct.pack(">BBHH", 5, 0, 3, 0)
        client.request_full_update()
        assert await fake.recv(10) == request(False, 4, 3)
        await client.close()
        await task
        client.key_event(True, 0x61, 0x1E)  # after close: dropped, no error
        await fake.close()

    run(scenario())
    assert qnum(0x1E) == 0x1E and qnum(0xE01D) == 0x9D and qnum(0xC8) == 0xC8
    with pytest.raises(ValueError):
        qnum(0x1FF)


SERVER_38 = b"RFB 003.008\n"


def reason(text: bytes) -> bytes:
    return struct.pack(">I", len(text)) + text


@pytest.mark.parametrize(("script", "password", "message"), [
    (b"HTTP/1.1 400 Bad Request\r\n", None, "This is not a VNC server: it greeted with b'HTTP/1.1 400'."),
    (SERVER_38, None, "The display server closed the connection during the handshake."),
    (SERVER_38 + b"\x00" + reason(b"Too many security failures"), None,
     "The VNC server refused the connection: Too many security failures"),
    (SERVER_38 + b"\x02\x13\x12", None,
     "The VNC server offers only security this client does not support (VeNCrypt, TLS)."),
    (SERVER_38 + b"\x01\x02", None, "The server requires VNC authentication; give a password."),
    (SERVER_38 + b"\x01\x02" + bytes(16) + b"\0\0\0\x01" + reason(b"Authentication failed"), "wrong",
     "The VNC server rejected the password: Authentication failed."),
    (b"RFB 003.003\n" + b"\0\0\0\0" + reason(b"Go away"), None, "The VNC server refused the connection: Go away"),
    (b"RFB 002.000\n", None, "The VNC server speaks RFB 2.0, older than 3.3, which is not supported."),
], ids=["not-vnc", "eof", "refused", "security", "needs-password", "bad-password", "refused-3.3", "old"])
def test_handshake_failures_are_one_clear_error(script: bytes, password: str | None, message: str) -> None:
    async def scenario() -> None:
        ours, fake = await Fake.pair()
        opening = asyncio.create_task(RfbClient.open_socket(ours, password=password))
        await fake.send(script)
        if script == SERVER_38:
            await fake.recv(12)
            await fake.close()
        with pytest.raises(RfbError) as e:
            await opening
        assert str(e.value) == message
        if script != SERVER_38:
            await fake.close()

    run(scenario())


def test_rfb_3_3_server_with_vnc_authentication() -> None:
    async def scenario() -> None:
        ours, fake = await Fake.pair()
        opening = asyncio.create_task(RfbClient.open_socket(ours, password="secret"))
        challenge = os.urandom(16)
        await fake.send(b"RFB 003.003\n", struct.pack(">I", 2), challenge)
        assert await fake.recv(12) == b"RFB 003.003\n"
        assert await fake.recv(16) == vnc_auth_response("secret", challenge)
        await fake.send(b"\0\0\0\0")
        assert await fake.recv(1) == b"\x01"
        await fake.send(struct.pack(">HH16sI", 2, 1, bytes(16), 3), b"old")
        client = await opening
        assert (client.name, client.width, client.height) == ("old", 2, 1)
        await client.close()
        await fake.close()

    run(scenario())


def audio(operation: int, payload: bytes = b"") -> bytes:
    """QEMU's server message 255, submessage 1 (audio): 0 end, 1 begin, 2 data (u32 length + PCM)."""
    data = struct.pack(">I", len(payload)) + payload if operation == 2 else b""
    return struct.pack(">BBH", 255, 1, operation) + data


def audio_request(operation: int) -> bytes:
    """What the client sends: 255, 1, then 0 enable, 1 disable or 2 set format (S16, channels, rate)."""
    extra = struct.pack(">BBI", 3, AUDIO_CHANNELS, AUDIO_RATE) if operation == 2 else b""
    return struct.pack(">BBH", 255, 1, operation) + extra


def test_audio_is_asked_for_once_acknowledged_and_its_pcm_delivered() -> None:
    async def scenario() -> None:
        client, fake = await connected()
        pcm: list[bytes] = []
        bells: list[None] = []
        client.on_audio = pcm.append
        client.on_bell = lambda: bells.append(None)
        task = asyncio.create_task(client.run())
        client.set_audio(True)  # not acknowledged yet: nothing is sent
        await fake.send(update(rect(0, 0, 4, 3, -259)))
        assert await fake.recv(24) == audio_request(2) + audio_request(0) + request(True, 4, 3)
        assert client.supports_audio
        await fake.send(audio(1), audio(2, b"\x01\x00\x02\x00"), audio(2, b""), audio(2, bytes(4096)), audio(0))
        await until(lambda: len(pcm) == 3, "three chunks of sound")
        assert pcm == [b"\x01\x00\x02\x00", b"", bytes(4096)]
        client.set_audio(False)
        client.set_audio(False)  # once is enough
        assert await fake.recv(4) == audio_request(1)
        await fake.send(audio(2, b"late"), b"\x02")  # sent before the server read the disable: dropped
        await until(lambda: bells, "the bell after the late sound")
        client.set_audio(True)
        assert await fake.recv(14) == audio_request(2) + audio_request(0)
        await fake.send(audio(2, b"back"))
        await until(lambda: len(pcm) == 4, "the sound after unmuting")
        assert pcm[3] == b"back"
        await client.close()
        await task
        await fake.close()

    run(scenario())


def test_a_server_without_audio_gets_no_audio_messages() -> None:
    async def scenario() -> None:
        client, fake = await connected()
        task = asyncio.create_task(client.run())
        client.set_audio(True)
        client.pointer_event(1, 1, 0)
        assert await fake.recv(6) == struct.pack(">BBHH", 5, 0, 1, 1)  # the next thing sent: no audio request
        assert not client.supports_audio
        await client.close()
        await task
        await fake.close()

    run(scenario())


@pytest.mark.parametrize(("message", "error"), [
    (b"\x07", "The display server sent an unknown message (type 7)."),
    (audio(2)[:4] + struct.pack(">I", MAX_AUDIO_CHUNK + 1),
     f"The display server sent {MAX_AUDIO_CHUNK + 1} bytes of sound at once, which is not plausible."),
    (struct.pack(">BBH", 255, 1, 3), "The display server sent an unknown audio operation (3)."),
    (struct.pack(">BBH", 255, 7, 0), "The display server sent an unknown QEMU message (submessage 7)."),
    (update(rect(3, 2, 2, 2, 0, bytes(16))),
     "The display server sent a 2x2 rectangle at 3,2 (encoding 0) outside its 4x3 screen."),
    (update(rect(0, 0, 1, 1, 16, bytes(16))),
     "The display server sent a rectangle in encoding 16, which was not asked for."),
    (update(rect(0, 0, 1, 1, 6, struct.pack(">I", 4) + b"junk")),
     ("The display server sent Zlib data that does not decompress (Error -3 while decompressing data: "
      "incorrect header check).")),
    (update(rect(0, 0, 4, 3, 0, bytes(20))), "The display server closed the connection in the middle of a message."),
], ids=["type", "audio-size", "audio-operation", "qemu-submessage", "outside", "encoding", "zlib", "truncated"])
def test_protocol_errors_end_the_run_with_one_clear_error(message: bytes, error: str) -> None:
    async def scenario() -> None:
        client, fake = await connected()
        task = asyncio.create_task(client.run())
        await fake.send(message)
        await fake.close()
        with pytest.raises(RfbError) as e:
            await task
        assert str(e.value) == error
        await client.close()

    run(scenario())


def test_close_while_running_is_a_clean_end(tmp_path: Path) -> None:
    async def scenario() -> None:
        client, fake = await connected()
        task = asyncio.create_task(client.run())
        await fake.send(update(rect(0, 0, 4, 3, 0))[:10])  # in the middle of a message
        await asyncio.sleep(0.05)
        await client.close()
        await task
        await fake.close()
        with pytest.raises(RfbError, match=r"^Could not connect to the display at .*missing\.sock: No such file"):
            await RfbClient.open_unix(tmp_path / "missing.sock")

    run(scenario())


# -- QEMU with the test guest ---------------------------------------------------------------------

def start_guest(sm: Sm, guest: tuple[Path, Path], name: str) -> tuple[dict[str, Any], Serial]:
    sm.new_guest(name, guest)
    sm("start", name)
    serial = sm.serial(name)
    serial.wait_for(r"^ready\r?$")
    return sm("status", name, "--json").json(), serial


@dataclass
class QemuView:
    client: RfbClient
    events: Events
    task: asyncio.Task[None]
    machine: Machine


async def with_view(status: dict[str, Any], body: Callable[[QemuView], Awaitable[None]],
                    encodings: tuple[int, ...] = LOCAL_ENCODINGS) -> None:
    client = await RfbClient.open_unix(status["vnc_socket"], encodings=encodings)
    events = Events()
    events.attach(client)
    task = asyncio.create_task(client.run())
    try:
        async with Machine.connect(Sockets(Path(status["qmp_socket"]).parent)) as m:
            await until(lambda: (0, 0, client.width, client.height) in events.updates, "a first full frame")
            await body(QemuView(client, events, task, m))
    finally:
        await client.close()
        await task


@pytest.mark.qemu
def test_qemu_frame_matches_its_screendump(sm: Sm, guest: tuple[Path, Path], tmp_path: Path) -> None:
    status, serial = start_guest(sm, guest, "view")
    serial.wait_counter(1)

    async def body(v: QemuView) -> None:
        assert v.client.name == "QEMU (view)" and (v.client.width, v.client.height) == (720, 400)
        assert v.client.supports_ext_keys and v.events.leds  # QEMU acknowledged both at once
        await assert_matches_screendump(v.client, v.events, v.machine, tmp_path / "shot.ppm")
        frames = v.events.frames
        await wait_serial(serial, r"^counter 3\r?$")
        await until(lambda: v.events.frames > frames, "updates after the guest went on")

    run(with_view(status, body))


@pytest.mark.qemu
def test_qemu_extended_and_plain_key_events_reach_the_guest(sm: Sm, guest: tuple[Path, Path]) -> None:
    status, serial = start_guest(sm, guest, "keys")

    async def body(v: QemuView) -> None:
        since = serial.size()
        assert v.client.supports_ext_keys
        await type_text(v.client, "vnc")
        await tap(v.client, ord("x"), SCANCODES["h"])  # the scancode wins over the keysym
        v.client.supports_ext_keys = False  # as with a server without QEMU's extension
        await type_text(v.client, "ok")
        await wait_serial(serial, r"^key k\r?$", since)
        assert re.findall(r"^key (\S+)\r?$", serial.text(since), re.MULTILINE) == list("vnchok")

    run(with_view(status, body))


@pytest.mark.qemu
def test_qemu_mode_change_is_followed_and_the_painter_streams(sm: Sm, guest: tuple[Path, Path], tmp_path: Path) -> None:
    status, serial = start_guest(sm, guest, "mode")

    async def body(v: QemuView) -> None:
        since = serial.size()
        await type_text(v.client, "M")
        mode = await wait_serial(serial, r"^mode (\d+)x(\d+)\r?$", since)
        size = (int(mode[1]), int(mode[2]))
        await until(lambda: (v.client.width, v.client.height) == size, f"the client follows to {size}")
        assert v.events.resizes[-1] == size and len(v.client.framebuffer) == size[0] * size[1] * 4
        await until(lambda: (0, 0, *size) in v.events.updates, "a full frame at the new size")

        since = serial.size()
        await type_text(v.client, "P")
        await wait_serial(serial, r"^paint on\r?$", since)
        seen: set[bytes] = set()
        frames = v.events.frames
        async with asyncio.timeout(60):
            while len(seen) < 3 or v.events.frames < frames + 5:
                seen.add(bytes(v.client.framebuffer[: size[0] * 4 * 16]))
                await asyncio.sleep(0.05)
        await type_text(v.client, "P")
        await wait_serial(serial, r"^paint off\r?$", since)
        await assert_matches_screendump(v.client, v.events, v.machine, tmp_path / "shot.ppm")

    run(with_view(status, body, NETWORK_ENCODINGS))  # Zlib at level 1, as over TCP


@pytest.mark.qemu
def test_qemu_pointer_lands_where_sent(sm: Sm, guest: tuple[Path, Path]) -> None:
    status, serial = start_guest(sm, guest, "pointer")

    async def body(v: QemuView) -> None:
        await until(lambda: v.client.absolute_pointer is True, "QEMU switched to the absolute tablet")
        assert v.events.pointer_modes[-1] is True
        w, h = v.client.width, v.client.height
        for x, y in [(w // 3, h // 2), (w - 1, h - 1), (0, 0), (123, 45)]:  # evdev drops non-moves: (0, 0) not first
            since = serial.size()
            v.client.pointer_event(x, y, 0)
            found = await wait_serial(serial, r"^pointer (\d+) (\d+)\r?$", since)
            assert (int(found[1]), int(found[2])) == (x * 32767 // w, y * 32767 // h), (x, y)
        since = serial.size()
        v.client.pointer_event(200, 100, 1)
        await asyncio.sleep(0.05)
        v.client.pointer_event(200, 100, 0)
        found = await wait_serial(serial, r"^click (\d+) (\d+)\r?$", since)
        assert (int(found[1]), int(found[2])) == (200 * 32767 // w, 100 * 32767 // h)

    run(with_view(status, body))


# -- Xvnc (TigerVNC), a VNC server that is not QEMU -----------------------------------------------------

@dataclass
class Xvnc:
    display: str
    unix_socket: Path
    port: int | None


@pytest.fixture
def xvnc(tmp_path: Path) -> Iterator[Callable[..., Xvnc]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(password: str | None = None) -> Xvnc:
        path = tmp_path / f"xvnc{len(procs)}.sock"
        argv = ["Xvnc", "-geometry", "1024x768", "-depth", "24", "-rfbunixpath", str(path), "-nolisten", "tcp"]
        port = None
        if password is None:
            argv += ["-rfbport", "-1", "-SecurityTypes", "None"]
        else:
            port = free_port()
            passwd = tmp_path / "passwd"
            passwd.write_bytes(subprocess.run(["vncpasswd", "-f"], input=password.encode(), capture_output=True,
                                              check=True).stdout)
            argv += ["-rfbport", str(port), "-interface", "127.0.0.1", "-SecurityTypes", "VncAuth",
                     "-PasswordFile", str(passwd)]
        r, w = os.pipe()
        with open(tmp_path / f"xvnc{len(procs)}.log", "wb") as log:
            procs.append(subprocess.Popen([*argv, "-displayfd", str(w)], pass_fds=[w], stdout=log, stderr=log))
        os.close(w)
        with os.fdopen(r) as f:
            display = f.readline().strip()
        assert display, (tmp_path / f"xvnc{len(procs) - 1}.log").read_text()
        return Xvnc(":" + display, path, port)

    yield start
    for p in procs:
        p.terminate()
        p.wait()


async def x_view(server: Xvnc, body: Callable[[RfbClient, Events, Any], Awaitable[None]],
                 password: str | None = None) -> None:
    if password is None:
        client = await RfbClient.open_unix(server.unix_socket)
    else:
        assert server.port is not None
        client = await RfbClient.open_tcp("127.0.0.1", server.port, password=password)
    events = Events()
    events.attach(client)
    task = asyncio.create_task(client.run())
    d = xlib_display(server.display)
    try:
        await until(lambda: events.frames > 0 and bool(events.updates), "a first frame")
        await body(client, events, d)
    finally:
        d.close()
        await client.close()
        await task


def fill_root(d: Any, rgb: int) -> None:
    root = d.screen().root
    root.change_attributes(background_pixel=rgb)  # TrueColor 24 bit: the pixel value is 0xRRGGBB
    root.clear_area()
    d.sync()


def test_xvnc_pixels_and_resize(xvnc: Callable[..., Xvnc]) -> None:
    server = xvnc()

    async def body(client: RfbClient, events: Events, d: Any) -> None:
        from Xlib import X
        from Xlib.ext import randr

        assert (client.width, client.height) == (1024, 768)
        fill_root(d, 0x336699)
        await until(lambda: client.framebuffer == px(0x336699) * (1024 * 768), "the whole screen turns #336699")
        root = d.screen().root
        gc = root.create_gc(foreground=0xFF8000, subwindow_mode=X.IncludeInferiors)
        root.fill_rectangle(gc, 100, 50, 30, 20)
        d.sync()

        def drawn() -> bool:
            fb, stride = client.framebuffer, 1024 * 4
            inside = all(fb[(50 + r) * stride + 400:(50 + r) * stride + 520] == px(0xFF8000) * 30 for r in range(20))
            return inside and fb[49 * stride + 400:49 * stride + 404] == px(0x336699)
        await until(drawn, "an orange 30x20 rectangle at 100,50")

        sizes = [(s.width_in_pixels, s.height_in_pixels) for s in randr.get_screen_info(root).sizes]
        info = randr.get_screen_info(root)
        root.xrandr_set_screen_config(sizes.index((800, 600)), info.rotation, info.config_timestamp)
        d.sync()
        await until(lambda: (client.width, client.height) == (800, 600), "the client follows the X screen to 800x600")
        assert events.resizes[-1] == (800, 600) and len(client.framebuffer) == 800 * 600 * 4
        fill_root(d, 0x123456)
        await until(lambda: client.framebuffer == px(0x123456) * (800 * 600), "the resized screen turns #123456")

    run(x_view(server, body))


def test_xvnc_keys_and_pointer(xvnc: Callable[..., Xvnc]) -> None:
    server = xvnc()

    async def body(client: RfbClient, events: Events, d: Any) -> None:
        from Xlib import XK, X

        root = d.screen().root
        win = root.create_window(0, 0, 1024, 768, 0, d.screen().root_depth, override_redirect=True,
                                 event_mask=X.KeyPressMask | X.ButtonPressMask | X.ExposureMask)
        win.map()
        d.sync()
        win.set_input_focus(X.RevertToParent, X.CurrentTime)
        d.sync()

        async def next_event(kind: int) -> Any:
            async with asyncio.timeout(10):
                while True:
                    while d.pending_events():
                        ev = d.next_event()
                        if ev.type == kind:
                            return ev
                    await asyncio.sleep(0.01)

        assert client.supports_ext_keys  # TigerVNC implements QEMU's extended key events too
        await tap(client, XK.XK_a, SCANCODES["a"])
        ev = await next_event(X.KeyPress)
        assert d.keycode_to_keysym(ev.detail, 0) == XK.XK_a
        client.supports_ext_keys = False  # the plain KeyEvent: keysym only
        await tap(client, XK.XK_b, SCANCODES["b"])
        ev = await next_event(X.KeyPress)
        assert d.keycode_to_keysym(ev.detail, 0) == XK.XK_b

        client.pointer_event(123, 45, 0)
        await until(lambda: (root.query_pointer().root_x, root.query_pointer().root_y) == (123, 45),
                    "the X pointer at 123,45")
        client.pointer_event(300, 200, 1)
        client.pointer_event(300, 200, 0)
        ev = await next_event(X.ButtonPress)
        assert (ev.detail, ev.root_x, ev.root_y) == (1, 300, 200)

    run(x_view(server, body))


def test_xvnc_over_tcp_with_vnc_authentication(xvnc: Callable[..., Xvnc]) -> None:
    server = xvnc(password="s3cret!")

    async def body(client: RfbClient, events: Events, d: Any) -> None:
        fill_root(d, 0x336699)
        await until(lambda: client.framebuffer[:4] == px(0x336699), "pixels over TCP")

    run(x_view(server, body, password="s3cret!"))

    async def refused() -> None:
        assert server.port is not None
        with pytest.raises(RfbError, match=r"^The VNC server rejected the password"):
            await RfbClient.open_tcp("127.0.0.1", server.port, password="wrong")
        with pytest.raises(RfbError, match=r"^The server requires VNC authentication; give a password\.$"):
            await RfbClient.open_tcp("127.0.0.1", server.port)

    run(refused())
