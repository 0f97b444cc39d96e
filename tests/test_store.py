"""The checkpoint repository: exact round trips, deduplication, crash safety, maintenance."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from helpers import ROOT
from helpers.store import assert_consistent, ingest, pack_of, stream_of, synthetic_stream
from helpers.stream import fill_data, reader, record_stream
from session_manager.errors import (
    CorruptionError,
    NotFoundError,
    RepositoryError,
    StreamFormatError,
    UsageError,
)
from session_manager.store import maintenance, writer
from session_manager.store.codec import decode, encode
from session_manager.store.repo import STREAM_CHUNK, CheckpointInfo, CheckpointMeta, Repository
from session_manager.store.writer import CHUNK_SIZE, MAP_RANGE
from session_manager.vm.stream import PAGE_SIZE, iter_segments

# -- helpers ------------------------------------------------------------------------------------------


def random_pages(n: int, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.randbytes(PAGE_SIZE // 2) * 2 for _ in range(n)]  # compressible, like real memory


def copy_repo(src: Path, dst: Path) -> None:
    """A copy of a repository with its key file (kept beside it: the tests have no keyring)."""
    shutil.copytree(src, dst)
    shutil.copy2(src.with_name(src.name + ".key"), dst.with_name(dst.name + ".key"))


def pack_files(path: Path) -> set[Path]:
    return set((path / "data").rglob("*"))  - {p for p in (path / "data").rglob("*") if p.is_dir()}


SCRIPT = textwrap.dedent("""
    import os, sys
    from session_manager.store import backend as B, repo as R, writer as W
    from session_manager.vm.stream import iter_segments

    W.PACK_SIZE = 128 << 10  # many small packs: many places to be killed at
    W.BLOCK_SIZE = 32 << 10
    kill_at = os.environ.get("KILL_AT", "")
    packs = deletes = 0

    def die():
        os.kill(os.getpid(), 9)

    finish = B._LocalObject.finish
    def killing_finish(self, name):
        global packs
        kind = name.split("/")[0]
        packs += kind == "data"
        if kill_at == "before:" + kind or (kind == "data" and kill_at == f"pack:{packs}"):
            die()
        finish(self, name)
        if kill_at == "after:" + kind:
            die()
    B._LocalObject.finish = killing_finish

    delete = B.LocalBackend.delete
    def killing_delete(self, name):
        global deletes
        deletes += 1
        if kill_at == f"delete:{deletes}" or kill_at == "delete:" + name.split("/")[0]:
            die()
        delete(self, name)
    B.LocalBackend.delete = killing_delete

    repo = R.Repository.open(sys.argv[1], create=True)
    if sys.argv[2] == "ingest":
        with open(sys.argv[3], "rb") as f, repo.writer(session=sys.argv[4]) as w:
            w.add_memory(iter_segments(f.read))
            print(w.commit(R.CheckpointMeta(kind="auto")).id)
    else:
        repo.prune()
