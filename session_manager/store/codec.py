"""Byte formats of everything the repository stores.  Integers are little-endian.

Master key (see keys.py for where it is kept)
    64 random bytes: a ChaCha20-Poly1305 key for every object but ``config`` and ``keys/*``, then a
    BLAKE3 key for blob ids.
Blob ids
    keyed BLAKE3-256 of the blob's plaintext (the key: the master key's second half), so an id
    tells nothing about the content to whoever lacks the key; 32 bytes in memory, lowercase hex
    in names and JSON.
Envelope (each blob in a pack; pack headers; index, manifest, annotation and lock files)
    u8 format, 12-byte random nonce, ChaCha20-Poly1305(payload) with its 16-byte tag.  Format 0x80:
    the payload is the plaintext itself; 0x81: a zstd frame of it (used only when smaller).  The
    associated data is the format byte and what the envelope is: b"blob:" + blob id, b"pack
    header", or the object's name; so an envelope moved elsewhere fails authentication.  Random
    nonces: under a 2**-32 chance of a repeat until 2**32 envelopes (16 TiB of distinct pages).
Pack file ``data/<2 hex>/<pack id>`` (pack id = plain BLAKE3 of the whole file)
    blob envelopes back to back, then the header's envelope, of b"SMP1" and per blob (32-byte
    id, u8 type, u32 offset, u32 length, u32 raw length); last, u32 length of that envelope.
Index file ``index/<id>`` (id = blob id of the plaintext), an envelope of
    b"SMI1", u32 pack count, per pack: 32-byte pack id, u32 blob count, per blob:
    (32-byte id, u8 type, u32 offset, u32 length, u32 raw length).
Segment blob: a piece of a migration stream with its pages cut out (see vm/stream.py)
    b"SMS1", u32 data length, u32 page count, u32 offset delta per page, 32-byte page id per
    page, data.  Page ``i`` goes back into data at the sum of the first ``i + 1`` deltas.
Map blob: the non-zero chunks of one range of a disk
    b"SMM1", u32 count, per chunk (u32 chunk index, 32-byte chunk blob id), sorted by index.
"""

from __future__ import annotations

import enum
import os
import struct
import sys
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..errors import CorruptionError

# The repository's format (its config's "version" and every manifest's): 1 was unencrypted, 2 is everything in
# this module.  A reader refuses any other (repo.py, docs/design.md "Versions").
FORMAT_VERSION = 2
ID_SIZE = 32
KEY_SIZE = 64
NONCE_SIZE = 12
FORMAT_PLAIN, FORMAT_ZSTD = 0x80, 0x81
OVERHEAD = 1 + NONCE_SIZE + 16  # an envelope's bytes beyond its payload
ZSTD_LEVEL = 3
PACK_HEADER_AD = b"pack header"


class BlobType(enum.IntEnum):
    PAGE = 1
    SEGMENT = 2
    CHUNK = 3
    MAP = 4
    THUMBNAIL = 5


Bytes = bytes | bytearray | memoryview


class MasterKey:
    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_SIZE:
            raise ValueError(f"a master key has {KEY_SIZE} bytes, not {len(raw)}")
        self.raw = raw
        self.aead = ChaCha20Poly1305(raw[:32])
        self._id_key = raw[32:]

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(os.urandom(KEY_SIZE))

    def blob_id(self, data: Bytes) -> bytes:
        digest: bytes = blake3.blake3(data, key=self._id_key).digest()
        return digest


def blob_ad(blob_id: bytes) -> bytes:
    """The associated data of a blob's envelope."""
    return b"blob:" + blob_id


_local = threading.local()


def encode(key: MasterKey, ad: bytes, plain: Bytes) -> bytes:
    """The envelope of ``plain``: compressed when that is smaller, then encrypted."""
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    packed: Bytes = cctx.compress(plain)
    fmt = FORMAT_ZSTD
    if len(packed) >= len(plain):
        packed, fmt = plain, FORMAT_PLAIN
    head = bytes((fmt,))
    nonce = os.urandom(NONCE_SIZE)
    return b"".join((head, nonce, key.aead.encrypt(nonce, packed, head + ad)))


def decode(key: MasterKey, ad: bytes, stored: Bytes, raw_length: int | None, what: str) -> bytes:
    """The plaintext of an envelope; CorruptionError naming ``what`` when it cannot be."""
    fmt = stored[0] if stored else -1
    if fmt not in (FORMAT_PLAIN, FORMAT_ZSTD) or len(stored) < OVERHEAD:
        raise CorruptionError(f"{what} has unknown format {fmt}; run `session-manager check --read-data`.")
    try:
        payload = key.aead.decrypt(stored[1:1 + NONCE_SIZE], stored[1 + NONCE_SIZE:], bytes((fmt,)) + ad)
    except InvalidTag:
        raise CorruptionError(f"{what} is damaged or was tampered with (it fails authentication); "
                              "run `session-manager check --read-data`.") from None
    plain = payload
    if fmt == FORMAT_ZSTD:
        dctx = getattr(_local, "dctx", None)
        if dctx is None:
            dctx = _local.dctx = zstandard.ZstdDecompressor()
        try:
            # max_output_size makes zstandard allocate once: 4x faster for pages.
            plain = dctx.decompress(payload, max_output_size=raw_length or 0)
        except zstandard.ZstdError:
            raise CorruptionError(f"{what} does not decompress; run `session-manager check --read-data`.") from None
    if raw_length is not None and len(plain) != raw_length:
        raise CorruptionError(f"{what} has the wrong length; run `session-manager check --read-data`.")
    return plain


# -- segments --------------------------------------------------------------------------------

