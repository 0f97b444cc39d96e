"""check, forget, prune and du of a repository (see repo.py for the layout and prune's order)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import blake3

from ..errors import CorruptionError, NotFoundError
from .backend import AlreadyExistsError
from .codec import (
    blob_ad,
    count_entries,
    decode,
    decode_map,
    decode_pack_header,
    decode_segment,
    encode,
    encode_index,
    iter_entries,
)
from .index import BlobTable
from .writer import Packer

if TYPE_CHECKING:
    from .records import CheckpointInfo
    from .repo import Repository

log = logging.getLogger(__name__)

REPACK_BELOW = 0.5  # prune rewrites packs whose live share of bytes is below this
PRUNE_LOCK_WAIT = 10.0  # seconds prune waits for writers and readers to finish


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # ids of checkpoints that cannot be restored
    checkpoints: int = 0
    packs: int = 0
    blobs: int = 0
    read_bytes: int = 0
    unused_packs: int = 0  # packs no index lists: garbage for prune, not an error

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        head = (f"Checked {self.checkpoints} checkpoints, {self.packs} packs, {self.blobs} blobs"
                + (f", read {self.read_bytes / 2**20:.1f} MiB" if self.read_bytes else "") + ": ")
        if self.ok:
            unused = f" ({self.unused_packs} unused packs for prune)" if self.unused_packs else ""
            return f"{head}no errors{unused}."
        damaged = ", ".join(c[:8] for c in self.damaged) or "none"
        return "\n".join([head + f"{len(self.errors)} errors; damaged checkpoints: {damaged}."]
                         + [f"  {e}" for e in self.errors])


@dataclass
class PruneStats:
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    bytes_kept: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"Freed {self.bytes_freed / 2**20:.1f} MiB: deleted {self.packs_deleted} packs, repacked "
                f"{self.packs_repacked} into {self.packs_written}, removed {self.blobs_removed} blobs; "
                f"{self.bytes_kept / 2**20:.1f} MiB in use.")


@dataclass
class DuStats:
    checkpoints: int = 0
    logical_bytes: int = 0  # memory streams plus non-zero disk chunks, summed over the checkpoints
    unique_bytes: int = 0  # raw size of the distinct blobs they use
    stored_bytes: int = 0  # compressed size of those blobs in the packs
    repository_bytes: int = 0  # every pack, with the garbage prune has not removed yet
    added: dict[str, int] = field(default_factory=dict)  # checkpoint id -> bytes it added when written

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dedup_ratio": self.dedup_ratio, "compression_ratio": self.compression_ratio}

    def summary(self) -> str:
        return (f"{self.checkpoints} checkpoints: {self.logical_bytes / 2**20:.1f} MiB of state stored in "
                f"{self.stored_bytes / 2**20:.1f} MiB (deduplication {self.dedup_ratio:.1f}x, compression "
                f"{self.compression_ratio:.2f}x); the repository holds {self.repository_bytes / 2**20:.1f} MiB.")


class Walker:
    """Marks the blobs checkpoints use (by table position) and collects what is missing.

    A segment or map that several checkpoints share is read once; its problems are remembered.
    """

    def __init__(self, repo: Repository, table: BlobTable, bad: dict[int, str] | None = None) -> None:
        self.repo = repo
        self.table = table
        self.used = bytearray(len(table))
        self.bad = bad or {}  # position -> why the blob is unusable (found by check)
        self._problems: dict[int, list[str]] = {}  # segment or map position -> problems below it

    def walk(self, info: CheckpointInfo) -> list[str]:
        """Mark everything ``info`` needs; returns its problems (none when it is complete)."""
        m = info.manifest
        what = f"checkpoint {info.id[:8]}"
        problems: list[str] = []
        for key in self.repo.objects.segments(info.id):
            problems += self._container(key, "memory segment", what,
                                        lambda plain: decode_segment(plain, f"A memory segment of {what}")[2])
        for _, h in (m["disk"] or {}).get("maps", []):
            problems += self._container(bytes.fromhex(h), "disk map", what,
                                        lambda plain: [k for _, k in decode_map(plain, f"A disk map of {what}")])
        if m["thumbnail"]:
            problems += self._mark([bytes.fromhex(m["thumbnail"])], "thumbnail", what)
        return problems

    def _container(self, key: bytes, kind: str, what: str, children: Callable[[bytes], list[bytes]]) -> list[str]:
        pos = self.table.find(key)
        if 0 <= pos < len(self.used) and self.used[pos]:
            return self._problems.get(pos, [])
        problems = self._mark([key], kind, what)
        if not problems:
            try:
                plain = self.repo.objects.fetch(self.table, [key], what)[0]
                problems = self._mark(children(plain), f"{kind} part", what)
            except CorruptionError as e:
                problems = [str(e)]
        if pos >= 0 and problems:
            self._problems[pos] = problems
        return problems

    def _mark(self, keys: Iterable[bytes], kind: str, what: str) -> list[str]:
        problems = []
        find, used, bad = self.table.find, self.used, self.bad
        for key in keys:
            pos = find(key)
            if pos < 0:
                problems.append(f"A {kind} blob ({key.hex()[:12]}) of {what} is missing from the repository.")
                continue
            if pos >= len(used):  # added to the table since the walk began
                used.extend(bytes(len(self.table) - len(used)))
            used[pos] = 1
            if pos in bad:
                problems.append(f"A {kind} blob ({key.hex()[:12]}) of {what} is damaged: {bad[pos]}.")
        return problems


def check(repo: Repository, read_data: bool) -> CheckReport:
    report = CheckReport()
    with repo.objects.lock(False, "check"):
        table = BlobTable()
        for name in sorted(repo.backend.list("index/")):
            try:
                for pack_id, entries in repo.objects.load_index(name):
                    table.add_pack(pack_id.hex(), iter_entries(entries))
            except (CorruptionError, NotFoundError) as e:
                report.errors.append(str(e))
        if report.errors:  # as the repository itself reads it then: what a damaged index listed, from the packs
            repo.objects.index_unlisted_packs(table)
        on_disk = {n.rpartition("/")[2]: n for n in repo.backend.list("data/")}
        report.unused_packs = len(set(on_disk) - set(table.pack_numbers))
        by_pack: dict[int, list[int]] = {}
        for pos in range(len(table)):
            by_pack.setdefault(table.pack[pos], []).append(pos)
        bad: dict[int, str] = {}
        for number, positions in by_pack.items():
            pack = table.packs[number]
            _check_pack(repo, table, pack, on_disk.get(pack), positions, read_data, bad, report)
        report.packs, report.blobs = len(by_pack), len(table)
        walker = Walker(repo, table, bad)
        infos = repo.checkpoints()  # without the damaged manifests, which are reported here
        listed = {info.id for info in infos}
        for name in sorted(repo.backend.list("checkpoints/")):
            ckpt_id = name.removeprefix("checkpoints/")
            if ckpt_id not in listed:
                try:
                    repo.objects.read_manifest(ckpt_id)
                except (CorruptionError, NotFoundError) as e:
                    report.errors.append(f"{str(e).rstrip('.')} ({name}).")
                    report.damaged.append(ckpt_id)
        for info in infos:
            if info.annotation.get("damaged_annotation"):
                report.errors.append(f"The annotation {info.annotation['damaged_annotation']} is damaged; checkpoint "
                                     f"{info.id[:8]} is kept as if pinned until it is pinned or unpinned again.")
        for info in infos:
            report.checkpoints += 1
            problems = walker.walk(info)
            if problems:
                report.damaged.append(info.id)
                more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
                report.errors.append(problems[0].rstrip(".") + more + ".")
    return report


def _check_pack(repo: Repository, table: BlobTable, pack: str, name: str | None, positions: list[int],
                read_data: bool, bad: dict[int, str], report: CheckReport) -> None:
    """Compare a pack's header with the index (with read_data, every blob with its hash); damage goes into bad."""
    def fail(why: str) -> None:
        report.errors.append(f"Pack {pack[:12]} {why}.")
        for pos in positions:
            bad.setdefault(pos, f"pack {pack[:12]} {why}")

    if name is None:
        return fail("is listed in the index but missing")
    data = None
    try:
        size = repo.backend.stat(name)
        if read_data:
            tail = data = repo.backend.load(name)
            report.read_bytes += size
        else:
            hlen = int.from_bytes(repo.backend.load(name, max(0, size - 4), 4), "little")
            tail = repo.backend.load(name, max(0, size - 4 - hlen), min(size, hlen + 4))
        entries, header_size = decode_pack_header(repo.master, tail, pack)
    except (CorruptionError, NotFoundError):
        return fail("cannot be read or has no valid header (damaged or tampered with)")
    header = {key: (offset, length, type_, raw) for key, type_, offset, length, raw in entries}
    if max((o + n for _, _, o, n, _ in entries), default=0) + header_size != size:
        return fail("does not have the size its header implies")
    damaged = 0
    for pos in positions:
        key, offset, length = table.key(pos), table.offset[pos], table.length[pos]
        if header.get(key) != (offset, length, table.type[pos], table.raw[pos]):
            bad[pos] = f"pack {pack[:12]} does not hold it where the index says"
        elif data is not None:
            try:
                plain = decode(repo.master, blob_ad(key), data[offset:offset + length], table.raw[pos], "A blob")
                if repo.master.blob_id(plain) != key:
                    raise CorruptionError("hash mismatch")
            except CorruptionError:
                bad[pos] = f"its copy in pack {pack[:12]} is damaged or was tampered with"
        damaged += pos in bad
    if damaged:
        report.errors.append(f"Pack {pack[:12]} holds {damaged} damaged blobs.")
    elif data is not None and blake3.blake3(data).hexdigest() != pack:
        report.errors.append(f"Pack {pack[:12]} does not match its hash, though every blob in it does.")
    return None


