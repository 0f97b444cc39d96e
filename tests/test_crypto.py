"""Encrypted repositories: nothing readable on disk, keyed ids, tamper detection, passphrases, key storage."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import keyring
import pytest

from helpers import ROOT
from helpers.cli import Sm
from helpers.store import MemoryKeyring, ingest, noise_pages, pack_of, stream_of, synthetic_stream
from helpers.stream import reader
from session_manager import keychain
from session_manager.errors import CorruptionError, RepositoryError, UsageError
from session_manager.store import keys
from session_manager.store.codec import decode, encode
from session_manager.store.repo import CheckpointMeta, Repository
from session_manager.vm.stream import iter_segments


def all_bytes(root: Path) -> bytes:
    """Every file's name and content under ``root``."""
    return b"".join(str(p).encode() + (p.read_bytes() if p.is_file() else b"") for p in sorted(root.rglob("*")))


@pytest.fixture(autouse=True)
def no_passphrase_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(keys.PASSPHRASE_ENV, raising=False)
    monkeypatch.setattr(keys, "ask", None)


def test_nothing_readable_on_disk(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    repo = Repository.open(root, create=True)
    pages = noise_pages(200, 1)
    data = synthetic_stream(pages, state=b"device state of the secret session")
    with repo.writer(session="secret-session-name") as w:
        w.add_memory(iter_segments(reader(data)))
        w.set_thumbnail(b"\x89PNG secret thumbnail")
        ckpt = w.commit(CheckpointMeta(note="secret note"))
    repo.annotate(ckpt, note="secret annotation")
    with repo.objects.lock(False, "reading the secret session"):
        disk = all_bytes(root)
    assert stream_of(repo, ckpt) == data and repo.thumbnail(ckpt) == b"\x89PNG secret thumbnail"
    for secret in (b"secret", b"device state", b"SMS1", b"SMI1", b"SMP1", b"SMM1"):
        assert secret not in disk
    for page in pages:
        assert page[1000:1032] not in disk
        plain_id = blake3.blake3(page).digest()
        assert plain_id not in disk and plain_id.hex().encode() not in disk
    config = json.loads((root / "config").read_text())
    assert config["encryption"] == "chacha20-poly1305" and config["version"] == 2
    assert repo.check(read_data=True).ok


def test_keyed_ids_deduplicate(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "repo", create=True)
    page = noise_pages(1, 2)[0]
    assert repo.master.blob_id(page) != blake3.blake3(page).digest()
    data = synthetic_stream([page, page, page])
    with repo.writer(session="s") as w:
        stats = w.add_memory(iter_segments(reader(data)))
        w.commit(CheckpointMeta())
    assert stats.pages == 3 and stats.new_pages == 1
    second = ingest(repo, data)
    assert second.added_bytes == 0 and stream_of(repo, second) == data
    other = Repository.open(tmp_path / "other", create=True)  # another repository, another id key
    assert other.master.blob_id(page) != repo.master.blob_id(page)


def test_tampered_pack_is_refused_naming_the_checkpoint(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "repo", create=True)
    good = ingest(repo, synthetic_stream(noise_pages(20, 3), state=b"a"))
    bad = ingest(repo, synthetic_stream(noise_pages(20, 4), state=b"b"))
    path, offset = pack_of(repo, bad)
    pack = path.name
    data = bytearray(path.read_bytes())
    data[offset + 50] ^= 0x01  # inside the ciphertext of bad's last page
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match=f"{bad.id[:8]} .*damaged or was tampered with"):
        repo.verify(bad)
    with pytest.raises(CorruptionError, match=f"blob of checkpoint {bad.id[:8]} in pack {pack[:12]} is damaged or "
                                              "was tampered with"):
        stream_of(repo, bad)
    assert stream_of(repo, good)
    assert repo.check(read_data=True).damaged == [bad.id]


