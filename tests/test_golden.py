"""The golden repository: what an earlier version wrote (tests/golden/, made by tests/golden/make.py) this one reads.

An accidental change of the repository format (docs/design.md) fails here in one of three ways: the code of the
day no longer reads the checked-in repository; a reader written from docs/design.md alone (GoldenReader, which
uses nothing of session_manager.store) no longer reads what the code of the day writes; or what it writes of the
same contents no longer deduplicates against the golden packs (blob ids, segment and map encodings, chunking).
The tests work on a copy: the checked-in files never change.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import blake3
import pytest
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from helpers.stream import reader
from session_manager.local.engine import Engine
from session_manager.store import writer
from session_manager.store.codec import FORMAT_VERSION, encode
from session_manager.store.records import CheckpointMeta
from session_manager.store.repo import Repository
from session_manager.vm.stream import iter_segments

GOLDEN = Path(__file__).resolve().parent / "golden"
EXPECTED: dict[str, Any] = json.loads((GOLDEN / "expected.json").read_text())
A, B, C = "0a" * 16, "0b" * 16, "0c" * 16

PAGE, SEGMENT, CHUNK, MAP, THUMBNAIL = 1, 2, 3, 4, 5
ENTRY = struct.Struct("<32sBIII")  # id, type, offset, length, raw length


# -- a reader of the format as docs/design.md writes it down -------------------------------------------------------


class GoldenReader:
    """Reads a repository directory with the passphrase, as docs/design.md describes the format, checking every
    MUST on the way; uses nothing of session_manager.store."""

    def __init__(self, root: Path, passphrase: str) -> None:
        self.root = root
        self.config = json.loads((root / "config").read_bytes())
        master = self._unwrap(passphrase)
        self.aead, self.id_key = ChaCha20Poly1305(master[:32]), master[32:]
        self.formats: set[int] = set()  # envelope format bytes seen
        self.index = self._read_index()
        self.packs: dict[str, tuple[bytes, list[tuple[bytes, int, int, int, int]]]] = {}

    def _unwrap(self, passphrase: str) -> bytes:
        ad = b"session-manager repository " + self.config["id"].encode()
        for path in sorted((self.root / "keys").iterdir()):
            obj = json.loads(path.read_bytes())
            assert obj["kdf"] == "argon2id" and len(path.name) == 16
            kek = Argon2id(salt=base64.b64decode(obj["salt"]), length=32, iterations=obj["iterations"],
                           lanes=obj["lanes"], memory_cost=obj["memory_kib"]).derive(passphrase.encode())
            wrapped = base64.b64decode(obj["key"])
            try:
                master = ChaCha20Poly1305(kek).decrypt(wrapped[:12], wrapped[12:], ad)
            except InvalidTag:
                continue
            assert len(master) == 64
            return master
        raise AssertionError("no key object opens with the passphrase")

    def open(self, stored: bytes, context: bytes, raw_length: int | None = None) -> bytes:
        """An envelope's plaintext: u8 format, 12-byte nonce, ChaCha20-Poly1305 with AD = format byte + context."""
        fmt = stored[0]
        assert fmt in (0x80, 0x81), fmt
        self.formats.add(fmt)
        payload = self.aead.decrypt(stored[1:13], stored[13:], bytes([fmt]) + context)
        if fmt == 0x81:  # a zstd frame that says its content size
            assert zstandard.get_frame_parameters(payload).content_size not in (0, zstandard.CONTENTSIZE_UNKNOWN)
            payload = zstandard.ZstdDecompressor().decompress(payload)
        assert raw_length is None or len(payload) == raw_length
        return payload

    def blob_id(self, plain: bytes) -> bytes:
        return blake3.blake3(plain, key=self.id_key).digest()

    def _read_index(self) -> dict[bytes, tuple[str, int, int, int, int]]:
        """Blob id -> (pack id, type, offset, length, raw length), from every index file (the first listing wins)."""
        out: dict[bytes, tuple[str, int, int, int, int]] = {}
        for path in sorted((self.root / "index").iterdir()):
            plain = self.open(path.read_bytes(), f"index/{path.name}".encode())
            assert path.name == self.blob_id(plain).hex()  # named by the keyed hash of its plaintext
            assert plain[:4] == b"SMI1"
            (count,) = struct.unpack_from("<I", plain, 4)
            at = 8
            for _ in range(count):
                pack_id, n = struct.unpack_from("<32sI", plain, at)
                at += 36
                for _ in range(n):
                    key, type_, offset, length, raw = ENTRY.unpack_from(plain, at)
                    at += ENTRY.size
                    out.setdefault(key, (pack_id.hex(), type_, offset, length, raw))
            assert at == len(plain)
        return out

    def pack(self, pack_id: str) -> tuple[bytes, list[tuple[bytes, int, int, int, int]]]:
        """A pack's bytes and its header's entries: blob envelopes back to back, header envelope, u32 its length."""
        if pack_id not in self.packs:
            data = (self.root / "data" / pack_id[:2] / pack_id).read_bytes()
            assert blake3.blake3(data).hexdigest() == pack_id  # named by the plain BLAKE3 of its bytes
            (hlen,) = struct.unpack("<I", data[-4:])
            header = self.open(data[-4 - hlen:-4], b"pack header")
            assert header[:4] == b"SMP1" and (len(header) - 4) % ENTRY.size == 0
            entries = list(ENTRY.iter_unpack(header[4:]))
            at = 0
            for _, type_, offset, length, _ in entries:
                assert offset == at and 1 <= type_ <= 5 and data[offset] in (0x80, 0x81)
                at += length
            assert at + hlen + 4 == len(data)
            self.packs[pack_id] = data, entries
        return self.packs[pack_id]

    def blob(self, key: bytes) -> bytes:
        pack_id, type_, offset, length, raw = self.index[key]
        data, entries = self.pack(pack_id)
        assert (key, type_, offset, length, raw) in entries  # the pack's own header agrees with the index
        plain = self.open(data[offset:offset + length], b"blob:" + key, raw)
        assert self.blob_id(plain) == key
        return plain

    def manifest(self, ckpt_id: str) -> dict[str, Any]:
        name = f"checkpoints/{ckpt_id}"
        m: dict[str, Any] = json.loads(self.open((self.root / name).read_bytes(), name.encode()))
        assert m["id"] == ckpt_id and m["version"] == self.config["version"]
        assert set(m) == {"version", "id", "session", "parent", "created", "meta", "memory", "disk", "thumbnail",
                          "added_bytes"}
        return m

    def memory(self, m: dict[str, Any]) -> bytes:
        """The migration stream: each segment's data with its pages put back, in the manifest's order."""
        out = bytearray()
        for h in m["memory"]["segments"]:
            seg = self.blob(bytes.fromhex(h))
            assert seg[:4] == b"SMS1"
            dlen, n = struct.unpack_from("<II", seg, 4)
            deltas = struct.unpack_from(f"<{n}I", seg, 12)
            ids = [seg[12 + 4 * n + 32 * i:12 + 4 * n + 32 * (i + 1)] for i in range(n)]
            data = seg[12 + 36 * n:]
            assert len(data) == dlen
            at = pos = 0
            for delta, page_id in zip(deltas, ids):
                pos += delta
                out += data[at:pos]
                at = pos
                out += self.blob(page_id)
            out += data[at:]
        assert len(out) == m["memory"]["stream_bytes"]
        return bytes(out)

    def disk(self, m: dict[str, Any]) -> bytes:
        """The raw disk: zeros, with each map's chunks at their places."""
        disk = m["disk"]
        raw = bytearray(disk["size"])
        for r, h in disk["maps"]:
            plain = self.blob(bytes.fromhex(h))
            assert plain[:4] == b"SMM1"
            (n,) = struct.unpack_from("<I", plain, 4)
            assert len(plain) == 8 + 36 * n
            last = -1
            for i in range(n):
                index, chunk_id = struct.unpack_from("<I32s", plain, 8 + 36 * i)
                assert index > last and index < disk["range_chunks"]
                last = index
                chunk = self.blob(chunk_id)
                at = (r * disk["range_chunks"] + index) * disk["chunk_size"]
                assert 0 < len(chunk) <= disk["chunk_size"] and at + len(chunk) <= disk["size"]
                raw[at:at + len(chunk)] = chunk
        return bytes(raw)

    def annotations(self) -> dict[str, dict[str, Any]]:
        """Checkpoint id -> its annotation of the highest number."""
        latest: dict[str, tuple[int, dict[str, Any]]] = {}
        for path in (self.root / "annotations").iterdir():
            ckpt_id, _, n = path.name.rpartition("-")
            payload = json.loads(self.open(path.read_bytes(), f"annotations/{path.name}".encode()))
            if ckpt_id not in latest or int(n) > latest[ckpt_id][0]:
                latest[ckpt_id] = (int(n), payload)
        return {k: v for k, (_, v) in latest.items()}


