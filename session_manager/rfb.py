"""A small asyncio RFB (VNC) 3.8 client: QEMU's VNC server first, any VNC server second.

No Qt here: the owner sets the ``on_*`` callbacks (called on the loop thread), runs
:meth:`RfbClient.run` as a task and reads :attr:`RfbClient.framebuffer`, which always holds
``width * height`` pixels of 4 bytes in QImage.Format_RGB32 byte order (B, G, R, unused).

Encodings asked for: Raw and CopyRect over local sockets; over TCP Zlib first (one zlib stream
per connection) with CompressLevel 1, as QEMU's default level is too slow for full-screen changes.
Pseudo-encodings: DesktopSize, ExtendedDesktopSize and QEMU's Extended Key Event, Pointer Motion
Change, LED state and Audio.  Security: None, or VNC authentication (DES, done here) when a password is given.

QEMU's audio extension (ui/vnc.c; all integers big-endian):

- The client lists pseudo-encoding -259; a QEMU with an audiodev on its VNC display acknowledges it with a
  FramebufferUpdate of one rectangle in that encoding (the screen's size, no payload).  Other servers ignore it.
- Client message 255 (QEMU), submessage 1 (audio), u16 operation: 0 enable (QEMU starts capturing the guest's
  output for this client), 1 disable, 2 set format followed by u8 format (0 U8, 1 S8, 2 U16, 3 S16, 4 U32, 5 S32),
  u8 channels (1 or 2) and u32 frequency (at most 48000).  Set the format before enabling: QEMU reads it then.
  QEMU's default is what we ask for anyway: S16 (little-endian), 2 channels, 44100 Hz.
- Server message 255, submessage 1, u16 operation: 0 end, 1 begin (capture stopped/started), 2 data followed by
  u32 length and that many bytes of interleaved PCM.  QEMU drops data rather than queue it behind a slow client.

Receiving goes through a buffered protocol rather than asyncio streams: pixel payloads are read
by the kernel straight into the framebuffer (Raw) or into one reusable buffer (Zlib), and the
reader wakes once per payload, not once per socket read.  Sending never blocks the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import zlib
from collections.abc import Callable, Sequence

from .errors import SessionManagerError

log = logging.getLogger(__name__)


class RfbError(SessionManagerError):
    """The display server refused us, broke the RFB protocol or went away during the handshake."""


# Encodings (RFC 6143 section 7.7 and the community registry).
RAW = 0
COPY_RECT = 1
ZLIB = 6
DESKTOP_SIZE = -223
EXTENDED_DESKTOP_SIZE = -308
QEMU_POINTER_MOTION_CHANGE = -257
QEMU_EXTENDED_KEY_EVENT = -258
QEMU_LED_STATE = -261
QEMU_AUDIO = -259
COMPRESS_LEVEL_1 = -255  # -256 + level

_PSEUDO = (DESKTOP_SIZE, EXTENDED_DESKTOP_SIZE, QEMU_EXTENDED_KEY_EVENT, QEMU_POINTER_MOTION_CHANGE, QEMU_LED_STATE,
           QEMU_AUDIO)
# Over a local socket bytes cost nothing and compressing costs both ends CPU: Raw, which the
# kernel copies straight into the framebuffer (benchmarks/viewer.py: 2-3x the frame rate of Zlib).
LOCAL_ENCODINGS: tuple[int, ...] = (RAW, COPY_RECT, *_PSEUDO)
# Over TCP: Zlib at level 1 (QEMU's default level manages only a few full screens a second).
NETWORK_ENCODINGS: tuple[int, ...] = (ZLIB, COPY_RECT, RAW, *_PSEUDO, COMPRESS_LEVEL_1)

# 32 bpp, depth 24, little endian, true colour, max 255 each, shifts R16 G8 B0: Format_RGB32.
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
BYTES_PER_PIXEL = 4

HANDSHAKE_TIMEOUT = 15.0
BUFFER_SIZE = 1 << 20  # receive buffer for everything but pixel payloads
PAUSE_ABOVE = 16 << 20  # stop reading the socket while this much is received but not yet consumed
MAX_STRING = 1 << 20  # longest name, reason or cut text we accept

# The sound we ask QEMU for: signed 16 bit little-endian, stereo, 44100 Hz (QEMU's own default, hda's rate).
AUDIO_RATE = 44100
AUDIO_CHANNELS = 2
AUDIO_S16 = 3
MAX_AUDIO_CHUNK = 1 << 20  # QEMU sends a few KB at a time; 1 MiB is 6 s of sound

SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2
SECURITY_NAMES = {0: "Invalid", 1: "None", 2: "VNC authentication", 5: "RA2", 6: "RA2ne", 16: "Tight",
                  18: "TLS", 19: "VeNCrypt", 22: "xvp", 30: "Apple remote desktop", 113: "MSLogonII"}

# Keys of send_ctrl_alt_del: (keysym, XT scancode in QEMU's "qnum" numbering).
_CTRL_ALT_DEL = ((0xFFE3, 0x1D), (0xFFE9, 0x38), (0xFFFF, 0xD3))


class RfbClient:
    """One connection to a VNC server.  Make it with ``open_unix``, ``open_tcp``, ``open_socket`` or ``open_over``."""

    name: str
    width: int
    height: int
    framebuffer: bytearray
    supports_ext_keys: bool
    absolute_pointer: bool | None
    leds: int | None
    supports_audio: bool

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._zlib = zlib.decompressobj()
        self._scratch = bytearray()
        self._want_full = False
        self._closing = False
        self.name = ""
        self.width = self.height = 0
        self.framebuffer = bytearray()
        self.supports_ext_keys = False
        self.absolute_pointer = None
        self.leds = None
        self.supports_audio = False
        self._audio_wanted = self._audio_on = False
        self.on_update: Callable[[int, int, int, int], None] | None = None
        self.on_frame: Callable[[], None] | None = None
        self.on_resize: Callable[[int, int], None] | None = None
        self.on_leds: Callable[[int], None] | None = None
        self.on_pointer_mode: Callable[[bool], None] | None = None
        self.on_bell: Callable[[], None] | None = None
        self.on_audio: Callable[[bytes], None] | None = None

    # -- connecting ------------------------------------------------------------------------------

    @classmethod
    async def open_unix(cls, path: str | os.PathLike[str], *, password: str | None = None, shared: bool = True,
                        encodings: Sequence[int] = LOCAL_ENCODINGS) -> RfbClient:
        """Connect to a VNC server listening on a unix socket (QEMU's ``-vnc unix:PATH``)."""
        conn = _Connection()
        try:
            await asyncio.get_running_loop().create_unix_connection(lambda: conn, os.fspath(path))
        except OSError as e:
            raise RfbError(f"Could not connect to the display at {os.fspath(path)}: {e.strerror or e}.") from e
        return await cls._start(conn, password, shared, encodings)

    @classmethod
    async def open_tcp(cls, host: str, port: int, *, password: str | None = None, shared: bool = True,
                       encodings: Sequence[int] = NETWORK_ENCODINGS) -> RfbClient:
        """Connect over TCP; VNC authentication is used when the server asks for it."""
        conn = _Connection()
        try:
            await asyncio.get_running_loop().create_connection(lambda: conn, host, port)  # sets TCP_NODELAY
        except OSError as e:
            raise RfbError(f"Could not connect to the display at {host}:{port}: {e.strerror or e}.") from e
        return await cls._start(conn, password, shared, encodings)

    @classmethod
    async def open_socket(cls, sock: socket.socket, *, password: str | None = None, shared: bool = True,
                          encodings: Sequence[int] = LOCAL_ENCODINGS) -> RfbClient:
        """Speak RFB over a connected stream socket, e.g. one end of a socketpair whose other end
        was given to QEMU with QMP ``getfd`` + ``add_client``.  The client owns ``sock`` from now on."""
        conn = _Connection()
        try:
            await asyncio.get_running_loop().create_connection(lambda: conn, sock=sock)
        except (OSError, ValueError) as e:
            raise RfbError(f"Could not use the display socket: {e}.") from e
        return await cls._start(conn, password, shared, encodings)

    @classmethod
    async def open_over(cls, attach: Callable[[asyncio.BaseProtocol], None], *, password: str | None = None,
                        shared: bool = True, encodings: Sequence[int] = NETWORK_ENCODINGS) -> RfbClient:
        """Speak RFB over a connection opened elsewhere: ``attach(protocol)`` makes ``protocol`` its protocol
        (with ``connection_made``), e.g. ``agent.Connection.hand_over`` for a display at a peer, through its agent.
        ``attach`` is kept as long as the connection: a StreamWriter it holds closes the transport when collected."""
        conn = _Connection()
        attach(conn)
        conn.source = attach
        return await cls._start(conn, password, shared, encodings)

    @classmethod
    async def _start(cls, conn: _Connection, password: str | None, shared: bool,
                     encodings: Sequence[int]) -> RfbClient:
        client = cls(conn)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await client._handshake(password, shared, encodings)
        except BaseException as e:
            conn.close()
            if isinstance(e, asyncio.IncompleteReadError | ConnectionError):
                raise RfbError("The display server closed the connection during the handshake.") from e
            if isinstance(e, TimeoutError):
                raise RfbError(
                    f"The display server did not finish the handshake within {HANDSHAKE_TIMEOUT:.0f} s.") from e
            raise
        return client

    async def _handshake(self, password: str | None, shared: bool, encodings: Sequence[int]) -> None:
        read = self._conn.read
        banner = await read(12)
        if not (banner.startswith(b"RFB ") and banner[7:8] == b"." and banner.endswith(b"\n")
                and banner[4:7].isdigit() and banner[8:11].isdigit()):
            raise RfbError(f"This is not a VNC server: it greeted with {banner[:12]!r}.")
        version = (int(banner[4:7]), int(banner[8:11]))
        if version < (3, 3):
            raise RfbError(
                f"The VNC server speaks RFB {version[0]}.{version[1]}, older than 3.3, which is not supported.")
        # 3.3 and 3.7 are answered in kind; anything newer (3.8, 3.889, 4.x, 5.x) gets 3.8.
        ours = min(version, (3, 8)) if version[0] == 3 else (3, 8)
        if ours not in ((3, 3), (3, 7), (3, 8)):
            ours = (3, 3)
        self._conn.write(b"RFB %03d.%03d\n" % ours)

        if ours == (3, 3):
            (chosen,) = struct.unpack(">I", await read(4))
            if chosen == 0:
                raise RfbError(f"The VNC server refused the connection: {await self._read_reason()}")
            offered = [chosen]
        else:
            (count,) = await read(1)
            if count == 0:
                raise RfbError(f"The VNC server refused the connection: {await self._read_reason()}")
            offered = list(await read(count))
            chosen = SECURITY_NONE if SECURITY_NONE in offered else SECURITY_VNC_AUTH
        if SECURITY_NONE not in offered and SECURITY_VNC_AUTH not in offered:
            names = ", ".join(SECURITY_NAMES.get(t, f"type {t}") for t in offered)
            raise RfbError(f"The VNC server offers only security this client does not support ({names}).")
        if chosen == SECURITY_VNC_AUTH and password is None:
            raise RfbError("The server requires VNC authentication; give a password.")
        if ours != (3, 3):
            self._conn.write(bytes([chosen]))
        if chosen == SECURITY_VNC_AUTH:
            assert password is not None
            challenge = await read(16)
            self._conn.write(vnc_auth_response(password, challenge))
        if chosen == SECURITY_VNC_AUTH or ours == (3, 8):
            (result,) = struct.unpack(">I", await read(4))
            if result != 0:
                reason = await self._read_reason() if ours == (3, 8) else ""
                if chosen == SECURITY_VNC_AUTH:
                    raise RfbError(
                        f"The VNC server rejected the password{': ' + reason.rstrip('.') if reason else ''}.")
                raise RfbError(f"The VNC server refused the connection{': ' + reason.rstrip('.') if reason else ''}.")

        self._conn.write(bytes([1 if shared else 0]))
        width, height, _fmt, name_len = struct.unpack(">HH16sI", await read(24))
        if name_len > MAX_STRING:
            raise RfbError(f"The VNC server sent a desktop name of {name_len} bytes, which is not plausible.")
        self.name = (await read(name_len)).decode("utf-8", "replace")
        self._allocate(width, height)
        log.debug("connected to VNC desktop %r, %dx%d, RFB %d.%d", self.name, width, height, *ours)

        self._conn.write(b"\x00\x00\x00\x00" + PIXEL_FORMAT)
        self._conn.write(struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings))
        self._request(incremental=False)
        await self._conn.drain()

    async def _read_reason(self) -> str:
        (length,) = struct.unpack(">I", await self._conn.read(4))
        reason = (await self._conn.read(min(length, MAX_STRING))).decode("utf-8", "replace").strip()
        return reason or "no reason given"

    # -- receiving -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Apply server messages until the connection ends.

        Returns on a clean end of the connection (also after :meth:`close`); raises RfbError when
        the server breaks the protocol or the connection breaks in the middle of a message.
        """
        read = self._conn.read
        try:
            while True:
                try:
                    kind = await read(1)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        raise
                    return
                if kind == b"\x00":
                    await self._framebuffer_update()
                elif kind == b"\x01":  # SetColourMapEntries: not used with true colour
                    _, count = struct.unpack(">xHH", await read(5))
                    await read(6 * count)
                elif kind == b"\x02":
                    if self.on_bell:
                        self.on_bell()
                elif kind == b"\x03":  # ServerCutText: read and dropped
                    (length,) = struct.unpack(">3xI", await read(7))
                    if length > 64 * MAX_STRING:
                        raise RfbError(
                            f"The display server sent {length} bytes of clipboard text, which is not plausible.")
                    await self._conn.skip(length)
                elif kind == b"\xff":
                    await self._qemu_message()
                else:
                    raise RfbError(f"The display server sent an unknown message (type {kind[0]}).")
        except asyncio.IncompleteReadError as e:
            if self._closing:
                return
            raise RfbError("The display server closed the connection in the middle of a message.") from e
        except ConnectionError as e:
            if self._closing:
                return
            raise RfbError(f"The connection to the display server broke: {e.strerror or e}.") from e

    async def _qemu_message(self) -> None:
        submessage, operation = struct.unpack(">BH", await self._conn.read(3))
        if submessage != 1:
            raise RfbError(f"The display server sent an unknown QEMU message (submessage {submessage}).")
        if operation == 2:
            (length,) = struct.unpack(">I", await self._conn.read(4))
            if length > MAX_AUDIO_CHUNK:
                raise RfbError(f"The display server sent {length} bytes of sound at once, which is not plausible.")
            data = await self._conn.read(length)
            if self.on_audio and self._audio_on:
                self.on_audio(data)
        elif operation > 2:
            raise RfbError(f"The display server sent an unknown audio operation ({operation}).")

    async def _framebuffer_update(self) -> None:
        read = self._conn.read
        (count,) = struct.unpack(">xH", await read(3))
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await read(12))
            if encoding == RAW:
                self._check(x, y, w, h, encoding)
                if x == 0 and w == self.width:  # whole rows: straight from the socket into the framebuffer
                    stride = self.width * BYTES_PER_PIXEL
                    with memoryview(self.framebuffer) as fb:
                        await self._conn.read_into(fb[y * stride:(y + h) * stride])
                else:
                    with self._payload(w * h * BYTES_PER_PIXEL) as rows:
                        await self._conn.read_into(rows)
                        self._put(x, y, w, h, rows)
            elif encoding == ZLIB:
                self._check(x, y, w, h, encoding)
                (length,) = struct.unpack(">I", await read(4))
                try:
                    with self._payload(length) as data:
                        await self._conn.read_into(data)
                        pixels = self._zlib.decompress(data)
                except zlib.error as e:
                    raise RfbError(f"The display server sent Zlib data that does not decompress ({e}).") from e
                if len(pixels) != w * h * BYTES_PER_PIXEL:
                    raise RfbError(f"A Zlib rectangle of {w}x{h} pixels decompressed to {len(pixels)} bytes.")
                self._put(x, y, w, h, pixels)
            elif encoding == COPY_RECT:
                self._check(x, y, w, h, encoding)
                sx, sy = struct.unpack(">HH", await read(4))
                self._check(sx, sy, w, h, encoding)
                self._put(x, y, w, h, self._get(sx, sy, w, h))
            elif encoding == DESKTOP_SIZE:
                self._resize(w, h)
                continue
            elif encoding == EXTENDED_DESKTOP_SIZE:
                (screens,) = struct.unpack(">B3x", await read(4))
                await read(16 * screens)
                if y == 0:  # status 0: the layout is the server's current one
                    self._resize(w, h)
                continue
            elif encoding == QEMU_EXTENDED_KEY_EVENT:
                self.supports_ext_keys = True
                continue
            elif encoding == QEMU_POINTER_MOTION_CHANGE:
                self.absolute_pointer = x != 0
                if self.on_pointer_mode:
                    self.on_pointer_mode(self.absolute_pointer)
                continue
            elif encoding == QEMU_AUDIO:
                self.supports_audio = True
                self._send_audio()
                continue
            elif encoding == QEMU_LED_STATE:
                (self.leds,) = await read(1)
                if self.on_leds:
                    self.on_leds(self.leds)
                continue
            else:
                raise RfbError(f"The display server sent a rectangle in encoding {encoding}, which was not asked for.")
            if self.on_update:
                self.on_update(x, y, w, h)
        if self.on_frame:
            self.on_frame()
        self._request(incremental=not self._want_full)
        await self._conn.drain()

    def _payload(self, size: int) -> memoryview:
        """``size`` bytes of the reusable payload buffer (release the view before the next call)."""
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        return memoryview(self._scratch)[:size]

    def _check(self, x: int, y: int, w: int, h: int, encoding: int) -> None:
        if x + w > self.width or y + h > self.height:
            raise RfbError(f"The display server sent a {w}x{h} rectangle at {x},{y} (encoding {encoding}) "
                           f"outside its {self.width}x{self.height} screen.")

    def _put(self, x: int, y: int, w: int, h: int, pixels: bytes | bytearray | memoryview) -> None:
        fb, stride, row = self.framebuffer, self.width * BYTES_PER_PIXEL, w * BYTES_PER_PIXEL
        if x == 0 and w == self.width:
            fb[y * stride:(y + h) * stride] = pixels
            return
        src = memoryview(pixels)
        at = y * stride + x * BYTES_PER_PIXEL
        for r in range(0, h * row, row):
            fb[at:at + row] = src[r:r + row]
            at += stride

    def _get(self, x: int, y: int, w: int, h: int) -> bytes:
        stride, row = self.width * BYTES_PER_PIXEL, w * BYTES_PER_PIXEL
        at = y * stride + x * BYTES_PER_PIXEL
        return b"".join(self.framebuffer[a:a + row] for a in range(at, at + h * stride, stride))

    def _allocate(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.framebuffer = bytearray(width * height * BYTES_PER_PIXEL)

    def _resize(self, width: int, height: int) -> None:
        if (width, height) == (self.width, self.height):
            return
        self._allocate(width, height)
        self._want_full = True
        if self.on_resize:
            self.on_resize(width, height)

    # -- sending ---------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self._conn.write(data)

    def _request(self, incremental: bool) -> None:
        self._send(struct.pack(">BBHHHH", 3, 1 if incremental else 0, 0, 0, self.width, self.height))
        if not incremental:
            self._want_full = False

    def request_full_update(self) -> None:
        """Ask for the whole screen now (in addition to the incremental request outstanding)."""
        self._request(incremental=False)

    def key_event(self, down: bool, keysym: int, scancode: int | None = None) -> None:
        """Press or release a key.

        With ``scancode`` (an XT scancode: 0x1E for A, 0xE048 or QEMU's 0xC8 for Up) and a server
        that acknowledged QEMU's Extended Key Event, the scancode goes along and the server's keymap
        does not matter; otherwise a plain KeyEvent carries only the keysym.
        """
        if scancode is not None and self.supports_ext_keys:
            self._send(struct.pack(">BBHII", 255, 0, 1 if down else 0, keysym, qnum(scancode)))
        else:
            self._send(struct.pack(">BBxxI", 4, 1 if down else 0, keysym))

    def set_audio(self, on: bool) -> None:
        """Have the server send the guest's sound (PCM as AUDIO_RATE, AUDIO_CHANNELS, s16le) to ``on_audio``, or stop
        it sending.  Kept until the server acknowledges QEMU's audio extension; a server without it sends nothing."""
        self._audio_wanted = on
        self._send_audio()

    def _send_audio(self) -> None:
        if not self.supports_audio or self._audio_on == self._audio_wanted:
            return
        self._audio_on = self._audio_wanted
        if self._audio_on:
            self._send(struct.pack(">BBHBBI", 255, 1, 2, AUDIO_S16, AUDIO_CHANNELS, AUDIO_RATE))
        self._send(struct.pack(">BBH", 255, 1, 0 if self._audio_on else 1))

    def pointer_event(self, x: int, y: int, buttons: int) -> None:
        """Move the pointer to framebuffer position ``x``, ``y`` with ``buttons`` held
        (bit 0 left, 1 middle, 2 right, 3/4 wheel up/down)."""
        x = min(max(x, 0), max(self.width - 1, 0))
        y = min(max(y, 0), max(self.height - 1, 0))
        self._send(struct.pack(">BBHH", 5, buttons & 0xFF, x, y))

    def send_ctrl_alt_del(self) -> None:
        for keysym, scancode in _CTRL_ALT_DEL:
            self.key_event(True, keysym, scancode)
        for keysym, scancode in reversed(_CTRL_ALT_DEL):
            self.key_event(False, keysym, scancode)

    async def close(self) -> None:
        """Close the connection; a running :meth:`run` then returns."""
        self._closing = True
        self._conn.close()
        await self._conn.closed


class _Connection(asyncio.BufferedProtocol):
    """The socket under an RfbClient: reads of exact sizes, non-blocking writes."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray(BUFFER_SIZE)
        self._start = self._end = 0  # received, not yet consumed: _buf[_start:_end]
        self._target: memoryview | None = None  # a read_into waiting for more: the socket fills this
        self._filled = 0
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: Exception | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.source: object = None  # what opened the connection, when it must outlive it

    # asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._filled:]
        if len(self._buf) - self._end < BUFFER_SIZE // 4:
            self._relocate(BUFFER_SIZE // 4)
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._wake()
            return
        self._end += nbytes
        if self._end - self._start >= self._want:
            self._wake()
        if self._end - self._start > PAUSE_ABOVE and self._transport and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._wake()
        self._wake_drain()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain()

    # the client's side

    async def read(self, n: int) -> bytes:
        if self._end - self._start < n:
            if len(self._buf) - self._start < n:
                self._relocate(n)
            await self._wait(n)
        data = bytes(memoryview(self._buf)[self._start:self._start + n])
        self._consumed(n)
        return data

    async def read_into(self, view: memoryview) -> None:
        """Fill ``view`` from the connection: what is buffered, then straight from the socket."""
        have = min(len(view), self._end - self._start)
        view[:have] = memoryview(self._buf)[self._start:self._start + have]
        self._consumed(have)
        if have == len(view):
            return
        self._target, self._filled = view, have
        try:
            await self._wait(len(view))
        finally:
            self._target = None

    async def skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, BUFFER_SIZE)))
        while n > 0:
            await self.read_into(scratch[:min(n, len(scratch))])
            n -= min(n, len(scratch))

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def drain(self) -> None:
        if self._writing_paused and not self._eof:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        elif not self.closed.done():
            self.closed.set_result(None)

    # helpers

    def _available(self) -> int:
        return self._filled if self._target is not None else self._end - self._start

    async def _wait(self, n: int) -> None:
        if self._available() < n and not self._eof:
            self._want = n
            self._waiter = self._loop.create_future()
            if self._reading_paused and self._transport is not None:
                self._reading_paused = False
                self._transport.resume_reading()
            try:
                await self._waiter
            finally:
                self._waiter = None
                self._want = 0
        if self._available() < n:
            if isinstance(self._error, ConnectionError):
                raise self._error
            partial = bytes(self._target[:self._filled]) if self._target is not None else bytes(
                memoryview(self._buf)[self._start:self._end])
            raise asyncio.IncompleteReadError(partial, n)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (self._eof or self._available() >= self._want):
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _consumed(self, n: int) -> None:
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        if self._reading_paused and self._end - self._start < PAUSE_ABOVE // 2 and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def _relocate(self, room: int) -> None:
        """Move the unconsumed bytes to the front of a buffer with ``room`` bytes free after them."""
        pending = memoryview(self._buf)[self._start:self._end]
        size = max(BUFFER_SIZE, len(pending) + room)
        if size > len(self._buf) or self._start > 0:
            buf = bytearray(size) if size > len(self._buf) else self._buf
            buf[:len(pending)] = bytes(pending) if buf is self._buf else pending
            pending.release()
            self._buf = buf
            self._end -= self._start
            self._start = 0


def qnum(scancode: int) -> int:
    """QEMU's number for an XT scancode: 0xE0-prefixed keys become 0x80 | code."""
    if scancode >> 8 == 0xE0:
        return 0x80 | (scancode & 0x7F)
    if not 0 < scancode <= 0xFF:
        raise ValueError(f"{scancode:#x} is not an XT scancode")
    return scancode


# -- VNC authentication: DES of the 16-byte challenge with the password as key (bits mirrored) ---------

def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode("latin-1", "replace")[:8].ljust(8, b"\0"))
    return des_encrypt(key, challenge[:8]) + des_encrypt(key, challenge[8:16])


