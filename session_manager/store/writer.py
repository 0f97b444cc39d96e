"""Adding a checkpoint: hashing, deduplicating, compressing, encrypting and packing blobs (see repo.py)."""

from __future__ import annotations

import json
import re
import secrets
import threading
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import blake3

from ..errors import RepositoryError
from .backend import Backend, NewObject
from .codec import (
    FORMAT_VERSION,
    BlobType,
    IndexEntry,
    MasterKey,
    blob_ad,
    decode_map,
    encode,
    encode_index,
    encode_map,
    encode_pack_header,
    encode_segment,
)
from .index import BlobTable
from .records import CheckpointInfo, CheckpointMeta

if TYPE_CHECKING:
    from .repo import Repository

PACK_SIZE = 16 << 20
BLOCK_SIZE = 1 << 20  # packs are written in blocks of about this size
CHUNK_SIZE = 64 << 10  # disk chunk
MAP_RANGE = 4096  # disk chunks per map blob (256 MiB of disk)
WORKERS = 2
INFLIGHT = 2 * WORKERS  # segments being hashed and compressed at once
_ZERO_CHUNK = bytes(CHUNK_SIZE)
_ID_RE = re.compile(r"[0-9a-f]{32}")

Prepared = list[tuple[int, bytes]]  # (table position, envelope) of blobs to store


class SegmentLike(Protocol):
    """What vm.stream.Segment provides (the store does not import vm/)."""

    data: bytes
    page_offsets: tuple[int, ...]
    pages: list[bytes]


@dataclass
class MemoryStats:
    stream_bytes: int = 0
    segments: int = 0
    new_segments: int = 0
    pages: int = 0
    new_pages: int = 0
    added_bytes: int = 0  # stored (compressed) bytes of the new blobs


