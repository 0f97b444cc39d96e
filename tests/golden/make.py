"""Make the golden repository: tests/golden/repo/ and tests/golden/expected.json, read by tests/test_golden.py.

    .venv/bin/python tests/golden/make.py

The repository is written by the project's own store (Repository, Writer) and holds, with a passphrase and no
other key, three small checkpoints that share blobs (see docs/design.md for the format):

    0a0a...  session "work",    manual,   memory + disk + thumbnail; annotated twice (a note, then a pin)
    0b0b...  session "work",    autosave, parent 0a0a...: two pages and one disk chunk changed, the rest shared
    0c0c...  session "scratch", stop,     memory only: some pages shared with 0a0a... (dedup across sessions)

Every blob type is there (pages, segments, disk chunks, disk maps, a thumbnail), and envelopes of both formats
(compressed and, for a page of random bytes, plain).  The meta records are those the engine writes
(Engine._meta).  expected.json records what a reader must find: ids, times, sessions, meta, annotations, the
SHA-256 of each restored memory stream, disk and thumbnail, and the repository's numbers.

Run it again only when the format changes on purpose (and then keep the old golden repository beside the new
one, if the new reader is to read it): the point of the checked-in files is that the code of the day must read
what an earlier version wrote.  The contents are fixed (seeded), but keys, nonces, and so pack names are new on
every run.  Nothing touches the user's keyring: the key this makes is dropped with a temporary directory, and
only the passphrase opens the repository.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import struct
import sys
import tempfile
import zlib
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"  # never the user's keyring

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for helpers

import keyring  # noqa: E402
from keyring.backends import fail  # noqa: E402

from helpers.stream import be32, be64, name, reader  # noqa: E402
from session_manager.store.records import CheckpointMeta  # noqa: E402
from session_manager.store.repo import Repository  # noqa: E402
from session_manager.store.writer import CHUNK_SIZE  # noqa: E402
from session_manager.vm.stream import PAGE_SIZE, iter_segments  # noqa: E402

PASSPHRASE = "correct horse battery staple, golden"
A, B, C = "0a" * 16, "0b" * 16, "0c" * 16
DISK_SIZE = 3 * CHUNK_SIZE + 1000  # four chunks, the last one short


# -- contents ------------------------------------------------------------------------------------------------------


def stream(pages: dict[int, bytes | None], state: bytes) -> bytes:
    """A QEMU migration stream (file version 3, as QEMU 7.2 writes it) of a guest whose pc.ram holds ``pages``
    (guest-physical address -> 4 KiB page, None: a zero page), then one device section holding ``state``."""
    ram = 4 << 20
    out = bytearray(b"QEVM" + be32(3) + b"\x07" + be32(10) + b"pc-q35-7.2")
    out += b"\x01" + be32(2) + name(b"ram") + be32(0) + be32(4)  # START "ram", instance 0, version 4
    out += be64(ram | 0x04) + name(b"pc.ram") + be64(ram)  # MEM_SIZE
    out += be64(0x10) + b"\x7e" + be32(2)  # EOS, FOOTER
    out += b"\x02" + be32(2)  # PART
    first = True
    for addr, page in sorted(pages.items()):
        flags = (0x08 if page is not None else 0x02) | (0 if first else 0x20)  # PAGE or ZERO, CONTINUE
        out += be64(addr | flags) + (name(b"pc.ram") if first else b"")
        out += page if page is not None else b"\x00"
        first = False
    out += be64(0x10) + b"\x7e" + be32(2)
    out += b"\x04" + be32(0) + name(b"timer") + be32(0) + be32(2) + state + b"\x7e" + be32(0)  # FULL
    desc = json.dumps({"page_size": PAGE_SIZE, "devices": []}).encode()
    out += b"\x00" + b"\x06" + be32(len(desc)) + desc  # EOF, VMDESCRIPTION
    return bytes(out)


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A one-colour PNG, like a tiny screendump."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def contents() -> dict[str, dict[str, Any]]:
    """What each checkpoint holds: memory stream, disk chunks (index -> bytes), thumbnail."""
    rnd = random.Random(13)

    def page() -> bytes:  # compressible, like real memory
        return rnd.randbytes(256) * (PAGE_SIZE // 256)

    region = 2 << 20  # a 2 MiB region of RAM is one segment (vm/stream.py)
    pages_a: dict[int, bytes | None] = {i * PAGE_SIZE: page() for i in range(6)}
    pages_a[6 * PAGE_SIZE] = None
    pages_a[7 * PAGE_SIZE] = rnd.randbytes(PAGE_SIZE)  # incompressible: stored without compression
    pages_a.update({region + i * PAGE_SIZE: page() for i in range(4)})
    state = b"device state " * 20
    pages_b = dict(pages_a)
    pages_b[1 * PAGE_SIZE] = page()
    pages_b[3 * PAGE_SIZE] = page()  # region 1 is unchanged: its segment is shared with A
    pages_c = {addr: p for addr, p in pages_a.items() if addr < region}  # region 0 as in A
    pages_c[0] = page()
    pages_c[region] = page()
    disk_a = {0: rnd.randbytes(1024) * 64, 2: rnd.randbytes(1024) * 64, 3: rnd.randbytes(100) * 10}
    disk_b = {**disk_a, 2: rnd.randbytes(1024) * 64}
    thumbnail = png(16, 10, (40, 90, 160))
    return {
        A: {"memory": stream(pages_a, state), "disk": disk_a, "thumbnail": thumbnail},
        B: {"memory": stream(pages_b, state), "disk": disk_b, "thumbnail": thumbnail},
        C: {"memory": stream(pages_c, b"other state " * 20), "disk": None, "thumbnail": None},
    }


@dataclass
class Config:
    """The fields of local/sessions.py's SessionConfig, as the engine records them in meta["config"]."""

    name: str
    machine: str = "pc-q35-7.2"
    memory_mib: int = 4
    cpus: int = 1
    boot: str = "disk"
    disk_size: int = DISK_SIZE
    base_image: str | None = None
    base_format: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    iso: str | None = None
    vnc_tcp: str | None = None
    created: str = "2024-06-01T08:55:00+00:00"


