"""Remote repositories: where push, pull and resume copy checkpoints to and from.

``<config>/remotes.toml`` holds each remote's name, URL, S3 endpoint and region, and bandwidth
limit.  A URL is ``s3://bucket/prefix`` (S3-compatible storage) or a directory: a path or
``file:///path``, e.g. a mounted network share.  S3 credentials never go into a file: they live
in the OS keyring (keychain.py) as "remote NAME"; AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,
when both are set, take precedence (headless machines have no keyring).
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import json
import os
import re
import sys
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import tomli_w

from ..errors import NotFoundError, RepositoryError, SessionManagerError, UsageError
from ..files import atomic_write
from ..keychain import KeyringUnavailable, delete_secret, get_secret, set_secret
from ..local.engine import Engine, Progress, Status
from ..local.sessions import Session
from ..paths import Home
from ..store.backend import Backend, LocalBackend
from ..store.keys import keyfile_for
from ..store.replicate import Transfer, TransferProgress, replicate, replicate_forever
from ..store.repo import CheckpointInfo, Repository
from ..store.s3 import S3Backend, check_endpoint

KEY_ENV, SECRET_ENV = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str


@dataclass
class Remote:
    name: str
    url: str  # s3://bucket/prefix or file:///absolute/path
    endpoint: str | None = None
    region: str | None = None
    limit: int | None = None  # bytes a second; None: as fast as the link goes

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


def normalize_url(url: str) -> str:
    """``s3://bucket/prefix`` as given (checked), or a directory as ``file:///absolute/path``."""
    if not url.strip():
        raise UsageError("No remote was given; name one as s3://BUCKET/PREFIX or as a directory.")
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not _BUCKET_RE.fullmatch(bucket):
            raise UsageError(f"{url!r} does not name a valid bucket; write it like s3://my-bucket/session-manager.")
        return f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"{url!r} names another host; mount the share and give its local path.")
        path = Path(unquote(parts.path))
    elif "://" in url:
        raise UsageError(f"{url!r} is neither s3://bucket/prefix nor a directory; give one of those.")
    else:
        path = Path(url).expanduser().resolve()
    return path.resolve().as_uri()


def open_backend(url: str, endpoint: str | None = None, region: str | None = None,
                 credentials: Credentials | None = None, create: bool = True) -> Backend:
    """The backend of a normalized URL; S3 needs ``credentials``.  A directory that is not there is made only with
    ``create`` (to push to); reading from one that is not there is a NotFoundError."""
    if url.startswith("s3://"):
        if credentials is None:
            raise UsageError(f"Credentials for {url} are missing; set {KEY_ENV} and {SECRET_ENV}.")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return S3Backend(bucket, prefix, endpoint=endpoint, region=region,
                         access_key=credentials.access_key, secret_key=credentials.secret_key)
    return LocalBackend(Path(unquote(urlsplit(url).path)), create)


def env_credentials() -> Credentials | None:
    key, secret = os.environ.get(KEY_ENV), os.environ.get(SECRET_ENV)
    return Credentials(key, secret) if key and secret else None


def ask_credentials(url: str) -> Credentials:
    """From the environment, else asked for on the terminal."""
    creds = env_credentials()
    if creds:
        return creds
    if not sys.stdin.isatty():
        raise UsageError(f"Credentials for {url} are needed; set {KEY_ENV} and {SECRET_ENV} "
                         "(or run this in a terminal to type them).")
    key = getpass.getpass("Access key: ").strip()
    secret = getpass.getpass("Secret key: ").strip()
    if not key or not secret:
        raise UsageError("Both an access key and a secret key are needed; nothing was changed.")
    return Credentials(key, secret)


