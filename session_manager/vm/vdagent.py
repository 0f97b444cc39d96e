"""The guest's spice-vdagent, spoken to directly: clipboard text both ways, and the screen size.

A desktop session's virtio-serial port ``com.redhat.spice.0`` is a plain unix socket (Sockets.vdagent, QEMU the
server) instead of QEMU's own ``qemu-vdagent`` chardev, which blocks migration and so every checkpoint.  Whoever
connects speaks the VDAgent protocol (spice-protocol's vd_agent.h; QEMU's ui/vdagent.c is the host side of the same
thing) to the guest's spice-vdagentd, which passes it on to spice-vdagent in the X session.

Everything is little-endian.  The byte stream is made of chunks, each at most 2048 bytes of data::

    VDIChunkHeader: u32 port (1 = client, 2 = server), u32 size
    data: the next ``size`` bytes of that port's stream of messages
    VDAgentMessage: u32 protocol (1), u32 type, u64 opaque (0), u32 size, then ``size`` bytes

A message is cut into as many chunks as it needs; what the guest sends is read as one stream per port, so a chunk
may also end one message and begin the next.  Used here (all in Debian 12's spice-vdagent 0.22):

- ANNOUNCE_CAPABILITIES 6: u32 request, u32 caps bitmap.  Ours: MONITORS_CONFIG 1, REPLY 2, CLIPBOARD_BY_DEMAND 5,
  CLIPBOARD_SELECTION 6.  Not GRAB_SERIAL 17: without it grabs carry no serial.  request=1 tells spice-vdagentd a new
  client is there (it drops the old client's clipboard state) and asks for its caps; it sends request=1 itself when
  it opens its port.  A message sent while its port is closed in the guest is lost (the guest closes it on each host
  disconnect and reopens it), so our request is repeated until the guest's caps arrive.
- MONITORS_CONFIG 2 (to the guest): u32 count (1), u32 flags (0), then per monitor u32 height, u32 width,
  u32 depth, i32 x, i32 y.  spice-vdagent sets the X screen to it with xrandr; the guest answers REPLY 3
  (u32 type, u32 error), which is ignored.
- Clipboard, each message led by u8 selection + 3 reserved bytes when both sides announce CLIPBOARD_SELECTION
  (0 = CLIPBOARD; PRIMARY 1 and SECONDARY 2 are ignored); type 1 is UTF-8 text:
  CLIPBOARD_GRAB 7 (u32 types...): the sender owns the clipboard now.  CLIPBOARD_REQUEST 8 (u32 type): send me
  the data.  CLIPBOARD 4 (u32 type, bytes): the data, empty when there is none.  CLIPBOARD_RELEASE 9: no longer
  the owner.  When the guest grabs text we request it at once; when we grab, the guest requests and we answer.
- Any other type (REPLY, FILE_XFER_STATUS, ...) and anything on other ports is read and dropped.

State survives reconnecting (a checkpoint restored, QEMU restarted, the app restarted while QEMU ran on): the
screen size we asked for is sent again once the guest's caps arrive; our clipboard is not grabbed again, since
the guest may have copied something newer meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from pathlib import Path

from ..errors import QemuError

PROTOCOL = 1
CLIENT_PORT = 1
CHUNK_DATA_MAX = 2048  # what we send per chunk (VD_AGENT_MAX_DATA_SIZE)
CHUNK_ACCEPT_MAX = 64 << 10  # what we take from the guest; spice-vdagentd sends 2048
CLIPBOARD_MAX = 8 << 20  # bytes of clipboard text, either way; bigger messages from the guest are skipped
MESSAGE_MAX = CLIPBOARD_MAX + 8
CAPS_RETRY = 2.0  # seconds between our capability requests until the guest answers
SCREEN_MIN = (320, 200)
SCREEN_MAX = (8192, 8192)

MONITORS_CONFIG, REPLY, CLIPBOARD, ANNOUNCE_CAPABILITIES = 2, 3, 4, 6
CLIPBOARD_GRAB, CLIPBOARD_REQUEST, CLIPBOARD_RELEASE = 7, 8, 9
CAP_MONITORS_CONFIG, CAP_REPLY, CAP_CLIPBOARD_BY_DEMAND, CAP_CLIPBOARD_SELECTION = 1, 2, 5, 6
OUR_CAPS = sum(1 << c for c in (CAP_MONITORS_CONFIG, CAP_REPLY, CAP_CLIPBOARD_BY_DEMAND, CAP_CLIPBOARD_SELECTION))
SELECTION_CLIPBOARD = 0
TYPE_TEXT = 1

_CHUNK = struct.Struct("<II")
_MESSAGE = struct.Struct("<IIQI")
_U32 = struct.Struct("<I")


class VDAgentError(QemuError):
    """The spice-vdagent channel cannot be opened or the guest broke its protocol."""


def message(type_: int, data: bytes, port: int = CLIENT_PORT) -> bytes:
    """One message, cut into chunks."""
    raw = _MESSAGE.pack(PROTOCOL, type_, 0, len(data)) + data
    return b"".join(_CHUNK.pack(port, len(piece)) + piece
                    for piece in (raw[i:i + CHUNK_DATA_MAX] for i in range(0, len(raw), CHUNK_DATA_MAX)))


class _Port:
    """Reassembles one port's messages from its chunks; skips (without keeping) messages that are too big."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.skip = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        out: list[tuple[int, bytes]] = []
        while True:
            if self.skip:
                n = min(self.skip, len(self.buffer))
                del self.buffer[:n]
                self.skip -= n
                if self.skip:
                    return out
            if len(self.buffer) < _MESSAGE.size:
                return out
            protocol, type_, _, size = _MESSAGE.unpack_from(self.buffer)
            if protocol != PROTOCOL:
                raise VDAgentError(f"The guest's spice-vdagent sent a message of protocol {protocol}, not "
                                   f"{PROTOCOL}; the channel is reconnected.")
            if size > MESSAGE_MAX:
                del self.buffer[:_MESSAGE.size]
                self.skip = size
                continue
            end = _MESSAGE.size + size
            if len(self.buffer) < end:
                return out
            out.append((type_, bytes(self.buffer[_MESSAGE.size:end])))
            del self.buffer[:end]


