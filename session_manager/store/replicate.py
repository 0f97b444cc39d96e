"""Copying a repository between two backends: push, pull, resume and background replication.

Both sides hold the same repository: the same ``config`` object, byte for byte (a destination
without one gets the source's ``keys/*`` and then its ``config``; one with another config is
refused).  The objects go in the repository's write order, each kind only after the one before
is complete: keys and config, packs, index files, manifests, annotations.  So the destination is
consistent at every moment: a manifest appears only after every pack and index file it needs.

Only objects missing on the destination are sent (both sides are listed; objects are write-once,
so a name that is there is the same object).  Each object is written atomically (a file linked
into place, one S3 PUT), so a copy killed at any point, even by kill -9, leaves nothing torn:
the next run sends what is still missing, and only the objects that were in flight are sent
twice.  The source is listed in the reverse order (manifests first), so that a checkpoint being
written during the copy is either wholly in the listing or not at all.  Both sides hold a shared
lock meanwhile, so no prune deletes what is being copied.

A partial copy (``checkpoints``: what resume needs) sends those checkpoints' manifests and
annotations and only the packs that hold their blobs; instead of the source's index files, which
also list packs it does not send, the destination indexes the packs it received itself
(Repository.index_packs).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import blake3

from ..errors import CorruptionError, NotFoundError, RepositoryError, SessionManagerError
from ..ratelimit import RateLimiter
from .backend import Backend
from .repo import Repository

log = logging.getLogger(__name__)

WORKERS = 4  # objects in flight at once (each up to a 16 MiB pack)
POLL_SECONDS = 10.0  # how often replicate_forever looks for new checkpoints
RETRY_FIRST, RETRY_MAX = 5.0, 300.0  # its back-off after a failed push


@dataclass(frozen=True)
class Transfer:
    """What a copy has to send (what the destination misses) and how much of it it has sent."""

    objects_total: int = 0
    objects_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"objects_total": self.objects_total, "objects_done": self.objects_done,
                "bytes_total": self.bytes_total, "bytes_done": self.bytes_done}


TransferProgress = Callable[[Transfer], None]
"""Told after each object sent; called from a worker thread."""


class _Copy:
    def __init__(self, src: Backend, dst: Backend, limiter: RateLimiter | None,
                 progress: TransferProgress | None, stop: threading.Event) -> None:
        self.src, self.dst, self.limiter, self.progress, self.stop = src, dst, limiter, progress, stop
        self.failed = threading.Event()
        self.total = Transfer()
        self._lock = threading.Lock()

    def plan(self, sizes: dict[str, int]) -> list[str]:
        with self._lock:
            self.total = Transfer(self.total.objects_total + len(sizes), self.total.objects_done,
                                  self.total.bytes_total + sum(sizes.values()), self.total.bytes_done)
        return sorted(sizes)

    def halted(self) -> bool:
        return self.stop.is_set() or self.failed.is_set()

    def run(self, names: list[str]) -> bool:
        """Copy ``names``; False when stopped before all were copied."""
        if names:
            with ThreadPoolExecutor(min(WORKERS, len(names)), thread_name_prefix="replicate") as pool:
                try:
                    for future in [pool.submit(self._one, name) for name in names]:
                        future.result()
                except BaseException:  # a failure or Ctrl+C: the other threads stop too
                    self.failed.set()
                    raise
        return not self.halted()

    def _one(self, name: str) -> None:
        if self.halted():
            return
        data = self.src.load(name)
        if name.startswith("data/") and blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest() != \
                name.rpartition("/")[2]:  # a pack is named by its hash: a damaged one goes no further
            raise CorruptionError(f"The pack {name.rpartition('/')[2][:12]} at {self.src} is damaged or was "
                                  "tampered with (its hash does not match), so it was not copied; run `session-manager "
                                  "check` where it came from.")
        if self.limiter is not None:
            deadline = time.monotonic() + self.limiter.take(len(data))
            while not self.halted() and time.monotonic() < deadline:
                self.stop.wait(min(deadline - time.monotonic(), 0.2))
        if self.halted():
            return
        self.dst.save(name, data)
        with self._lock:
            t = self.total
            self.total = done = Transfer(t.objects_total, t.objects_done + 1, t.bytes_total, t.bytes_done + len(data))
        if self.progress is not None:
            self.progress(done)


def replicate(src: Repository, dst: Backend, *, checkpoints: Collection[str] | None = None,
              limit: int | None = None, progress: TransferProgress | None = None,
              stop: threading.Event | None = None, keys: bool = True) -> Transfer:
    """Copy to ``dst`` what it misses of ``src`` (or of the given checkpoints: ids or unique prefixes).

    ``keys``: also the passphrase-wrapped keys (``keys/``); without them the destination opens the repository only
    with the master key it was given (a paired peer's repository, which takes no keys from us).

    ``limit``: bytes a second on average.  ``stop`` (set from any thread) ends the copy after the
    objects in flight, before the next kind of object; what was sent stays and counts.
    Returns what was sent.  Raises RepositoryError when ``dst`` holds another repository.
    """
    stop = stop or threading.Event()
    started = time.monotonic()
    copy = _Copy(src.backend, dst, RateLimiter(limit) if limit else None, progress, stop)
    config = src.backend.load("config")
    try:
        there: bytes | None = dst.load("config")
    except NotFoundError:
        there = None
    if there not in (None, config):
        raise RepositoryError(f"{dst} holds another checkpoint repository than {src.backend}; "
                              "use another location for this one.")
    target = Repository(dst, src.id, src.master)
    with src.objects.lock(False, f"copying to {dst}"), target.objects.lock(False, f"copying from {src.backend}"):
        def missing(prefix: str, wanted: Callable[[str], bool] = lambda name: True) -> list[str]:
            have = set(dst.list(prefix))
            return copy.plan({n: size for n, size in src.backend.sizes(prefix).items() if n not in have and wanted(n)})

        if checkpoints is None:
            annotations, manifests, indexes = missing("annotations/"), missing("checkpoints/"), missing("index/")
            packs = missing("data/")
        else:
            ids = {src.get(ref).id for ref in checkpoints}
            annotations = missing("annotations/", lambda n: n.removeprefix("annotations/").rpartition("-")[0] in ids)
            manifests = missing("checkpoints/", lambda n: n.removeprefix("checkpoints/") in ids)
            indexes = []
            needed = src.packs_for(ids)
            packs = missing("data/", needed.__contains__)
        first = (missing("keys/") if keys else []) + (copy.plan({"config": len(config)}) if there is None else [])
        for names in (first, packs, indexes):
            if not copy.run(names):
                return copy.total
        if checkpoints is not None:
            target.index_packs(needed)
        for names in (manifests, annotations):
            if not copy.run(names):
                return copy.total
    t = copy.total
    log.info("copied %d objects (%.1f MiB) from %s to %s in %.1f s", t.objects_done, t.bytes_done / 2**20,
             src.backend, dst, time.monotonic() - started)
    return t


async def replicate_forever(src: Repository, dst: Backend, *, limit: int | None = None,
                            progress: TransferProgress | None = None,
                            on_error: Callable[[SessionManagerError, float], None] | None = None,
                            wake: asyncio.Event | None = None, poll: float = POLL_SECONDS,
                            after: Callable[[Repository], None] | None = None) -> None:
    """Push every new checkpoint and annotation of ``src`` to ``dst``, until cancelled.

    Looks for new ones every ``poll`` seconds, or at once when ``wake`` is set (by whoever just
    took a checkpoint).  The copying runs in a worker thread.  When a push fails (the server
    cannot be reached, ...), ``on_error`` gets the error and the seconds until the next try,
    which back off from RETRY_FIRST to RETRY_MAX; checkpoints are still taken locally meanwhile.
    ``after`` gets the copy (a Repository over ``dst``) after each push, in the worker thread (e.g. to thin
    it by a retention policy); its failure is logged, and it runs again after the next push.
    """
    stop = threading.Event()
    pushed: frozenset[str] | None = None
    delay = RETRY_FIRST
    try:
        while True:
            seen = await asyncio.to_thread(_newest, src.backend)
            if seen != pushed:
                try:
                    await asyncio.to_thread(replicate, src, dst, limit=limit, progress=progress, stop=stop)
                    pushed, delay = seen, RETRY_FIRST
                except SessionManagerError as e:
                    log.warning("Replication to %s failed (next try in %.0f s): %s", dst, delay, e)
                    if on_error is not None:
                        on_error(e, delay)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, RETRY_MAX)
                    continue
                if after is not None:
                    try:
                        await asyncio.to_thread(after, Repository(dst, src.id, src.master))
                    except SessionManagerError as e:  # the push itself went through: nothing to retry for it
                        log.warning("After the push to %s: %s; it is tried again after the next push", dst, e)
            if wake is None:
                await asyncio.sleep(poll)
            else:
                try:
                    await asyncio.wait_for(wake.wait(), poll)
                except TimeoutError:
                    pass
                wake.clear()
    finally:
        stop.set()


def _newest(backend: Backend) -> frozenset[str]:
    return frozenset(backend.list("checkpoints/")) | frozenset(backend.list("annotations/"))