class Remotes:
    """The remotes of one home (remotes.toml) and their credentials (the keyring)."""

    def __init__(self, home: Home) -> None:
        self.file = home.config / "remotes.toml"

    def all(self) -> list[Remote]:
        try:
            with open(self.file, "rb") as f:
                return [Remote(name=name, **fields) for name, fields in sorted(tomllib.load(f)["remotes"].items())]
        except FileNotFoundError:
            return []
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{self.file} cannot be read ({e!r}); fix or delete it.") from None

    def get(self, name: str) -> Remote:
        for remote in self.all():
            if remote.name == name:
                return remote
        raise NotFoundError(f"There is no remote named {name!r}; `session-manager remote list` shows them.")

    def pick(self, name: str | None) -> Remote:
        """The remote named ``name``, or the only one there is."""
        if name:
            return self.get(name)
        remotes = self.all()
        if len(remotes) != 1:
            raise UsageError("Name the remote to use; `session-manager remote list` shows them."
                             if remotes else "There is no remote yet; add one with `session-manager remote add`.")
        return remotes[0]

    def add(self, remote: Remote, credentials: Credentials | None = None) -> bool:
        """Add or replace a remote, asking for an S3 remote's credentials (ask_credentials) unless given;
        returns False when they could not go into the keyring (then they come from the environment each time)."""
        if not _NAME_RE.fullmatch(remote.name):
            raise UsageError(f"{remote.name!r} is not a valid remote name; use up to 32 letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit.")
        remote.url = normalize_url(remote.url)
        stored = True
        if remote.is_s3:
            check_endpoint(remote.endpoint, remote.region)
            credentials = credentials or ask_credentials(remote.url)
            try:
                set_secret(_secret_name(remote.name), json.dumps(asdict(credentials)))
            except KeyringUnavailable:
                if env_credentials() != credentials:
                    raise
                stored = False
        elif remote.endpoint or remote.region:
            raise UsageError("--endpoint and --region are for s3:// remotes only.")
        self._write([r for r in self.all() if r.name != remote.name] + [remote])
        return stored

    def remove(self, name: str) -> None:
        self.get(name)
        delete_secret(_secret_name(name))
        self._write([r for r in self.all() if r.name != name])

    def credentials(self, remote: Remote) -> Credentials:
        creds = env_credentials()
        if creds:
            return creds
        stored = get_secret(_secret_name(remote.name))
        if stored:
            try:
                return Credentials(**json.loads(stored))
            except (ValueError, TypeError):
                pass
        raise UsageError(f"No credentials for remote {remote.name!r} are in the keyring; store them with "
                         f"`session-manager remote add {remote.name} {remote.url}` or set {KEY_ENV} and {SECRET_ENV}.")

    def backend(self, remote: Remote, create: bool = True) -> Backend:
        return open_backend(remote.url, remote.endpoint, remote.region,
                            self.credentials(remote) if remote.is_s3 else None, create)

    def source(self, text: str, endpoint: str | None = None, region: str | None = None) -> tuple[Backend, int | None]:
        """(backend, bandwidth limit) of a remote's name or of a URL (credentials: ask_credentials)."""
        for remote in self.all():
            if remote.name == text:
                if endpoint or region:
                    raise UsageError(f"{text} is a remote with its own endpoint; leave out --endpoint and --region.")
                return self.backend(remote, create=False), remote.limit
        url = normalize_url(text)
        return open_backend(url, endpoint, region, ask_credentials(url) if url.startswith("s3://") else None,
                            create=False), None

    def _write(self, remotes: list[Remote]) -> None:
        data = {"remotes": {r.name: {k: v for k, v in asdict(r).items() if k != "name" and v is not None}
                            for r in sorted(remotes, key=lambda r: r.name)}}
        atomic_write(self.file, tomli_w.dumps(data).encode())


def _secret_name(remote: str) -> str:
    return f"remote {remote}"


# -- push, pull, resume ----------------------------------------------------------------------------

def open_remote(home: Home, backend: Backend, passphrase: str | None = None) -> Repository:
    """The repository in a remote, unlocked with this computer's key of it or its passphrase."""
    return Repository.unlock(backend, str(backend), keyfile_for(home.repository), passphrase)