def prune(repo: Repository) -> PruneStats:
    stats = PruneStats()
    backend = repo.backend
    with repo.objects.lock(True, "prune", wait=PRUNE_LOCK_WAIT):
        old_indexes = sorted(backend.list("index/"))
        table = BlobTable()
        indexed: dict[str, memoryview] = {}  # pack id -> its encoded index entries
        for name in old_indexes:
            for raw_id, entries in repo.objects.load_index(name):
                indexed.setdefault(raw_id.hex(), entries)
                table.add_pack(raw_id.hex(), iter_entries(entries))
        walker = Walker(repo, table)
        infos = repo.checkpoints()
        for info in infos:
            problems = walker.walk(info)
            if problems:
                raise CorruptionError(f"Prune stopped without changing anything because checkpoint {info.id[:8]} "
                                      f"is damaged ({problems[0].rstrip('.')}); run `session-manager check`.")
        on_disk = {n.rpartition("/")[2]: n for n in backend.list("data/")}

        def live(pack: str) -> Iterable[tuple[int, bytes, int, int, int]]:
            """(position, id, offset, length, raw length) of the pack's blobs that are used from it."""
            number = table.pack_numbers[pack]
            for key, _, offset, length, raw in iter_entries(indexed[pack]):
                pos = table.find(key)
                if walker.used[pos] and table.pack[pos] == number and table.offset[pos] == offset:
                    yield pos, key, offset, length, raw

        share = {p: sum(e[3] for e in live(p)) / max(1, sum(e[3] for e in iter_entries(v))) for p, v in indexed.items()}
        for pack in indexed:
            if share[pack] and pack not in on_disk:
                raise CorruptionError(f"Prune stopped without changing anything because pack {pack[:12]} is "
                                      "missing; run `session-manager check`.")
        keep = [p for p in indexed if p in on_disk and share[p] >= REPACK_BELOW]
        repack = [p for p in indexed if p in on_disk and 0 < share[p] < REPACK_BELOW]
        # 1. the live blobs of mostly dead packs go into new packs
        packer = Packer(backend, repo.master, table)
        copied = 0
        try:
            for pack in repack:
                data = memoryview(backend.load(on_disk[pack]))
                for pos, key, offset, length, raw in live(pack):
                    stored = bytes(data[offset:offset + length])
                    what = f"A blob in pack {pack[:12]}"
                    if repo.master.blob_id(decode(repo.master, blob_ad(key), stored, raw, what)) != key:
                        raise CorruptionError(f"Prune stopped because a blob in pack {pack[:12]} does not match "
                                              "its hash; run `session-manager check --read-data`.")
                    packer.add([(pos, stored)])
                    copied += 1
            packer.finish()
        except BaseException:
            packer.abort()
            raise
        # 2. one index for everything that stays
        packs = [(bytes.fromhex(p), count_entries(indexed[p]), iter_entries(indexed[p])) for p in keep]
        packs += packer.index_entries()
        new_index = ""
        if packs:
            plain = encode_index(packs)
            new_index = f"index/{repo.master.blob_id(plain).hex()}"
            if new_index not in old_indexes:  # if it is, it holds this plaintext (encrypted with another nonce)
                backend.save(new_index, encode(repo.master, new_index.encode(), plain))
        # 3. the old index files
        for name in old_indexes:
            if name != new_index:
                backend.delete(name)
        # 4. the packs no index lists any more
        kept = set(keep) | {n.rpartition("/")[2] for n in packer.written}
        for pack, name in on_disk.items():
            if pack not in kept:
                stats.bytes_freed += backend.stat(name)
                backend.delete(name)
                stats.packs_repacked += pack in repack
                stats.packs_deleted += pack not in repack
                stats.blobs_removed += count_entries(indexed[pack]) if pack in indexed else 0
        written = sum(backend.stat(n) for n in packer.written)
        stats.packs_written = len(packer.written)
        stats.blobs_removed -= copied
        stats.bytes_freed -= written
        stats.bytes_kept = sum(backend.stat(on_disk[p]) for p in keep) + written
        # 5. annotations of deleted checkpoints and superseded ones, temporary files
        live_ids = {i.id for i in infos}
        latest: dict[str, tuple[int, str]] = {}
        for name in backend.list("annotations/"):
            ckpt_id, _, n = name.removeprefix("annotations/").rpartition("-")
            if ckpt_id not in live_ids or not n.isdigit():
                backend.delete(name)
            elif ckpt_id not in latest or int(n) > latest[ckpt_id][0]:
                if ckpt_id in latest:
                    backend.delete(latest[ckpt_id][1])
                latest[ckpt_id] = (int(n), name)
            else:
                backend.delete(name)
        backend.remove_temporaries()
    return stats


