"""The migration stream splitter, on streams recorded from a real QEMU and on synthetic ones."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.stream import Synthetic, be32, be64, fill_data, name, reader, record_stream
from session_manager.errors import StreamFormatError
from session_manager.vm.qemu import find_qemu, qemu_path, release
from session_manager.vm.stream import PAGE_SIZE, SEGMENT_DATA_MAX, Segment, iter_segments


def rebuild(segments: Iterator[Segment]) -> bytes:
    return b"".join(piece for seg in segments for piece in seg.pieces())


# -- synthetic streams ---------------------------------------------------------------------------------


def page(n: int) -> bytes:
    return bytes([n % 251 + 1]) * PAGE_SIZE


def basic() -> tuple[bytes, Synthetic]:
    s = Synthetic().section(0x01).section(0x02)
    s.page(b"pc.ram", 0, page(1)).page(b"pc.ram", 4096).page(b"pc.ram", 8192, page(2))
    s.page(b"pc.ram", 2 << 20, page(3))  # next 2 MiB region
    s.page(b"vga.vram", 0, page(4))  # another block, same region number
    s.page(b"pc.ram", 2 << 20 | 4096, page(5))
    s.end().section(0x03).page(b"pc.ram", 12 << 20, page(6)).end()  # pages in END too
    return s.devices(), s


# -- tests: real QEMU streams --------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("which", ["small-plain", "small-bg", "large-plain", "large-bg"])
def test_real_stream_round_trip(qemu_streams: dict[str, Path], which: str) -> None:
    data = qemu_streams[which].read_bytes()
    segments = list(iter_segments(reader(data)))
    assert hashlib.sha256(rebuild(iter(segments))).digest() == hashlib.sha256(data).digest()
    pages = [p for s in segments for p in s.pages]
    fill = fill_data(24 if which.startswith("large") else 4, 1)
    assert {fill[i:i + PAGE_SIZE] for i in range(0, len(fill), PAGE_SIZE)} <= set(pages)
    for seg in segments:
        assert len(seg.data) <= SEGMENT_DATA_MAX
        assert len(seg.page_offsets) == len(seg.pages) <= 512
        assert list(seg.page_offsets) == sorted(seg.page_offsets) and all(len(p) == PAGE_SIZE for p in seg.pages)
    # A pipe returns short reads; the segments must not depend on how the input arrives.
    again = list(iter_segments(reader(data, max_read=70000, seed=3)))
    assert again == segments


@pytest.mark.qemu
def test_unchanged_memory_gives_identical_segments(qemu_streams: dict[str, Path]) -> None:
    data = bytearray(qemu_streams["large-plain"].read_bytes())
    first = list(iter_segments(reader(bytes(data))))
    # Change one page of the guest's memory in the stream: only the segment holding it changes.
    victim = fill_data(24, 1)[5 << 20:(5 << 20) + PAGE_SIZE]
    at = data.find(victim)
    data[at:at + 16] = b"\xff" * 16
    second = list(iter_segments(reader(bytes(data))))
    assert len(first) == len(second)
    differ = [i for i, (a, b) in enumerate(zip(first, second)) if a != b]
    assert len(differ) == 1
    assert first[differ[0]].data == second[differ[0]].data


@pytest.mark.qemu
@pytest.mark.parametrize("capability, message", [("x-ignore-shared", "x-ignore-shared"), ("compress", "COMPRESS_PAGE")])
def test_real_streams_with_unsupported_capabilities(tmp_path: Path, capability: str, message: str) -> None:
    if capability == "compress" and release(find_qemu(qemu_path()).version_text) >= (9, 1):
        pytest.skip("QEMU 9.1 removed the compress capability: no stream of this QEMU can have it")
    data = record_stream(tmp_path / "s", 48, fill_data(1, 2), background=False, capability=capability).read_bytes()
    with pytest.raises(StreamFormatError, match=message):
        list(iter_segments(reader(data)))


@pytest.mark.qemu
def test_truncated_real_stream(qemu_streams: dict[str, Path]) -> None:
    data = qemu_streams["small-bg"].read_bytes()
    tail = data.rfind(b"\x00\x06")
    for cut in (4, 20, 100, len(data) // 2, tail - 50, tail + 1, tail + 9, len(data) - 1):
        with pytest.raises(StreamFormatError, match="ends"):
            list(iter_segments(reader(data[:cut])))


# -- tests: synthetic streams ---------------------------------------------------------------------------


def test_synthetic_round_trip_and_cuts() -> None:
    data, s = basic()
    segments = list(iter_segments(reader(data)))
    assert rebuild(iter(segments)) == data
    assert [p for seg in segments for p in seg.pages] == s.pages
    by_pages = [[p[0] - 1 for p in seg.pages] for seg in segments if seg.pages]
    # One segment per (block, 2 MiB region); a section start also starts one.
    assert by_pages == [[1, 2], [3], [4], [5], [6]]
    # The device-state tail is opaque and has no pages.
    assert segments[-1].pages == [] and segments[-1].data.endswith(b"}")


def test_qemu_10_switchover_start_is_kept_and_other_commands_refused() -> None:
    """QEMU 10.0's plain migration of a 10.0 machine type: COMMAND SWITCHOVER_START before the last RAM section."""
    s = Synthetic().section(0x01).section(0x02).page(b"pc.ram", 0, page(1)).end()
    s.out += b"\x08\x00\x0b\x00\x00"
    data = s.section(0x03).page(b"pc.ram", 4096, page(2)).end().devices()
    segments = list(iter_segments(reader(data)))
    assert rebuild(iter(segments)) == data and [p for seg in segments for p in seg.pages] == [page(1), page(2)]
    ping = data.replace(b"\x08\x00\x0b\x00\x00", b"\x08\x00\x02\x00\x04" + be32(1))
    with pytest.raises(StreamFormatError, match="commands of postcopy"):
        list(iter_segments(reader(ping)))