# -- helpers -------------------------------------------------------------------------------------------------------


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    """A copy of the golden repository (alone: its key is only in its passphrase)."""
    shutil.copytree(GOLDEN / "repo", tmp_path / "repo")
    return tmp_path / "repo"


def open_repo(path: Path) -> Repository:
    return Repository.open(path, passphrase=EXPECTED["passphrase"])


def files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def disk_image(repo: Repository, ckpt_id: str) -> bytes:
    raw = bytearray(repo.disk_size(ckpt_id))
    for index, chunk in repo.disk_chunks(ckpt_id):
        raw[index * writer.CHUNK_SIZE:index * writer.CHUNK_SIZE + len(chunk)] = chunk
    return bytes(raw)


# -- what a user sees ----------------------------------------------------------------------------------------------


def test_the_checked_in_repository_is_what_make_wrote() -> None:
    assert files(GOLDEN / "repo") == EXPECTED["files"]
    assert sum(p.stat().st_size for p in (GOLDEN / "repo").rglob("*") if p.is_file()) < 64 << 10


def test_the_checkpoints_are_listed_with_their_sessions_times_meta_and_annotations(golden: Path) -> None:
    repo = open_repo(golden)
    assert repo.id == EXPECTED["repository_id"]
    assert [c.id for c in repo.checkpoints()] == [A, B, C]  # oldest first
    assert [c.id for c in repo.checkpoints("work")] == [A, B]
    assert repo.get("0b").id == B
    for c in repo.checkpoints():
        want = EXPECTED["checkpoints"][c.id]
        assert (c.session, c.parent, c.created) == (want["session"], want["parent"], want["created"])
        assert c.created_at.utcoffset() is not None
        assert (c.note, c.pinned) == (want["note"], want["pinned"])
        assert (c.added_bytes, c.stream_bytes, c.disk_size) == (want["added_bytes"], want["stream_bytes"],
                                                                want["disk_size"])
        meta = c.manifest["meta"]
        assert meta == want["meta"]
        assert c.meta == CheckpointMeta.from_json(meta) and c.meta.to_json() == meta  # the JSON as it was
        assert c.meta.kind in ("manual", "autosave", "stop") and c.meta.qemu == "7.2.11"
        assert Engine.config_of(c).name == c.session  # what restore and resume build the session from
    # The annotation of the highest number wins; the manifest keeps the note it was taken with.
    a = repo.get(A)
    assert a.pinned and a.note == "before the upgrade" and a.manifest["meta"]["note"] == "clean install"


