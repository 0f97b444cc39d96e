"""`session-manager send NAME PEER`: migrate by checkpoint, for when the other computer is off or far.

The session's latest (or a chosen) checkpoint goes into the paired peer's own repository over its agent
(``serve``), and the peer gets the session, stopped, with that checkpoint as its saved state: `session-manager
start NAME` there resumes it, whenever.  Nothing runs there until then, and the session stays here as it is.

The peer's agent exposes a small object store on its repository directory to paired peers (``repo-*``: just
what store/replicate.py needs), so :func:`replicate` does the copy with all its guarantees (write order, only
the missing objects, only the packs the checkpoint needs).  ``repo-open`` first applies remotes.local_target's
rule there (the same repository, or one holding no checkpoints, which takes our identity) and hands over the
repository's master key, over the paired TLS connection, to be remembered there as any unlocked key is
(keyring, else the key file beside the repository).  ``session-adopt`` then creates the session.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CorruptionError, NotFoundError, PeerError, RepositoryError, UsageError
from ..local.engine import Engine, Status
from ..local.sessions import Session
from ..store import keys as repo_keys
from ..store.backend import AlreadyExistsError, Backend, LocalBackend, NewObject
from ..store.codec import MasterKey
from ..store.replicate import Transfer, TransferProgress, replicate
from ..store.repo import CheckpointInfo
from ..vm.qemu import cannot_load, machine_types
from .agent import Agent, Call, Connection, connect, shown
from .arrivals import ArrivalRules, check_replaceable
from .identity import installation_name
from .peers import Peers
from .remotes import adopt_identity

CHUNK = 512 << 10  # bytes of object data per message (base64 keeps a message under agent.MAX_LINE)
CALL_TIMEOUT = 120.0

_ERRORS: dict[str, type[Exception]] = {"missing": NotFoundError, "exists": AlreadyExistsError,
                                       "corrupt": CorruptionError}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError:
        raise PeerError("A repository request carried malformed data; use the same version of session-manager on "
                        "both computers.") from None


# -- which QEMU runs sessions here: asked before a session or a checkpoint moves ------------------------------

QEMU_INFO = "qemu-info"


async def qemu_info(engine: Engine) -> dict[str, Any]:
    """The answer to QEMU_INFO: the version of the QEMU that would run an arriving session, and its machine types."""
    qemu = engine.qemu
    return {"version": qemu.version_text, "machines": sorted(machine_types(qemu))}


async def require_peer_loads(conn: Connection, written_by: str | None, machine: str, what: str) -> None:
    """Refuse, before anything moves, to send the peer a machine state (saved by QEMU ``written_by`` for ``machine``)
    that its QEMU cannot load."""
    info = await conn.call(QEMU_INFO, timeout=CALL_TIMEOUT)
    try:
        why = cannot_load(str(info["version"]), {str(m) for m in info["machines"]}, written_by, machine)
    except (KeyError, TypeError, ValueError):
        raise PeerError(f"{conn.name} answered {QEMU_INFO} with something malformed; use the same version of "
                        "session-manager on both computers.") from None
    if why:
        raise UsageError(f"{what} cannot run on {conn.name}: {why}; upgrade QEMU there (or set its `qemu` setting), "
                         "and nothing was sent.")


# -- the receiving side: the agent's handlers -------------------------------------------------------------

MAX_UPLOADS = 16  # objects a peer may have half-sent at once (replicate sends WORKERS = 4)
MAX_OBJECT = 64 << 20  # bytes of one object (packs are at most 16 MiB)
_OBJECT_NAME = re.compile(r"(config|(data/[0-9a-f]{2}/|index/|checkpoints/|keys/|locks/)[0-9a-f]{16,64}"
                          r"|annotations/[0-9a-f]{32,64}-[0-9]{1,9})")
_PREFIXES = ("", "data/", "index/", "checkpoints/", "annotations/", "keys/", "locks/")


def _object_name(value: Any) -> str:
    """A repository object's name from a peer: one of the names the repository uses, so never outside it."""
    if not isinstance(value, str) or not _OBJECT_NAME.fullmatch(value):
        raise PeerError(f"A repository request named {shown(value)}, which is not an object of a repository; use "
                        "the same version of session-manager on both computers.")
    return value


def _prefix(value: Any) -> str:
    if value not in _PREFIXES:
        raise PeerError(f"A repository request listed {shown(value)}, which is not a part of a repository; use the "
                        "same version of session-manager on both computers.")
    return str(value)