def test_tail_is_cut_into_bounded_segments() -> None:
    s = Synthetic().section(0x01).section(0x02).page(b"pc.ram", 0, page(1)).end()
    data = s.devices(state=random.Random(5).randbytes(3 * SEGMENT_DATA_MAX + 123))
    segments = list(iter_segments(reader(data, max_read=300000)))
    assert rebuild(iter(segments)) == data
    assert max(len(seg.data) for seg in segments) <= SEGMENT_DATA_MAX


def ram_then(raw: bytes) -> bytes:
    """A stream whose PART section has one page, then ``raw``."""
    s = Synthetic().section(0x01).section(0x02).page(b"pc.ram", 0, page(1))
    s.out += raw
    return s.end().devices()


def mutate_tail(data: bytes, at: int, new: bytes) -> bytes:
    """Replace bytes from the EOF marker that precedes the VM description."""
    i = data.rfind(b"\x00\x06") + at
    return data[:i] + new + data[i + len(new):]


BASIC = basic()[0]


@pytest.mark.parametrize("bad, message", [
    (b"QEVX" + BASIC[4:], "magic"),
    (BASIC[:4] + be32(2) + BASIC[8:], "version 2"),
    (BASIC[:4] + be32(4) + BASIC[8:], "version 4"),
    (ram_then(be64(4096 | 0x40 | 0x20) + b"\x00" * 4096), "XBZRLE"),
    (ram_then(be64(4096 | 0x100 | 0x20) + b"\x00" * 4096), "COMPRESS_PAGE"),
    (ram_then(be64(4096 | 0x400 | 0x20) + b"\x00" * 4096), "invalid RAM record"),
    (ram_then(be64(4096 | 0x10)), "invalid RAM record"),
    (ram_then(be64(0x04 | 0x20)), "invalid RAM record"),  # MEM_SIZE with CONTINUE
    (ram_then(be64(4096 | 0x08) + name(b"nope") + b"\x00" * 4096), "unknown RAM block 'nope'"),
    (ram_then(be64(0x10) + b"\x09" + be32(2)), "unexpected section type 0x09"),
    (ram_then(be64(0x10) + b"\x08" + b"\x00\x01\x00\x00"), "postcopy"),
    (ram_then(be64(0x10) + b"\x02" + be32(7)), "not the RAM section"),
    (ram_then(be64(0x10) + b"\x7e" + be32(3)), "footer"),
    (mutate_tail(BASIC, 1, b"\x07"), "VM description"),
    (mutate_tail(BASIC, 2, be32(5)), "VM description"),
    (BASIC + b"x", "VM description"),
    (BASIC.replace(name(b"ram") + be32(0) + be32(4), name(b"ram") + be32(0) + be32(3)), "RAM section version 3"),
    (BASIC.replace(name(b"ram"), name(b"blk"), 1), "iterable section 'blk'"),
    (BASIC.replace(b"\x07" + be32(10), b"\x07" + be32(1000), 1), "configuration"),
])
def test_malformed_streams(bad: bytes, message: str) -> None:
    with pytest.raises(StreamFormatError, match=message) as e:
        list(iter_segments(reader(bad)))
    assert str(e.value).count(";") == 1 and str(e.value).endswith(".")  # one sentence: what, then what to do