def test_each_checkpoint_restores_to_the_bytes_it_was_taken_from(golden: Path) -> None:
    repo = open_repo(golden)
    for ckpt_id, want in EXPECTED["checkpoints"].items():
        repo.verify(ckpt_id)
        assert sha256(b"".join(repo.memory_stream(ckpt_id))) == want["memory_sha256"]
        if want["disk_sha256"]:
            assert sha256(disk_image(repo, ckpt_id)) == want["disk_sha256"]
        else:
            assert repo.disk_size(ckpt_id) == 0 and list(repo.disk_chunks(ckpt_id)) == []
        thumbnail = repo.thumbnail(ckpt_id)
        assert (sha256(thumbnail) if thumbnail else None) == want["thumbnail_sha256"]


def test_check_finds_it_clean_and_du_sees_the_deduplication(golden: Path) -> None:
    repo = open_repo(golden)
    for read_data in (False, True):
        report = repo.check(read_data=read_data)
        assert report.ok, report.summary()
        assert (report.checkpoints, report.packs, report.blobs) == tuple(EXPECTED["check"][k] for k in
                                                                         ("checkpoints", "packs", "blobs"))
        assert report.unused_packs == 0 and report.damaged == []
    du = repo.du()
    assert {k: getattr(du, k) for k in EXPECTED["du"]} == EXPECTED["du"]
    assert du.logical_bytes > 1.4 * du.unique_bytes  # the checkpoints share most of their blobs
    assert files(golden) == EXPECTED["files"]  # reading changed nothing (its locks came and went)


@pytest.mark.parametrize("change", [{"version": FORMAT_VERSION + 1}, {"disk": {"chunk_size": 32 << 10}},
                                    {"created": "yesterday"}, {"meta": {"pause_ms": "fast"}}])
def test_a_manifest_outside_the_format_is_damaged_alone(golden: Path, change: dict[str, Any]) -> None:
    """A manifest of another format version, disk chunking, an unreadable time or a malformed meta record (written
    with the repository's key, so it authenticates) hides only itself: the others list, and check names it."""
    repo = open_repo(golden)
    name = f"checkpoints/{A}"
    manifest = repo.objects.read_manifest(A)
    for key, value in change.items():
        manifest[key] = {**manifest[key], **value} if isinstance(value, dict) else value
    (golden / name).chmod(0o600)
    (golden / name).write_bytes(encode(repo.master, name.encode(), json.dumps(manifest).encode()))
    fresh = open_repo(golden)
    assert [c.id for c in fresh.checkpoints()] == [B, C]
    report = fresh.check()
    assert report.damaged == [A] and f"checkpoint {A[:8]} is damaged" in report.summary()