_SEGMENT_MAGIC = b"SMS1"
_U32 = struct.Struct("<I")
_U32X2 = struct.Struct("<II")


def encode_segment(data: bytes, offsets: Sequence[int], page_ids: Sequence[bytes]) -> bytes:
    deltas = array("I", (b - a for a, b in zip((0, *offsets), offsets)))  # "I" is 32-bit on every target
    if sys.byteorder != "little":
        deltas.byteswap()
    return b"".join((_SEGMENT_MAGIC, _U32X2.pack(len(data), len(offsets)), deltas.tobytes(), *page_ids, data))


def decode_segment(plain: bytes, what: str) -> tuple[bytes, list[int], list[bytes]]:
    """(data, page offsets, page ids) of a segment blob."""
    try:
        if plain[:4] != _SEGMENT_MAGIC:
            raise ValueError
        dlen, n = _U32X2.unpack_from(plain, 4)
        at = 12 + 4 * n
        deltas = array("I")
        deltas.frombytes(plain[12:at])
        if sys.byteorder != "little":
            deltas.byteswap()
        ids = [plain[i:i + ID_SIZE] for i in range(at, at + ID_SIZE * n, ID_SIZE)]
        data = plain[at + ID_SIZE * n:]
        offsets = list(accumulate(deltas))
        if len(data) != dlen or (offsets and offsets[-1] > dlen):
            raise ValueError
    except (ValueError, struct.error):
        raise CorruptionError(f"{what} is malformed; run `session-manager check --read-data`.") from None
    return data, offsets, ids


# -- disk maps --------------------------------------------------------------------------------

_MAP_MAGIC = b"SMM1"


def encode_map(entries: Iterable[tuple[int, bytes]]) -> bytes:
    body = [_U32.pack(index) + cid for index, cid in entries]
    return b"".join((_MAP_MAGIC, _U32.pack(len(body)), *body))


def decode_map(plain: bytes, what: str) -> list[tuple[int, bytes]]:
    try:
        if plain[:4] != _MAP_MAGIC:
            raise ValueError
        (n,) = _U32.unpack_from(plain, 4)
        step = 4 + ID_SIZE
        if len(plain) != 8 + n * step:
            raise ValueError
        return [(_U32.unpack_from(plain, at)[0], plain[at + 4:at + step]) for at in range(8, len(plain), step)]
    except (ValueError, struct.error):
        raise CorruptionError(f"{what} is malformed; run `session-manager check --read-data`.") from None


# -- packs ---------------------------------------------------------------------------------------

_PACK_MAGIC = b"SMP1"
_ENTRY = struct.Struct(f"<{ID_SIZE}sBIII")  # a blob in a pack header or an index file

IndexEntry = tuple[bytes, int, int, int, int]  # id, type, offset, length, raw length


def encode_pack_header(key: MasterKey, entries: Sequence[IndexEntry]) -> bytes:
    header = encode(key, PACK_HEADER_AD, b"".join([_PACK_MAGIC, *(_ENTRY.pack(*e) for e in entries)]))
    return header + _U32.pack(len(header))


def decode_pack_header(key: MasterKey, tail: bytes, pack_id: str) -> tuple[list[IndexEntry], int]:
    """(entries, size of the header with its length) of a pack whose last bytes are ``tail``."""
    try:
        (hlen,) = _U32.unpack_from(tail, len(tail) - 4)
        stored = tail[len(tail) - 4 - hlen:len(tail) - 4]
        if len(stored) != hlen:
            raise ValueError
        header = decode(key, PACK_HEADER_AD, stored, None, f"The header of pack {pack_id[:12]}")
        if header[:4] != _PACK_MAGIC or (len(header) - 4) % _ENTRY.size:
            raise ValueError
        return list(_ENTRY.iter_unpack(header[4:])), hlen + 4
    except (ValueError, struct.error):
        raise CorruptionError(f"Pack {pack_id[:12]} has no valid header; run `session-manager check`.") from None


# -- index files -------------------------------------------------------------------------------

_INDEX_MAGIC = b"SMI1"
_INDEX_PACK = struct.Struct(f"<{ID_SIZE}sI")


def encode_index(packs: Sequence[tuple[bytes, int, Iterable[IndexEntry]]]) -> bytearray:
    """An index file from (pack id, blob count, entries) per pack, without holding the entries."""
    out = bytearray(_INDEX_MAGIC + _U32.pack(len(packs)))
    for pack_id, count, entries in packs:
        out += _INDEX_PACK.pack(pack_id, count)
        for entry in entries:
            out += _ENTRY.pack(*entry)
    return out


def decode_index(plain: bytes, what: str) -> list[tuple[bytes, memoryview]]:
    """(pack id, its entries still encoded: see iter_entries) per pack; CorruptionError naming ``what``."""
    try:
        if plain[:4] != _INDEX_MAGIC:
            raise ValueError
        (count,) = _U32.unpack_from(plain, 4)
        at, packs, view = 8, [], memoryview(plain)
        for _ in range(count):
            pack_id, n = _INDEX_PACK.unpack_from(plain, at)
            at += _INDEX_PACK.size
            packs.append((pack_id, view[at:at + n * _ENTRY.size]))
            at += n * _ENTRY.size
        if at != len(plain):
            raise ValueError
    except (ValueError, struct.error):
        raise CorruptionError(f"{what} is not a valid index file; run `session-manager check`.") from None
    return packs


def iter_entries(encoded: memoryview) -> Iterator[IndexEntry]:
    return _ENTRY.iter_unpack(encoded)


def count_entries(encoded: memoryview) -> int:
    return len(encoded) // _ENTRY.size
