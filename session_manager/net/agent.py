"""The host agent (``session-manager serve``) and its client: how installations talk to each other.

The agent listens on TCP (DEFAULT_PORT) with TLS 1.3 and mutual authentication by pinned certificates
(identity.py): the client checks that the agent presents exactly the certificate it paired with, and the
agent accepts exactly the certificates in its peers.toml.  Python's ``ssl`` cannot ask for a client
certificate without verifying it, and an unpaired installation must still be able to ask to pair, so the
agent asks for the certificate after the handshake (TLS 1.3 post-handshake authentication): the first call,
``hello``, names the caller's fingerprint; if it is a paired one, the agent requests the certificate, which
must then verify against a trust store of exactly the paired certificates and match by fingerprint before any
call but ``hello`` and ``pair`` is served.  Other callers get ``"paired": false`` from hello and a one-sentence
refusal for anything else, and the connection closes.

The protocol is JSON lines, one call at a time: the client sends ``{"call": COMMAND, "args": {...}}``; the
agent answers with any number of ``{"event": ...}`` (streamed by the handler), then ``{"result": ...}`` or
``{"error": SENTENCE}``.  A client that disconnects cancels its call; ``Call.closed`` tells a handler when the
connection has ended, so that work it leaves behind (a half-made incoming session) can be tied to it.  TCP
keepalive ends a connection whose peer vanished within about 15 s, idle or not.  Commands are added with
:meth:`Agent.register`; :func:`connect` opens a connection to a paired peer, :func:`pair` pairs with a new one.

A handler may take over the connection after its result (it sets ``Call.relay``): the client, once it has read
the result line, sends one byte (GO_AHEAD) and from then on the connection carries raw bytes both ways, relayed
by the handler (``display``: a session's VNC, handover.py) until either side closes it.  The agent relays only
after that byte, so nothing relayed lands in the client's line buffer: :meth:`Connection.hand_over` gives the
connection to the client's own protocol first, then sends the byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import PeerError, SessionManagerError, UsageError
from ..files import atomic_write
from ..paths import Home, make_private_dir
from .identity import Identity, fingerprint, installation_name, load_identity, short_id
from .peers import (
    DEFAULT_PORT,
    PAIR_TIMEOUT,
    PairingRequest,
    Peer,
    Peers,
    format_address,
    new_peer,
    parse_address,
    peer_name,
)

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # bytes of one message
TIMEOUT = 10.0  # seconds to connect, and to answer a hello; also what a caller not yet paired may stay silent
MAX_CONNECTIONS = 256  # connections at once, in all ...
MAX_PER_ADDRESS = 16  # ... and from one address
MAX_PAIRING = 8  # pairing requests waiting at once (one per address)
QUIET_SECONDS = 60.0  # a refusal from one address is logged once in this time
KEEPALIVE = (5, 2, 5)  # TCP keepalive: idle seconds, probe interval, probes; a silent peer is dropped within ~15 s
GO_AHEAD = b"\x00"  # the client's one byte before a relayed connection's raw bytes

Relay = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Call:
    """One call being handled.  ``peer`` is the paired peer calling (None only in a public command, when an
    unpaired installation calls); ``send`` streams a message to it before the result."""

    command: str
    args: dict[str, Any]
    peer: Peer | None
    host: str  # the address the call came from
    send: Callable[[Any], Awaitable[None]]
    closed: asyncio.Event  # set when the caller's connection ends (a handler may leave work tied to it)
    relay: Relay | None = None  # set by a handler to take over the connection after its result (module docstring)
    presented: str | None = None  # the fingerprint of the certificate the caller has proven it holds, if any


Handler = Callable[[Call], Awaitable[Any]]


def shown(value: object, limit: int = 64) -> str:
    """Something from the network as it may be logged or printed: control characters and everything not ASCII
    escaped (no forged log lines, no terminal escapes), at most ``limit`` characters."""
    text = (value if isinstance(value, str) else repr(value)).encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


def _say(text: str, level: int = logging.INFO) -> None:
    log.log(level, "%s", text)
    print(text, flush=True)


def _certificate(tls: ssl.SSLObject) -> bytes | None:
    """The certificate the other side has presented (and which verified), if any."""
    try:
        return tls.getpeercert(binary_form=True)
    except ValueError:  # asked for, not yet received
        return None


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """Notice a peer that vanished (cable pulled, host down) even while the connection is idle, and unanswered
    data within the same time."""
    sock = writer.get_extra_info("socket")
    idle, interval, count = KEEPALIVE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000 * (idle + interval * count))


def agent_port(home: Home) -> int | None:
    """The port this home's running agent listens on, if one runs."""
    try:
        return int(json.loads((home.runtime / "agent.json").read_text())["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Agent:
    """Answers other installations.  ``say`` reports what the user should see (a pairing request, a refusal)."""

    def __init__(self, home: Home, say: Callable[[str, int], None] = _say) -> None:
        self.home = home
        self.identity = load_identity(home)
        self.peers = Peers(home)
        self.name = installation_name()
        self.say = say
        self._handlers: dict[str, tuple[Handler, bool]] = {}
        self._connections: dict[asyncio.Task[Any], tuple[str, asyncio.StreamWriter]] = {}
        self._refused: dict[str, float] = {}  # address -> when a refusal from it was last logged
        self._tls = self._tls_context()
        self.register("hello", self._hello, public=True)
        self.register("pair", self._pair, public=True)

    def register(self, command: str, handler: Handler, *, public: bool = False) -> None:
        """Answer ``command`` with ``handler``: it may ``await call.send(message)`` any number of times and returns
        the result (both JSON-serializable); a SessionManagerError it raises reaches the caller as its sentence.
        Only paired peers may call it, unless ``public``."""
        self._handlers[command] = (handler, public)

    async def start(self, host: str, port: int) -> asyncio.Server:
        """Listen (port 0: any free port); stop with :meth:`close`."""
        return await asyncio.start_server(self._connection, host, port, ssl=self._tls, ssl_handshake_timeout=TIMEOUT,
                                          limit=MAX_LINE)

    async def close(self, server: asyncio.Server) -> None:
        """Stop listening and end every connection (calls under way are cancelled)."""
        server.close()
        for _, writer in self._connections.values():
            writer.transport.abort()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def serve(self, host: str, port: int) -> None:
        """Run until SIGTERM or SIGINT."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        with contextlib.suppress(ValueError, OSError):  # room for every connection a flood may hold in its handshake
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            server = await self.start(host, port)
        except OSError as e:
            raise PeerError(f"Cannot listen on {format_address(host, port)} ({e.strerror or e}); if another agent runs "
                            "there already, stop it or pick another address with --listen.") from None
        bound = server.sockets[0].getsockname()[1]
        state = make_private_dir(self.home.runtime) / "agent.json"
        atomic_write(state, json.dumps({"pid": os.getpid(), "port": bound}).encode())
        self.say(f"Listening on {format_address(host, bound)} as {self.name} ({self.identity.short_id}); to pair "
                 f"another computer with this one, run `session-manager peers add {self.name}:{bound}` there.",
                 logging.INFO)
        try:
            await stop.wait()
        finally:
            state.unlink(missing_ok=True)
            await self.close(server)
        self.say("Agent stopped.", logging.INFO)

    # -- one connection ------------------------------------------------------------------------------
    # Every call there is, who may make it, and what it may touch here (its handler enforces it; the tests in
    # tests/test_hostile_peer.py make each call as a paired peer with hostile arguments):
    #
    # | call                       | who               | may touch                                                    |
    # |----------------------------|-------------------|--------------------------------------------------------------|
    # | hello                      | anyone            | nothing: answers our name, id, fingerprint, version and      |
    # |                            |                   | whether the caller is paired                                 |
    # | pair                       | anyone            | files a pairing request for the user to accept               |
    # | qemu-info                  | paired            | reads which QEMU would run an arriving session               |
    # | migrate-in                 | paired            | creates a session under arrivals.py's rules (the receiver's  |
    # |                            |                   | limits and boot directories, no listener of the caller's,    |
    # |                            |                   | a name free here or of a session that came from or went to   |
    # |                            |                   | the caller) and its QEMU, which takes the state from the     |
    # |                            |                   | caller only (TLS pinned to its certificate)                  |
    # | migrate-finish, -abort     | the paired caller | the session it is migrating here, nothing else               |
    # |                            | that began it     |                                                              |
    # | display                    | paired            | the screen, keyboard and mouse of a running session that     |
    # |                            |                   | arrived from the caller; no other session                    |
    # | repo-open                  | paired            | this home's repository: takes the caller's identity only     |
    # |                            |                   | while it holds no checkpoints; keeps the caller's key only   |
    # |                            |                   | where this computer keeps none for it (never replaces one)   |
    # | repo-list, -sizes, -stat,  | paired            | reads objects of this home's repository, named as the        |
    # | -load                      |                   | repository names them: nothing outside it                    |
    # | repo-save                  | paired            | adds objects the repository lacks, never replaces one, never |
    # |                            |                   | a key; at most 16 half-sent at once, dropped when the        |
    # |                            |                   | connection ends                                              |
    # | repo-delete                | paired            | only the lock files the caller made itself                   |
    # | session-adopt              | paired            | creates a stopped session from a checkpoint by its whole id, |
    # |                            |                   | under arrivals.py's rules (or updates one that came from or  |
    # |                            |                   | went to the caller, when it is stopped)                      |
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        host = str((writer.get_extra_info("peername") or ["?"])[0])
        from_host = sum(h == host for h, _ in self._connections.values())
        if len(self._connections) >= MAX_CONNECTIONS or from_host >= MAX_PER_ADDRESS:
            self._refuse_quietly(host, f"Too many connections ({len(self._connections)} in all, {from_host} from "
                                       f"{host}); refusing more for now.")
            writer.transport.abort()
            return
        self._connections[task] = (host, writer)
        closed = asyncio.Event()
        try:
            _keepalive(writer)
            await self._converse(reader, writer, host, closed)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError; a line over MAX_LINE is a ValueError
            log.info("The connection from %s ended: %s", host, e)
        finally:
            closed.set()
            del self._connections[task]
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                        closed: asyncio.Event) -> None:
        tls: ssl.SSLObject = writer.get_extra_info("ssl_object")

        async def send(message: dict[str, Any]) -> None:
            writer.write(json.dumps(message, default=str).encode() + b"\n")
            await writer.drain()

        asked = paired = False
        while True:
            try:  # a caller not (yet) known as a paired peer gets TIMEOUT to say something
                line = await asyncio.wait_for(reader.readline(), None if paired else TIMEOUT)
            except TimeoutError:
                log.debug("%s said nothing for %.0f s", host, TIMEOUT)
                return
            if not line:
                return
            try:
                request = json.loads(line)
                command, args = request["call"], request.get("args", {})
                if not isinstance(command, str) or not isinstance(args, dict):
                    raise TypeError(args)
            except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested too deep
                await send({"error": f"{self.name} received a malformed request; use the same version of "
                                     "session-manager on both computers."})
                return
            handler, public = self._handlers.get(command, (None, False))
            der = _certificate(tls)
            peer = self.peers.find(fingerprint(der)) if der else None
            paired = paired or peer is not None
            if peer is None and not public:
                who = f"the installation {short_id(fingerprint(der))}" if der else \
                    "an installation it has not paired with"
                self._refuse_quietly(host, f"Refused {shown(command)} from {host}: {who} is not paired with this one.")
                await send({"error": self._refusal(who)})
                return
            if handler is None:
                await send({"error": f"{self.name} does not know the request {shown(command)}; update "
                                     f"session-manager there to version {__version__} or later."})
                continue
            if command == "hello" and not asked and (offered := self._offered(args)):
                self._tls.load_verify_locations(cadata=offered)
                tls.verify_client_post_handshake()  # sent with the reply; the certificate precedes the next call
                asked = True
            call = Call(command, args, peer, host, lambda message: send({"event": message}), closed,
                        presented=fingerprint(der) if der else None)
            reply = await self._run(handler, call, reader)
            if reply is None:
                log.info("%s left during %s; the call was cancelled", host, shown(command))
                return
            await send(reply)
            if call.relay is not None and "result" in reply:
                if await asyncio.wait_for(reader.read(1), TIMEOUT) == GO_AHEAD:
                    await call.relay(reader, writer)
                return

    async def _run(self, handler: Handler, call: Call, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        """The reply to a call, or None when the caller disconnected first (the call is then cancelled)."""
        work = asyncio.ensure_future(handler(call))
        gone = asyncio.ensure_future(reader.read(1))  # the caller sends nothing during a call: EOF or data is a bug
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, gone):
                task.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
        if not work.done() or work.cancelled():
            return None
        error = work.exception()
        if error is None:
            return {"result": work.result()}
        if isinstance(error, SessionManagerError):
            return {"error": str(error)}
        log.error("%s failed", call.command, exc_info=error)
        return {"error": f"{self.name} failed to handle {call.command} ({type(error).__name__}); its log "
                         "(session-manager.log) says more."}

    def _offered(self, args: dict[str, Any]) -> str | None:
        """The certificate (PEM) a hello asks us to request: a paired peer's, or the one an installation that wants to
        pair sends along (``certificate``), if it is the one its ``fingerprint`` names."""
        claimed = self.peers.find(str(args.get("fingerprint")))
        if claimed:
            return claimed.certificate
        offered = args.get("certificate")
        try:
            if isinstance(offered, str) and len(offered) < 8192 \
                    and fingerprint(offered.encode()) == args["fingerprint"]:
                return offered
        except (ValueError, KeyError):
            pass
        return None

    def _refuse_quietly(self, host: str, text: str) -> None:
        """Say ``text`` at most once a QUIET_SECONDS per address: a stranger's flood does not flood the log."""
        now = asyncio.get_running_loop().time()
        if now - self._refused.get(host, -QUIET_SECONDS) >= QUIET_SECONDS:
            if len(self._refused) > 4 * MAX_CONNECTIONS:
                self._refused.clear()
            self._refused[host] = now
            self.say(text, logging.WARNING)

    def _refusal(self, who: str) -> str:
        return (f"{self.name} ({self.identity.short_id}) refuses {who}: only installations paired with it may "
                "send or receive sessions; pair them with `session-manager peers add` first.")

    def _tls_context(self) -> ssl.SSLContext:
        """Presents our certificate and asks for the client's only after the handshake; each paired certificate
        joins its trust store when its peer says hello (the fingerprint check decides, so one removed since is
        harmless there)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.identity.cert_file, self.identity.key_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.post_handshake_auth = True
        return ctx

    # -- the built-in commands -----------------------------------------------------------------------
    async def _hello(self, call: Call) -> dict[str, Any]:
        """Who we are, and whether the fingerprint the caller names is paired here (it proves it is its own with
        its certificate before its next call)."""
        peer = self.peers.find(str(call.args.get("fingerprint")))
        log.info("hello from %s at %s (%s)", shown(call.args.get("name")), call.host,
                 f"paired as {peer.name}" if peer else "not paired")
        return {"name": self.name, "id": self.identity.short_id, "fingerprint": self.identity.fingerprint,
                "version": __version__, "paired": peer is not None}

    async def _pair(self, call: Call) -> dict[str, bool]:
        """Add the caller once the user here accepts it (``peers accept``), or at once if it is already paired."""
        try:
            port = int(call.args.get("port") or DEFAULT_PORT)
            if not 0 < port < 65536:
                raise ValueError(port)
            request = PairingRequest(peer_name(str(call.args["name"])), format_address(call.host, port),
                                     str(call.args["certificate"]))
            theirs = request.fingerprint
        except (KeyError, TypeError, ValueError):
            raise PeerError(f"{self.name} received a malformed pairing request; use the same version of "
                            "session-manager on both computers.") from None
        if call.presented != theirs:  # a request is filed under the certificate its caller holds, never another
            raise PeerError(f"{self.name} files a pairing request only for the certificate the caller presents; "
                            "use the same version of session-manager on both computers.")
        if self.peers.find(theirs) is None:
            path = self.peers.request_file(theirs)
            waiting = [r for r in self.peers.requests.glob("*") if r != path] if self.peers.requests.is_dir() else []
            if len(waiting) >= MAX_PAIRING or any(_address_of(r) == call.host for r in waiting):
                self._refuse_quietly(call.host, f"Refused a pairing request from {call.host}: {len(waiting)} are "
                                                "waiting already.")
                raise PeerError(f"{self.name} has pairing requests waiting already (one per address at most); "
                                "accept or let them expire there, then try again.")
            make_private_dir(path.parent)
            atomic_write(path, json.dumps(asdict(request)).encode())
            self.say(f"{request.name} at {call.host} ({short_id(theirs)}) wants to pair; accept with "
                     f"`session-manager peers accept {short_id(theirs)}`.", logging.WARNING)
            try:
                await call.send({"waiting": True})
                async with asyncio.timeout(PAIR_TIMEOUT):
                    while (peer := self.peers.find(theirs)) is None:
                        await asyncio.sleep(0.2)
            except TimeoutError:
                raise PeerError(f"{self.name} did not accept the pairing within {PAIR_TIMEOUT / 60:.0f} minutes; "
                                "run `session-manager peers add` again and accept it there in time.") from None
            finally:
                path.unlink(missing_ok=True)
            self.say(f"Paired with {peer.name} ({peer.short_id}).", logging.INFO)
        return {"paired": True}


def _address_of(request_file: Path) -> str | None:
    """The address a waiting pairing request came from."""
    try:
        return parse_address(str(json.loads(request_file.read_text())["address"]))[0]
    except (OSError, ValueError, KeyError, TypeError, PeerError):
        return None


# -- the client ----------------------------------------------------------------------------------------

class Connection:
    """A TLS connection to another installation's agent, as ``name`` (how errors call it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity,
                 name: str) -> None:
        self._reader, self._writer = reader, writer
        self.identity = identity
        self.name = name
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        self.certificate = ssl.DER_cert_to_PEM_cert(der)
        self.fingerprint = fingerprint(der)
        self._handed_over = False

    async def call(self, command: str, on_event: Callable[[Any], None] | None = None, timeout: float | None = None,
                   **args: Any) -> Any:
        """The result of ``command``; ``on_event`` gets each message the handler streams before it."""
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(json.dumps({"call": command, "args": args}).encode() + b"\n")
                await self._writer.drain()
                while line := await self._reader.readline():
                    reply = json.loads(line)
                    if "event" in reply:
                        if on_event is not None:
                            on_event(reply["event"])
                    elif "error" in reply:
                        raise PeerError(shown(str(reply["error"]), 1000))
                    else:
                        return reply["result"]
        except TimeoutError:
            raise PeerError(f"{self.name} did not answer {command} within {timeout:.0f} s; check that it is running "
                            "and see its log.") from None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # ssl.SSLError is an OSError
            raise PeerError(f"The connection to {self.name} broke during {command} ({shown(str(e))}); see its "
                            "log.") from None
        raise PeerError(f"{self.name} closed the connection during {command}; its log says why.")

    async def hello(self, offer: bool = False) -> dict[str, Any]:
        """The other side's name, id, fingerprint, version and whether it has us paired; with ``offer`` our certificate
        goes along, for an installation that has not paired us yet to ask for (pairing)."""
        extra: dict[str, Any] = {"certificate": self.identity.cert_pem.decode()} if offer else {}
        result: dict[str, Any] = await self.call("hello", timeout=TIMEOUT, name=installation_name(),
                                                 fingerprint=self.identity.fingerprint, **extra)
        return result

    def hand_over(self, protocol: asyncio.BaseProtocol) -> None:
        """After a call whose handler took over the connection, give the rest of it to ``protocol`` (raw bytes
        both ways, see the module docstring), which owns it from now on: :meth:`close` leaves it open.  Keep this
        Connection referenced while the protocol runs: the StreamWriter in it closes the transport when collected."""
        transport = self._writer.transport
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        transport.write(GO_AHEAD)  # the agent starts relaying only now, so every relayed byte reaches ``protocol``
        self._handed_over = True

    async def close(self) -> None:
        if self._handed_over:
            return
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), 1)