class Packer:
    """Puts blob envelopes into packs of about PACK_SIZE.

    The caller's thread only gathers blocks of about BLOCK_SIZE; a writer thread hashes and
    writes them in order, and sync threads finish (fsync and name) whole packs, so the caller
    never waits for the disk and only a few blocks are in memory.
    """

    def __init__(self, backend: Backend, master: MasterKey, table: BlobTable) -> None:
        self.backend = backend
        self.master = master
        self.table = table
        self.written: list[str] = []  # names of the packs saved so far
        self._done: list[tuple[str, array[int]]] = []  # their ids and the table positions of their blobs
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="pack-writer")
        self._syncer = ThreadPoolExecutor(2, thread_name_prefix="pack-sync")
        self._writes: deque[Future[None]] = deque()
        self._syncs: list[Future[None]] = []
        self._objects: list[NewObject] = []
        self._start()

    def _start(self) -> None:
        self._number = self.table.pack_number("")
        self._object: NewObject | None = None
        self._hasher = blake3.blake3()
        self._block: list[bytes] = []
        self._block_size = 0
        self._entries: list[IndexEntry] = []
        self._positions = array("I")
        self._size = 0

    def add(self, blobs: Prepared) -> None:
        """Put the envelopes of claimed blobs into packs; their table entries get their places."""
        t = self.table
        for pos, stored in blobs:
            n = len(stored)
            t.pack[pos], t.offset[pos], t.length[pos] = self._number, self._size, n
            self._entries.append((t.key(pos), t.type[pos], self._size, n, t.raw[pos]))
            self._positions.append(pos)
            self._block.append(stored)
            self._block_size += n
            self._size += n
            if self._size >= PACK_SIZE:
                self.flush()
            elif self._block_size >= BLOCK_SIZE:
                self._hand_off()

    def _hand_off(self) -> NewObject:
        """Queue the gathered block for writing; returns the pack's object."""
        if self._object is None:
            self._object = self.backend.create()
            self._objects.append(self._object)
        block = b"".join(self._block)
        self._block, self._block_size = [], 0
        while len(self._writes) >= 4:
            self._writes.popleft().result()
        self._writes.append(self._writer.submit(self._write, self._object, self._hasher, block))
        return self._object

    @staticmethod
    def _write(obj: NewObject, hasher: Any, block: bytes) -> None:
        hasher.update(block)
        obj.write(block)

    def flush(self) -> None:
        """End the current pack (if it has blobs)."""
        if not self._entries:
            return
        self._block.append(encode_pack_header(self.master, self._entries))
        obj = self._hand_off()
        self._writes.append(self._writer.submit(self._seal, obj, self._hasher, self._number, self._positions))
        self._start()

    def _seal(self, obj: NewObject, hasher: Any, number: int, positions: array[int]) -> None:
        """On the writer thread, after the pack's last block: fsync and name it in the background."""
        self._syncs.append(self._syncer.submit(self._finish, obj, hasher.hexdigest(), number, positions))

    def _finish(self, obj: NewObject, pack_id: str, number: int, positions: array[int]) -> None:
        name = f"data/{pack_id[:2]}/{pack_id}"
        obj.finish(name)
        self.table.name_pack(number, pack_id)
        self.written.append(name)
        self._done.append((pack_id, positions))

    def finish(self) -> None:
        """Write the last pack and wait until every pack is saved."""
        self.flush()
        try:
            while self._writes:
                self._writes.popleft().result()
            self._writer.shutdown()
            for f in self._syncs:
                f.result()
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop; packs not finished yet are dropped (finished ones stay: see ``written``)."""
        for f in self._writes:
            f.cancel()
        self._writer.shutdown()
        self._syncer.shutdown()
        for obj in self._objects:
            obj.abort()

    def index_entries(self) -> list[tuple[bytes, int, Iterator[IndexEntry]]]:
        """(pack id, blob count, entries) of the packs written, for encode_index."""
        t = self.table

        def entries(positions: array[int]) -> Iterator[IndexEntry]:
            for pos in positions:
                yield t.key(pos), t.type[pos], t.offset[pos], t.length[pos], t.raw[pos]

        return [(bytes.fromhex(pack_id), len(positions), entries(positions)) for pack_id, positions in self._done]


class Writer:
    """Adds one checkpoint.  Use as a context manager; nothing is visible until commit().

    It holds a shared lock, so several writers (processes or threads) can work at once.  Pages
    and disk chunks are hashed and compressed by a small thread pool while the caller's thread
    parses; a blob is stored once per repository: the first job to see it "claims" it.  A
    writer's own methods must be called one at a time (from any thread).
    """

    def __init__(self, repo: Repository, session: str, parent: str | None, ckpt_id: str | None) -> None:
        if ckpt_id is not None and not _ID_RE.fullmatch(ckpt_id):
            raise ValueError(f"checkpoint id must be 32 lowercase hex digits, not {ckpt_id!r}")
        self.repo = repo
        self.id = ckpt_id or secrets.token_hex(16)
        self.session = session
        self.parent = parent
        self._memory: dict[str, Any] | None = None
        self._disk: dict[str, Any] | None = None
        self._thumbnail: str | None = None
        self._added = 0
        self._done = False
        self._claim_lock = threading.Lock()

    def __enter__(self) -> Writer:
        self._lock = self.repo.objects.lock(False, f"a checkpoint of session {self.session!r}")
        try:
            self._table = self.repo.objects.index(copy=True)
            self._packer = Packer(self.repo.backend, self.repo.master, self._table)
            self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="blob-hasher")
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._pool.shutdown(cancel_futures=True)
            if not self._done:
                self._packer.abort()
                for name in self._packer.written:  # no index lists them: nobody else can use them
                    self.repo.backend.delete(name)
        finally:
            self._lock.release()

    # -- claiming and storing blobs ------------------------------------------------------------

    def _claim(self, keys: Sequence[bytes], type_: BlobType, raw: Sequence[int]) -> list[tuple[int, int]]:
        """(i, table position) of each keys[i] new to the repository: this writer stores those."""
        with self._claim_lock:
            return self._table.claim(keys, type_, raw)

    def _store(self, blobs: Prepared) -> int:
        self._packer.add(blobs)
        added = sum(len(stored) for _, stored in blobs)
        self._added += added
        return added

    def _put(self, plain: bytes, type_: BlobType) -> tuple[bytes, int]:
        """Store one blob from the caller's thread: (id, bytes added)."""
        key = self.repo.master.blob_id(plain)
        claimed = self._claim([key], type_, [len(plain)])
        return key, self._store([(pos, encode(self.repo.master, blob_ad(key), plain)) for _, pos in claimed])

    # -- memory --------------------------------------------------------------------------------

    def add_memory(self, segments: Iterable[SegmentLike]) -> MemoryStats:
        """Store a migration stream given as segments (vm.stream.iter_segments).

        If the iterable raises (a malformed stream), the exception propagates and the
        checkpoint can only be abandoned.
        """
        if self._memory is not None:
            raise RuntimeError("add_memory() was already called for this checkpoint")
        stats = MemoryStats()
        ids: list[str] = []
        inflight: deque[Future[tuple[bytes, Prepared, int, bool]]] = deque()

        def collect() -> None:
            key, blobs, new_pages, new_segment = inflight.popleft().result()
            ids.append(key.hex())
            stats.new_pages += new_pages
            stats.new_segments += new_segment
            stats.added_bytes += self._store(blobs)

        try:
            for seg in segments:
                stats.segments += 1
                stats.pages += len(seg.pages)
                stats.stream_bytes += len(seg.data) + sum(map(len, seg.pages))
                inflight.append(self._pool.submit(self._prepare_segment, seg))
                if len(inflight) >= INFLIGHT:
                    collect()
            while inflight:
                collect()
        finally:
            for f in inflight:
                f.cancel()
        self._memory = {"stream_bytes": stats.stream_bytes, "segments": ids}
        return stats

    def _prepare_segment(self, seg: SegmentLike) -> tuple[bytes, Prepared, int, bool]:
        """In a worker: hash the pages and the segment, claim the new ones, compress those."""
        master = self.repo.master
        page_ids = [master.blob_id(p) for p in seg.pages]
        plain = encode_segment(seg.data, seg.page_offsets, page_ids)
        key = master.blob_id(plain)
        claimed = self._claim(page_ids, BlobType.PAGE, [len(p) for p in seg.pages])
        blobs = [(pos, encode(master, blob_ad(page_ids[i]), seg.pages[i])) for i, pos in claimed]
        seg_claim = self._claim([key], BlobType.SEGMENT, [len(plain)])
        blobs += [(pos, encode(master, blob_ad(key), plain)) for _, pos in seg_claim]
        return key, blobs, len(claimed), bool(seg_claim)

    # -- disk ------------------------------------------------------------------------------------

    def add_disk(self, size: int, changed: Iterable[tuple[int, bytes]], base: str | None) -> int:
        """Record the disk: ``base``'s chunks (None: an all-zero disk) with ``changed`` on top.

        ``changed`` yields (chunk index, CHUNK_SIZE bytes; the disk's last chunk may be
        shorter) in any order; an all-zero chunk is recorded as zero.  Returns the bytes added.
        """
        if self._disk is not None:
            raise RuntimeError("add_disk() was already called for this checkpoint")
        nchunks = -(-size // CHUNK_SIZE)
        maps: dict[int, str] = {}
        if base is not None:
            disk = self.repo.get(base).manifest["disk"]
            if disk:
                if disk["chunk_size"] != CHUNK_SIZE or disk["range_chunks"] != MAP_RANGE:
                    raise RepositoryError(f"The disk of checkpoint {base[:8]} has another chunk layout; "
                                          "take the checkpoint without a base.")
                maps = {int(r): h for r, h in disk["maps"]}
        changes: dict[int, dict[int, bytes | None]] = {}  # map range -> chunk in range -> id (None: zero)
        inflight: deque[tuple[int, Future[tuple[bytes, Prepared]]]] = deque()
        added = 0

        def collect() -> None:
            nonlocal added
            index, future = inflight.popleft()
            key, blobs = future.result()
            changes.setdefault(index // MAP_RANGE, {})[index % MAP_RANGE] = key
            added += self._store(blobs)

        try:
            for index, data in changed:
                expected = min(CHUNK_SIZE, size - index * CHUNK_SIZE)
                if not 0 <= index < nchunks or len(data) != expected:
                    raise ValueError(f"disk chunk {index} has {len(data)} bytes, not {expected}")
                if data == _ZERO_CHUNK or data == bytes(len(data)):
                    changes.setdefault(index // MAP_RANGE, {})[index % MAP_RANGE] = None
                    continue
                inflight.append((index, self._pool.submit(self._prepare_chunk, data)))
                if len(inflight) >= 4 * INFLIGHT:
                    collect()
            while inflight:
                collect()
        finally:
            for _, f in inflight:
                f.cancel()
        for r in sorted(set(changes) | {r for r in maps if (r + 1) * MAP_RANGE > nchunks}):
            entries: dict[int, bytes | None] = {}
            if r in maps:
                what = f"A disk map of checkpoint {base}"
                plain = self.repo.objects.fetch(self._table, [bytes.fromhex(maps[r])], what)[0]
                entries.update(decode_map(plain, what))
            entries.update(changes.get(r, {}))
            kept = sorted((i, k) for i, k in entries.items() if k is not None and r * MAP_RANGE + i < nchunks)
            if kept:
                key, n = self._put(encode_map(kept), BlobType.MAP)
                maps[r] = key.hex()
                added += n
            else:
                maps.pop(r, None)
        self._disk = {"size": size, "chunk_size": CHUNK_SIZE, "range_chunks": MAP_RANGE,
                      "maps": [[r, maps[r]] for r in sorted(maps)]}
        return added

    def _prepare_chunk(self, data: bytes) -> tuple[bytes, Prepared]:
        key = self.repo.master.blob_id(data)
        claimed = self._claim([key], BlobType.CHUNK, [len(data)])
        return key, [(pos, encode(self.repo.master, blob_ad(key), data)) for _, pos in claimed]

    # -- the rest --------------------------------------------------------------------------------

    def set_thumbnail(self, png: bytes) -> None:
        key, _ = self._put(png, BlobType.THUMBNAIL)
        self._thumbnail = key.hex()

    def commit(self, meta: CheckpointMeta, created: datetime | None = None) -> CheckpointInfo:
        """Write the remaining packs, then the index, then the manifest: the checkpoint exists.

        ``created`` (default: now) is for imports and tests.
        """
        if self._done:
            raise RuntimeError("this checkpoint was already committed")
        self._packer.finish()
        self._done = True  # from here on the packs stay: at worst they are garbage for prune
        packs = self._packer.index_entries()
        if packs:
            plain = encode_index(packs)
            name = f"index/{self.repo.master.blob_id(plain).hex()}"
            self.repo.backend.save(name, encode(self.repo.master, name.encode(), plain))
        manifest = {
            "version": FORMAT_VERSION,
            "id": self.id,
            "session": self.session,
            "parent": self.parent,
            "created": (created or datetime.now(UTC)).astimezone(UTC).isoformat(),
            "meta": meta.to_json(),
            "memory": self._memory,
            "disk": self._disk,
            "thumbnail": self._thumbnail,
            "added_bytes": self._added,
        }
        name = f"checkpoints/{self.id}"
        self.repo.backend.save(name, encode(self.repo.master, name.encode(), json.dumps(manifest).encode()))
        return CheckpointInfo.from_manifest(manifest, {})