@dataclass
class _Upload:
    peer: str
    obj: NewObject
    size: int = 0


@dataclass
class CheckpointReceiver:
    """Serves this home's repository directory to paired peers, and adopts the sessions they send.

    What a peer may do here (the agent's table of calls is in agent.py): read objects of the repository, add
    objects it lacks (never replace one: objects are write-once), delete only the lock files it made itself,
    hand over the repository's key only where this computer has none for it, and adopt a session under
    arrivals.py's rules."""

    engine: Engine
    uploads: dict[str, _Upload] = field(default_factory=dict)  # upload id -> the object being written
    locks: set[tuple[str, str]] = field(default_factory=set)  # (peer, lock name) of the locks peers made
    _watches: set[asyncio.Task[None]] = field(default_factory=set)  # drop a half-sent object when its sender goes

    def register(self, agent: Agent) -> None:
        for command, handler in (("repo-open", self.repo_open), ("repo-list", self.repo_list),
                                 ("repo-sizes", self.repo_sizes), ("repo-stat", self.repo_stat),
                                 ("repo-load", self.repo_load), ("repo-save", self.repo_save),
                                 ("repo-delete", self.repo_delete), ("session-adopt", self.session_adopt)):
            agent.register(command, handler)

    @property
    def backend(self) -> LocalBackend:
        return LocalBackend(self.engine.home.repository)

    async def repo_open(self, call: Call) -> dict[str, Any]:
        """Make this repository the caller's (if it is not: only while it holds no checkpoints) and keep its key,
        unless this computer keeps one for it already: then it must be that one."""
        assert call.peer is not None
        home = self.engine.home
        config, raw = _unb64(call.args.get("config")), _unb64(call.args.get("key"))
        try:
            repo_id = str(json.loads(config)["id"])
            key = MasterKey(raw)
        except (ValueError, KeyError, TypeError):
            raise PeerError("The repository request was malformed; use the same version of session-manager on "
                            "both computers.") from None
        where, keyfile = str(home.repository), repo_keys.keyfile_for(home.repository)
        known = await asyncio.to_thread(repo_keys.remembered, repo_id, where, keyfile)
        if known is not None and not hmac.compare_digest(known.raw, key.raw):
            raise RepositoryError(f"{installation_name()} keeps another key for this repository than the one "
                                  f"{call.peer.name} sent, so it took nothing; check that both use the same "
                                  "repository.")
        if await asyncio.to_thread(adopt_identity, home, config) is None:
            raise RepositoryError(f"{installation_name()}'s checkpoint repository ({home.repository}) is another one "
                                  f"than {call.peer.name}'s and holds checkpoints, so it takes none of "
                                  f"{call.peer.name}'s; run `serve` there with another --home, or use a remote.")
        if known is None:
            await asyncio.to_thread(repo_keys.remember, repo_id, key, where, keyfile)
        self.engine._repo = None  # its identity may have changed: opened afresh when next needed
        return {"id": repo_id}

    async def repo_list(self, call: Call) -> list[str]:
        prefix = _prefix(call.args.get("prefix", ""))
        return await asyncio.to_thread(lambda: list(self.backend.list(prefix)))

    async def repo_sizes(self, call: Call) -> dict[str, int]:
        return await asyncio.to_thread(self.backend.sizes, _prefix(call.args.get("prefix", "")))

    async def repo_stat(self, call: Call) -> dict[str, Any]:
        return await self._answer(self.backend.stat, _object_name(call.args.get("name")))

    async def repo_load(self, call: Call) -> dict[str, Any]:
        name, offset, length = _object_name(call.args.get("name")), call.args.get("offset") or 0, \
            call.args.get("length") or CHUNK
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (offset, length)):
            raise PeerError("A repository request asked for a malformed range; use the same version of "
                            "session-manager on both computers.")
        return await self._answer(lambda: _b64(self.backend.load(name, offset, min(length, CHUNK))))

    async def repo_save(self, call: Call) -> dict[str, Any]:
        """One piece of an object (``upload`` names it, from the first piece on); ``name`` with the last one.  A
        new object only: one that exists is not replaced.  Half-sent objects go when the connection ends."""
        assert call.peer is not None
        peer = call.peer.name
        data, upload, name = _unb64(call.args.get("data")), call.args.get("upload"), call.args.get("name")
        if name is not None:
            name = _object_name(name)
            if name.startswith("keys/"):
                raise PeerError(f"{installation_name()} takes no keys for its repository from {peer}; it keeps the "
                                "master key repo-open handed over.")
            if name.startswith("locks/"):
                self.locks.add((peer, name))
        if upload is None and name is not None:  # the whole object at once
            return await self._answer(self.backend.save, name, data)
        upload = str(upload)[:64]
        if upload not in self.uploads:
            if sum(u.peer == peer for u in self.uploads.values()) >= MAX_UPLOADS:
                raise PeerError(f"{peer} has {MAX_UPLOADS} objects half-sent here already; finish those first.")
            self.uploads[upload] = _Upload(peer, await asyncio.to_thread(self.backend.create))
            watch = asyncio.ensure_future(self._drop_when_closed(upload, peer, call.closed))
            self._watches.add(watch)
            watch.add_done_callback(self._watches.discard)
        current = self.uploads[upload]
        if current.peer != peer:
            raise PeerError("That upload belongs to another peer; send the object again.")
        try:
            current.size += len(data)
            if current.size > MAX_OBJECT:
                raise PeerError(f"An object from {peer} grew past {MAX_OBJECT >> 20} MiB, more than any repository "
                                "object is; it was dropped.")
            await asyncio.to_thread(current.obj.write, data)
            if name is None:
                return {"result": None}
            del self.uploads[upload]
            return await self._answer(current.obj.finish, name)
        except BaseException:
            self._drop(upload, peer)
            raise

    async def _drop_when_closed(self, upload: str, peer: str, closed: asyncio.Event) -> None:
        await closed.wait()
        self._drop(upload, peer)

    def _drop(self, upload: str, peer: str) -> None:
        current = self.uploads.get(upload)
        if current is not None and current.peer == peer:
            del self.uploads[upload]
            current.obj.abort()

    async def repo_delete(self, call: Call) -> None:
        """Only the caller's own lock files go; a stale lock of someone else's it would clean up stays."""
        assert call.peer is not None
        name = _object_name(call.args.get("name"))
        if (call.peer.name, name) in self.locks:
            self.locks.discard((call.peer.name, name))
            await asyncio.to_thread(self.backend.delete, name)
        elif not name.startswith("locks/"):
            raise PeerError(f"{installation_name()} deletes nothing of its repository for {call.peer.name}.")

    @staticmethod
    async def _answer(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        """``{"result": ...}``, or the kind of a repository error the caller's code handles (missing, ...)."""
        try:
            return {"result": await asyncio.to_thread(fn, *args)}
        except (NotFoundError, AlreadyExistsError, CorruptionError) as e:
            kind = next(k for k, cls in _ERRORS.items() if isinstance(e, cls))
            return {"kind": kind, "message": str(e)}

    async def session_adopt(self, call: Call) -> dict[str, Any]:
        """Make the checkpoint's session exist here, stopped, with it as its saved state (`start` resumes it)."""
        assert call.peer is not None
        engine, peer = self.engine, call.peer.name
        ref = str(call.args.get("checkpoint"))
        ckpt = await asyncio.to_thread(engine.repo.get, ref)
        if ckpt.id != ref:
            raise PeerError("session-adopt names a checkpoint by its whole id; use the same version of "
                            "session-manager on both computers.")
        config = ArrivalRules.of(engine.home).config(ckpt.meta.config, peer)
        if config.name != ckpt.session:
            raise PeerError(f"Checkpoint {ckpt.id[:8]} names two sessions; it cannot be adopted.")
        engine.require_loadable(ckpt)
        session = Session(engine.home, ckpt.session)
        async with engine._locked(session):
            check_replaceable(session, peer)
            if not session.exists():
                return _status(await engine.adopt(ckpt, start=False, config=config, arrived_from=peer))
            if engine.sockets(session).pid() is not None:
                raise UsageError(f"Session {ckpt.session!r} is running on {installation_name()}; stop it there "
                                 "first, then send it again.")
            state = session.load_state()
            state.head = state.saved = ckpt.id
            state.moved_to = state.running_boot = None
            state.arrived_from = peer
            session.save_state(state)
        return _status(await engine.status(session.name))


def _status(st: Status) -> dict[str, Any]:
    return asdict(st)


# -- the sending side ---------------------------------------------------------------------------------------

class AgentBackend(Backend):
    """A peer's repository directory, through its agent (CheckpointReceiver) over one connection.

    Its methods are synchronous, for replicate()'s worker threads: each runs its call on ``loop``, the event
    loop that owns ``conn`` (never call them from that loop's thread), one call at a time."""

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.conn, self.loop = conn, loop
        self._lock = asyncio.Lock()

    def __str__(self) -> str:
        return f"{self.conn.name}'s repository"

    async def _call_async(self, command: str, **args: Any) -> Any:
        async with self._lock:
            return await self.conn.call(command, timeout=CALL_TIMEOUT, **args)

    def _call(self, command: str, **args: Any) -> Any:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            raise RuntimeError("AgentBackend is used from its event loop's thread; use a worker thread")
        return asyncio.run_coroutine_threadsafe(self._call_async(command, **args), self.loop).result(
            CALL_TIMEOUT + 10)

    def _checked(self, command: str, **args: Any) -> Any:
        reply = self._call(command, **args)
        if "kind" in reply:
            raise _ERRORS.get(reply["kind"], RepositoryError)(reply["message"])
        return reply["result"]

    def save(self, name: str, data: bytes) -> None:
        if len(data) <= CHUNK:
            self._checked("repo-save", name=name, data=_b64(data))
            return
        upload = secrets.token_hex(16)
        for start in range(0, len(data), CHUNK):
            last = start + CHUNK >= len(data)
            self._checked("repo-save", upload=upload, data=_b64(data[start:start + CHUNK]),
                          **({"name": name} if last else {}))

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if length is None:
            length = self.stat(name) - offset
        parts = []
        for start in range(offset, offset + length, CHUNK):
            size = min(CHUNK, offset + length - start)
            part = base64.b64decode(self._checked("repo-load", name=name, offset=start, length=size))
            parts.append(part)
            if len(part) < size:
                break
        data = b"".join(parts)
        if len(data) != length:
            raise CorruptionError(f"The repository object {name} on {self.conn.name} is shorter than expected; run "
                                  "`session-manager check` there.")
        return data

    def list(self, prefix: str) -> Iterator[str]:
        return iter(self._call("repo-list", prefix=prefix))

    def delete(self, name: str) -> None:
        self._call("repo-delete", name=name)

    def stat(self, name: str) -> int:
        return int(self._checked("repo-stat", name=name))

    def sizes(self, prefix: str) -> dict[str, int]:
        return {str(k): int(v) for k, v in self._call("repo-sizes", prefix=prefix).items()}


@dataclass
class Sent:
    checkpoint: CheckpointInfo
    transfer: Transfer
    status: dict[str, Any]  # the session's status on the peer


async def send(engine: Engine, name: str, peer_name: str, ref: str | None = None,
               progress: TransferProgress | None = None) -> Sent:
    """Copy what checkpoint ``ref`` (default: the session's latest) needs into the peer's repository, with the
    repository's key, and make the session exist there, stopped, resuming from it on `start`."""
    session = engine.session(name)
    peer = Peers(engine.home).get(peer_name)
    if ref:
        ckpt = engine.find_checkpoint(session, ref)
    else:
        ckpts = engine.checkpoints(name)
        if not ckpts:
            raise UsageError(f"Session {name!r} has no checkpoint to send; take one with `session-manager checkpoint "
                             f"{name}` (or stop it, which saves one).")
        ckpt = ckpts[-1]
    async with connect(engine.home, peer) as conn:
        await require_peer_loads(conn, ckpt.meta.qemu, engine.config_of(ckpt).machine,
                                 f"Checkpoint {ckpt.id[:8]} of {name}")
        sent = await _copy(engine, conn, [ckpt.id], progress)
        status = await conn.call("session-adopt", timeout=CALL_TIMEOUT, checkpoint=ckpt.id)
    return Sent(ckpt, sent, status)


async def send_history(engine: Engine, name: str, peer_name: str, progress: TransferProgress | None = None) -> Transfer:
    """Copy every checkpoint of a session to the peer's repository (after a live migration: its timeline there)."""
    ids = [c.id for c in engine.checkpoints(name)]
    async with connect(engine.home, Peers(engine.home).get(peer_name)) as conn:
        return await _copy(engine, conn, ids, progress)


async def _copy(engine: Engine, conn: Connection, ids: list[str], progress: TransferProgress | None) -> Transfer:
    repo = engine.repo
    stop = threading.Event()
    await conn.call("repo-open", timeout=CALL_TIMEOUT, config=_b64(repo.backend.load("config")),
                    key=_b64(repo.master.raw))
    try:
        return await asyncio.to_thread(replicate, repo, AgentBackend(conn, asyncio.get_running_loop()),
                                       checkpoints=ids, progress=progress, stop=stop, keys=False)
    finally:
        stop.set()
