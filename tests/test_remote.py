"""Remote repositories: S3 (a real SeaweedFS on loopback) and directories; push, pull, resume, replication."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path

import pytest

from helpers.aio import until
from helpers.cli import Sm
from helpers.net import free_port
from helpers.qemu import Serial, two_checkpoints
from helpers.s3server import S3Server
from helpers.store import assert_consistent, ingest, noise_pages, synthetic_stream
from session_manager.errors import CorruptionError, RepositoryError, UsageError
from session_manager.keychain import KeyringUnavailable
from session_manager.net.remotes import KEY_ENV, SECRET_ENV, Credentials, Remote, Remotes, local_target, normalize_url
from session_manager.paths import Home
from session_manager.ratelimit import RateLimiter
from session_manager.store import replicate as replication
from session_manager.store.backend import Backend, LocalBackend
from session_manager.store.replicate import Transfer, replicate, replicate_forever
from session_manager.store.repo import Repository
from session_manager.store.writer import PACK_SIZE

PASSPHRASE = "correct horse battery staple"


def objects(backend: Backend) -> dict[str, int]:
    """Every object but locks, with its size."""
    return {n: s for n, s in backend.sizes("").items() if not n.startswith("locks/")}


def keyfile(repo_dir: Path) -> Path:
    return repo_dir.with_name(repo_dir.name + ".key")  # the tests have no keyring: keys are kept here


def creds_env(server: S3Server) -> dict[str, str]:
    return {KEY_ENV: server.access_key, SECRET_ENV: server.secret_key}


# -- copying between backends -------------------------------------------------------------------------

def test_push_sends_only_what_is_missing_and_the_remote_checks_clean(s3_server: S3Server, tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "local", create=True)
    base = noise_pages(300, 1)
    a = ingest(repo, synthetic_stream(base), session="desk")
    remote = s3_server.backend(tmp_path.name)
    seen: list[Transfer] = []
    first = replicate(repo, remote, progress=seen.append)
    local = objects(repo.backend)
    assert objects(remote) == local
    assert first == Transfer(len(local), len(local), sum(local.values()), sum(local.values()))
    assert len(seen) == len(local) and seen[-1] == first
    assert sorted(t.bytes_done for t in seen) == [t.bytes_done for t in seen]

    b = ingest(repo, synthetic_stream(base[:200] + noise_pages(100, 2)), session="desk", parent=a.id)
    repo.annotate(a, note="before the change")
    new = set(objects(repo.backend)) - set(objects(remote))
    second = replicate(repo, remote)
    assert second.objects_done == len(new) == 4  # a pack, an index file, a manifest and an annotation
    assert replicate(repo, remote) == Transfer()  # nothing missing, nothing sent

    there = Repository.unlock(remote, str(remote), keyfile(tmp_path / "local"))
    assert_consistent(there, {a.id: synthetic_stream(base), b.id: synthetic_stream(base[:200] + noise_pages(100, 2))})
    assert there.get(a.id).note == "before the change"

    # And back: a pull into an empty directory gives the same repository.
    back = LocalBackend(tmp_path / "back")
    replicate(there, back)
    assert objects(back) == objects(repo.backend)


def test_a_partial_copy_takes_only_the_packs_a_checkpoint_needs(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "local", create=True)
    base, other = noise_pages(200, 1), noise_pages(200, 3)
    a = ingest(repo, synthetic_stream(base), session="desk")
    b = ingest(repo, synthetic_stream(base[:100] + noise_pages(100, 2)), session="desk", parent=a.id)
    c = ingest(repo, synthetic_stream(other), session="other")
    dst = LocalBackend(tmp_path / "there")
    needed = repo.packs_for([b])
    assert needed == repo.packs_for([a, b])  # b shares pages with a
    left_behind = repo.packs_for([c]) - needed
    assert left_behind

    sent = replicate(repo, dst, checkpoints=[b.id[:8]])
    assert set(objects(dst)) == {"config", f"checkpoints/{b.id}", *needed, *dst.list("index/")}
    assert len(list(dst.list("index/"))) == 1  # of the packs it received
    assert sent.objects_done == len(needed) + 2  # the packs, the manifest, the config
    there = Repository.unlock(dst, "there", keyfile(tmp_path / "local"))
    assert_consistent(there, {b.id: synthetic_stream(base[:100] + noise_pages(100, 2))})
    assert replicate(repo, dst, checkpoints=[b.id]) == Transfer()

    # The index there lists only the packs that are there, so a checkpoint written there stores the
    # pages it does not have (some of them are in a pack of `other` that stayed behind).
    d = ingest(there, synthetic_stream(other[:50] + base[100:150]), session="desk", parent=b.id)
    assert_consistent(there, {b.id: synthetic_stream(base[:100] + noise_pages(100, 2)),
                              d.id: synthetic_stream(other[:50] + base[100:150])})


def test_another_repository_is_refused(tmp_path: Path) -> None:
    first = Repository.open(tmp_path / "first", create=True)
    second = Repository.open(tmp_path / "second", create=True)
    shared = LocalBackend(tmp_path / "shared")
    replicate(first, shared)
    before = objects(shared)
    with pytest.raises(RepositoryError, match=r"holds another checkpoint repository than .*; use another location"):
        replicate(second, shared)
    assert objects(shared) == before


def test_a_new_or_empty_home_takes_the_remotes_identity(tmp_path: Path) -> None:
    remote = Repository.open(tmp_path / "remote", create=True)
    ingest(remote, synthetic_stream(noise_pages(10, 1)), session="desk")
    home = Home.locate(tmp_path / "home")
    assert objects(local_target(home, remote)) == {}  # new: nothing to do

    Repository.open(home.repository, create=True)  # its own, empty
    target = local_target(home, remote)
    assert "config" not in objects(target)
    replicate(remote, target)
    assert Repository.unlock(target, "home", keyfile(tmp_path / "remote")).id == remote.id

    other = Home.locate(tmp_path / "other")
    mine = Repository.open(other.repository, create=True)
    ingest(mine, synthetic_stream(noise_pages(10, 2)), session="mine")
    with pytest.raises(RepositoryError, match=r"^This computer's repository .* is another one than the one in "
                                              r".* and holds checkpoints; use another --home for that one\.$"):
        local_target(other, remote)


# -- bandwidth ------------------------------------------------------------------------------------------

def test_rate_limiter_computes_the_waits_of_a_token_bucket() -> None:
    now = [100.0]
    limiter = RateLimiter(1000, burst=500, clock=lambda: now[0])
    assert limiter.take(500) == 0  # the burst
    assert limiter.take(1000) == pytest.approx(1.0)  # in debt: wait until it is paid
    now[0] += 1.0
    assert limiter.take(250) == pytest.approx(0.25)
    now[0] += 10.0  # idle: the bucket refills up to the burst, no further
    assert limiter.take(500) == 0
    assert limiter.take(100) == pytest.approx(0.1)


def test_limit_is_respected(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "local", create=True)
    ingest(repo, synthetic_stream(noise_pages(700, 1)), session="desk")  # about 3 MiB
    limit = 1 << 20
    started = time.monotonic()
    sent = replicate(repo, LocalBackend(tmp_path / "remote"), limit=limit)
    elapsed = time.monotonic() - started
    assert sent.bytes_done > 2 * limit
    # What the bucket allows: its burst at once, the rest at `limit` bytes a second (a lower bound only).
    assert elapsed >= (sent.bytes_done - limit) / limit


# -- background replication ------------------------------------------------------------------------------

class Flaky(LocalBackend):
    """A directory that pretends its server is down while ``down`` is set."""

    down = True

    def save(self, name: str, data: bytes) -> None:
        if self.down:
            raise RepositoryError("Cannot reach the server at http://nas: Connection refused; check the address or "
                                  "try later.")
        super().save(name, data)


def test_background_replication_pushes_new_checkpoints_and_retries_when_offline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "RETRY_FIRST", 0.2)
    repo = Repository.open(tmp_path / "local", create=True)
    a = ingest(repo, synthetic_stream(noise_pages(20, 1)), session="desk")
    remote = Flaky(tmp_path / "remote")
    errors: list[tuple[str, float]] = []
    sent: list[Transfer] = []
    after: list[set[str]] = []  # what the remote's copy held after each push

    def thin(copy: Repository) -> None:  # what the app passes: Autosaver.thin_copy
        after.append({c.id for c in copy.checkpoints()})
        if len(after) == 1:
            raise RepositoryError("The copy is locked by another computer.")  # not a failed push

    b = a

    async def main() -> None:
        wake = asyncio.Event()
        task = asyncio.create_task(replicate_forever(
            repo, remote, progress=sent.append, on_error=lambda e, delay: errors.append((str(e), delay)),
            wake=wake, poll=60, after=thin))
        await until(lambda: len(errors) >= 2, "two failed pushes")  # it keeps trying, backing off
        assert errors[0] == ("Cannot reach the server at http://nas: Connection refused; check the address or "
                             "try later.", 0.2)
        assert errors[1][1] == 0.4
        remote.down = False
        await until(lambda: f"checkpoints/{a.id}" in set(remote.list("checkpoints/")), "a pushed")
        nonlocal b
        b = await asyncio.to_thread(ingest, repo, synthetic_stream(noise_pages(20, 2)), "desk", a.id)
        wake.set()  # as the app does after a checkpoint, rather than wait for the next poll
        await until(lambda: f"checkpoints/{b.id}" in set(remote.list("checkpoints/")), "b pushed")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert sent and objects(remote) == objects(repo.backend)
    assert after == [{a.id}, {a.id, b.id}] and all(e.startswith("Cannot reach") for e, _ in errors)


# -- remotes and their credentials -------------------------------------------------------------------

def test_urls() -> None:
    assert normalize_url("s3://bucket/some/prefix/") == "s3://bucket/some/prefix"
    assert normalize_url("s3://bucket") == "s3://bucket"
    assert normalize_url("file:///mnt/share/sm") == "file:///mnt/share/sm"
    assert normalize_url("/mnt/share/./sm") == "file:///mnt/share/sm"
    with pytest.raises(UsageError, match="does not name a valid bucket"):
        normalize_url("s3://No_Such/x")
    with pytest.raises(UsageError, match="neither s3://bucket/prefix nor a directory"):
        normalize_url("https://example.com/x")
    with pytest.raises(UsageError, match="names another host"):
        normalize_url("file://nas/share")


def test_credentials_go_to_the_keyring_and_never_into_files(
        tmp_path: Path, memory_keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(SECRET_ENV, raising=False)
    remotes = Remotes(Home.locate(tmp_path))
    office = Remote("office", "s3://bucket/me", "http://127.0.0.1:9000", None, 10 << 20)
    assert remotes.add(office, Credentials("AKEXAMPLE", "SECRETEXAMPLE")) is True
    text = remotes.file.read_text()
    assert "AKEXAMPLE" not in text and "SECRETEXAMPLE" not in text
    assert remotes.all() == [office]
    assert ("session-manager", "remote office") in memory_keyring.secrets
    assert remotes.credentials(office) == Credentials("AKEXAMPLE", "SECRETEXAMPLE")
    monkeypatch.setenv(KEY_ENV, "ENVKEY")
    monkeypatch.setenv(SECRET_ENV, "ENVSECRET")
    assert remotes.credentials(office) == Credentials("ENVKEY", "ENVSECRET")  # headless use overrides
    remotes.remove("office")
    assert remotes.all() == [] and memory_keyring.secrets == {}
    with pytest.raises(UsageError, match="plain http"):
        remotes.add(Remote("nas", "s3://bucket/me", "http://nas.example:9000"), None)


def test_without_a_keyring_credentials_come_from_the_environment(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    remotes = Remotes(Home.locate(tmp_path))
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(SECRET_ENV, raising=False)
    office = Remote("office", "s3://bucket/me")
    with pytest.raises(KeyringUnavailable, match="^The keyring cannot store remote office"):
        remotes.add(office, Credentials("AK", "SK"))
    monkeypatch.setenv(KEY_ENV, "AK")
    monkeypatch.setenv(SECRET_ENV, "SK")
    assert remotes.add(office, Credentials("AK", "SK")) is False  # kept without them
    assert remotes.credentials(office) == Credentials("AK", "SK")
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(UsageError, match=f"^No credentials for remote 'office' are in the keyring; .* {SECRET_ENV}"):
        remotes.credentials(office)


# -- the command line -----------------------------------------------------------------------------------

def test_push_killed_midway_resumes_and_sends_only_what_is_missing(s3_server: S3Server, tmp_path: Path) -> None:
    home = tmp_path / "home"
    repo = Repository.open(home / "data" / "repository", create=True)
    for seed in range(3):  # three writer runs: three packs of about 12 MiB
        ingest(repo, synthetic_stream(noise_pages(3000, seed)), session="desk")
    local = objects(repo.backend)
    sm = Sm(home, env=creds_env(s3_server))
    url = f"s3://{s3_server.bucket}/{tmp_path.name}"
    sm("remote", "add", "office", url, "--endpoint", s3_server.endpoint, "--limit", "6M/s")
    remote = s3_server.backend(tmp_path.name)

    push = sm.popen("push")
    deadline = time.monotonic() + 60
    while not any(remote.list("data/")):
        assert push.poll() is None and time.monotonic() < deadline, push.communicate()
        time.sleep(0.05)
    push.send_signal(signal.SIGKILL)
    push.communicate()
    there = objects(remote)
    assert len([n for n in there if n.startswith("data/")]) < 3, "the push was not interrupted"
    opened = Repository.unlock(remote, url, keyfile(home / "data" / "repository"))
    assert opened.check().ok  # consistent at every moment: unindexed packs at worst

    second = sm("push", "--json").json()
    assert objects(remote) == local
    # Only what was missing went, and at most one object in flight at the kill (a pack) went twice.
    assert second["bytes_done"] <= sum(local.values()) - sum(there.values()) + PACK_SIZE
    report = opened.check(read_data=True)
    assert report.ok and report.checkpoints == 3, report.summary()


def test_reading_from_a_place_that_is_not_there_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ingest(Repository.open(home / "data" / "repository", create=True), synthetic_stream(noise_pages(10, 1)), "desk")
    sm = Sm(home)
    for url in ("", "  "):
        r = sm("remote", "add", "here", url, check=False)
        assert r.returncode != 0 and "No remote was given" in r.stderr
    assert sm("remote", "list", "--json").json() == []
    missing = tmp_path / "not-mounted" / "share"
    r = sm("resume", str(missing), check=False)
    assert r.returncode != 0 and f"There is no directory {missing}" in r.stderr and len(r.stderr.splitlines()) == 1
    share = tmp_path / "share"
    sm("remote", "add", "share", str(share))
    sm("push")
    shutil.rmtree(share)  # the share is not mounted now
    r = sm("pull", check=False)
    assert r.returncode != 0 and f"There is no directory {share}" in r.stderr
    assert not missing.parent.exists() and not share.exists()  # nothing was made


def test_push_to_an_unreachable_server_fails_in_one_sentence_and_changes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ingest(Repository.open(home / "data" / "repository", create=True), synthetic_stream(noise_pages(10, 1)), "desk")
    port = free_port()
    sm = Sm(home, env={KEY_ENV: "AK", SECRET_ENV: "SK"})
    sm("remote", "add", "office", "s3://bucket/me", "--endpoint", f"http://127.0.0.1:{port}")
    files = lambda: {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (home / "data").rglob("*")}  # noqa: E731
    before = files()
    r = sm("push", check=False)
    assert r.returncode == 1
    assert r.stderr == (f"session-manager: Cannot reach the server at http://127.0.0.1:{port}: Connection refused; "
                        "check the address or try later.\n")
    assert files() == before


def test_a_directory_works_as_a_remote(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "one" / "data" / "repository", create=True)
    a = ingest(repo, synthetic_stream(noise_pages(50, 1)), session="desk")
    b = ingest(repo, synthetic_stream(noise_pages(50, 2)), session="laptop")
    share = tmp_path / "share"
    one = Sm(tmp_path / "one", env={"SESSION_MANAGER_NEW_PASSPHRASE": PASSPHRASE})
    one("key", "add")  # what opens the repository on another computer
    one("remote", "add", "share", str(share))
    assert one("remote", "list", "--json").json() == [{"name": "share", "url": share.as_uri(), "endpoint": None,
                                                        "region": None, "limit": None}]
    assert one("push", "--json").json()["objects_done"] == len(objects(repo.backend))
    assert one("push", "--json").json()["objects_done"] == 0

    two = Sm(tmp_path / "two", env={"SESSION_MANAGER_PASSPHRASE": PASSPHRASE})
    listing = two("resume", share.as_uri(), "--json").json()  # two sessions there: which one?
    assert [(r["session"], r["latest"]) for r in listing] == [("desk", a.id), ("laptop", b.id)]
    assert "Name one: session-manager resume" in two("resume", str(share)).stdout
    two("remote", "add", "share", str(share))
    assert two("pull", "--json").json()["objects_done"] == len(objects(repo.backend))
    report = two("check", "--read-data", "--json").json()
    assert report["ok"] and report["checkpoints"] == 2


@pytest.mark.qemu
def test_resume_on_another_computer_continues_the_guest(s3_server: S3Server, guest: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    url = f"s3://{s3_server.bucket}/{tmp_path.name}"
    one = Sm(tmp_path / "one", env={**creds_env(s3_server), "SESSION_MANAGER_NEW_PASSPHRASE": PASSPHRASE})
    two = Sm(tmp_path / "two", env={**creds_env(s3_server), "SESSION_MANAGER_PASSPHRASE": PASSPHRASE})
    try:
        serial, first, latest, before, after = two_checkpoints(one, "desk", guest)
        one("key", "add")
        one("remote", "add", "office", url, "--endpoint", s3_server.endpoint)
        one("push")

        resumed = two("resume", url, "--endpoint", s3_server.endpoint, "--json").json()  # its only session
        assert resumed["checkpoint"]["id"] == latest["id"] and resumed["status"]["running"]
        assert [c["id"] for c in two("checkpoints", "desk", "--json").json()] == [latest["id"]]
        assert first["id"] not in str(objects(LocalBackend(tmp_path / "two" / "data" / "repository")))
        there = Serial(resumed["status"]["serial_log"])
        mark = there.last_start()
        there.wait_counter(2, since=mark)
        counter = there.counters(since=mark)[0]
        assert before + 1 <= counter <= after + 1  # from the checkpoint's memory
        there.wait_for(rf"^disk ok {counter + 1}", since=mark)  # and its disk, record for record
        assert "disk-mismatch" not in there.text()
        two("checkpoint", "desk")  # it goes on there
        assert two("check", "--read-data").returncode == 0
    finally:
        one.kill_all()
        two.kill_all()


def test_an_object_tampered_with_on_the_server_is_refused(s3_server: S3Server, tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "one" / "data" / "repository", create=True)
    ckpt = ingest(repo, synthetic_stream(noise_pages(40, 7)), session="desk")
    repo.add_key(PASSPHRASE)
    remote = s3_server.backend(tmp_path.name)
    replicate(repo, remote)
    pack = next(n for n in remote.list("data/"))
    data = bytearray(remote.load(pack))
    data[len(data) // 2] ^= 0x40  # someone with access to the bucket changes one bit
    remote.delete(pack)
    remote.save(pack, bytes(data))

    there = Repository.unlock(remote, str(remote), None, PASSPHRASE)
    with pytest.raises(CorruptionError, match=f"checkpoint {ckpt.id[:8]} .*damaged or was tampered with"):
        there.verify(there.get(ckpt.id))  # what a restore or resume does before QEMU sees a byte
    two = Sm(tmp_path / "two", env={"SESSION_MANAGER_PASSPHRASE": PASSPHRASE, **creds_env(s3_server)})
    two("remote", "add", "server", f"s3://{s3_server.bucket}/{tmp_path.name}", "--endpoint", s3_server.endpoint)
    pulled = two("pull", check=False)  # the pack's hash is checked as it arrives: it goes no further
    assert pulled.returncode != 0 and len(pulled.stderr.strip().splitlines()) == 1, pulled
    assert f"pack {pack.rpartition('/')[2][:12]}" in pulled.stderr and "tampered with" in pulled.stderr
    assert not list((tmp_path / "two" / "data" / "repository" / "data").rglob(pack.rpartition("/")[2]))
