"""Splitting a QEMU migration stream into segments, RAM pages apart from everything else.

What QEMU 7.2 writes (migration file version 3; see migration/savevm.c, migration/ram.c and
scripts/analyze-migration.py), for a background snapshot and for a plain precopy migration::

    be32 magic "QEVM", be32 version 3
    CONFIGURATION 0x07: be32 length + machine type, then optional subsections (0x05 ...)
    START 0x01, be32 section id, u8 length + "ram", be32 instance, be32 version 4:
        a MEM_SIZE record (the RAM blocks and their sizes), EOS      then FOOTER 0x7e, be32 section id
    PART 0x02 (or END 0x03), be32 section id: page records ..., EOS  then FOOTER
    ...
    FULL 0x04 sections: the state of every device, then EOF 0x00,
    VMDESCRIPTION 0x06: be32 length + the JSON description of the device sections

QEMU 10.0 writes the same, but for one command: a plain migration of a 10.0 machine type sends
COMMAND 0x08, be16 11 (SWITCHOVER_START), be16 0 just before its last RAM section, which is kept
with the bytes around it; any other command is refused.  Since 9.0 the "globalstate" section's
100-byte run-state buffer holds the name in its first 32 bytes (see running_on_load).

A page record is be64 (address | flags), then, unless flag CONTINUE says "same block as the
record before", u8 length + the block's idstr; then one byte for ZERO, or the 4096-byte page
for PAGE.  Measured on QEMU 7.2: a background snapshot sends every page once, in PART sections,
and writes no END section for RAM; a plain migration of a stopped guest sends all pages in its
first PART and an empty END; a plain migration of a running guest sends pages again in later
PARTs as they are dirtied, and the last dirty pages in END.  The device sections come after
the last RAM section in all three.

Device state has no length prefix: only the VM description at the very end of the stream
says where a device section ends, and the stream is read once from a pipe.  So everything from
the first device section on (the "tail") is kept as opaque bytes, and its end is checked: it
must be EOF followed by the VM description whose length reaches exactly the end of the stream.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import StreamFormatError

MAGIC = b"QEVM"
VERSION = 3
PAGE_SIZE = 4096
REGION_SHIFT = 21  # a new segment starts when a record leaves a 2 MiB region of a RAM block
MAX_SEGMENT_PAGES = 1 << (REGION_SHIFT - 12)
SEGMENT_DATA_MAX = 1 << 20  # the tail is cut into segments of this much data
READ_SIZE = 1 << 20

# Section types (migration/savevm.h).
EOF, START, PART, END, FULL, SUBSECTION, VMDESCRIPTION, CONFIGURATION, COMMAND, FOOTER = (
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x7E)
# RAM record flags (migration/ram.c); the low 12 bits of the be64 record header.
F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
# COMMAND MIG_CMD_SWITCHOVER_START (be16 11) with no data (be16 0): since QEMU 10.0 a precopy migration of a
# machine type of 10.0 or later sends it before its last RAM section ("send-switchover-start"); it means
# nothing to a stream at rest.
SWITCHOVER_START = b"\x00\x0b\x00\x00"
FLAG_MASK = PAGE_SIZE - 1
RAM_VERSION = 4
_FLAG_NAMES = {0x01: "FULL", 0x40: "XBZRLE", 0x80: "HOOK (RDMA)", 0x100: "COMPRESS_PAGE", 0x200: "MULTIFD_FLUSH"}
_MAX_RECORD = 8 + 1 + 255 + PAGE_SIZE
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
# Subsections the configuration section may carry (migration/savevm.c), by idstr.
_CONFIG_SUBSECTIONS = {b"configuration/target-page-bits", b"configuration/capabilities", b"configuration/uuid"}


@dataclass(slots=True)
class Segment:
    """A piece of the stream: its non-page bytes, and the pages cut out of them.

    Page ``i`` goes back into ``data`` at ``page_offsets[i]`` (an offset in ``data``, so
    offsets never decrease and several pages can share one).
    """

    data: bytes
    page_offsets: tuple[int, ...]
    pages: list[bytes]

    def pieces(self) -> Iterator[bytes]:
        """The original bytes of this piece of the stream, in order."""
        at = 0
        for offset, page in zip(self.page_offsets, self.pages):
            if offset > at:
                yield self.data[at:offset]
                at = offset
            yield page
        if at < len(self.data):
            yield self.data[at:]


def iter_segments(read: Callable[[int], bytes]) -> Iterator[Segment]:
    """Split the migration stream that ``read(n)`` returns (short reads allowed, ``b''`` at end).

    Raises StreamFormatError for anything that is not a complete QEMU 7.2 precopy stream whose
    RAM uses only plain and zero pages.  Segments already yielded stay valid pieces of the
    stream, but the caller must drop them all when an error is raised.
    """
    return _Splitter(read).segments()


def _fail(what: str, todo: str = "take the checkpoint again with a supported QEMU (7.2 or newer)") -> StreamFormatError:
    return StreamFormatError(f"The migration stream {what}; {todo}.")


class _Splitter:
    """One pass over the stream.

    ``buf[pos:]`` is unread input.  The current segment's data is ``parts`` followed by
    ``buf[run:pos]``; ``dlen`` is the total length of ``parts``.
    """

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self.read = read
        self.buf = b""
        self.pos = 0
        self.origin = 0  # stream offset of buf[0]
        self.eof = False
        self.run = 0
        self.parts: list[bytes] = []
        self.dlen = 0
        self.offsets: list[int] = []
        self.pages: list[bytes] = []
        self.blocks: dict[bytes, int] = {}  # RAM block idstr -> used length
        self.block = b""
        self.block_len = -1
        self.ram_id: int | None = None

    # -- input ---------------------------------------------------------------------------

    def fill(self, need: int) -> bool:
        """Make ``need`` bytes available at ``pos`` (reading at least READ_SIZE); False at EOF."""
        avail = len(self.buf) - self.pos
        if avail >= need:
            return True
        if self.pos > self.run:
            self.parts.append(self.buf[self.run:self.pos])
            self.dlen += self.pos - self.run
        chunks = [self.buf[self.pos:]]
        while avail < max(need, READ_SIZE) and not self.eof:
            chunk = self.read(READ_SIZE)
            if not chunk:
                self.eof = True
            chunks.append(chunk)
            avail += len(chunk)
        self.origin += self.pos
        self.buf = b"".join(chunks)
        self.pos = self.run = 0
        return avail >= need

    def take(self, n: int) -> bytes:
        if not self.fill(n):
            raise self.truncated()
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def byte(self) -> int:
        return self.take(1)[0]

    def be32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def peek(self) -> int | None:
        return self.buf[self.pos] if self.fill(1) else None

    def truncated(self) -> StreamFormatError:
        return _fail(f"ends early, at byte {self.origin + len(self.buf)}, before its end marker",
                     "it is incomplete: take the checkpoint again")

    # -- output --------------------------------------------------------------------------

    def cut(self) -> Segment | None:
        """End the current segment before ``pos``."""
        if self.pos > self.run:
            self.parts.append(self.buf[self.run:self.pos])
            self.dlen += self.pos - self.run
        self.run = self.pos
        if not self.dlen and not self.pages:
            return None
        seg = Segment(b"".join(self.parts), tuple(self.offsets), self.pages)
        self.parts, self.dlen, self.offsets, self.pages = [], 0, [], []
        return seg

    # -- structure -----------------------------------------------------------------------

    def segments(self) -> Iterator[Segment]:
        head = self.take(8)
        if head[:4] != MAGIC:
            raise _fail("does not start with QEMU's magic 'QEVM'", "it is not a QEMU migration stream")
        version = _BE32.unpack(head[4:])[0]
        if version != VERSION:
            raise _fail(f"has file version {version}, not {VERSION}")
        if self.peek() == CONFIGURATION:
            self.pos += 1
            n = self.be32()
            if n > 255:
                raise _fail("has an invalid configuration section", "it is corrupt: take the checkpoint again")
            self.take(n)  # machine type
            self.config_subsections()
        while True:
            kind = self.peek()
            if kind is None:
                raise self.truncated()
            if kind in (FULL, EOF):
                if self.ram_id is None:
                    raise _fail("has no RAM section")
                seg = self.cut()
                if seg:
                    yield seg
                yield from self.tail()
                return
            if kind == COMMAND and self.fill(5) and self.buf[self.pos + 1:self.pos + 5] == SWITCHOVER_START:
                self.pos += 5  # kept as it is, with the bytes around it
                continue
            if kind not in (START, PART, END):
                if kind == COMMAND:
                    raise _fail("contains commands of postcopy, COLO or a return path",
                                "migrate without the postcopy-ram, return-path and x-colo capabilities")
                raise _fail(f"has an unexpected section type 0x{kind:02x} at byte {self.origin + self.pos}",
                            "it is corrupt or from an unsupported QEMU: take the checkpoint again")
            seg = self.cut()
            if seg:
                yield seg
            self.pos += 1
            section_id = self.be32()
            if kind == START:
                idstr = self.take(self.byte())
                self.take(4)  # instance id
                version = self.be32()
                if idstr != b"ram":
                    raise _fail(f"carries the iterable section {idstr.decode(errors='replace')!r} besides RAM",
                                "migrate without block migration and dirty-bitmap migration")
                if self.ram_id is not None:
                    raise _fail("has two RAM sections", "it is corrupt: take the checkpoint again")
                if version != RAM_VERSION:
                    raise _fail(f"has RAM section version {version}, not {RAM_VERSION}")
                self.ram_id = section_id
            elif section_id != self.ram_id:
                raise _fail(f"continues section {section_id}, which is not the RAM section",
                            "it is corrupt or uses an unsupported capability: take the checkpoint again")
            yield from self.ram_records()
            if self.peek() == FOOTER:
                self.pos += 1
                if self.be32() != section_id:
                    raise _fail(f"has a section footer that does not match section {section_id}",
                                "it is corrupt: take the checkpoint again")

    def config_subsections(self) -> None:
        while self.peek() == SUBSECTION:
            self.pos += 1
            name = self.take(self.byte())
            if name not in _CONFIG_SUBSECTIONS:
                raise _fail(f"has an unknown configuration subsection {name.decode(errors='replace')!r}")
            self.take(4)  # subsection version
            if name == b"configuration/target-page-bits":
                if self.be32() != PAGE_SIZE.bit_length() - 1:
                    raise _fail("uses a target page size other than 4 KiB")
            elif name == b"configuration/uuid":
                self.take(16)
            else:
                for _ in range(self.be32()):
                    cap = self.take(self.byte())
                    if cap == b"x-ignore-shared":
                        raise _fail("was made with the x-ignore-shared capability",
                                    "migrate without x-ignore-shared")

    def mem_size(self, total: int) -> None:
        """The block list of a MEM_SIZE record: u8 length + idstr, be64 used length, per block."""
        self.blocks = {}
        while total > 0:
            name = self.take(self.byte())
            length = _BE64.unpack(self.take(8))[0]
            if not name or length == 0 or length & FLAG_MASK or length > total or name in self.blocks:
                raise _fail("has an invalid RAM block list", "it is corrupt: take the checkpoint again")
            self.blocks[name] = length
            total -= length
        self.block, self.block_len = b"", -1

    def ram_records(self) -> Iterator[Segment]:
        """Page records up to EOS; a new segment whenever the (block, 2 MiB region) changes.

        This is the hot loop: the state lives in locals and goes back to ``self`` only around
        the rare calls that move the buffer.  The block of the last record stays in ``self``
        because QEMU's CONTINUE flag refers to it across sections.
        """
        unpack = _BE64.unpack_from
        buf, pos, end, run, dlen = self.buf, self.pos, len(self.buf), self.run, self.dlen
        block, block_len = self.block, self.block_len
        parts, offsets, pages = self.parts, self.offsets, self.pages
        seg_block: bytes | None = None  # (seg_block, seg_region): the current segment's region
        seg_region = -1
        while True:
            if end - pos < _MAX_RECORD and not self.eof:
                self.pos, self.run, self.dlen = pos, run, dlen
                self.fill(_MAX_RECORD)
                buf, pos, end, run, dlen = self.buf, self.pos, len(self.buf), self.run, self.dlen
            if end - pos < 8:
                raise self.truncated()
            record = pos
            header = unpack(buf, pos)[0]
            flags = header & FLAG_MASK
            addr = header ^ flags
            pos += 8
            if flags & F_CONTINUE:
                flags ^= F_CONTINUE
                if block_len < 0:
                    raise _fail(f"continues a RAM block before naming one, at byte {self.origin + record}",
                                "it is corrupt: take the checkpoint again")
            elif flags == F_ZERO or flags == F_PAGE:
                n = buf[pos] if pos < end else 0
                block = buf[pos + 1:pos + 1 + n]
                pos += 1 + n
                if pos > end:
                    raise self.truncated()
                block_len = self.blocks.get(block, -1)
                if block_len < 0:
                    raise _fail(f"names an unknown RAM block {block.decode(errors='replace')!r}",
                                "it is corrupt: take the checkpoint again")
            elif flags == F_EOS and not addr:
                break
            elif flags == F_MEM_SIZE:
                self.pos, self.run, self.dlen = pos, run, dlen
                self.mem_size(addr)
                buf, pos, end, run, dlen = self.buf, self.pos, len(self.buf), self.run, self.dlen
                block, block_len = b"", -1
                continue
            if addr >= block_len or not (flags == F_ZERO or flags == F_PAGE):
                raise self.bad_record(flags, addr, record)
            if addr >> REGION_SHIFT != seg_region or block != seg_block:
                if seg_block is not None:  # else this section's header starts the segment
                    if record > run:
                        parts.append(buf[run:record])
                        dlen += record - run
                    yield Segment(b"".join(parts), tuple(offsets), pages)
                    parts, offsets, pages, dlen = [], [], [], 0
                    self.parts, self.offsets, self.pages = parts, offsets, pages
                    run = record
                seg_block, seg_region = block, addr >> REGION_SHIFT
            if flags == F_PAGE:
                if pos + PAGE_SIZE > end:
                    raise self.truncated()
                parts.append(buf[run:pos])
                dlen += pos - run
                offsets.append(dlen)
                pages.append(buf[pos:pos + PAGE_SIZE])
                pos += PAGE_SIZE
                run = pos
                if len(pages) == MAX_SEGMENT_PAGES:  # only a stream that repeats pages gets here
                    seg_region = -1
            else:
                if pos >= end:
                    raise self.truncated()
                pos += 1
        self.pos, self.run, self.dlen = pos, run, dlen
        self.block, self.block_len = block, block_len

    def bad_record(self, flags: int, addr: int, record: int) -> StreamFormatError:
        at = self.origin + record
        unsupported = [name for bit, name in _FLAG_NAMES.items() if flags & bit]
        if unsupported:
            return _fail(f"uses the RAM encoding {'/'.join(unsupported)} at byte {at}",
                         "migrate without the xbzrle, compress, multifd and rdma capabilities")
        return _fail(f"has an invalid RAM record (flags 0x{flags:x}, address 0x{addr:x}) at byte {at}",
                     "it is corrupt or from an unsupported QEMU: take the checkpoint again")

    # -- the device-state tail -----------------------------------------------------------

    def tail(self) -> Iterator[Segment]:
        """Everything from the first device section to the end, as opaque segments.

        The stream must end with EOF 0x00, VMDESCRIPTION 0x06, be32 n and n bytes of JSON.
        Every ``00 06 nn nn nn nn {`` is a candidate for that, kept while the end it implies is
        still ahead; bytes are yielded only once searched.
        """
        pending = bytearray(self.buf[self.pos:])
        at = self.origin + self.pos  # stream offset of pending[0]
        self.buf, self.pos, self.run = b"", 0, 0
        searched = 0  # pending[:searched] holds no candidate start not yet seen
        ends: list[int] = []
        while True:
            i = pending.find(b"\x00\x06", searched)
            while 0 <= i <= len(pending) - 6:
                if i + 6 == len(pending) or pending[i + 6] == 0x7B:
                    ends.append(at + i + 6 + _BE32.unpack_from(pending, i + 2)[0])
                i = pending.find(b"\x00\x06", i + 1)
            searched = max(searched, len(pending) - 5)
            total = at + len(pending)
            ends = [e for e in ends if e >= total]
            while searched >= SEGMENT_DATA_MAX:
                yield Segment(bytes(pending[:SEGMENT_DATA_MAX]), (), [])
                del pending[:SEGMENT_DATA_MAX]
                at += SEGMENT_DATA_MAX
                searched -= SEGMENT_DATA_MAX
            if self.eof:
                break
            chunk = self.read(READ_SIZE)
            self.eof = not chunk
            pending += chunk
        if total not in ends or not pending.endswith(b"}"):
            raise _fail(f"ends at byte {total} without a complete VM description after its end marker",
                        "it is incomplete or was made with suppress-vmdesc: take the checkpoint again")
        yield Segment(bytes(pending), (), [])


# The "globalstate" device section: FULL, be32 section id, u8 11 + idstr, be32 instance 0,
# be32 version 1, then be32 size (strlen + 1) and a 100-byte buffer: up to 7.2 the run state's
# name, zero-padded; since 9.0 (migration/global_state.c) the name in its first 32 bytes, then
# two bytes saying whether the guest was suspended (ACPI S3), then 66 unused zero bytes.
_GLOBALSTATE = re.compile(rb"\x04.{4}\x0bglobalstate\x00\x00\x00\x00\x00\x00\x00\x01(.{4})(paused\x00{26})(.{68})",
                          re.S)


def running_on_load(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The stream with its recorded run state changed from paused to running.

    A checkpoint is taken of a stopped guest, so its stream says "paused" and a QEMU loading
    it stays paused until told ``cont``.  An exported stream must resume by itself in a stock
    QEMU: this rewrites the run state's name in place (same length) and changes nothing else.
    """
    carry = b""
    for chunk in chunks:
        buf = carry + chunk
        m = _GLOBALSTATE.search(buf)
        if m:
            size = (len(b"running") + 1).to_bytes(4, "big")
            yield buf[: m.start(1)] + size + b"running".ljust(32, b"\0") + buf[m.end(2):]
            yield from chunks
            return
        keep = min(len(buf), 256)  # longer than the pattern: a match may straddle two chunks
        yield buf[:-keep]
        carry = buf[-keep:]
    yield carry