_PC1 = (57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18, 10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60, 52, 44, 36,
        63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22, 14, 6, 61, 53, 45, 37, 29, 21, 13, 5, 28, 20, 12, 4)
_PC2 = (14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10, 23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2,
        41, 52, 31, 37, 47, 55, 30, 40, 51, 45, 33, 48, 44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32)
_SHIFTS = (1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1)
_IP = (58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4, 62, 54, 46, 38, 30, 22, 14, 6,
       64, 56, 48, 40, 32, 24, 16, 8, 57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3,
       61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7)
_FP = tuple(_IP.index(i) + 1 for i in range(1, 65))
_E = (32, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 8, 9, 10, 11, 12, 13, 12, 13, 14, 15, 16, 17,
      16, 17, 18, 19, 20, 21, 20, 21, 22, 23, 24, 25, 24, 25, 26, 27, 28, 29, 28, 29, 30, 31, 32, 1)
_P = (16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10,
      2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25)
_S = (
    "e4d12fb83a6c5907 0f74e2d1a6cb9538 41e8d62bfc973a50 fc8249175b3ea06d",
    "f18e6b34972dc05a 3d47f28ec01a69b5 0e7ba4d158c6932f d8a13f42b67c05e9",
    "a09e63f51dc7b428 d709346a285ecbf1 d6498f30b12c5ae7 1ad069874fe3b52c",
    "7de3069a1285bc4f d8b56f03472c1ae9 a690cb7df13e5284 3f06a1d8945bc72e",
    "2c417ab6853fd0e9 eb2c47d150fa3986 421bad78f9c5630e b8c71e2d6f09a453",
    "c1af92680d34e75b af427c9561de0b38 9ef528c3704a1db6 432c95fabe17608d",
    "4b2ef08d3c975a61 d0b7491ae35c2f86 14bdc37eaf680592 6bd814a7950fe23c",
    "d2846fb1a93e50c7 1fd8a374c56b0e92 7b419ce206adf358 21e74a8dfc90356b",
)
_SBOX = tuple(tuple(int(c, 16) for c in s.replace(" ", "")) for s in _S)