class VDAgent:
    """The host's end of one guest's spice-vdagent channel, across reconnections.

    ``run()`` serves one connection until it closes; call it again to reconnect.  ``on_clipboard(text)`` is called
    with the text the guest copies.  ``set_clipboard`` and ``set_screen`` may be called at any time: what cannot
    go out yet goes once the guest has answered (see the module's docstring)."""

    def __init__(self, path: Path, on_clipboard: Callable[[str], None]) -> None:
        self.path = path
        self.on_clipboard = on_clipboard
        self.guest_caps: int | None = None  # None until the guest has announced them on this connection
        self.ready = asyncio.Event()  # set while the guest has announced its caps on the current connection
        self._writer: asyncio.StreamWriter | None = None
        self._ours: str | None = None  # the text we grabbed the clipboard with, while we own it
        self._guest_text: str | None = None  # the guest's text, while it owns the clipboard
        self._screen: tuple[int, int] | None = None

    async def run(self) -> None:
        """Connect and serve until the channel closes (QEMU stopped, or the guest broke the protocol: then
        VDAgentError).  VDAgentError if it cannot be opened."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.path))
        except OSError as e:
            raise VDAgentError(f"The spice-vdagent channel {self.path} cannot be opened ({e.strerror}); is the "
                               "session running?") from None
        self._writer = writer
        announce = asyncio.create_task(self._announce())
        ports: dict[int, _Port] = {}
        try:
            while True:
                try:
                    head = await reader.readexactly(_CHUNK.size)
                    port, size = _CHUNK.unpack(head)
                    if size > CHUNK_ACCEPT_MAX:
                        raise VDAgentError(f"The guest's spice-vdagent sent a chunk of {size} bytes (at most "
                                           f"{CHUNK_ACCEPT_MAX} are allowed); the channel is reconnected.")
                    data = await reader.readexactly(size)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                for type_, body in ports.setdefault(port, _Port()).feed(data):
                    self._dispatch(type_, body)
        finally:
            announce.cancel()
            self._writer = None
            self.guest_caps = None
            self.ready.clear()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _announce(self) -> None:
        while self.guest_caps is None:
            self._send(ANNOUNCE_CAPABILITIES, _U32.pack(1) + _U32.pack(OUR_CAPS))
            await asyncio.sleep(CAPS_RETRY)

    def set_clipboard(self, text: str) -> None:
        """Own the guest's clipboard with ``text`` (the guest asks for it when something there pastes); text the
        guest just gave us, or text bigger than CLIPBOARD_MAX, is left alone."""
        if text == self._guest_text or text == self._ours or len(text.encode()) > CLIPBOARD_MAX:
            return
        self._ours, self._guest_text = text, None
        if self.guest_caps is not None:
            self._send(CLIPBOARD_GRAB, self._selection() + _U32.pack(TYPE_TEXT))

    def set_screen(self, width: int, height: int) -> None:
        """Ask the guest for one screen of this size (clamped to SCREEN_MIN..SCREEN_MAX)."""
        self._screen = (min(max(width, SCREEN_MIN[0]), SCREEN_MAX[0]),
                        min(max(height, SCREEN_MIN[1]), SCREEN_MAX[1]))
        if self.guest_caps is not None:
            self._send_screen()

    def _send_screen(self) -> None:
        if self._screen is not None:
            width, height = self._screen
            self._send(MONITORS_CONFIG, struct.pack("<IIIIIii", 1, 0, height, width, 32, 0, 0))

    def _send(self, type_: int, data: bytes) -> None:
        if (self._writer is not None and not self._writer.is_closing()
                and self._writer.transport.get_write_buffer_size() < 2 * MESSAGE_MAX):  # a guest that reads nothing
            self._writer.write(message(type_, data))

    def _selection(self, selection: int = SELECTION_CLIPBOARD) -> bytes:
        agreed = self.guest_caps is not None and self.guest_caps & (1 << CAP_CLIPBOARD_SELECTION)
        return bytes((selection, 0, 0, 0)) if agreed else b""

    def _dispatch(self, type_: int, data: bytes) -> None:
        if type_ == ANNOUNCE_CAPABILITIES:
            if len(data) < 8:
                return
            request, caps = struct.unpack_from("<II", data)
            first = self.guest_caps is None
            self.guest_caps = caps
            if request:
                self._send(ANNOUNCE_CAPABILITIES, _U32.pack(0) + _U32.pack(OUR_CAPS))
            if first or request:
                self.ready.set()
                self._send_screen()
            return
        if self.guest_caps is None or type_ not in (CLIPBOARD_GRAB, CLIPBOARD_REQUEST, CLIPBOARD, CLIPBOARD_RELEASE):
            return
        selection = self._selection()
        if selection:
            if len(data) < 4 or data[0] != SELECTION_CLIPBOARD:
                return
            data = data[4:]
        if type_ == CLIPBOARD_GRAB:
            self._ours = self._guest_text = None
            if TYPE_TEXT in (t for (t,) in _U32.iter_unpack(data[:min(len(data), 64) & ~3])):
                self._send(CLIPBOARD_REQUEST, selection + _U32.pack(TYPE_TEXT))
            return
        if len(data) < 4:
            return
        (kind,) = _U32.unpack_from(data)
        if type_ == CLIPBOARD_REQUEST:
            ours = self._ours.encode() if self._ours is not None and kind == TYPE_TEXT else b""
            self._send(CLIPBOARD, selection + _U32.pack(kind) + ours)
        elif type_ == CLIPBOARD and kind == TYPE_TEXT and self._ours is None:
            text = data[4:].rstrip(b"\0").decode(errors="replace")
            self._guest_text = text
            self.on_clipboard(text)
