"""Paired peers: the other installations this one may send sessions to and receive them from.

``<config>/peers.toml`` holds each peer's name, address (host:port of its ``session-manager serve``),
certificate fingerprint, certificate and when it was added.  The ``peers`` commands change it; the host
agent only reads it, for every call.

A pairing request that waits for this side's consent is a file in ``<runtime>/pairing/`` (0700), written by
the agent while the requesting installation stays connected and removed when it leaves; ``peers accept``
(:meth:`Peers.accept`) turns it into a peer, which the waiting agent notices.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import NotFoundError, PeerError, UsageError
from ..files import atomic_write
from ..paths import Home
from .identity import fingerprint, matches, short_id

DEFAULT_PORT = 7385
PAIR_TIMEOUT = 300.0  # seconds a pairing request waits for the other side to accept it
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class Peer:
    name: str
    address: str  # host:port of its agent
    fingerprint: str  # hex SHA-256 of its certificate's DER
    certificate: str  # PEM
    added: str  # ISO 8601, UTC

    @property
    def short_id(self) -> str:
        return short_id(self.fingerprint)

    def summary(self) -> dict[str, Any]:
        """What `peers list --json` shows."""
        return {"name": self.name, "address": self.address, "id": self.short_id, "fingerprint": self.fingerprint,
                "added": self.added}


def new_peer(name: str, address: str, certificate: str) -> Peer:
    return Peer(check_peer_name(name), address, fingerprint(certificate.encode()), certificate,
                datetime.now(UTC).isoformat(timespec="seconds"))


def check_peer_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise UsageError(f"{name!r} is not a valid peer name; use up to 63 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit.")
    return name


def peer_name(suggested: str) -> str:
    """A valid peer name made from what another installation calls itself (its host name)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", suggested).strip("._-")[:63]
    return name or "peer"


def parse_address(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address -> (host, port); the port defaults to
    DEFAULT_PORT."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([^\s:\[\]/]+)(?::(\d{1,5}))?|([0-9A-Fa-f]*:[0-9A-Fa-f:.]+)",
                     text.strip())
    if not m or int(m[2] or m[4] or 0) > 65535:
        raise UsageError(f"{text!r} is not an address; write it like HOST, HOST:PORT or [IPV6]:PORT.")
    return m[1] or m[3] or m[5], int(m[2] or m[4] or DEFAULT_PORT)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class PairingRequest:
    """Another installation waiting for this one to accept it."""

    name: str  # what it calls itself
    address: str  # where its agent listens
    certificate: str  # PEM

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate.encode())


class Peers:
    """The peers of one home (peers.toml) and the pairing requests waiting for it (the runtime directory)."""

    def __init__(self, home: Home) -> None:
        self.file = home.config / "peers.toml"
        self.requests = home.runtime / "pairing"

    def all(self) -> list[Peer]:
        try:
            with open(self.file, "rb") as f:
                return [Peer(name=name, **fields) for name, fields in sorted(tomllib.load(f)["peers"].items())]
        except FileNotFoundError:
            return []
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{self.file} cannot be read ({e!r}); fix or delete it.") from None

    def get(self, name: str) -> Peer:
        for peer in self.all():
            if peer.name == name:
                return peer
        raise NotFoundError(f"There is no peer named {name!r}; `session-manager peers list` shows them.")

    def find(self, fingerprint: str) -> Peer | None:
        return next((p for p in self.all() if p.fingerprint == fingerprint), None)

    def verify(self, fingerprint: str) -> Peer:
        """The peer whose certificate has this fingerprint; PeerError if there is none."""
        peer = self.find(fingerprint)
        if peer is None:
            raise PeerError(f"The installation {short_id(fingerprint)} is not paired with this one; pair them with "
                            "`session-manager peers add` first.")
        return peer

    def add(self, peer: Peer) -> None:
        """Add a peer, or update the one with its certificate (new name or address)."""
        for other in self.all():
            if other.name == peer.name and other.fingerprint != peer.fingerprint:
                raise UsageError(f"A peer named {peer.name!r} is already paired with another installation "
                                 f"({other.short_id}); pick another name with --name, or remove that one first.")
        self._write([p for p in self.all() if p.fingerprint != peer.fingerprint] + [peer])

    def remove(self, name: str) -> Peer:
        peer = self.get(name)
        self._write([p for p in self.all() if p.name != name])
        return peer

    def _write(self, peers: list[Peer]) -> None:
        data = {"peers": {p.name: {k: v for k, v in asdict(p).items() if k != "name"}
                          for p in sorted(peers, key=lambda p: p.name)}}
        atomic_write(self.file, tomli_w.dumps(data, multiline_strings=True).encode())

    # -- pairing requests ------------------------------------------------------------------------------
    def request_file(self, fingerprint: str) -> Path:
        return self.requests / f"{fingerprint}.json"

    def pending(self) -> list[PairingRequest]:
        out = []
        for path in sorted(self.requests.glob("*.json")):
            try:
                out.append(PairingRequest(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # gone meanwhile (its installation left) or half-written
        return out

    def accept(self, given_id: str, name: str | None = None) -> Peer:
        """Pair with the waiting installation whose id is ``given_id``."""
        for request in self.pending():
            if matches(request.fingerprint, given_id):
                peer = new_peer(name or peer_name(request.name), request.address, request.certificate)
                self.add(peer)
                return peer
        raise NotFoundError(f"No installation with id {given_id} is waiting to pair; run `session-manager peers add` "
                            f"there again (it waits {PAIR_TIMEOUT / 60:.0f} minutes for you to accept).")