def test_page_beyond_its_block() -> None:
    s = Synthetic().section(0x01).section(0x02).page(b"vga.vram", 4 << 20, page(1)).end()
    with pytest.raises(StreamFormatError, match="invalid RAM record"):
        list(iter_segments(reader(s.devices())))


def test_continue_before_any_block() -> None:
    s = Synthetic().section(0x01).section(0x02)
    s.last = b"pc.ram"  # pretend a block was named: the record gets CONTINUE without one
    s.page(b"pc.ram", 0, page(1)).end()
    with pytest.raises(StreamFormatError, match="before naming one"):
        list(iter_segments(reader(s.devices())))


def test_every_truncation_of_a_synthetic_stream_is_refused() -> None:
    data, _ = basic()
    for cut in range(0, len(data), 97):
        with pytest.raises(StreamFormatError):
            list(iter_segments(reader(data[:cut], max_read=5000)))
    assert rebuild(iter_segments(reader(data, max_read=1))) == data


def test_empty_input() -> None:
    with pytest.raises(StreamFormatError, match="ends early"):
        list(iter_segments(reader(b"")))


def test_parse_speed() -> None:
    """About 1 GiB/s here; fail only when far off (shared CI machines are noisy)."""
    s = Synthetic(blocks={b"pc.ram": 64 << 20}).section(0x01).section(0x02)
    rnd = random.Random(1)
    for i in range(8192):
        s.page(b"pc.ram", i * PAGE_SIZE, rnd.randbytes(PAGE_SIZE) if i % 3 else None)
    data = s.end().devices()
    start = time.perf_counter()
    n = sum(len(seg.pages) for seg in iter_segments(reader(data)))
    rate = len(data) / (time.perf_counter() - start)
    assert n == sum(1 for i in range(8192) if i % 3)
    assert rate > 150e6, f"parsing ran at {rate / 1e6:.0f} MB/s"


def test_reads_are_large() -> None:
    data, _ = basic()
    sizes: list[int] = []
    inner = reader(data)

    def read(n: int) -> bytes:
        sizes.append(n)
        return inner(n)

    list(iter_segments(read))
    assert min(sizes) >= 1 << 20


def test_segment_pieces() -> None:
    seg = Segment(b"abcdef", (0, 3, 3, 6), [b"1", b"2", b"3", b"4"])
    assert b"".join(seg.pieces()) == b"1abc23def4"


@pytest.mark.parametrize("after", [bytes(68), b"\x01\x00" + bytes(66)], ids=["7.2", "9.0+ (suspended flags)"])
def test_running_on_load_rewrites_only_the_run_state_wherever_chunks_split(after: bytes) -> None:
    from session_manager.vm.stream import running_on_load

    section = (b"\x04\x00\x00\x00\x31\x0bglobalstate" + b"\x00\x00\x00\x00\x00\x00\x00\x01"
               + (7).to_bytes(4, "big") + b"paused".ljust(32, b"\0") + after)
    stream = b"A" * 300 + section + b"\x7e\x00\x00\x00\x31" + b"B" * 50
    expected = stream.replace((7).to_bytes(4, "big") + b"paused".ljust(32, b"\0") + after,
                              (8).to_bytes(4, "big") + b"running".ljust(32, b"\0") + after)
    assert expected != stream and len(expected) == len(stream)
    for cut in range(0, len(stream), 7):
        chunks = iter([stream[:cut], stream[cut:cut + 13], stream[cut + 13:]])
        assert b"".join(running_on_load(chunks)) == expected
    untouched = b"C" * 1000  # no globalstate section: every byte passes through unchanged
    assert b"".join(running_on_load(iter([untouched[:10], untouched[10:]]))) == untouched
