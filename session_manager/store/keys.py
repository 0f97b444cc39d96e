"""The repository's master key: where this computer keeps it, and the passphrases that unlock it.

The master key (codec.MasterKey) is made at random with the repository.  This computer keeps it
in the keyring (keychain.py: user name "repository <repository id>", base64) or, where no
keyring works, in a key file next to the repository directory (``<repository>.key``, mode 0600,
JSON {repository id: base64 key}): never inside it, because the repository directory is what
goes to servers.  A repository needs no passphrase until `session-manager key add` gives it
one, which is what opens it on another computer.

Key object ``keys/<16 hex>``, plaintext JSON, one per passphrase::

    {"created": ISO 8601, "kdf": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4,
     "salt": base64, "key": base64(12-byte nonce + ChaCha20-Poly1305(master key))}

The wrapping key is Argon2id(passphrase, salt); the associated data is b"session-manager
repository " + the repository id, so a key object works only in its own repository.

Unlocking tries, in order: the keyring, the key file, a passphrase (the argument, else
SESSION_MANAGER_PASSPHRASE, else ``ask``); after a passphrase it caches the key in the keyring
when there is one.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ..errors import NotFoundError, RepositoryError, UsageError
from ..files import atomic_write
from ..keychain import KeyringUnavailable, get_secret, set_secret
from .backend import Backend
from .codec import NONCE_SIZE, MasterKey

PASSPHRASE_ENV = "SESSION_MANAGER_PASSPHRASE"
ARGON2 = {"memory_kib": 64 << 10, "iterations": 3, "lanes": 4}  # RFC 9106's second choice: 0.15 s here

log = logging.getLogger(__name__)

ask: Callable[[str], str] | None = None
"""How to ask the user for a passphrase (prompt in, passphrase out); the CLI sets it on a terminal."""


class NeedPassphrase(RepositoryError):
    """The repository's key is not on this computer and no passphrase was given."""

    exit_code = 2


class WrongPassphrase(RepositoryError):
    """No key object of the repository opens with the passphrase given."""

    exit_code = 2


@dataclass
class KeyInfo:
    id: str
    created: str
    kdf: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _keyring_name(repo_id: str) -> str:
    return f"repository {repo_id}"


def _wrap_ad(repo_id: str) -> bytes:
    return f"session-manager repository {repo_id}".encode()


def _read_keyfile(path: Path) -> dict[str, str]:
    try:
        keys = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise RepositoryError(f"The key file {path} cannot be read ({e}); restore it from a backup or "
                              "use a passphrase of the repository.") from None
    return keys if isinstance(keys, dict) else {}


def keyfile_for(repository: Path) -> Path:
    """Where a repository's key is kept when no keyring works: beside the directory, which is what servers get."""
    return repository.with_name(repository.name + ".key")


def create(repo_id: str, where: str, keyfile: Path) -> MasterKey:
    """A new master key, kept in the keyring or, without one, in ``keyfile`` (the caller serialises creation)."""
    key = MasterKey.generate()
    remember(repo_id, key, where, keyfile)
    return key


def remember(repo_id: str, key: MasterKey, where: str, keyfile: Path | None) -> None:
    """Keep an unlocked master key on this computer: in the keyring, or without one in ``keyfile`` (0600)."""
    try:
        set_secret(_keyring_name(repo_id), _b64(key.raw))
        return
    except KeyringUnavailable as e:
        reason = e.reason
    if keyfile is None:
        log.info("The key of the repository at %s is not cached (%s).", where, reason)
        return
    keys = {**_read_keyfile(keyfile), repo_id: _b64(key.raw)}
    atomic_write(keyfile, json.dumps(keys).encode())
    log.warning("No usable keyring (%s): the key of the repository at %s is kept in %s (mode 0600); "
                "`session-manager key add` sets a passphrase, which also opens it on other computers.",
                reason, where, keyfile)


def remembered(repo_id: str, where: str, keyfile: Path | None) -> MasterKey | None:
    """The master key this computer keeps for the repository (keyring, else ``keyfile``), if it keeps one."""
    cached = get_secret(_keyring_name(repo_id))
    if cached is None and keyfile is not None:
        cached = _read_keyfile(keyfile).get(repo_id)
    if cached is not None:
        try:
            return MasterKey(base64.b64decode(cached, validate=True))
        except (binascii.Error, ValueError):
            log.warning("The cached key of the repository at %s is malformed; trying a passphrase.", where)
    return None