""")


def run_script(tmp_path: Path, *args: str, kill_at: str = "") -> subprocess.CompletedProcess[str]:
    script = tmp_path / "store_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AT": kill_at}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=300)


# -- round trips ------------------------------------------------------------------------------------------


@pytest.mark.qemu
def test_real_streams_round_trip(tmp_path: Path, qemu_streams: dict[str, Path]) -> None:
    repo = Repository.open(tmp_path / "repo", create=True)
    infos = {}
    for which in ("small-plain", "small-bg", "large-plain", "large-bg"):
        data = qemu_streams[which].read_bytes()
        infos[which] = ingest(repo, data, session=which.split("-")[0])
        assert infos[which].stream_bytes == len(data)
    for which, info in infos.items():
        original_data = qemu_streams[which].read_bytes()
        original = hashlib.sha256(original_data).hexdigest()
        assert hashlib.sha256(stream_of(repo, info)).hexdigest() == original
        # Memory stays bounded whatever the stream's size: about STREAM_CHUNK plus one segment (a 2 MiB region).
        largest = max(len(seg.data) + PAGE_SIZE * len(seg.pages) for seg in iter_segments(reader(original_data)))
        assert all(len(chunk) < STREAM_CHUNK + largest for chunk in repo.memory_stream(info))
        repo.verify(info)
    assert [c.id for c in repo.checkpoints("large")] == [infos["large-plain"].id, infos["large-bg"].id]
    # The same guest memory twice (plain, then background) costs little the second time.
    assert infos["large-bg"].added_bytes < infos["large-plain"].added_bytes / 5
    assert repo.check(read_data=True).ok


@pytest.mark.qemu
def test_second_checkpoint_of_a_barely_changed_guest_adds_little(tmp_path: Path) -> None:
    fill = bytearray(fill_data(24, 7))
    first = record_stream(tmp_path / "a.stream", 160, bytes(fill), background=False).read_bytes()
    changed = [3, 1000, 4000]  # pages of the fill that the guest "wrote"
    for i in changed:
        fill[i * PAGE_SIZE:i * PAGE_SIZE + 8] = b"changed!"
    second = record_stream(tmp_path / "b.stream", 160, bytes(fill), background=False).read_bytes()

    repo = Repository.open(tmp_path / "repo", create=True)
    a = ingest(repo, first)
    with repo.writer(session="s", parent=a.id) as w:
        stats = w.add_memory(iter_segments(reader(second)))
        b = w.commit(CheckpointMeta(kind="auto"))
    assert stream_of(repo, b) == second and stream_of(repo, a) == first
    assert stats.new_pages == len(changed)
    # Bound from what changed: the new pages, plus the segments that differ (stored raw at worst).
    old = {(s.data, s.page_offsets) for s in iter_segments(reader(first))}
    differing = [s for s in iter_segments(reader(second)) if (s.data, s.page_offsets) not in old]
    changed_segments = [s for s in iter_segments(reader(second)) if any(p in s.pages for p in (
        bytes(fill[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in changed))]
    segment_bytes = sum(len(s.data) + 40 * len(s.pages) + 20 for s in differing + changed_segments)
    bound = segment_bytes + len(changed) * (PAGE_SIZE + 1)
    assert b.added_bytes <= bound
    assert b.added_bytes < a.added_bytes / 20
    assert b.parent == a.id


def test_disk_round_trip_with_parent(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "repo", create=True)
    rnd = random.Random(3)
    size = (2 * MAP_RANGE + 10) * CHUNK_SIZE + 1000  # three map ranges, a short last chunk
    last = size // CHUNK_SIZE
    disk: dict[int, bytes] = {i: rnd.randbytes(CHUNK_SIZE) for i in (0, 5, MAP_RANGE + 1, 2 * MAP_RANGE)}
    disk[last] = rnd.randbytes(1000)
    with repo.writer(session="d") as w:
        w.add_disk(size, sorted(disk.items()) + [(7, bytes(CHUNK_SIZE))], base=None)
        a = w.commit(CheckpointMeta())
    assert repo.disk_size(a) == size
    assert dict(repo.disk_chunks(a)) == disk
    # A child: one chunk changed, one zeroed, one new; unchanged map ranges are shared.
    child = dict(disk)
    child[5] = rnd.randbytes(CHUNK_SIZE)
    del child[0]
    child[9] = rnd.randbytes(CHUNK_SIZE)
    with repo.writer(session="d", parent=a.id) as w:
        added = w.add_disk(size, [(5, child[5]), (0, bytes(CHUNK_SIZE)), (9, child[9])], base=a.id)
        b = w.commit(CheckpointMeta())
    assert list(repo.disk_chunks(b)) == sorted(child.items())
    assert dict(repo.disk_chunks(a)) == disk
    assert added < 3 * CHUNK_SIZE + 4 * 2 ** 10 * 40
    maps_a, maps_b = a.manifest["disk"]["maps"], b.manifest["disk"]["maps"]
    assert maps_a[1:] == maps_b[1:] and maps_a[0] != maps_b[0]
    # Shrinking the disk drops the chunks beyond its end.
    with repo.writer(session="d", parent=b.id) as w:
        w.add_disk(MAP_RANGE * CHUNK_SIZE + 2 * CHUNK_SIZE, [], base=b.id)
        c = w.commit(CheckpointMeta())
    assert dict(repo.disk_chunks(c)) == {i: d for i, d in child.items() if i < MAP_RANGE + 2}
    with pytest.raises(ValueError):
        with repo.writer(session="d") as w:
            w.add_disk(size, [(1, b"short")], base=None)
    repo.verify(c)
    assert repo.check(read_data=True).ok


def test_thumbnail_annotations_and_lookup(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "repo", create=True)
    with repo.writer(session="t") as w:
        w.set_thumbnail(b"\x89PNG fake")
        a = w.commit(CheckpointMeta(note="first", kind="manual"))
    assert repo.thumbnail(a) == b"\x89PNG fake"
    assert a.note == "first" and not a.pinned
    repo.annotate(a, note="renamed")
    got = repo.annotate(a.id, pinned=True)
    assert got.note == "renamed" and got.pinned and got.meta.kind == "manual"
    assert repo.get(a.id[:6]).pinned
    assert repo.checkpoints("t")[0].note == "renamed"
    name = f"checkpoints/{a.id}"
    assert json.loads(decode(repo.master, name.encode(), repo.backend.load(name), None, "m"))["meta"]["note"] == "first"
    with pytest.raises(NotFoundError, match="does not exist"):
        repo.get("0123456789abcdef")
    with pytest.raises(NotFoundError):
        repo.get("../config")
    for _ in range(40):
        with repo.writer(session="t") as w:
            w.commit(CheckpointMeta())
    prefixes = [c.id[:1] for c in repo.checkpoints()]
    common = max(set(prefixes), key=prefixes.count)
    with pytest.raises(NotFoundError, match="ambiguous"):
        repo.get(common)
    with pytest.raises(NotFoundError, match="no memory"):
        stream_of(repo, a)


def test_uncommitted_writer_leaves_nothing(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "repo", create=True)
    data = synthetic_stream(random_pages(600, 1))
    with repo.writer(session="s") as w:
        w.add_memory(iter_segments(reader(data)))
    assert repo.checkpoints() == [] and not pack_files(tmp_path / "repo")
    assert not list(repo.backend.list("index/")) and not list(repo.backend.list("locks/"))


def test_malformed_stream_stores_nothing(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "repo", create=True)
    good = synthetic_stream(random_pages(50, 1))
    a = ingest(repo, good)
    before = pack_files(tmp_path / "repo")
    bad = synthetic_stream(random_pages(3000, 2))
    with pytest.raises(StreamFormatError):
        ingest(repo, bad[:-10])
    assert [c.id for c in repo.checkpoints()] == [a.id]
    assert pack_files(tmp_path / "repo") == before
    assert_consistent(repo, {a.id: good})


# -- crashes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kill_at", ["pack:1", "pack:20", "before:index", "before:checkpoints", "after:checkpoints"])
def test_kill_during_ingest(tmp_path: Path, kill_at: str) -> None:
    path = tmp_path / "repo"
    repo = Repository.open(path, create=True)
    base = synthetic_stream(random_pages(300, 1))
    a = ingest(repo, base)
    data = synthetic_stream(random_pages(200, 1) + random_pages(1500, 2) + [None] * 50, state=b"other")
    (tmp_path / "b.stream").write_bytes(data)
    run = run_script(tmp_path, str(path), "ingest", str(tmp_path / "b.stream"), "s", kill_at=kill_at)
    assert run.returncode == -9, run.stderr
    expected = {a.id: base}
    if kill_at == "after:checkpoints":  # the manifest was written: the checkpoint exists
        expected[repo.checkpoints()[-1].id] = data
    assert_consistent(repo, expected)
    # The dead writer's lock does not block anyone, and prune removes what it left.
    b = ingest(repo, data)
    expected[b.id] = data
    repo.prune()
    assert_consistent(repo, expected)
    assert repo.check().unused_packs == 0 and not list(path.rglob(".tmp-*"))


@pytest.fixture(scope="module")
def prunable(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A repository with garbage: a forgotten checkpoint whose packs are partly shared."""
    path = tmp_path_factory.mktemp("prunable") / "repo"
    writer.PACK_SIZE, saved = 128 << 10, writer.PACK_SIZE
    try:
        repo = Repository.open(path, create=True)
        pages = random_pages(1200, 5)
        a = synthetic_stream(pages)
        b = synthetic_stream(pages[::3] + random_pages(300, 6))  # a third of a's pages
        c = synthetic_stream(random_pages(400, 7))
        infos = [ingest(repo, d) for d in (a, b, c)]
    finally:
        writer.PACK_SIZE = saved
    repo.delete_checkpoint(infos[0])
    return path, {infos[1].id: b, infos[2].id: c}