def test_objects_cannot_be_swapped(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    repo = Repository.open(root, create=True)
    a, b = (ingest(repo, synthetic_stream(noise_pages(2, seed), state=bytes([seed]))) for seed in (5, 6))
    shutil.copy(root / "checkpoints" / a.id, root / "checkpoints" / b.id)  # a's manifest under b's name
    fresh = Repository.open(root)
    with pytest.raises(CorruptionError, match=f"manifest of checkpoint {b.id[:8]} is damaged or was tampered with"):
        fresh.get(b.id)
    name = next(iter(repo.backend.list("index/")))
    sealed = encode(repo.master, name.encode(), b"anything")
    with pytest.raises(CorruptionError, match="tampered"):
        decode(repo.master, b"index/other", sealed, None, "An index file")
    assert decode(repo.master, name.encode(), sealed, None, "An index file") == b"anything"


def test_key_file_without_keyring(tmp_path: Path) -> None:
    """The tests' default: no usable keyring, as on a headless machine."""
    root = tmp_path / "data" / "repository"
    repo = Repository.open(root, create=True)
    keyfile = tmp_path / "data" / "repository.key"
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert json.loads(keyfile.read_text()) == {repo.id: base64.b64encode(repo.master.raw).decode()}
    assert base64.b64encode(repo.master.raw) not in all_bytes(root) and repo.master.raw not in all_bytes(root)
    assert Repository.open(root).master.raw == repo.master.raw
    # A second repository beside it adds its key to the same file.
    other = Repository.open(tmp_path / "data" / "repository2", create=True)
    assert Repository.open(root).master.raw == repo.master.raw
    assert (tmp_path / "data" / "repository2.key").exists() and other.master.raw != repo.master.raw


def test_passphrases(tmp_path: Path, memory_keyring: MemoryKeyring, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "repo"
    repo = Repository.open(root, create=True)
    cached = ("session-manager", f"repository {repo.id}")
    assert memory_keyring.secrets == {cached: base64.b64encode(repo.master.raw).decode()}
    assert not (tmp_path / "repo.key").exists()
    assert repo.keys() == []
    memory_keyring.secrets.clear()  # another computer: the repository alone
    with pytest.raises(RepositoryError, match="not on this computer and the repository has no passphrase"):
        Repository.open(root)
    memory_keyring.secrets[cached] = base64.b64encode(repo.master.raw).decode()
    one = repo.add_key("correct horse")
    two = repo.add_key("battery staple")
    assert [k.id for k in repo.keys()] == [one.id, two.id] and one.kdf.startswith("argon2id (64 MiB")
    stored = json.loads((root / "keys" / one.id).read_text())
    assert stored["kdf"] == "argon2id" and base64.b64encode(repo.master.raw).decode() not in json.dumps(stored)
    for passphrase in ("correct horse", "battery staple"):
        memory_keyring.secrets.clear()
        assert Repository.open(root, passphrase=passphrase).master.raw == repo.master.raw
        assert memory_keyring.secrets == {cached: base64.b64encode(repo.master.raw).decode()}  # cached again
    memory_keyring.secrets.clear()
    with pytest.raises(keys.NeedPassphrase, match="is locked; give its passphrase") as need:
        Repository.open(root)
    with pytest.raises(keys.WrongPassphrase) as wrong:
        Repository.open(root, passphrase="tr0ub4dor")
    assert str(wrong.value) == (f"That passphrase does not unlock the repository at {root}; "
                                "try again or use another of its passphrases.")
    assert need.value.exit_code == wrong.value.exit_code == 2
    monkeypatch.setenv(keys.PASSPHRASE_ENV, "battery staple")
    assert Repository.open(root).master.raw == repo.master.raw
    monkeypatch.delenv(keys.PASSPHRASE_ENV)
    memory_keyring.secrets.clear()
    monkeypatch.setattr(keys, "ask", lambda prompt: "correct horse" if str(root) in prompt else "")
    assert Repository.open(root).master.raw == repo.master.raw
    # Removing: by prefix, never the last one.
    assert repo.remove_key(one.id[:6]) == one
    with pytest.raises(UsageError, match="only passphrase"):
        repo.remove_key(two.id)
    with pytest.raises(UsageError, match="has no key"):
        repo.remove_key("ffff")
    with pytest.raises(UsageError, match="empty passphrase"):
        repo.add_key("")
    memory_keyring.secrets.clear()
    with pytest.raises(keys.WrongPassphrase):
        Repository.open(root, passphrase="correct horse")


@pytest.mark.parametrize("param, value", [("memory_kib", 64 << 20), ("iterations", 10**9), ("lanes", 0),
                                          ("memory_kib", "lots")])
def test_a_key_asking_for_too_much_is_skipped(tmp_path: Path, memory_keyring: MemoryKeyring, param: str,
                                              value: object) -> None:
    """A hostile or damaged key object cannot make unlocking take 64 GiB or forever: it is skipped (and logged)."""
    root = tmp_path / "repo"
    repo = Repository.open(root, create=True)
    one = repo.add_key("correct horse")
    hostile = json.loads((root / "keys" / one.id).read_text()) | {param: value}
    (root / "keys" / one.id).write_text(json.dumps(hostile))
    memory_keyring.secrets.clear()
    with pytest.raises(keys.WrongPassphrase):
        Repository.open(root, passphrase="correct horse")


def test_unencrypted_repository_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "config").write_text(json.dumps({"version": 1, "id": "ab" * 16, "created": "2024-01-01T00:00:00+00:00"}))
    with pytest.raises(RepositoryError, match="did not encrypt.*move it aside"):
        Repository.open(root)


def test_keychain(memory_keyring: MemoryKeyring) -> None:
    keychain.set_secret("remote x", "s3cret")
    assert keychain.get_secret("remote x") == "s3cret" and keychain.get_secret("other") is None
    keychain.delete_secret("remote x")
    keychain.delete_secret("remote x")
    assert memory_keyring.secrets == {}
    keyring.set_keyring(keyring.backends.fail.Keyring())
    assert keychain.get_secret("remote x") is None
    with pytest.raises(keychain.KeyringUnavailable, match="cannot store remote x .no Secret Service"):
        keychain.set_secret("remote x", "s3cret")
    keychain.delete_secret("remote x")  # nothing can be there


def test_cli_keys(tmp_path: Path) -> None:
    home = tmp_path / "home"
    sm = Sm(home, env={"SESSION_MANAGER_NEW_PASSPHRASE": "first passphrase"})
    added = sm("key", "add", "--json").json()
    assert added["kdf"].startswith("argon2id")
    listed = sm("key", "list").stdout
    assert added["id"] in listed and "KDF" in listed
    keyfile = home / "data" / "repository.key"
    keyfile.unlink()  # as on another computer
    repo_path = home / "data" / "repository"
    need = Sm(home)("key", "list", check=False)
    assert need.returncode == 2 and need.stderr == (
        f"session-manager: The repository at {repo_path} is locked; give its passphrase "
        "(SESSION_MANAGER_PASSPHRASE or the prompt in a terminal).\n")
    wrong = Sm(home, env={"SESSION_MANAGER_PASSPHRASE": "wrong"})("key", "list", check=False)
    assert wrong.returncode == 2 and wrong.stderr == (
        f"session-manager: That passphrase does not unlock the repository at {repo_path}; "
        "try again or use another of its passphrases.\n")
    unlocked = Sm(home, env={"SESSION_MANAGER_PASSPHRASE": "first passphrase",
                             "SESSION_MANAGER_NEW_PASSPHRASE": "second passphrase"})
    assert [k["id"] for k in unlocked("key", "list", "--json").json()] == [added["id"]]
    second = unlocked("key", "add", "--json").json()
    assert Sm(home, env={"SESSION_MANAGER_PASSPHRASE": "second passphrase"})("key", "remove", added["id"]).stdout
    assert keyfile.exists()  # a passphrase unlock keeps the key on this computer (no keyring here: the key file)
    keyfile.unlink()
    last = unlocked("key", "remove", second["id"], check=False)  # "first passphrase" no longer unlocks
    assert last.returncode == 2 and "does not unlock" in last.stderr
    last = Sm(home, env={"SESSION_MANAGER_PASSPHRASE": "second passphrase"})("key", "remove", second["id"], check=False)
    assert last.returncode == 2 and "only passphrase" in last.stderr
    no_new = Sm(home, env={"SESSION_MANAGER_PASSPHRASE": "second passphrase"})("key", "add", check=False)
    assert no_new.returncode == 2 and "SESSION_MANAGER_NEW_PASSPHRASE" in no_new.stderr


SECRET_SERVICE_SCRIPT = textwrap.dedent("""
    import base64, os, sys
    import keyring
    from session_manager.store.repo import Repository

    print(keyring.get_keyring())
    repo = Repository.open(sys.argv[1], passphrase="pass phrase")
    cached = keyring.get_password("session-manager", f"repository {repo.id}")
    assert cached == base64.b64encode(repo.master.raw).decode(), cached
    again = Repository.open(sys.argv[1])  # no passphrase: from the Secret Service
    assert again.master.raw == repo.master.raw
    print("ok")
""")


def test_secret_service(tmp_path: Path) -> None:
    """A real Secret Service (gnome-keyring in its own D-Bus session) caches the key after a passphrase."""
    root = tmp_path / "repo"
    Repository.open(root, create=True).add_key("pass phrase")
    (tmp_path / "repo.key").unlink()
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHON_KEYRING_BACKEND", "DBUS_SESSION_BUS_ADDRESS") and not k.startswith("XDG_")}
    env.update(HOME=str(home), XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"),
               XDG_CACHE_HOME=str(home / "cache"), XDG_RUNTIME_DIR=str(home / "run"), PYTHONPATH=str(ROOT))
    (home / "run").mkdir(parents=True, mode=0o700)
    script = tmp_path / "secret_service.py"
    script.write_text(SECRET_SERVICE_SCRIPT)
    command = ('eval "$(printf unlock | gnome-keyring-daemon --unlock --components=secrets)"; '
               f'exec "{sys.executable}" "{script}" "{root}"')
    run = subprocess.run(["dbus-run-session", "--", "sh", "-c", command], env=env, capture_output=True, text=True,
                         timeout=120)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and lines[0].startswith("keyring.backends.SecretService.Keyring") and lines[1:] == [
        "ok"], run.stderr + run.stdout
    assert not (tmp_path / "repo.key").exists()
