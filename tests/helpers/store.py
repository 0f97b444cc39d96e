"""Repositories: checkpoints ingested from synthetic streams and read back, consistency, where a page lies; a working
keyring in memory for their keys."""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path

import keyring.backend
from keyring.errors import PasswordDeleteError

from helpers.stream import Synthetic, reader
from session_manager.store.repo import CheckpointInfo, CheckpointMeta, Repository
from session_manager.vm.stream import PAGE_SIZE, iter_segments


def ingest(repo: Repository, data: bytes, session: str = "s", parent: str | None = None,
           created: datetime | None = None, meta: CheckpointMeta | None = None) -> CheckpointInfo:
    """A checkpoint of the migration stream ``data``."""
    with repo.writer(session=session, parent=parent) as w:
        w.add_memory(iter_segments(reader(data)))
        return w.commit(meta or CheckpointMeta(kind="auto"), created=created)


def stream_of(repo: Repository, ckpt: CheckpointInfo | str) -> bytes:
    """The checkpoint's migration stream, as a restore reads it."""
    return b"".join(repo.memory_stream(ckpt))


def synthetic_stream(pages: list[bytes | None], state: bytes = b"device state") -> bytes:
    """A valid stream whose RAM pages are ``pages`` (None: a zero page) at consecutive addresses."""
    s = Synthetic(blocks={b"pc.ram": max(len(pages), 1) * PAGE_SIZE}).section(0x01).section(0x02)
    for i, p in enumerate(pages):
        s.page(b"pc.ram", i * PAGE_SIZE, p)
    return s.end().devices(state)


def noise_pages(n: int, seed: int) -> list[bytes]:
    """Incompressible pages: sizes are predictable, and without encryption they would lie in the packs byte for
    byte."""
    rnd = random.Random(seed)
    return [rnd.randbytes(PAGE_SIZE) for _ in range(n)]


def assert_consistent(repo: Repository, expected: dict[str, bytes]) -> None:
    """check() is clean and exactly the expected checkpoints exist and restore byte for byte."""
    report = repo.check(read_data=True)
    assert report.ok, report.summary()
    assert {c.id for c in repo.checkpoints()} == set(expected)
    for ckpt_id, data in expected.items():
        repo.verify(ckpt_id)
        assert stream_of(repo, ckpt_id) == data


def pack_of(repo: Repository, ckpt: CheckpointInfo) -> tuple[Path, int]:
    """The pack holding the checkpoint's last page (only it uses that pack), and where in it."""
    from session_manager.store.codec import decode_segment
    table = repo.objects.index()
    segments = repo.objects.fetch(table, repo.objects.segments(ckpt.id), "test")
    page_id = [ids[-1] for _, _, ids in (decode_segment(s, "test") for s in segments) if ids][-1]
    pos = table.find(page_id)
    pack = table.packs[table.pack[pos]]
    return repo.backend.root / "data" / pack[:2] / pack, table.offset[pos]


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A working keyring in a dict, as a desktop's Secret Service would be."""

    priority = 0.1  # never chosen by discovery: tests set it with keyring.set_keyring

    def __init__(self) -> None:
        super().__init__()
        self.secrets: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.secrets.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.secrets[service, username] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.secrets.pop((service, username), None) is None:
            raise PasswordDeleteError(f"{username} is not in the keyring")