def meta(kind: str, note: str, live: bool, pause_ms: float, stream_bytes: int, layer: str, session: str) -> dict:
    """What Engine._meta records (as JSON)."""
    return {"kind": kind, "note": note, "live": live, "pause_ms": pause_ms, "downtime_ms": round(pause_ms * 0.8, 3),
            "wall_s": 0.25, "stream_bytes": stream_bytes, "disk_layer": layer, "qemu": "7.2.11",
            "config": asdict(Config(session))}


# -- the repository ------------------------------------------------------------------------------------------------


def write(root: Path) -> dict[str, Any]:
    keyring.set_keyring(fail.Keyring())
    logging.getLogger("session_manager").setLevel(logging.ERROR)  # "no usable keyring": the key file is dropped
    repo = Repository.open(root, create=True)
    repo.add_key(PASSPHRASE)
    data = contents()
    plan = [  # id, session, parent, created, meta
        (A, "work", None, datetime(2024, 6, 1, 9, 0, tzinfo=UTC),
         meta("manual", "clean install", True, 12.5, len(data[A]["memory"]), "layer-5a1e0000aaaa.qcow2", "work")),
        (B, "work", A, datetime(2024, 6, 1, 9, 5, tzinfo=UTC),
         meta("autosave", "", True, 9.875, len(data[B]["memory"]), "layer-5a1e0000bbbb.qcow2", "work")),
        (C, "scratch", None, datetime(2024, 6, 1, 10, 0, tzinfo=UTC),
         meta("stop", "saved on stop", False, 140.25, len(data[C]["memory"]), "layer-5a1e0000cccc.qcow2", "scratch")),
    ]
    expected: dict[str, Any] = {"passphrase": PASSPHRASE, "repository_id": repo.id, "checkpoints": {}}
    for ckpt_id, session, parent, created, record in plan:
        d = data[ckpt_id]
        with repo.writer(session=session, parent=parent, ckpt_id=ckpt_id) as w:
            w.add_memory(iter_segments(reader(d["memory"])))
            if d["disk"] is not None:
                changed = d["disk"] if parent is None else {i: c for i, c in d["disk"].items()
                                                            if data[parent]["disk"].get(i) != c}
                w.add_disk(DISK_SIZE, sorted(changed.items()), base=parent)
            if d["thumbnail"] is not None:
                w.set_thumbnail(d["thumbnail"])
            info = w.commit(CheckpointMeta.from_json(record), created=created)
        disk = None
        if d["disk"] is not None:
            raw = bytearray(DISK_SIZE)
            for i, chunk in d["disk"].items():
                raw[i * CHUNK_SIZE:i * CHUNK_SIZE + len(chunk)] = chunk
            disk = hashlib.sha256(raw).hexdigest()
        expected["checkpoints"][ckpt_id] = {
            "session": session, "parent": parent, "created": created.isoformat(), "meta": record,
            "note": record["note"], "pinned": False, "added_bytes": info.added_bytes,
            "stream_bytes": len(d["memory"]), "memory_sha256": hashlib.sha256(d["memory"]).hexdigest(),
            "disk_size": DISK_SIZE if disk else None, "disk_sha256": disk,
            "thumbnail_sha256": hashlib.sha256(d["thumbnail"]).hexdigest() if d["thumbnail"] else None,
            "segments": len(info.manifest["memory"]["segments"]) if "segments" in info.manifest["memory"]
            else info.manifest["memory"]["segment_count"]}
    repo.annotate(A, note="before the upgrade")  # annotations/<A>-1
    repo.annotate(A, pinned=True)  # annotations/<A>-2: the note too, and it wins
    expected["checkpoints"][A].update(note="before the upgrade", pinned=True)
    expected["annotations"] = {f"annotations/{A}-1": {"note": "before the upgrade"},
                               f"annotations/{A}-2": {"note": "before the upgrade", "pinned": True}}
    du = repo.du()
    expected["du"] = {"checkpoints": du.checkpoints, "logical_bytes": du.logical_bytes,
                      "unique_bytes": du.unique_bytes, "stored_bytes": du.stored_bytes,
                      "repository_bytes": du.repository_bytes}
    report = repo.check(read_data=True)
    assert report.ok, report.summary()
    expected["check"] = {"checkpoints": report.checkpoints, "packs": report.packs, "blobs": report.blobs}
    return expected


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / "repo"  # its key file, repo.key beside it, stays in tmp
        expected = write(built)
        target = HERE / "repo"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(built, target)
    for d in sorted(target.rglob("*"), reverse=True):  # git keeps no empty directory: neither does the copy
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    files = sorted(p for p in target.rglob("*") if p.is_file())
    expected["files"] = {p.relative_to(target).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in files)
    print(f"{target}: {len(files)} files, {size} bytes")


if __name__ == "__main__":
    main()
