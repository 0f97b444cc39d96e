"""`session-manager migrate NAME PEER`: move a running session to a paired peer, live (vm/migrate.py).

The source (the CLI) holds the session's lock throughout and talks to the peer's agent (``serve``):

    migrate-in      the peer creates the session (its config, a blank disk of the same size as its only layer),
                    launches QEMU waiting for the state, paused, and answers the ports it listens on (TLS, pinned
                    to our certificate)
    (Migration.run) disk and memory go over; the source's guest ends stopped, the peer's waits paused
    migrate-finish  the peer continues the guest and marks the session running there; only then does the source
                    quit its QEMU and record that the session runs on the peer.  With post-copy the source
                    calls it as soon as the guest switched over, while the rest of memory follows
    migrate-abort   on any failure before that: the peer kills its QEMU and removes the half-made session (and
                    puts back a stopped session of that name it replaced); the source runs on.  The peer does
                    the same by itself when the source's connection ends before migrate-finish (the source
                    died, or the link is gone: TCP keepalive notices within seconds)

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

from ..errors import PeerError, SessionManagerError, UsageError
from ..files import atomic_write
from ..local.engine import Engine
from ..local.sessions import Session
from ..paths import make_private_dir, valid_name
from ..units import size_text
from ..vm import disk as vdisk
from ..vm.machine import Machine, RunState, node_name
from ..vm.migrate import (
    UNLIMITED_BANDWIDTH,
    Migration,
    MigrationError,
    MigrationProgress,
    MigrationResult,
    ProgressCallback,
    finish_incoming,
    prepare_incoming,
    resume_source,
)
from .agent import Agent, Call, Connection, connect
from .arrivals import ArrivalRules, check_replaceable
from .handover import DISPLAY, serve_display
from .identity import TLS_HOSTNAME, installation_name, load_identity, write_qemu_tls_dir
from .peers import Peer, Peers, parse_address
from .send import QEMU_INFO, qemu_info, require_peer_loads, send_history

log = logging.getLogger(__name__)

CALL_TIMEOUT = 120.0  # seconds for the peer to prepare or finish
ABORT_TIMEOUT = 15.0  # seconds for it to abort (it also aborts by itself once our connection ends)
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
    watch: asyncio.Task[None] | None = None  # aborts it when the source's connection ends before migrate-finish
    finishing: bool = False  # migrate-finish is under way: it ends the migration one way or the other


@dataclass
class Receiver:
    engine: Engine
    pending: dict[str, _Incoming] = field(default_factory=dict)
    _arrivals: set[asyncio.Task[dict[str, bool]]] = field(default_factory=set)

    def register(self, agent: Agent) -> None:
        agent.register("migrate-in", self.migrate_in)
        agent.register("migrate-finish", self.migrate_finish)
        agent.register("migrate-abort", self.migrate_abort)
        agent.register(QEMU_INFO, lambda call: qemu_info(self.engine))
        agent.register(DISPLAY, lambda call: serve_display(self.engine, self.pending, call))  # after the move

    async def migrate_in(self, call: Call) -> dict[str, int]:
        assert call.peer is not None
        config = ArrivalRules.of(self.engine.home).config(call.args.get("config"), call.peer.name)
        disk_size, postcopy = call.args.get("disk_size"), call.args.get("postcopy", False)
        if not isinstance(disk_size, int) or isinstance(disk_size, bool) or disk_size <= 0 \
                or not isinstance(postcopy, bool):
            raise PeerError("The migration request was malformed; use the same version of session-manager on both "
                            "computers.")
        name = config.name
        session = Session(self.engine.home, name)
        if name in self.pending:  # a migration of it that its source gave up on
            if self.pending[name].peer != call.peer.name:
                raise UsageError(f"Session {name!r} is arriving on {installation_name()} from another computer now.")
            await self._abort(self.pending[name])
        check_replaceable(session, call.peer.name)
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(self.engine._locked(session))
        replaced = None
        try:
            check_replaceable(session, call.peer.name)  # again, now that it is ours
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
            await self.engine.receive(config, disk_size, f"live migration from {call.peer.name}", call.peer.name)
            incoming = _Incoming(session, call.peer.name, stack, replaced)
            self.pending[name] = incoming
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
                                       tls_dir=tls, disk_node=node_name(session.load_state().active_layer),
                                       postcopy=postcopy)
        except BaseException:
            await self._abort(incoming)
            raise
        incoming.watch = asyncio.ensure_future(self._abort_when_gone(incoming, call.closed))
        log.info("waiting for session %s from %s on ports %d and %d", name, call.peer.name, nbd_port, migrate_port)
        ports = {"nbd_port": nbd_port, "migrate_port": migrate_port}
        await call.send(ports)
        return ports

    async def migrate_finish(self, call: Call) -> dict[str, bool]:
        incoming = self._pending(call)
        if incoming.finishing:
            raise UsageError(f"Session {incoming.session.name!r} is already being started here.")
        incoming.finishing = True
        # It goes on if the source's connection breaks meanwhile: once the state is here the guest must run
        # here (the source may have quit its QEMU), and without it the arrival aborts itself.
        arrival = asyncio.ensure_future(self._arrive(incoming))
        self._arrivals.add(arrival)
        arrival.add_done_callback(self._arrived)
        return await asyncio.shield(arrival)

    async def _arrive(self, incoming: _Incoming) -> dict[str, bool]:
        session = incoming.session
        arrived = False

        def running() -> None:  # the guest runs here now: from here on nothing kills it
            nonlocal arrived
            if self.pending.get(session.name) is not incoming:
                raise MigrationError("The migration was aborted while the session was being started.")
            arrived = True
            del self.pending[session.name]
            self.engine._set_running(session, True)

        try:
            async with Machine.connect(self.engine.sockets(session)) as m:
                await finish_incoming(m, running=running)
                await self.engine._note_live_support(m, session)
        except BaseException:
            if not arrived:
                await self._abort(incoming)
            raise
        finally:
            if arrived:
                if incoming.watch is not None:
                    incoming.watch.cancel()
                shutil.rmtree(self._tls_path(session), ignore_errors=True)
                if incoming.replaced is not None:
                    shutil.rmtree(incoming.replaced, ignore_errors=True)
                await incoming.stack.aclose()
        log.info("session %s arrived from %s and runs here", session.name, incoming.peer)
        await self.engine.set_clock(session)
        return {"running": True}

    def _arrived(self, arrival: asyncio.Task[dict[str, bool]]) -> None:
        self._arrivals.discard(arrival)
        if not arrival.cancelled() and arrival.exception() is not None:
            log.warning("a session did not arrive: %s", arrival.exception())

    async def migrate_abort(self, call: Call) -> dict[str, bool]:
        """Kill a half-made incoming session; answers whether the session runs here all the same (a finish
        whose answer the source never got), so that the source resumes its guest only when it does not."""
        assert call.peer is not None
        name = call.args.get("name")
        if not isinstance(name, str) or not valid_name(name):
            raise PeerError("The migration request was malformed; use the same version of session-manager on both "
                            "computers.")
        if name in self.pending:
            await self._abort(self._pending(call))
        session = Session(self.engine.home, name)
        return {"running_here": session.exists() and session.load_state().arrived_from == call.peer.name
                and self.engine.sockets(session).pid() is not None}

    def _pending(self, call: Call) -> _Incoming:
        incoming = self.pending.get(str(call.args.get("name")))
        if incoming is None or call.peer is None or incoming.peer != call.peer.name:
            raise UsageError(f"No migration of session {str(call.args.get('name'))[:48]!r} from "
                             f"{call.peer.name if call.peer else '?'} is under way here; start it again.")
        return incoming

    async def _abort_when_gone(self, incoming: _Incoming, closed: asyncio.Event) -> None:
        await closed.wait()
        if self.pending.get(incoming.session.name) is incoming and not incoming.finishing:
            log.warning("the source of session %s (%s) went away during the migration", incoming.session.name,
                        incoming.peer)
            await self._abort(incoming)

    async def _abort(self, incoming: _Incoming) -> None:
        """Undo a half-made incoming session (once: later calls do nothing)."""
        session = incoming.session
        if self.pending.get(session.name) is not incoming:
            return
        del self.pending[session.name]
        if incoming.watch is not None and incoming.watch is not asyncio.current_task():
            incoming.watch.cancel()
        try:
            await self.engine._kill(self.engine.sockets(session))
            session.remove()
            if incoming.replaced is not None:
                incoming.replaced.rename(session.dir)
        finally:
            await incoming.stack.aclose()
        log.info("the migration of session %s from %s was aborted", session.name, incoming.peer)

    def _tls_path(self, session: Session) -> Path:
        return session.runtime / "migrate-tls"

    def _tls_dir(self, session: Session, peer: Peer) -> Path:
        path = self._tls_path(session)
        shutil.rmtree(path, ignore_errors=True)
        return write_qemu_tls_dir(path, load_identity(self.engine.home), peer.certificate.encode(), "server")


# -- the source ------------------------------------------------------------------------------------------

async def migrate(engine: Engine, name: str, peer_name: str, say: Callable[[str], None],
                  progress: ProgressCallback | None = None, *, postcopy: bool = False,
                  limit: int | None = None) -> MigrationResult:
    """Live-migrate the running session ``name`` to the paired peer ``peer_name``; ``say`` gets a line per step,
    ``progress`` QEMU's figures about twenty times a second (``describe`` words them).

    On failure the session runs on here (and the peer has nothing of it); on success its QEMU here is gone and
    its state says it runs on the peer.  With ``postcopy`` the guest switches to the peer after two memory
    passes and the rest of its memory follows on demand: for guests that change memory faster than the link
    carries it, at a price: if the link breaks after the switch, neither side can go on and the session is
    back at its latest checkpoint (`recover`).  ``limit`` caps the bytes per second of the disk copy and of the
    memory copy (else they take what the link gives)."""
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
        mark = engine.migration_mark(session)
        atomic_write(mark, peer.name.encode())
        try:
            async with connect(home, peer) as conn:
                await require_peer_loads(conn, engine.running_qemu(session)[0], config.machine, f"Session {name}")
                say(f"Preparing {peer.name} to receive {name}")
                ports = await conn.call("migrate-in", timeout=CALL_TIMEOUT, name=name, config=asdict(config),
                                        disk_size=disk_size, postcopy=postcopy)
                handed_over = False
                try:
                    async with Machine.connect(sockets) as m:
                        mig = Migration(
                            m, dest_host=parse_address(peer.address)[0], nbd_port=int(ports["nbd_port"]),
                            migrate_port=int(ports["migrate_port"]), tls_dir=tls, tls_hostname=TLS_HOSTNAME,
                            postcopy=postcopy, max_bandwidth=limit or UNLIMITED_BANDWIDTH, mirror_speed=limit or 0,
                            progress=progress or (lambda p: None))
                        result, handed_over = await _run(mig, conn, name, peer.name, say)
                        state = session.load_state()
                        state.moved_to, state.running_boot = peer.name, None  # stopped on purpose: not a crash
                        session.save_state(state)
                        await m.quit()
                finally:
                    if not handed_over:
                        with contextlib.suppress(PeerError, OSError):
                            await conn.call("migrate-abort", timeout=ABORT_TIMEOUT, name=name)
        finally:
            shutil.rmtree(tls, ignore_errors=True)
            mark.unlink(missing_ok=True)
    say(f"Copying the checkpoints of {name} to {peer.name}")
    try:  # the session runs there already: its history following is a bonus that can be redone
        sent = await send_history(engine, name, peer.name)
        say(f"  {sent.objects_done} objects")
    except SessionManagerError as e:
        say(f"The checkpoints of {name} stay here ({e}); `session-manager send {name} {peer.name}` copies the "
            "latest later.")
    return result


async def _run(mig: Migration, conn: Connection, name: str, peer: str,
               say: Callable[[str], None]) -> tuple[MigrationResult, bool]:
    """Copy the session and start it at the peer; Ctrl-C (SIGINT) cancels until the switch.  Returns the result
    and whether the peer runs the guest now (else it raises: the guest runs on here, or, after a post-copy
    switch, nowhere)."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, mig.cancel)
    copying = asyncio.ensure_future(mig.run())
    switched = asyncio.ensure_future(mig.postcopy_started.wait())
    try:
        await asyncio.wait({copying, switched}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        copying.cancel()
        await asyncio.gather(copying, return_exceptions=True)
        raise
    finally:
        switched.cancel()
        loop.remove_signal_handler(signal.SIGINT)
    if mig.postcopy_started.is_set() and not copying.done():
        say(f"Starting {name} on {peer}; the rest of its memory follows")
        try:  # the guest runs there from the switch on: whatever fails now, it cannot come back here
            await asyncio.gather(conn.call("migrate-finish", name=name), copying)
        except (PeerError, MigrationError) as e:
            raise MigrationError(f"The link to {peer} failed after {name} switched over to it (post-copy): {e} "
                                 f"If {name} does not run there, `session-manager recover {name}` restores its "
                                 "latest checkpoint here.") from e
        return copying.result(), True
    result = copying.result()  # pre-copy: raises if it failed (the guest runs on here)
    say(f"Starting {name} on {peer}")
    try:
        await conn.call("migrate-finish", timeout=CALL_TIMEOUT, name=name)
        return result, True
    except BaseException:
        # The guest goes on here only once the peer says it does not run it: never twice.
        answer: dict[str, Any] = {}
        with contextlib.suppress(PeerError, OSError):
            answer = await conn.call("migrate-abort", timeout=ABORT_TIMEOUT, name=name)
        if answer.get("running_here") is True:
            return result, True  # it started there; only its answer was lost
        if answer.get("running_here") is not False:
            raise PeerError(f"Could not confirm whether {peer} took over {name}, so it stays paused here and never "
                            f"runs twice; check {peer}, and if it does not run {name} there, `session-manager "
                            f"start {name}` continues it here.") from None
        await resume_source(mig.machine)  # the peer did not take over: the guest goes on here
        raise


def describe(p: MigrationProgress, peer: str) -> str:
    """One line for the user about where a migration is."""
    if p.phase == "disk":
        share = f"{p.fraction:.0%} " if p.fraction >= 0 else ""
        return f"Copying the disk to {peer}: {share}({size_text(p.disk_done)} of {size_text(p.disk_total)})"
    if p.phase == "memory":
        slowed = f", guest slowed {p.throttle_percent} %" if p.throttle_percent else ""
        return (f"Copying memory, pass {p.passes}: {size_text(p.ram_remaining)} left at {p.mbps:.0f} Mbit/s, the "
                f"guest changes {size_text(p.dirty_rate)}/s, expected pause {p.expected_downtime_ms} ms{slowed}")
    if p.phase == "postcopy":
        return f"Running on {peer}; {size_text(p.ram_remaining)} of memory still follows (post-copy)"
    return {"connecting": f"Connecting to {peer}", "switchover": "Switching over: the session is paused",
            "completed": f"Copied to {peer}"}.get(p.phase, p.phase)