async def _open(address: str, identity: Identity, name: str) -> Connection:
    """Connect to the agent at ``address`` (``name`` in messages).  Its certificate is not verified here: callers
    compare its fingerprint.  Ours goes to it when it asks (after a hello naming a peer it has paired)."""
    host, port = parse_address(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned instead
    ctx.load_cert_chain(identity.cert_file, identity.key_file)
    ctx.post_handshake_auth = True
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx, limit=MAX_LINE), TIMEOUT)
    except (OSError, TimeoutError) as e:
        reason = "no answer" if isinstance(e, TimeoutError) else e.strerror or str(e)
        where = address if name == address else f"{name} at {address}"
        raise PeerError(f"Cannot reach {where} ({reason}); check that `session-manager serve` runs there and that "
                        f"port {port} is open.") from None
    _keepalive(writer)
    return Connection(reader, writer, identity, name)


@contextlib.asynccontextmanager
async def connect(home: Home, peer: Peer) -> AsyncIterator[Connection]:
    """A connection to a paired peer's agent, which has said hello; PeerError if it presents another certificate than
    the paired one, or has not paired this installation."""
    identity = load_identity(home)
    conn = await _open(peer.address, identity, peer.name)
    try:
        if conn.fingerprint != peer.fingerprint:
            raise PeerError(f"{peer.address} presented certificate {short_id(conn.fingerprint)}, but you paired "
                            f"with {peer.short_id}; someone may be intercepting, or the other installation was "
                            f"reinstalled: remove it (`session-manager peers remove {peer.name}`) and pair again.")
        if not (await conn.hello())["paired"]:
            raise PeerError(f"{peer.name} at {peer.address} refuses this installation ({identity.short_id}): it has "
                            f"not paired with it, or removed it; pair again with `session-manager peers add "
                            f"{peer.address}`.")
        yield conn
    finally:
        await conn.close()


