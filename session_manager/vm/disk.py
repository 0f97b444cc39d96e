"""Disk chains: qcow2 overlays over the user's image, and reading what changed.

Every checkpoint freezes the overlay QEMU was writing to and puts a new one on
top, so a checkpoint's disk is the chain ending in its frozen layer.  Frozen
layers are never written again; restoring puts a new overlay on top of one.
"""

from __future__ import annotations

import bisect
import json
import os
import secrets
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QemuError
from .qemu import find_qemu, qemu_path

CHUNK = 64 * 1024  # the unit the repository stores disks in (qcow2's default cluster)


def new_layer_name() -> str:
    return f"layer-{secrets.token_hex(6)}.qcow2"


def qemu_img(*args: str) -> str:
    proc = subprocess.run([find_qemu(qemu_path()).img, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise QemuError(f"qemu-img {args[0]} failed: {msg}.")
    return proc.stdout


def image_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(qemu_img("info", "-U", "--output=json", str(path)))
    return info


def create_overlay(path: Path, backing: Path, backing_format: str, size: int) -> None:
    """A qcow2 overlay over ``backing``; a backing file in the same directory is named relatively."""
    ref = backing.name if backing.parent == path.parent else str(backing)
    # -u: don't open the backing file, which a running QEMU may hold locked.
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", ref, "-F", backing_format, str(path), str(size))


def create_blank(path: Path, size: int) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(size))


def backing_of(path: Path) -> str | None:
    """The backing file name recorded in a qcow2 header (None for a raw file or no backing)."""
    with open(path, "rb") as f:
        header = f.read(20)
        if len(header) < 20 or header[:4] != b"QFI\xfb":
            return None
        offset, size = struct.unpack(">QI", header[8:20])
        if not offset:
            return None
        f.seek(offset)
        return f.read(size).decode()


def chain(top: Path) -> list[Path]:
    """The files of a backing chain, top first."""
    infos = json.loads(qemu_img("info", "-U", "--backing-chain", "--output=json", str(top)))
    return [Path(i["filename"]) for i in infos]


@dataclass(frozen=True)
class _Extent:
    start: int
    length: int
    depth: int
    data: bool
    offset: int | None


class ChainReader:
    """Reads guest data from a backing chain without QEMU's help.

    ``qemu-img map`` says, for every range of the disk, which layer holds it
    and where in that file; uncompressed qcow2 and raw data is then read with
    plain ``pread``.
    """

    def __init__(self, top: Path) -> None:
        self.files = chain(top)
        self.size = int(image_info(top)["virtual-size"])
        raw = json.loads(qemu_img("map", "-U", "--output=json", str(top)))
        self.extents = [
            _Extent(e["start"], e["length"], e["depth"], e["data"] and e.get("present", True), e.get("offset"))
            for e in raw
        ]
        self._starts = [e.start for e in self.extents]
        self._fds: dict[int, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ChainReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def depth_of(self, path: Path) -> int | None:
        resolved = path.resolve()
        for depth, f in enumerate(self.files):
            if f.resolve() == resolved:
                return depth
        return None

    def chunks_above(self, depth: int | None) -> Iterator[tuple[int, bytes]]:
        """Every chunk with data from a layer above ``depth`` (all data chunks when None)."""
        limit = len(self.files) if depth is None else depth
        seen = -1
        for e in self.extents:
            if e.depth >= limit or (depth is None and not e.data):
                continue
            first = max(e.start // CHUNK, seen + 1)
            for index in range(first, (e.start + e.length + CHUNK - 1) // CHUNK):
                seen = index
                yield index, self.read(index * CHUNK, min(CHUNK, self.size - index * CHUNK))

    def read(self, pos: int, length: int) -> bytes:
        out = bytearray(length)
        base, end = pos, pos + length
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < end and i < len(self.extents):
            e = self.extents[i]
            stop = min(end, e.start + e.length)
            if e.data:
                if e.offset is None:
                    raise QemuError(
                        f"{self.files[e.depth]} stores data compressed or in a format session-manager cannot "
                        "read directly; convert it with `qemu-img convert -O qcow2` and create the session from "
                        "the copy."
                    )
                n = stop - pos
                chunk = os.pread(self._fd(e.depth), n, e.offset + (pos - e.start))
                out[pos - base : pos - base + len(chunk)] = chunk
            pos = stop
            i += 1
        return bytes(out)

    def _fd(self, depth: int) -> int:
        if depth not in self._fds:
            self._fds[depth] = os.open(self.files[depth], os.O_RDONLY)
        return self._fds[depth]


def write_raw(path: Path, size: int, chunks: Iterator[tuple[int, bytes]]) -> None:
    """Materialise a disk as a sparse raw file (zero chunks stay holes)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.truncate(size)
        for index, data in chunks:
            os.pwrite(f.fileno(), data, index * CHUNK)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