def test_prune_reclaims_and_repacks(tmp_path: Path, prunable: tuple[Path, dict[str, bytes]]) -> None:
    copy_repo(prunable[0], tmp_path / "repo")
    repo = Repository.open(tmp_path / "repo")
    before = repo.du()
    stats = repo.prune()
    assert stats.packs_repacked > 0 and stats.packs_written > 0 and stats.bytes_freed > 0
    after = repo.du()
    assert after.repository_bytes < before.repository_bytes
    assert after.stored_bytes == before.stored_bytes  # what is used stays, just moved
    assert len(list(repo.backend.list("index/"))) == 1
    assert_consistent(repo, prunable[1])
    again = repo.prune()
    assert again.packs_deleted == again.packs_repacked == again.bytes_freed == 0


@pytest.mark.parametrize("kill_at", ["before:index", "after:index", "delete:index", "delete:data", "delete:3"])
def test_kill_during_prune(tmp_path: Path, prunable: tuple[Path, dict[str, bytes]], kill_at: str) -> None:
    path = tmp_path / "repo"
    copy_repo(prunable[0], path)
    run = run_script(tmp_path, str(path), "prune", kill_at=kill_at)
    assert run.returncode == -9, run.stderr
    repo = Repository.open(path)
    assert_consistent(repo, prunable[1])
    repo.prune()
    assert_consistent(repo, prunable[1])
    assert repo.check().unused_packs == 0