async def check(home: Home, peers: list[Peer]) -> list[str | None]:
    """For each peer at once: None when its agent answers as the paired installation and has us paired, else
    what is wrong."""
    async def one(peer: Peer) -> str | None:
        try:
            async with connect(home, peer):
                pass
        except PeerError as e:
            return str(e)
        return None

    return list(await asyncio.gather(*(one(p) for p in peers)))


async def pair(home: Home, address: str, confirm: Callable[[str, str], None], *, name: str | None = None,
               waiting: Callable[[], None] = lambda: None) -> Peer:
    """Pair with the agent at ``address``.  ``confirm(its name, its fingerprint)`` raises unless the user confirms
    its id; then it is added here and asked to add this installation (``waiting`` is called while it waits for its
    user to accept), and a connection with our certificate proves that both sides have each other.  On failure
    this side is left as it was."""
    identity = load_identity(home)
    peers = Peers(home)
    address = format_address(*parse_address(address))
    conn = await _open(address, identity, address)
    try:
        hello = await conn.hello(offer=True)
        if conn.fingerprint == identity.fingerprint:
            raise UsageError(f"{address} is this installation itself; give the address of another computer's agent.")
        confirm(str(hello["name"]), conn.fingerprint)
        known = peers.find(conn.fingerprint)
        peer = new_peer(name or (known.name if known else peer_name(str(hello["name"]))), address, conn.certificate)
        peers.add(peer)
        try:
            await conn.call("pair", on_event=lambda _: waiting(), timeout=PAIR_TIMEOUT + TIMEOUT,
                            name=installation_name(), port=agent_port(home), certificate=identity.cert_pem.decode())
            async with connect(home, peer):
                pass  # it says hello as having us paired
        except BaseException:
            if known is None:
                peers.remove(peer.name)
            else:
                peers.add(known)
            raise
    finally:
        await conn.close()
    return peer