# -- the format ----------------------------------------------------------------------------------------------------


def test_the_golden_repository_reads_as_the_design_document_says(golden: Path) -> None:
    config = json.loads((golden / "config").read_bytes())
    assert config["version"] == FORMAT_VERSION == 2
    assert set(config) == {"version", "id", "encryption", "created"} and config["encryption"] == "chacha20-poly1305"
    g = GoldenReader(golden, EXPECTED["passphrase"])
    for ckpt_id, want in EXPECTED["checkpoints"].items():
        m = g.manifest(ckpt_id)
        assert (m["session"], m["parent"], m["created"], m["meta"]) == (want["session"], want["parent"],
                                                                          want["created"], want["meta"])
        assert sha256(g.memory(m)) == want["memory_sha256"]
        assert (sha256(g.disk(m)) if m["disk"] else None) == want["disk_sha256"]
        assert (sha256(g.blob(bytes.fromhex(m["thumbnail"]))) if m["thumbnail"] else None) == want["thumbnail_sha256"]
        if m["disk"]:
            assert (m["disk"]["chunk_size"], m["disk"]["range_chunks"]) == (writer.CHUNK_SIZE, writer.MAP_RANGE)
    assert g.annotations() == {A: EXPECTED["annotations"][f"annotations/{A}-2"]}
    assert g.formats == {0x80, 0x81}  # compressed envelopes, and a plain one (the page of random bytes)
    assert {t for _, t, *_ in g.index.values()} == {PAGE, SEGMENT, CHUNK, MAP, THUMBNAIL}
    assert {p for p, *_ in g.index.values()} == {p.name for p in (golden / "data").glob("*/*")}


def test_a_checkpoint_written_now_reads_as_documented_and_dedups_against_the_golden_packs(golden: Path) -> None:
    repo = open_repo(golden)
    meta = EXPECTED["checkpoints"][A]["meta"]
    stream = b"".join(repo.memory_stream(A))
    disk = dict(repo.disk_chunks(A))
    before = files(golden)
    # The same contents again: every blob (same ids, same segment and map plaintexts) is in a golden pack.
    with repo.writer(session="work", parent=B) as w:
        w.add_memory(iter_segments(reader(stream)))
        w.add_disk(repo.disk_size(A), sorted(disk.items()), base=None)
        w.set_thumbnail(repo.thumbnail(A) or b"")
        d = w.commit(CheckpointMeta.from_json(meta))
    assert d.added_bytes == 0
    assert set(files(golden)) - set(before) == {f"checkpoints/{d.id}"}  # no pack, no index file
    g = GoldenReader(golden, EXPECTED["passphrase"])
    md, ma = g.manifest(d.id), g.manifest(A)
    assert (md["memory"], md["disk"], md["thumbnail"]) == (ma["memory"], ma["disk"], ma["thumbnail"])
    assert md["version"] == FORMAT_VERSION and md["meta"] == meta and md["parent"] == B
    # One new disk chunk over A's disk: one new pack of that chunk and the new map, one new index file.
    new_chunk = bytes(range(256)) * (writer.CHUNK_SIZE // 256)
    with repo.writer(session="work", parent=A) as w:
        w.add_memory(iter_segments(reader(stream)))
        w.add_disk(repo.disk_size(A), [(1, new_chunk)], base=A)
        e = w.commit(CheckpointMeta.from_json(meta))
    added = set(files(golden)) - set(before) - {f"checkpoints/{d.id}", f"checkpoints/{e.id}"}
    assert len(added) == 2 and {n.split("/")[0] for n in added} == {"data", "index"}
    g = GoldenReader(golden, EXPECTED["passphrase"])
    me = g.manifest(e.id)
    assert me["memory"] == ma["memory"] and me["thumbnail"] is None
    assert me["disk"]["maps"][0][1] != ma["disk"]["maps"][0][1]
    pack = next(n for n in added if n.startswith("data/")).rpartition("/")[2]
    _, entries = g.pack(pack)
    assert sorted(t for _, t, *_ in entries) == [CHUNK, MAP]
    assert e.added_bytes == sum(length for _, _, _, length, _ in entries)
    assert sha256(g.memory(me)) == EXPECTED["checkpoints"][A]["memory_sha256"]
    image = bytearray(g.disk(ma))
    image[writer.CHUNK_SIZE:2 * writer.CHUNK_SIZE] = new_chunk
    assert g.disk(me) == bytes(image) == disk_image(repo, e.id)
    assert repo.check(read_data=True).ok