def test_two_processes_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    Repository.open(path, create=True)
    shared = random_pages(400, 1)
    streams = {}
    procs = []
    script = tmp_path / "store_script.py"
    script.write_text(SCRIPT)
    for n in range(2):
        data = synthetic_stream(shared + random_pages(800, 10 + n), state=bytes([n]) * 100)
        (tmp_path / f"{n}.stream").write_bytes(data)
        procs.append(subprocess.Popen([sys.executable, str(script), str(path), "ingest", str(tmp_path / f"{n}.stream"),
                                       f"s{n}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}))
        streams[n] = data
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ids = {n: out.strip() for n, (out, _) in enumerate(outputs)}
    repo = Repository.open(path)
    assert_consistent(repo, {ids[n]: streams[n] for n in ids})


# -- damage ------------------------------------------------------------------------------------------------


def damaged_repo(tmp_path: Path) -> tuple[Repository, CheckpointInfo, CheckpointInfo]:
    writer.PACK_SIZE, saved = 64 << 10, writer.PACK_SIZE
    try:
        repo = Repository.open(tmp_path / "repo", create=True)
        a = ingest(repo, synthetic_stream(random_pages(100, 1), state=b"a"))
        b = ingest(repo, synthetic_stream(random_pages(100, 2), state=b"b"))
    finally:
        writer.PACK_SIZE = saved
    return repo, a, b


def test_flipped_byte_is_found(tmp_path: Path) -> None:
    repo, a, b = damaged_repo(tmp_path)
    pack, offset = pack_of(repo, b)
    data = bytearray(pack.read_bytes())
    data[offset + 100] ^= 0x40
    pack.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match=b.id[:8]):
        repo.verify(b)
    repo.verify(a)
    report = repo.check(read_data=True)
    assert not report.ok and report.damaged == [b.id]
    assert any(b.id[:8] in e for e in report.errors), report.summary()


def test_missing_pack_is_found(tmp_path: Path) -> None:
    repo, a, b = damaged_repo(tmp_path)
    pack, _ = pack_of(repo, a)
    pack.unlink()
    with pytest.raises(CorruptionError, match=a.id[:8]):
        repo.verify(a)
    with pytest.raises(CorruptionError, match=a.id[:8]):
        stream_of(repo, a)
    report = repo.check()
    assert not report.ok and report.damaged == [a.id] and "missing" in report.summary()
    with pytest.raises(CorruptionError, match="Prune stopped"):
        repo.prune()


def test_damaged_pack_header_is_found_without_reading_data(tmp_path: Path) -> None:
    repo, a, b = damaged_repo(tmp_path)
    pack, _ = pack_of(repo, b)
    data = bytearray(pack.read_bytes())
    data[-20] ^= 0x01  # inside the last header entry's id
    pack.write_bytes(bytes(data))
    report = repo.check()
    assert not report.ok and b.id in report.damaged


# -- locks -------------------------------------------------------------------------------------------------


def test_prune_waits_for_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maintenance, "PRUNE_LOCK_WAIT", 0.3)
    repo = Repository.open(tmp_path / "repo", create=True)
    with repo.writer(session="s"):
        with pytest.raises(RepositoryError, match="locked by a checkpoint of session 's'"):
            repo.prune()
    repo.prune()


def test_stale_locks_are_ignored(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "repo", create=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    old = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    now = datetime.now(UTC).isoformat()
    locks = {
        "dead": {"exclusive": True, "host": os.uname().nodename, "pid": dead.pid, "time": now},
        "old": {"exclusive": True, "host": "elsewhere", "pid": 1, "time": old},
    }
    for name, info in locks.items():
        repo.backend.save(f"locks/{name}", encode(repo.master, f"locks/{name}".encode(), json.dumps(info).encode()))
    ingest(repo, synthetic_stream(random_pages(10, 1)))
    assert list(repo.backend.list("locks/")) == []
    live = {"exclusive": True, "host": "elsewhere", "pid": 1, "time": now, "purpose": "prune"}
    repo.backend.save("locks/live", encode(repo.master, b"locks/live", json.dumps(live).encode()))
    with pytest.raises(RepositoryError, match="locked by prune"):
        repo.objects.lock(False, "test", wait=0.2)


# -- forget and du -----------------------------------------------------------------------------------------


def test_forget_rules(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "repo", create=True)
    start = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    made = []
    for h in range(0, 24 * 10, 5):  # every 5 hours for 10 days
        kind = "manual" if h == 30 else "auto"
        with repo.writer(session="f") as w:
            made.append(w.commit(CheckpointMeta(kind=kind), created=start + timedelta(hours=h)))
    with repo.writer(session="other") as w:
        other = w.commit(CheckpointMeta(kind="auto"), created=start)
    repo.annotate(made[1], pinned=True)
    with pytest.raises(UsageError):
        repo.forget("f")
    removed = repo.forget("f", keep_last=3, keep_daily=2)
    kept = {c.id for c in repo.checkpoints("f")}
    newest = sorted(made, key=lambda c: c.created)[::-1]
    days: dict[str, str] = {}
    for c in newest:
        days.setdefault(c.created_at.astimezone().strftime("%Y-%m-%d"), c.id)
    expected = {c.id for c in newest[:3]} | set(list(days.values())[:2]) | {made[1].id, made[6].id}
    assert kept == expected
    assert {c.id for c in removed} == {c.id for c in made} - expected
    assert repo.get(other.id)  # other sessions are untouched
    # keep_within keeps by age from the newest; manual ones go when asked.
    repo.forget("f", keep_within=timedelta(hours=5), keep_manual=False)
    assert {c.id for c in repo.checkpoints("f")} == {newest[0].id, newest[1].id, made[1].id}
    repo.forget("f", keep_weekly=1, keep_monthly=1)
    assert {c.id for c in repo.checkpoints("f")} == {newest[0].id, made[1].id}


def test_du(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "repo", create=True)
    data = synthetic_stream(random_pages(500, 1) + [None] * 100)
    a = ingest(repo, data, session="a")
    ingest(repo, data, session="b")
    du = repo.du()
    assert du.checkpoints == 2 and du.logical_bytes == 2 * len(data)
    assert du.dedup_ratio > 1.9 and du.compression_ratio > 1.5
    assert du.added[a.id] == a.added_bytes and du.stored_bytes <= du.repository_bytes
    assert repo.du(session="a").logical_bytes == len(data)
    assert "deduplication" in du.summary() and json.dumps(du.to_dict())


def test_blob_table() -> None:
    from session_manager.store.index import PENDING, BlobTable

    table = BlobTable()
    keys = [random.Random(i).randbytes(32) for i in range(5000)]
    assert table.claim(keys[:10] + keys[:3], 1, [4096] * 13) == [(i, i) for i in range(10)]
    new = table.claim(keys, 1, [4096] * len(keys))  # grows through several rehashes
    assert [i for i, _ in new] == list(range(10, 5000))
    assert all(table.find(k) == i for i, k in enumerate(keys)) and table.find(bytes(32)) == -1
    assert table.pack[7] == PENDING and table.key(7) == keys[7]
    other = table.copy()
    other.claim([bytes(32)], 2, [1])
    assert len(other) == 5001 and len(table) == 5000 and table.find(bytes(32)) == -1
    table.add_pack("ab" * 32, [(keys[0], 1, 0, 10, 4096), (bytes(31) + b"\1", 3, 10, 5, 7)])
    assert table.pack[0] == PENDING and table.packs[table.pack[5000]] == "ab" * 32


def test_a_damaged_index_file_costs_only_a_look_at_the_packs_headers(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    def pages(seed: int) -> list[bytes | None]:
        return [random.Random(seed).randbytes(PAGE_SIZE) for _ in range(40)]

    root = tmp_path / "repo"
    repo = Repository.open(root, create=True)
    streams = {"a": synthetic_stream(pages(1)), "b": synthetic_stream(pages(2))}
    infos = {name: ingest(repo, data, session=name) for name, data in streams.items()}
    victim = sorted((root / "index").iterdir())[0]
    damaged = bytearray(victim.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    victim.write_bytes(damaged)

    fresh = Repository.open(root)  # another process: it meets the damaged file
    with caplog.at_level(logging.WARNING, logger="session_manager"):
        for name, info in infos.items():  # every session still restores, byte for byte
            fresh.verify(info)
            assert stream_of(fresh, info) == streams[name]
    assert f"index/{victim.name}" in caplog.text and "read from their own headers" in caplog.text
    more = ingest(fresh, synthetic_stream(pages(3)), session="a", parent=infos["a"].id)  # and checkpoints go on
    assert stream_of(Repository.open(root), more) == synthetic_stream(pages(3))
    report = fresh.check(read_data=True)  # check names the damaged file, and only it
    assert not report.ok and report.damaged == [] and all(victim.name in e for e in report.errors), report.errors


def test_a_damaged_manifest_a_stray_file_or_a_damaged_pin_hide_only_themselves(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    repo = Repository.open(root, create=True)
    data = {s: synthetic_stream([random.Random(i).randbytes(PAGE_SIZE) for _ in range(8)]) for i, s in
            enumerate(("a", "b"))}
    a1, a2 = ingest(repo, data["a"], session="a"), ingest(repo, data["a"], session="a")
    b1 = ingest(repo, data["b"], session="b")
    pinned = repo.annotate(a1, pinned=True)
    manifest = root / "checkpoints" / b1.id
    flipped = bytearray(manifest.read_bytes())
    flipped[-5] ^= 0x01
    manifest.write_bytes(flipped)
    (root / "checkpoints" / "stray").write_bytes(b"not a manifest")
    note = next((root / "annotations").glob(f"{pinned.id}-*"))
    flipped = bytearray(note.read_bytes())
    flipped[-3] ^= 0x01
    note.write_bytes(flipped)

    fresh = Repository.open(root)
    assert [c.id for c in fresh.checkpoints()] == [a1.id, a2.id]  # b's is hidden; everything else works
    assert fresh.checkpoints("a")[0].pinned is True  # a damaged pin keeps the checkpoint, never unpins it
    assert [c.id for c in fresh.forget("a", keep_last=1, keep_manual=False)] == []  # the formerly pinned one stays
    report = fresh.check(read_data=True)  # reports every damaged object, never raises
    assert not report.ok and report.damaged == sorted([b1.id, "stray"])
    text = " ".join(report.errors)
    assert b1.id[:8] in text and "checkpoints/stray" in text and note.name in text, report.errors


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "stray"])
@pytest.mark.parametrize("kind", ["pack", "index", "manifest", "annotation", "key", "lock"])
def test_one_damaged_object_costs_only_what_it_holds(tmp_path: Path, memory_keyring: object, kind: str,
                                                      damage: str) -> None:
    """Every kind of object, damaged every way: check reports (never raises), and the checkpoint of the session
    the object does not belong to still lists and restores byte for byte."""
    root = tmp_path / "repo"
    repo = Repository.open(root, create=True)
    repo.add_key("correct horse")
    streams = {s: synthetic_stream([random.Random(i).randbytes(PAGE_SIZE) for _ in range(8)])
               for i, s in enumerate(("a", "b"))}
    a = ingest(repo, streams["a"], session="a")
    indexes_before_b = set((root / "index").iterdir())
    b = repo.annotate(ingest(repo, streams["b"], session="b"), note="b's")
    victim = {
        "pack": pack_of(repo, b)[0],
        "index": next(iter(set((root / "index").iterdir()) - indexes_before_b)),
        "manifest": root / "checkpoints" / b.id,
        "annotation": next((root / "annotations").glob(f"{b.id}-*")),
        "key": next((root / "keys").iterdir()),
        "lock": root / "locks" / ("0" * 32),
    }[kind]
    if kind == "lock":  # no lock outlives its holder: one left behind, then damaged
        victim.parent.mkdir(exist_ok=True)
        victim.write_bytes(encode(repo.master, f"locks/{victim.name}".encode(),
                                  b'{"time": "2026-01-01T00:00:00+00:00"}'))
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x40
        victim.write_bytes(data)
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    elif damage == "missing":
        victim.unlink()
    else:
        (victim.parent / ("f" * len(victim.name))).write_bytes(b"stray bytes where an object belongs")

    fresh = Repository.open(root)  # its key is in the keyring; a damaged key object is another way in
    report = fresh.check(read_data=True)
    assert a.id in [c.id for c in fresh.checkpoints()] and a.id not in report.damaged, report.errors
    fresh.verify(fresh.get(a.id))
    assert stream_of(fresh, a.id) == streams["a"]
    if kind in ("pack", "index", "manifest") and damage != "stray" and (kind, damage) != ("manifest", "missing"):
        # (a checkpoint exists exactly when its manifest does: one that is gone was forgotten, not damaged)
        assert not report.ok and all(len(e.splitlines()) == 1 for e in report.errors)
    if kind == "annotation" and damage == "flip":
        assert fresh.get(b.id).pinned is True  # a damaged annotation keeps what it might have pinned


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_repository_config_is_named_in_one_sentence_and_nothing_changes(tmp_path: Path,
                                                                                 memory_keyring: object,
                                                                                 damage: str) -> None:
    """The config is the repository's identity: nothing opens without it, but nothing is written either."""
    root = tmp_path / "repo"
    ingest(Repository.open(root, create=True), synthetic_stream([random.Random(1).randbytes(PAGE_SIZE)]), "a")
    config = root / "config"
    if damage == "flip":
        data = bytearray(config.read_bytes())
        data[len(data) // 2] ^= 0x01
        config.write_bytes(data)
    elif damage == "truncate":
        config.write_bytes(config.read_bytes()[:10])
    else:
        config.unlink()
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(RepositoryError) as e:
        Repository.open(root)
    assert len(str(e.value).splitlines()) == 1 and str(root) in str(e.value), e.value
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
