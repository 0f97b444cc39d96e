"""The store's inside: what repo.py, writer.py and maintenance.py share below the public face, Repository.

An :class:`Objects` is one unlocked repository's backend and master key with the primitives every part
needs: locks, the blob index (cached, kept up to date with the index files), reading blobs out of packs,
and reading manifests.  Repository (repo.py) is the API for everyone else; nothing outside store/ uses this.
The formats are in docs/design.md and codec.py.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

from ..errors import CorruptionError, NotFoundError
from .backend import Backend
from .codec import (
    FORMAT_VERSION,
    IndexEntry,
    MasterKey,
    blob_ad,
    decode,
    decode_index,
    decode_pack_header,
    iter_entries,
)
from .index import PENDING, BlobTable
from .lock import Lock
from .records import CheckpointInfo
from .writer import CHUNK_SIZE, MAP_RANGE

log = logging.getLogger(__name__)

READ_GAP = 256 << 10  # blobs this close in a pack are read in one go
READ_MAX = 8 << 20
LOCK_WAIT = 30.0  # seconds a writer or reader waits for a prune to finish


class Objects:
    def __init__(self, backend: Backend, master: MasterKey) -> None:
        self.backend = backend
        self.master = master
        self._table = BlobTable()
        self._index_names: set[str] = set()
        self._index_lock = threading.Lock()

    def lock(self, exclusive: bool, purpose: str, wait: float = LOCK_WAIT) -> Lock:
        """Shared for writers and readers, exclusive for prune (lock.py)."""
        return Lock(self.backend, self.master, exclusive, purpose, wait)

    def index(self, copy: bool = False) -> BlobTable:
        """The blob index, brought up to date with the index files now in the repository.

        Other threads may add to the returned table; ``copy`` gives one of the caller's own.
        """
        with self._index_lock:
            names = set(self.backend.list("index/"))
            if not names >= self._index_names:  # prune replaced index files: start over
                self._table, self._index_names = BlobTable(), set()
            damaged = False
            for name in sorted(names - self._index_names):
                try:
                    loaded = self.load_index(name)
                except CorruptionError as e:  # one damaged file costs only a look at the packs' own headers
                    log.warning("%s; the packs no other index file lists are read from their own headers "
                                "instead, and `session-manager check` reports it.", str(e).rstrip("."))
                    damaged = True
                    loaded = []
                for pack_id, entries in loaded:
                    self._table.add_pack(pack_id.hex(), iter_entries(entries))
                self._index_names.add(name)
            if damaged:
                self.index_unlisted_packs(self._table)
            return self._table.copy() if copy else self._table

    def load_index(self, name: str) -> list[tuple[bytes, memoryview]]:
        plain = decode(self.master, name.encode(), self.backend.load(name), None, f"The index file {name}")
        return decode_index(plain, f"The index file {name}")

    def fetch(self, table: BlobTable, keys: Sequence[bytes], what: str, verify: bool = False) -> list[bytes]:
        """The plaintexts of blobs, reading neighbours in one go; CorruptionError naming ``what``."""
        positions = []
        for key in keys:
            pos = table.find(key)
            if pos < 0 or table.pack[pos] == PENDING:
                raise CorruptionError(f"A blob ({key.hex()[:12]}) of {what} is missing from the repository; "
                                      "run `session-manager check`.")
            positions.append(pos)
        out: list[bytes] = []
        packs, offset, length = table.pack, table.offset, table.length
        i = 0
        while i < len(positions):
            p = positions[i]
            pack, start = packs[p], offset[p]
            stop = start + length[p]
            j = i + 1
            while j < len(positions):
                q = positions[j]
                near = start <= offset[q] <= stop + READ_GAP and offset[q] + length[q] - start <= READ_MAX
                if packs[q] != pack or not near:
                    break
                stop = max(stop, offset[q] + length[q])
                j += 1
            name = f"data/{table.packs[pack][:2]}/{table.packs[pack]}"
            try:
                buf = memoryview(self.backend.load(name, start, stop - start))
            except (NotFoundError, CorruptionError):
                raise CorruptionError(f"The pack {table.packs[pack][:12]} holding data of {what} is missing or "
                                      "truncated; run `session-manager check`.") from None
            for q, key in zip(positions[i:j], keys[i:j]):
                at = offset[q] - start
                plain = decode(self.master, blob_ad(key), buf[at:at + length[q]], table.raw[q],
                               f"A blob of {what} in pack {table.packs[pack][:12]}")
                if verify and self.master.blob_id(plain) != key:
                    raise CorruptionError(f"A blob ({table.key(q).hex()[:12]}) of {what} does not match its hash; "
                                          "run `session-manager check --read-data`.")
                out.append(plain)
            i = j
        return out

    # -- checkpoints -----------------------------------------------------------------------------

    def read_manifest(self, ckpt_id: str) -> dict[str, Any]:
        """A checkpoint's manifest, checked as far as a listing reads it; CorruptionError naming it otherwise."""
        try:
            data = self.backend.load(f"checkpoints/{ckpt_id}")
        except NotFoundError:
            raise NotFoundError(f"Checkpoint {ckpt_id} does not exist; list them with "
                                "`session-manager checkpoints SESSION`.") from None
        try:
            m: dict[str, Any] = json.loads(decode(self.master, f"checkpoints/{ckpt_id}".encode(), data, None,
                                                  f"The manifest of checkpoint {ckpt_id[:8]}"))
            # The config's version governs the repository, so a manifest of another version, or a disk cut into chunks
            # of another size, is not something a newer writer could have left: it is damage.
            if m["id"] != ckpt_id or m["version"] != FORMAT_VERSION \
                    or (m["disk"] and (m["disk"]["chunk_size"], m["disk"]["range_chunks"]) != (CHUNK_SIZE, MAP_RANGE)):
                raise ValueError
            CheckpointInfo.from_manifest(m, {})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CorruptionError(f"The manifest of checkpoint {ckpt_id[:8]} is damaged; "
                                  "run `session-manager check`.") from None
        return m

    def segments(self, ckpt_id: str) -> list[bytes]:
        """The ids of a checkpoint's memory segments, in stream order (not cached: 50 KiB for a 1.5 GiB guest)."""
        memory = self.read_manifest(ckpt_id)["memory"]
        return [bytes.fromhex(h) for h in memory["segments"]] if memory else []

    def pack_entries(self, name: str) -> list[IndexEntry]:
        """The blobs a pack's own header lists (CorruptionError if it has no valid one)."""
        pack = name.rpartition("/")[2]
        size = self.backend.stat(name)
        hlen = int.from_bytes(self.backend.load(name, max(0, size - 4), 4), "little")
        tail = self.backend.load(name, max(0, size - 4 - hlen), min(size, hlen + 4))
        entries, _ = decode_pack_header(self.master, tail, pack)
        return entries

    def index_unlisted_packs(self, table: BlobTable) -> None:
        """Add to ``table`` (in memory only) the blobs of every pack no index file lists, from the packs' own headers:
        what a damaged index file listed stays reachable.  A pack without a valid header stays out (check names it)."""
        listed = table.pack_numbers
        for name in sorted(self.backend.list("data/")):
            pack = name.rpartition("/")[2]
            if pack not in listed:
                try:
                    table.add_pack(pack, self.pack_entries(name))
                except (CorruptionError, NotFoundError) as e:
                    log.warning("%s", e)
