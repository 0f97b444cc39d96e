"""The blob index in memory: blob id -> (pack, offset, length, raw length, type).

A Python dict of 32-byte keys costs ~150 bytes a blob; this table keeps ids in one bytearray
and the rest in typed arrays, with an open-addressing hash table of positions: ~60 bytes a
blob, so 1 million blobs (4 GiB of distinct pages) take ~60 MB.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

from .codec import ID_SIZE, IndexEntry

PENDING = 0xFFFFFFFF  # pack number of a blob that is claimed but not yet in a written pack


class BlobTable:
    def __init__(self) -> None:
        self.ids = bytearray()
        self.type = array("B")
        self.pack = array("I")
        self.offset = array("I")
        self.length = array("I")
        self.raw = array("I")
        self.packs: list[str] = []  # pack number -> pack id (hex); "" while being written
        self.pack_numbers: dict[str, int] = {}
        # Open addressing: slot 0 is empty, else position + 1.  One attribute, so that a reader in
        # another thread never pairs new slots with an old mask.
        self._hash = (array("I", bytes(4 * 1024)), 1023)

    def __len__(self) -> int:
        return len(self.type)

    def copy(self) -> BlobTable:
        t = BlobTable()
        t.ids, t.type, t.pack = bytearray(self.ids), array("B", self.type), array("I", self.pack)
        t.offset, t.length, t.raw = array("I", self.offset), array("I", self.length), array("I", self.raw)
        t._hash = (array("I", self._hash[0]), self._hash[1])
        t.packs, t.pack_numbers = list(self.packs), dict(self.pack_numbers)
        return t

    def find(self, key: bytes) -> int:
        """Position of ``key``, or -1."""
        ids, (slots, mask) = self.ids, self._hash
        h = int.from_bytes(key[:8], "little") & mask
        while True:
            s = slots[h]
            if not s:
                return -1
            at = (s - 1) * ID_SIZE
            if ids[at:at + ID_SIZE] == key:
                return s - 1
            h = (h + 1) & mask

    def _slot(self, key: bytes) -> int:
        """Position of ``key``; if absent, slot it as the next position and return -1 (the caller appends)."""
        ids, (slots, mask) = self.ids, self._hash
        h = int.from_bytes(key[:8], "little") & mask
        while True:
            s = slots[h]
            if not s:
                slots[h] = len(self.type) + 1
                return -1
            at = (s - 1) * ID_SIZE
            if ids[at:at + ID_SIZE] == key:
                return s - 1
            h = (h + 1) & mask

    def claim(self, keys: Sequence[bytes], type_: int, raws: Sequence[int]) -> list[tuple[int, int]]:
        """Add the keys not in the table yet, as PENDING; returns (i, position) for each keys[i] added."""
        new = []
        for i, key in enumerate(keys):
            if self._slot(key) < 0:
                new.append((i, len(self.type)))
                self._append(key, type_, PENDING, 0, 0, raws[i])
        return new

    def _append(self, key: bytes, type_: int, pack: int, offset: int, length: int, raw: int) -> None:
        self.ids += key
        self.type.append(type_)
        self.pack.append(pack)
        self.offset.append(offset)
        self.length.append(length)
        self.raw.append(raw)
        if 2 * len(self.type) > self._hash[1]:  # keep the slots at most half full
            mask = 2 * self._hash[1] + 1
            slots = array("I", bytes(4 * (mask + 1)))
            ids = self.ids
            for pos in range(len(self.type)):
                h = int.from_bytes(ids[pos * ID_SIZE:pos * ID_SIZE + 8], "little") & mask
                while slots[h]:
                    h = (h + 1) & mask
                slots[h] = pos + 1
            self._hash = (slots, mask)

    def key(self, pos: int) -> bytes:
        return bytes(self.ids[pos * ID_SIZE:(pos + 1) * ID_SIZE])

    def pack_number(self, pack_id: str) -> int:
        """The number of a pack, registering it if new ("" registers a pack being written)."""
        number = self.pack_numbers.get(pack_id) if pack_id else None
        if number is None:
            number = len(self.packs)
            self.packs.append(pack_id)
            if pack_id:
                self.pack_numbers[pack_id] = number
        return number

    def name_pack(self, number: int, pack_id: str) -> None:
        self.packs[number] = pack_id
        self.pack_numbers[pack_id] = number

    def add_pack(self, pack_id: str, entries: Iterable[IndexEntry]) -> None:
        """Index a pack's blobs; a blob already indexed (in another pack) keeps its first place."""
        number = self.pack_number(pack_id)
        for key, type_, offset, length, raw in entries:
            if self._slot(key) < 0:
                self._append(key, type_, number, offset, length, raw)