def unlock(backend: Backend, repo_id: str, where: str, keyfile: Path | None, passphrase: str | None) -> MasterKey:
    """The master key, from the first place that has it (see the module doc)."""
    cached = remembered(repo_id, where, keyfile)
    if cached is not None:
        return cached
    objects = _key_objects(backend)
    if not objects:
        raise RepositoryError(f"The key of the repository at {where} is not on this computer and the repository "
                              "has no passphrase; run `session-manager key add` where it was made, then use that "
                              "passphrase here.")
    if passphrase is None:
        passphrase = os.environ.get(PASSPHRASE_ENV)
    if passphrase is None and ask is not None:
        passphrase = ask(f"Passphrase of the repository at {where}: ")
    if passphrase is None:
        raise NeedPassphrase(f"The repository at {where} is locked; give its passphrase ({PASSPHRASE_ENV} "
                             "or the prompt in a terminal).")
    ad = _wrap_ad(repo_id)
    for name, obj in objects.items():
        try:
            wrapped = base64.b64decode(obj["key"], validate=True)
            raw = ChaCha20Poly1305(_derive(obj, passphrase)).decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], ad)
            key = MasterKey(raw)
        except InvalidTag:
            continue
        except (KeyError, TypeError, ValueError) as e:
            log.warning("Skipping the key object %s, which is damaged or of a newer format (%r).", name, e)
            continue
        remember(repo_id, key, where, keyfile)
        return key
    raise WrongPassphrase(f"That passphrase does not unlock the repository at {where}; try again or use another "
                          "of its passphrases.")


# What a key object may ask of Argon2id: a hostile or damaged repository must not make unlocking take gigabytes
# or hours (ours asks 64 MiB, 3 passes, 4 lanes).
ARGON2_LIMITS = {"memory_kib": 1 << 20, "iterations": 16, "lanes": 16}


def _derive(obj: dict[str, Any], passphrase: str) -> bytes:
    if obj["kdf"] != "argon2id":
        raise ValueError(f"unknown kdf {obj['kdf']!r}")
    for param, limit in ARGON2_LIMITS.items():
        value = obj[param]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ValueError(f"{param} {value!r} is beyond what a key may ask ({limit})")
    return Argon2id(salt=base64.b64decode(obj["salt"], validate=True), length=32, iterations=obj["iterations"],
                    lanes=obj["lanes"], memory_cost=obj["memory_kib"]).derive(passphrase.encode())


def _key_objects(backend: Backend) -> dict[str, dict[str, Any]]:
    """name -> content of every key object ({"kdf": "damaged"} for one that is not a JSON object)."""
    out = {}
    for name in sorted(backend.list("keys/")):
        try:
            obj = json.loads(backend.load(name))
        except NotFoundError:  # removed meanwhile
            continue
        except ValueError:
            obj = None
        out[name] = obj if isinstance(obj, dict) else {"kdf": "damaged"}
    return out


def _info(name: str, obj: dict[str, Any]) -> KeyInfo:
    kdf = str(obj.get("kdf"))
    if kdf == "argon2id":
        kdf += f" ({obj.get('memory_kib', 0) >> 10} MiB, {obj.get('iterations')} passes)"
    return KeyInfo(id=name.removeprefix("keys/"), created=str(obj.get("created", "")), kdf=kdf)


def add(backend: Backend, key: MasterKey, repo_id: str, passphrase: str) -> KeyInfo:
    if not passphrase:
        raise UsageError("An empty passphrase protects nothing; choose one with a few words in it.")
    salt = os.urandom(16)
    obj: dict[str, Any] = {"created": datetime.now(UTC).isoformat(), "kdf": "argon2id", **ARGON2,
                           "salt": _b64(salt)}
    nonce = os.urandom(NONCE_SIZE)
    obj["key"] = _b64(nonce + ChaCha20Poly1305(_derive(obj, passphrase)).encrypt(nonce, key.raw, _wrap_ad(repo_id)))
    name = f"keys/{secrets.token_hex(8)}"
    backend.save(name, json.dumps(obj).encode())
    return _info(name, obj)


def list_keys(backend: Backend) -> list[KeyInfo]:
    """The repository's passphrases, oldest first."""
    return sorted((_info(n, o) for n, o in _key_objects(backend).items()), key=lambda k: (k.created, k.id))


def remove(backend: Backend, ref: str) -> KeyInfo:
    """Remove the key object with this id or unique id prefix; never the last one."""
    keys = list_keys(backend)
    matches = [k for k in keys if k.id.startswith(ref)] if ref else []
    if not matches:
        raise UsageError(f"The repository has no key {ref}; list its keys with `session-manager key list`.")
    if len(matches) > 1:
        raise UsageError(f"Key {ref} is ambiguous ({len(matches)} keys start with it); give more of its id.")
    if len(keys) == 1:
        raise UsageError(f"Key {ref} is the repository's only passphrase; add another with "
                         "`session-manager key add` before removing this one.")
    backend.delete(f"keys/{matches[0].id}")
    return matches[0]
