"""`session-manager migrate NAME PEER`: move a running session to a paired peer, live (vm/migrate.py).

The source (the CLI) holds the session's lock throughout and talks to the peer's agent (``serve``):

    migrate-in      the peer creates the session (its config, a blank disk of the same size as its only layer),
                    launches QEMU waiting for the state, paused, and answers the ports it listens on (TLS, pinned
                    to our certificate)
    (Migration.run) disk and memory go over; the source's guest ends stopped, the peer's waits paused
    migrate-finish  the peer continues the guest and marks the session running there; only then does the source
                    quit its QEMU and record that the session runs on the peer
    migrate-abort   on any failure before that: the peer kills its QEMU and removes the half-made session (and
                    puts back a stopped session of that name it replaced); the source runs on

Afterwards the session's checkpoints are copied to the peer's repository (checkpoint_migration), so its
timeline goes with it; the session there starts a new branch from the migrated state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .agent import Agent, Call, connect
from .checkpoint_migration import send_history
from .engine import Engine
from .errors import PeerError, SessionManagerError, UsageError
from .identity import TLS_HOSTNAME, installation_name, load_identity, write_qemu_tls_dir
from .paths import make_private_dir
from .peers import Peer, Peers, parse_address
from .sessions import Session, SessionConfig
from .vm import disk as vdisk
from .vm.machine import Machine, RunState, node_name
from .vm.migrate import Migration, MigrationProgress, MigrationResult, finish_incoming, prepare_incoming, resume_source

log = logging.getLogger(__name__)

CALL_TIMEOUT = 120.0  # seconds for the peer to prepare, finish or abort
LISTEN_HOST = "0.0.0.0"  # the peer's QEMU listens here; TLS with the pinned certificates keeps strangers out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LISTEN_HOST, 0))
        return int(s.getsockname()[1])


# -- the destination: the agent's handlers ------------------------------------------------------------------

@dataclass
class _Incoming:
    session: Session
    peer: str
    stack: contextlib.AsyncExitStack  # holds the session's lock until finish or abort
    replaced: Path | None  # where a stopped session of the same name waits to be put back on abort


@dataclass
class Receiver:
    engine: Engine
    pending: dict[str, _Incoming] = field(default_factory=dict)

    def register(self, agent: Agent) -> None:
        agent.register("migrate-in", self.migrate_in)
        agent.register("migrate-finish", self.migrate_finish)
        agent.register("migrate-abort", self.migrate_abort)

    async def migrate_in(self, call: Call) -> dict[str, int]:
        assert call.peer is not None
        try:
            config = SessionConfig(**call.args["config"])
            disk_size = int(call.args["disk_size"])
        except (KeyError, TypeError, ValueError):
            raise PeerError("The migration request was malformed; use the same version of session-manager on both "
                            "computers.") from None
        name = config.name
        if name in self.pending:  # a migration of it that its source gave up on
            await self._abort(name)
        config.base_image = config.base_format = None  # the disk arrives whole, flattened into one layer
        session = Session(self.engine.home, name)
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(self.engine._locked(session))
        replaced = None
        try:
            if session.exists():
                sockets = self.engine.sockets(session)
                if sockets.pid() is not None:
                    async with Machine.connect(sockets) as m:
                        if await m.status() != RunState.INMIGRATE:
                            raise UsageError(f"A session named {name!r} is running on {installation_name()}; stop "
                                             "or delete it there first.")
                    await self.engine._kill(sockets)  # a leftover of a migration that never finished
                    session.remove()
                else:  # stopped here (e.g. migrated away before): replaced, but kept until the migration is done
                    replaced = make_private_dir(self.engine.home.data / "replaced") / name
                    shutil.rmtree(replaced, ignore_errors=True)
                    session.dir.rename(replaced)
            await self.engine.receive(config, disk_size, f"live migration from {call.peer.name}")
            self.pending[name] = _Incoming(session, call.peer.name, stack, replaced)
        except BaseException:
            if replaced is not None and not session.dir.exists():
                replaced.rename(session.dir)
            await stack.aclose()
            raise
        try:
            tls = self._tls_dir(session, call.peer)
            nbd_port, migrate_port = _free_port(), _free_port()
            async with Machine.connect(self.engine.sockets(session)) as m:
                await prepare_incoming(m, listen_host=LISTEN_HOST, nbd_port=nbd_port, migrate_port=migrate_port,
                                       tls_dir=tls, disk_node=node_name(session.load_state().active_layer))
        except BaseException:
            await self._abort(name)
            raise
        log.info("waiting for session %s from %s on ports %d and %d", name, call.peer.name, nbd_port, migrate_port)
        ports = {"nbd_port": nbd_port, "migrate_port": migrate_port}
        await call.send(ports)
        return ports

    async def migrate_finish(self, call: Call) -> dict[str, Any]:
        incoming = self._pending(call)
        session = incoming.session
        try:
            async with Machine.connect(self.engine.sockets(session)) as m:
                await finish_incoming(m)
                await self.engine._note_live_support(m, session)
            self.engine._set_running(session, True)
        except BaseException:
            await self._abort(session.name)
            raise
        del self.pending[session.name]
        shutil.rmtree(self._tls_path(session), ignore_errors=True)
        if incoming.replaced is not None:
            shutil.rmtree(incoming.replaced, ignore_errors=True)
        await incoming.stack.aclose()
        log.info("session %s arrived from %s and runs here", session.name, incoming.peer)
        return {"running": True}

    async def migrate_abort(self, call: Call) -> dict[str, bool]:
        """Kill a half-made incoming session; answers whether the session runs here all the same (a finish
        whose answer the source never got), so that the source resumes its guest only when it does not."""
        name = str(call.args.get("name"))
        if name in self.pending:
            self._pending(call)
            await self._abort(name)
        session = Session(self.engine.home, name)
        return {"running_here": session.exists() and self.engine.sockets(session).pid() is not None}

    def _pending(self, call: Call) -> _Incoming:
        incoming = self.pending.get(str(call.args.get("name")))
        if incoming is None or call.peer is None or incoming.peer != call.peer.name:
            raise UsageError(f"No migration of session {call.args.get('name')!r} from "
                             f"{call.peer.name if call.peer else '?'} is under way here; start it again.")
        return incoming

    async def _abort(self, name: str) -> None:
        incoming = self.pending.pop(name)
        session = incoming.session
        try:
            await self.engine._kill(self.engine.sockets(session))
            session.remove()
            if incoming.replaced is not None:
                incoming.replaced.rename(session.dir)
        finally:
            await incoming.stack.aclose()
        log.info("the migration of session %s from %s was aborted", name, incoming.peer)

    def _tls_path(self, session: Session) -> Path:
        return session.runtime / "migrate-tls"

    def _tls_dir(self, session: Session, peer: Peer) -> Path:
        path = self._tls_path(session)
        shutil.rmtree(path, ignore_errors=True)
        return write_qemu_tls_dir(path, load_identity(self.engine.home), peer.certificate.encode(), "server")


# -- the source ------------------------------------------------------------------------------------------

async def migrate(engine: Engine, name: str, peer_name: str, say: Callable[[str], None]) -> MigrationResult:
    """Live-migrate the running session ``name`` to the paired peer ``peer_name``; ``say`` gets a line per phase.

    On failure the session runs on here (and the peer has nothing of it); on success its QEMU here is gone and
    its state says it runs on the peer."""
    session = engine.session(name)
    peer = Peers(engine.home).get(peer_name)
    home = engine.home
    async with engine._locked(session):
        sockets = engine.sockets(session)
        if sockets.pid() is None:
            raise UsageError(f"Session {name!r} is not running here; start it first (only a running session "
                             "migrates).")
        config, state = session.load_config(), session.load_state()
        disk_size = int(vdisk.image_info(session.layer_path(state.active_layer))["virtual-size"])
        tls = session.runtime / "migrate-tls"
        shutil.rmtree(tls, ignore_errors=True)
        write_qemu_tls_dir(tls, load_identity(home), peer.certificate.encode(), "client")
        try:
            async with connect(home, peer) as conn:
                say(f"Preparing {peer.name} to receive {name}")
                ports = await conn.call("migrate-in", timeout=CALL_TIMEOUT, name=name, config=asdict(config),
                                        disk_size=disk_size)
                finished = False
                try:
                    async with Machine.connect(sockets) as m:
                        result = await _run(Migration(
                            m, dest_host=parse_address(peer.address)[0], nbd_port=int(ports["nbd_port"]),
                            migrate_port=int(ports["migrate_port"]), tls_dir=tls, tls_hostname=TLS_HOSTNAME), say)
                        say(f"Starting {name} on {peer.name}")
                        try:
                            await conn.call("migrate-finish", timeout=CALL_TIMEOUT, name=name)
                        except BaseException:
                            # The guest goes on here only once the peer says it does not run it: never twice.
                            answer: dict[str, Any] = {}
                            with contextlib.suppress(PeerError, OSError, TimeoutError):
                                answer = await conn.call("migrate-abort", timeout=CALL_TIMEOUT, name=name)
                            if answer.get("running_here") is not False:
                                raise PeerError(
                                    f"Could not confirm whether {peer.name} took over {name}, so it stays paused "
                                    f"here and never runs twice; check {peer.name}, and if it does not run "
                                    f"{name} there, `session-manager start {name}` continues it here.") from None
                            await resume_source(m)  # the peer did not take over: the guest goes on here
                            raise
                        finished = True
                        await m.quit()
                finally:
                    if not finished:
                        with contextlib.suppress(PeerError, OSError):
                            await conn.call("migrate-abort", timeout=CALL_TIMEOUT, name=name)
        finally:
            shutil.rmtree(tls, ignore_errors=True)
        state = session.load_state()
        state.moved_to, state.running_boot = peer.name, None  # stopped on purpose: not a crash
        session.save_state(state)
    say(f"Copying the checkpoints of {name} to {peer.name}")
    try:  # the session runs there already: its history following is a bonus that can be redone
        sent = await send_history(engine, name, peer.name)
        say(f"  {sent.objects_done} objects")
    except SessionManagerError as e:
        say(f"The checkpoints of {name} stay here ({e}); `session-manager send {name} {peer.name}` copies the "
            "latest later.")
    return result


async def _run(mig: Migration, say: Callable[[str], None]) -> MigrationResult:
    """Run a migration, a line per phase; Ctrl-C (SIGINT) cancels it (the session runs on here)."""
    phase = ""

    def progress(p: MigrationProgress) -> None:
        nonlocal phase
        if p.phase != phase:
            phase = p.phase
            say(f"  {phase}")

    mig.progress = progress
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, mig.cancel)
    try:
        return await mig.run()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