def _permute(value: int, table: Sequence[int], width: int) -> int:
    out = 0
    for position in table:
        out = (out << 1) | ((value >> (width - position)) & 1)
    return out


def des_encrypt(key: bytes, block: bytes) -> bytes:
    """Plain DES (FIPS 46-3) of one 8-byte block: only VNC authentication needs it."""
    cd = _permute(int.from_bytes(key, "big"), _PC1, 64)
    c, d = cd >> 28, cd & 0xFFFFFFF
    subkeys = []
    for shift in _SHIFTS:
        c = ((c << shift) | (c >> (28 - shift))) & 0xFFFFFFF
        d = ((d << shift) | (d >> (28 - shift))) & 0xFFFFFFF
        subkeys.append(_permute((c << 28) | d, _PC2, 56))
    lr = _permute(int.from_bytes(block, "big"), _IP, 64)
    left, right = lr >> 32, lr & 0xFFFFFFFF
    for subkey in subkeys:
        x = _permute(right, _E, 32) ^ subkey
        s = 0
        for i in range(8):
            six = (x >> (42 - 6 * i)) & 0x3F
            s = (s << 4) | _SBOX[i][(((six >> 4) & 2) | (six & 1)) * 16 + ((six >> 1) & 0xF)]
        left, right = right, left ^ _permute(s, _P, 32)
    return _permute((right << 32) | left, _FP, 64).to_bytes(8, "big")