def du(repo: Repository, session: str | None) -> DuStats:
    stats = DuStats()
    with repo.objects.lock(False, "du"):
        table = repo.objects.index()
        walker = Walker(repo, table)
        map_sizes: dict[str, int] = {}  # a map shared by several checkpoints is read once
        for info in repo.checkpoints(session):
            walker.walk(info)
            stats.checkpoints += 1
            stats.added[info.id] = info.added_bytes
            stats.logical_bytes += info.stream_bytes
            for _, h in (info.manifest["disk"] or {}).get("maps", []):
                if h not in map_sizes:
                    what = f"A disk map of checkpoint {info.id[:8]}"
                    keys = [k for _, k in decode_map(repo.objects.fetch(table, [bytes.fromhex(h)], what)[0], what)]
                    map_sizes[h] = sum(table.raw[pos] for pos in map(table.find, keys) if pos >= 0)
                stats.logical_bytes += map_sizes[h]
        for pos, used in enumerate(walker.used):
            if used:
                stats.unique_bytes += table.raw[pos]
                stats.stored_bytes += table.length[pos]
        stats.repository_bytes = sum(repo.backend.stat(n) for n in repo.backend.list("data/"))
    return stats


def packs_for(repo: Repository, infos: Iterable[CheckpointInfo]) -> set[str]:
    with repo.objects.lock(False, "finding the packs of checkpoints"):
        table = repo.objects.index()
        walker = Walker(repo, table)
        for info in infos:
            problems = walker.walk(info)
            if problems:
                raise CorruptionError(f"{problems[0].rstrip('.')}; run `session-manager check`.")
        numbers = {table.pack[pos] for pos, used in enumerate(walker.used) if used}
        return {f"data/{pack[:2]}/{pack}" for pack in (table.packs[n] for n in numbers)}


def index_packs(repo: Repository, names: Iterable[str]) -> str | None:
    indexed = repo.objects.index().pack_numbers
    packs = []
    for name in sorted(names):
        pack = name.rpartition("/")[2]
        if pack in indexed:
            continue
        entries = repo.objects.pack_entries(name)
        packs.append((bytes.fromhex(pack), len(entries), iter(entries)))
    if not packs:
        return None
    plain = encode_index(packs)
    index = f"index/{repo.master.blob_id(plain).hex()}"
    try:
        repo.backend.save(index, encode(repo.master, index.encode(), plain))
    except AlreadyExistsError:
        pass  # it holds this plaintext (encrypted with another nonce)
    return index