def local_target(home: Home, remote: Repository) -> LocalBackend:
    """This home's repository directory, ready to receive ``remote``'s objects: the same repository, or a
    new or empty one, which takes the remote's identity (its config and keys come with the first copy)."""
    backend = adopt_identity(home, remote.backend.load("config"))
    if backend is None:
        raise RepositoryError(f"This computer's repository ({home.repository}) is another one than the one in "
                              f"{remote.backend} and holds checkpoints; use another --home for that one.")
    return backend


def adopt_identity(home: Home, config: bytes) -> LocalBackend | None:
    """local_target's rule for a repository whose ``config`` is given: this home's repository directory, emptied of
    another identity if it holds no checkpoints; None when it is another repository that holds some."""
    backend = LocalBackend(home.repository)
    try:
        mine = backend.load("config")
    except NotFoundError:
        return backend
    if mine == config:
        return backend
    if any(backend.list("checkpoints/")):
        return None
    for name in [*backend.list("index/"), *backend.list("keys/"), "config"]:  # its packs are garbage for prune
        backend.delete(name)
    return backend


def remote_sessions(repo: Repository) -> dict[str, list[CheckpointInfo]]:
    """Session name -> its checkpoints in ``repo``, oldest first."""
    out: dict[str, list[CheckpointInfo]] = {}
    for c in repo.checkpoints():
        out.setdefault(c.session, []).append(c)
    return dict(sorted(out.items()))


async def resume(engine: Engine, remote: Repository, ckpt: CheckpointInfo, *, limit: int | None = None,
                 transfer: TransferProgress | None = None,
                 progress: Progress = lambda what, fraction: None) -> tuple[Status, Transfer]:
    """Pull what ``ckpt`` needs into this home's repository, then start its session from it: created from
    the checkpoint's config if this home does not have it, else restored (its current state checkpointed first)."""
    engine.require_loadable(ckpt)
    target = local_target(engine.home, remote)
    sent = await asyncio.to_thread(replicate, remote, target, checkpoints=[ckpt.id], limit=limit, progress=transfer)
    local = engine.repo.get(ckpt.id)
    if Session(engine.home, ckpt.session).exists():
        await engine.restore(ckpt.session, local.id, progress=progress)
        return await engine.status(ckpt.session), sent
    return await engine.adopt(local, progress=progress), sent


@dataclass
class Replicator:
    """Continuous replication of this computer's repository to one remote: ``run`` until cancelled; set ``wake``
    after a checkpoint to push it at once."""

    remote: Remote
    run: Callable[[], Awaitable[None]]
    wake: asyncio.Event


def replicators(engine: Engine, on_error: Callable[[str, str], None],
                progress: Callable[[str, Transfer], None] | None = None,
                thin: Callable[[Repository], None] | None = None) -> list[Replicator]:
    """One Replicator per configured remote; a remote that cannot be used (no credentials) is reported and skipped.
    ``thin`` gets each remote's copy after each push (Autosaver.thin_copy: its retention, there too)."""
    remotes, out = Remotes(engine.home), []
    for remote in remotes.all():
        try:
            backend = remotes.backend(remote)
        except SessionManagerError as e:
            on_error(remote.name, f"Not backing up to {remote.name}: {e}")
            continue
        wake = asyncio.Event()

        def failed(e: SessionManagerError, delay: float, name: str = remote.name) -> None:
            on_error(name, f"Backing up to {name} failed ({e}); trying again in {delay:.0f} s, checkpoints are "
                           "kept here meanwhile.")

        def pushed(t: Transfer, name: str = remote.name) -> None:
            if progress is not None:
                progress(name, t)

        out.append(Replicator(remote, functools.partial(
            replicate_forever, engine.repo, backend, limit=remote.limit, wake=wake, on_error=failed,
            progress=pushed, after=thin), wake))
    return out
