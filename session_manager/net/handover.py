"""Hand-over: after a live migration the source's window can follow the session to the peer that runs it now.

The peer's agent answers ``display`` (paired peers only) for a session that runs there and then relays the rest
of the connection to the session's VNC socket (``Call.relay``, agent.py): the screen travels inside the agent's
mutual TLS, with no port of its own.  :func:`open_display` is the source's side: an RfbClient over that tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Container
from pathlib import Path

from ..errors import NotFoundError, UsageError
from ..local.engine import Engine
from ..local.sessions import Session
from ..paths import Home, valid_name
from ..rfb import RfbClient
from .agent import TIMEOUT, Call, connect
from .identity import installation_name
from .peers import Peers

log = logging.getLogger(__name__)

DISPLAY = "display"
CHUNK = 1 << 16


async def serve_display(engine: Engine, arriving: Container[str], call: Call) -> dict[str, str]:
    """The agent's ``display``: if the session ``name`` came here from the caller and runs here (and is not one still
    ``arriving`` by a migration), relay the connection to its VNC socket.  Other sessions, ours or another peer's, are
    not the caller's to see: they get the same answer as a session that does not exist."""
    assert call.peer is not None
    name = call.args.get("name")
    session = Session(engine.home, name) if isinstance(name, str) and valid_name(name) else None
    if session is None or not session.exists() or session.load_state().arrived_from != call.peer.name:
        raise NotFoundError(f"{installation_name()} has no session named {str(name)[:48]!r} from {call.peer.name}.")
    vnc = engine.sockets(session).vnc
    if session.name in arriving or engine.sockets(session).pid() is None:
        raise UsageError(f"Session {session.name!r} does not run on {installation_name()} now, so its screen "
                         "cannot be shown from there.")
    peer = call.peer.name

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        log.info("showing the screen of session %s to %s", session.name, peer)
        await _relay(reader, writer, vnc)
        log.info("%s no longer shows the screen of session %s", peer, session.name)

    call.relay = relay
    return {"session": session.name}


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, vnc: Path) -> None:
    """Bytes both ways between the agent's connection and the VNC socket, until either side ends."""
    try:
        vnc_reader, vnc_writer = await asyncio.open_unix_connection(vnc)
    except OSError as e:  # QEMU went away since the check
        log.info("cannot open the display %s: %s", vnc, e)
        return
    pumps = [asyncio.ensure_future(_pump(reader, vnc_writer)), asyncio.ensure_future(_pump(vnc_reader, writer))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        vnc_writer.close()
        with contextlib.suppress(OSError):
            await vnc_writer.wait_closed()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while data := await source.read(CHUNK):
        sink.write(data)
        await sink.drain()


async def open_display(home: Home, peer_name: str, session: str) -> RfbClient:
    """The screen of ``session`` at the paired peer ``peer_name``, which runs it, through that peer's agent;
    PeerError (one sentence) when it is unreachable or does not run it."""
    async with connect(home, Peers(home).get(peer_name)) as conn:
        await conn.call(DISPLAY, timeout=TIMEOUT, name=session)
        return await RfbClient.open_over(conn.hand_over)
