"""The checkpoint repository: content-addressed, deduplicated and crash-safe, after restic's design.

Repository is the store's public face; objects.py is the inside its modules share.  docs/design.md has the
format in full (encodings, meta schema, invariants, crashes, versions, threat model); in brief:

Layout (names in the backend; byte formats in codec.py)::

    config                      JSON: format version, id, cipher; plaintext, written once at creation
    keys/<id>                   the master key wrapped with a passphrase (keys.py); plaintext JSON
    data/<2 hex>/<pack id>      packs: compressed blobs (pages, segments, disk chunks, disk maps, thumbnails)
    index/<id>                  which blobs the packs of one writer run (or one prune) hold
    checkpoints/<ckpt id>       manifests (JSON envelopes): a checkpoint exists exactly when its manifest does
    annotations/<ckpt id>-<n>   user annotations (note, pinned) of a checkpoint: the highest n wins
    locks/<id>                  lock.py: shared for writers and readers, exclusive for prune

Every object is written once, atomically, and never changed; only prune, forget,
delete_checkpoint and removing a passphrase remove objects.

Everything but ``config`` and ``keys/*`` is encrypted and authenticated with the master key,
and blob ids are keyed hashes (codec.py): whoever holds the repository without its key (a
server it is replicated to) sees only sizes and times.  A pack is named by the plain BLAKE3
of its (encrypted) bytes, and the authenticated index files list the packs by those names, so
hashing a pack authenticates it too.

Write order of a checkpoint: packs -> index file -> manifest.  When the manifest appears,
every blob it needs is in a pack that an index file lists, so a crash (kill -9) at any point
leaves a consistent repository; what a dead writer left (packs no index lists, an index no
manifest uses) is garbage that prune removes.

Prune order (exclusive lock): 1. write new packs with the live blobs of packs that are mostly
garbage; 2. write one index file listing every kept and new pack; 3. delete the old index
files; 4. delete packs no index lists any more; 5. delete annotations of deleted checkpoints
and temporary files.  After a crash between any two steps every manifest's blobs are still
indexed and present; the next prune finishes the job.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
from collections.abc import Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import blake3

from ..errors import CorruptionError, NotFoundError, RepositoryError
from . import keys as repo_keys
from . import maintenance
from .backend import AlreadyExistsError, Backend, LocalBackend
from .codec import FORMAT_VERSION, MasterKey, decode, decode_map, decode_segment, encode
from .index import PENDING
from .keys import KeyInfo
from .maintenance import CheckReport, DuStats, PruneStats
from .objects import Objects
from .records import CheckpointInfo, CheckpointMeta
from .retention import Policy, to_forget
from .writer import MemoryStats, Writer

log = logging.getLogger(__name__)

__all__ = ["CheckReport", "CheckpointInfo", "CheckpointMeta", "DuStats", "KeyInfo", "MemoryStats", "PruneStats",
           "Repository", "Writer"]

STREAM_CHUNK = 1 << 20  # memory_stream yields about this much at a time
ENCRYPTION = "chacha20-poly1305"
VERIFY_READ = 16 << 20


class Repository:
    def __init__(self, backend: Backend, repo_id: str, master: MasterKey) -> None:
        self.backend = backend
        self.id = repo_id
        self.master = master
        self.objects = Objects(backend, master)  # the store's inside, shared with writer.py and maintenance.py
        self._manifests: dict[str, dict[str, Any]] = {}
        self._annotations: dict[str, dict[str, Any]] = {}

    @classmethod
    def open(cls, path: str | Path, create: bool = False, passphrase: str | None = None) -> Repository:
        """The repository in directory ``path``, unlocked (see keys.py); ``create`` makes it if need be."""
        root = Path(path)
        keyfile = repo_keys.keyfile_for(root)
        if not (root / "config").exists():
            if any(any((root / sub).glob("*")) for sub in ("checkpoints", "index", "keys")):
                raise CorruptionError(f"The repository at {root} has lost its configuration (the file config), so "
                                      "nothing opens it; restore that file from a backup of the repository (nothing "
                                      "was changed, and no new repository is made over the old one).")
            if not create:
                raise NotFoundError(f"No checkpoint repository exists at {root}; create one by taking a checkpoint.")
            for sub in ("index", "checkpoints", "annotations", "locks", "keys", *(f"data/{i:02x}" for i in range(256))):
                (root / sub).mkdir(parents=True, exist_ok=True)
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # of processes creating it at once, the first does
                if not (root / "config").exists():
                    repo_id = secrets.token_hex(16)
                    repo_keys.create(repo_id, str(root), keyfile)
                    config = {"version": FORMAT_VERSION, "id": repo_id, "encryption": ENCRYPTION,
                              "created": datetime.now(UTC).isoformat()}
                    LocalBackend(root).save("config", json.dumps(config).encode())
            finally:
                os.close(fd)
        return cls.unlock(LocalBackend(root), str(root), keyfile, passphrase)

    @classmethod
    def unlock(cls, backend: Backend, where: str, keyfile: Path | None = None,
               passphrase: str | None = None) -> Repository:
        """The repository in ``backend`` (``where`` names it in messages), with its master key (keys.unlock)."""
        try:
            config = json.loads(backend.load("config"))
            version = config["version"]
            repo_id = config["id"]
            if version == FORMAT_VERSION and (config["encryption"] != ENCRYPTION or not isinstance(repo_id, str)):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise CorruptionError(f"The repository configuration of {where} is damaged; "
                                  "restore it from a backup of the repository.") from None
        if version == 1:
            raise RepositoryError(f"The repository at {where} is from an earlier session-manager that did not "
                                  "encrypt, and this version cannot read it; move it aside and take a new checkpoint.")
        if version != FORMAT_VERSION:
            raise RepositoryError(f"The repository at {where} has format {version}, which this version of "
                                  "session-manager cannot use; upgrade session-manager.")
        return cls(backend, repo_id, repo_keys.unlock(backend, repo_id, where, keyfile, passphrase))

    # -- passphrases -----------------------------------------------------------------------------

    def add_key(self, passphrase: str) -> KeyInfo:
        """A new passphrase that unlocks the repository (on any computer)."""
        return repo_keys.add(self.backend, self.master, self.id, passphrase)

    def keys(self) -> list[KeyInfo]:
        return repo_keys.list_keys(self.backend)

    def remove_key(self, ref: str) -> KeyInfo:
        """Remove a passphrase (by key id or unique prefix); the last one stays."""
        return repo_keys.remove(self.backend, ref)

    def writer(self, session: str, parent: str | None = None, ckpt_id: str | None = None) -> Writer:
        return Writer(self, session, parent, ckpt_id)

    # -- checkpoints -----------------------------------------------------------------------------

    def _manifest(self, ckpt_id: str) -> dict[str, Any]:
        """A manifest, cached without its list of segments (50 KiB for a 1.5 GiB guest): see Objects.segments."""
        m = self._manifests.get(ckpt_id)
        if m is None:
            full = self.objects.read_manifest(ckpt_id)
            m = self._manifests[ckpt_id] = CheckpointInfo.from_manifest(full, {}).manifest
        return m

    def _latest_annotations(self) -> dict[str, dict[str, Any]]:
        latest: dict[str, tuple[int, str]] = {}
        for name in self.backend.list("annotations/"):
            ckpt_id, _, n = name.removeprefix("annotations/").rpartition("-")
            if n.isdigit() and (ckpt_id not in latest or int(n) > latest[ckpt_id][0]):
                latest[ckpt_id] = (int(n), name)
        out = {}
        for ckpt_id, (_, name) in latest.items():
            if name not in self._annotations:
                try:
                    plain = decode(self.master, name.encode(), self.backend.load(name), None, f"The annotation {name}")
                    annotation = json.loads(plain)
                    if not isinstance(annotation, dict):
                        raise ValueError(name)
                    self._annotations[name] = annotation
                except NotFoundError:
                    continue
                except (ValueError, CorruptionError):  # it may have pinned the checkpoint: keep it, say so
                    log.warning("The annotation %s is damaged; checkpoint %s is kept as if pinned until it is "
                                "pinned or unpinned again.", name, ckpt_id[:8])
                    self._annotations[name] = {"pinned": True, "damaged_annotation": name}
            out[ckpt_id] = self._annotations[name]
        return out

    def checkpoints(self, session: str | None = None) -> list[CheckpointInfo]:
        """All checkpoints (of ``session``), oldest first, with their annotations."""
        annotations = self._latest_annotations()
        infos = []
        for name in self.backend.list("checkpoints/"):
            ckpt_id = name.removeprefix("checkpoints/")
            try:
                m = self._manifest(ckpt_id)
            except NotFoundError:  # deleted meanwhile
                continue
            except CorruptionError as e:  # one damaged manifest (or a stray file) hides only itself; check names it
                log.warning("%s", e)
                continue
            if session is None or m["session"] == session:
                infos.append(CheckpointInfo.from_manifest(m, annotations.get(ckpt_id, {})))
        infos.sort(key=lambda c: (c.created_at, c.id))
        return infos

    def get(self, ref: str) -> CheckpointInfo:
        """The checkpoint with this id or unique id prefix."""
        valid = re.fullmatch(r"[0-9a-f]{1,32}", ref) is not None
        matches = [n.removeprefix("checkpoints/") for n in self.backend.list(f"checkpoints/{ref}")] if valid else []
        if not matches:
            raise NotFoundError(f"Checkpoint {ref} does not exist; "
                                "list them with `session-manager checkpoints SESSION`.")
        if len(matches) > 1:
            raise NotFoundError(f"Checkpoint {ref} is ambiguous ({len(matches)} checkpoints start with it); "
                                "give more of its id.")
        return CheckpointInfo.from_manifest(self._manifest(matches[0]), self._latest_annotations().get(matches[0], {}))

    def _resolve(self, ckpt: CheckpointInfo | str) -> CheckpointInfo:
        return ckpt if isinstance(ckpt, CheckpointInfo) else self.get(ckpt)

    def annotate(self, ckpt: CheckpointInfo | str, *, note: str | None = None,
                 pinned: bool | None = None) -> CheckpointInfo:
        """Change a checkpoint's note or pin: a new annotation object, the manifest stays as it is."""
        info = self._resolve(ckpt)
        prefix = f"annotations/{info.id}-"
        numbers = [int(n.removeprefix(prefix)) for n in self.backend.list(prefix) if n.removeprefix(prefix).isdigit()]
        # A damaged annotation's stand-in (pinned, damaged_annotation) ends here: the new one says what the user chose.
        current = {k: v for k, v in self._latest_annotations().get(info.id, {}).items() if k != "damaged_annotation"}
        update = {k: v for k, v in (("note", note), ("pinned", pinned)) if v is not None}
        plain = json.dumps({**current, **update}).encode()
        n = max(numbers, default=0) + 1
        while True:
            try:
                self.backend.save(f"{prefix}{n}", encode(self.master, f"{prefix}{n}".encode(), plain))
                break
            except AlreadyExistsError:  # someone annotated at the same moment; ours comes after
                n += 1
        return self.get(info.id)

    def delete_checkpoint(self, ckpt: CheckpointInfo | str) -> None:
        """Remove the manifest only; prune reclaims the space."""
        ckpt_id = ckpt.id if isinstance(ckpt, CheckpointInfo) else self.get(ckpt).id
        self.backend.delete(f"checkpoints/{ckpt_id}")
        self._manifests.pop(ckpt_id, None)

    # -- reading a checkpoint ----------------------------------------------------------------------

    def verify(self, ckpt: CheckpointInfo | str) -> None:
        """Prove the checkpoint restorable before anything is restored; CorruptionError naming it otherwise.

        Every blob it needs must be indexed, and every pack holding one must be intact.  A pack
        is named by the BLAKE3 hash of its bytes, so hashing whole packs (multi-threaded, without
        the GIL) checks every blob in them far faster than blob by blob; the segment and map
        blobs that list the pages and chunks are read, and hash-checked, on the way.
        """
        info = self._resolve(ckpt)
        what = f"checkpoint {info.id[:8]}"
        m = info.manifest
        with self.objects.lock(False, f"verifying {what}"):
            table = self.objects.index()
            packs: set[int] = set()

            def need(keys: Sequence[bytes]) -> None:
                for key in keys:
                    pos = table.find(key)
                    if pos < 0 or table.pack[pos] == PENDING:
                        raise CorruptionError(f"A blob ({key.hex()[:12]}) of {what} is missing from the repository; "
                                              "run `session-manager check`.")
                    packs.add(table.pack[pos])

            segments = self.objects.segments(info.id)
            need(segments)
            for start in range(0, len(segments), 64):
                for plain in self.objects.fetch(table, segments[start:start + 64], what, verify=True):
                    need(decode_segment(plain, f"A memory segment of {what}")[2])
            for _, h in (m["disk"] or {}).get("maps", []):
                plain = self.objects.fetch(table, [bytes.fromhex(h)], what, verify=True)[0]
                need([bytes.fromhex(h)] + [k for _, k in decode_map(plain, f"A disk map of {what}")])
            if m["thumbnail"]:
                need([bytes.fromhex(m["thumbnail"])])
            for pack in sorted(packs):
                self._verify_pack(table.packs[pack], what)

    def _verify_pack(self, pack_id: str, what: str) -> None:
        name = f"data/{pack_id[:2]}/{pack_id}"
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        try:
            size = self.backend.stat(name)
            for offset in range(0, size, VERIFY_READ):
                hasher.update(self.backend.load(name, offset, min(VERIFY_READ, size - offset)))
        except NotFoundError:
            raise CorruptionError(f"The pack {pack_id[:12]} holding data of {what} is missing; "
                                  "run `session-manager check`.") from None
        if hasher.hexdigest() != pack_id:
            raise CorruptionError(f"The pack {pack_id[:12]} holding data of {what} is damaged or was tampered with "
                                  "(its hash does not match); run `session-manager check` to see what else it affects.")

    def memory_stream(self, ckpt: CheckpointInfo | str) -> Iterator[bytes]:
        """The checkpoint's migration stream, byte for byte as QEMU wrote it, about 1 MiB at a time."""
        info = self._resolve(ckpt)
        what = f"checkpoint {info.id[:8]}"
        if not info.manifest["memory"]:
            raise NotFoundError(f"Checkpoint {info.id[:8]} has no memory state; restore another checkpoint.")
        segments = self.objects.segments(info.id)
        with self.objects.lock(False, f"reading {what}"):
            table = self.objects.index()
            out: list[bytes | memoryview] = []
            size = 0
            for start in range(0, len(segments), 16):
                for plain in self.objects.fetch(table, segments[start:start + 16], what):
                    data, offsets, page_ids = decode_segment(plain, f"A memory segment of {what}")
                    view = memoryview(data)
                    at = 0
                    for offset, page in zip(offsets, self.objects.fetch(table, page_ids, what)):
                        if offset > at:
                            out.append(view[at:offset])
                            at = offset
                        out.append(page)
                        size += len(page)
                    out.append(view[at:])
                    size += len(data)
                    if size >= STREAM_CHUNK:
                        yield b"".join(out)
                        out, size = [], 0
            if out:
                yield b"".join(out)

    def disk_size(self, ckpt: CheckpointInfo | str) -> int:
        disk = self._resolve(ckpt).manifest["disk"]
        return disk["size"] if disk else 0

    def disk_chunks(self, ckpt: CheckpointInfo | str) -> Iterator[tuple[int, bytes]]:
        """(chunk index, bytes) of every non-zero chunk of the disk, in order."""
        info = self._resolve(ckpt)
        what = f"checkpoint {info.id[:8]}"
        disk = info.manifest["disk"]
        if not disk:
            return
        with self.objects.lock(False, f"reading {what}"):
            table = self.objects.index()
            for r, h in disk["maps"]:
                entries = decode_map(self.objects.fetch(table, [bytes.fromhex(h)], what)[0], f"A disk map of {what}")
                for start in range(0, len(entries), 64):
                    batch = entries[start:start + 64]
                    for (i, _), data in zip(batch, self.objects.fetch(table, [k for _, k in batch], what)):
                        yield r * disk["range_chunks"] + i, data

    def thumbnail(self, ckpt: CheckpointInfo | str) -> bytes | None:
        info = self._resolve(ckpt)
        if not info.manifest["thumbnail"]:
            return None
        key = bytes.fromhex(info.manifest["thumbnail"])
        return self.objects.fetch(self.objects.index(), [key], f"checkpoint {info.id[:8]}")[0]

    # -- maintenance -------------------------------------------------------------------------------

    def check(self, read_data: bool = False) -> CheckReport:
        """Index against packs and every checkpoint's blobs present; with read_data, every blob's hash."""
        return maintenance.check(self, read_data)

    def forget(self, session: str, keep_last: int | None = None, keep_hourly: int | None = None,
               keep_daily: int | None = None, keep_weekly: int | None = None, keep_monthly: int | None = None,
               keep_within: timedelta | None = None, keep_manual: bool = True,
               keep_ids: Sequence[str] = (), kinds: Collection[str] | None = None) -> list[CheckpointInfo]:
        """Delete the manifests of ``session``'s checkpoints that no rule keeps (retention.py); returns those."""
        policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_within, keep_manual,
                        keep_ids, kinds)
        removed = to_forget(self.checkpoints(session), policy)
        for c in removed:
            self.delete_checkpoint(c)
        return removed

    def prune(self) -> PruneStats:
        """Remove what no checkpoint uses, repacking packs that are mostly garbage (order: module doc)."""
        return maintenance.prune(self)

    def du(self, session: str | None = None) -> DuStats:
        """Sizes: logical, distinct, stored; ratios; what each checkpoint added when written."""
        return maintenance.du(self, session)

    # -- copying (replicate.py) --------------------------------------------------------------------

    def packs_for(self, ckpts: Iterable[CheckpointInfo | str]) -> set[str]:
        """The names of the packs holding every blob these checkpoints need; CorruptionError if one is missing."""
        return maintenance.packs_for(self, [self._resolve(c) for c in ckpts])

    def index_packs(self, names: Iterable[str]) -> str | None:
        """Index the packs ``names`` (copied in from elsewhere) that no index file lists yet, from their
        headers; returns the new index file's name, if one was needed."""
        return maintenance.index_packs(self, names)

