"""Installations pair and talk through their host agents: identity, pairing, refusals, the agent's protocol.

Each installation is a home of its own with `session-manager serve` running as its own process, on loopback and,
as two computers would, in two network namespaces joined by a veth pair (needs root and iproute2).
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from helpers.cli import Sm, log_text, one_sentence, wait_log
from helpers.net import NsSm, free_port, my_id, pair_by_ids, serving
from helpers.qemu import QmpClient
from session_manager.errors import PeerError, UsageError
from session_manager.net.agent import Agent, Call, _open, connect
from session_manager.net.identity import TLS_HOSTNAME, load_identity, matches, short_id, write_qemu_tls_dir
from session_manager.net.peers import Peers, new_peer, parse_address
from session_manager.paths import Home
from session_manager.vm.qemu import find_qemu, qemu_path

ID_RE = re.compile(r"[A-Z2-7]{7}(-[A-Z2-7]{7}){3}")


# -- two computers -----------------------------------------------------------------------------------

@pytest.fixture(params=["loopback", "netns"])
def two(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Sm, str, Sm, str, str]:
    """Two installations: (a, a's address, b, b's address, where serve listens)."""
    if request.param == "loopback":
        return Sm(tmp_path / "a"), "127.0.0.1", Sm(tmp_path / "b"), "127.0.0.1", "127.0.0.1:0"
    ns_a, ns_b = request.getfixturevalue("netns")
    return NsSm(tmp_path / "a", ns_a), "10.199.0.1", NsSm(tmp_path / "b", ns_b), "10.199.0.2", "0.0.0.0:0"


def test_pairing_is_confirmed_on_both_sides(two: tuple[Sm, str, Sm, str, str]) -> None:
    a, host_a, b, host_b, listen = two
    id_a, id_b = my_id(a), my_id(b)
    assert ID_RE.fullmatch(id_a) and ID_RE.fullmatch(id_b) and id_a != id_b
    with serving(a, listen) as port_a, serving(b, listen) as port_b:
        main, tty = pty.openpty()  # a's user confirms b's id at the prompt...
        try:
            adding = subprocess.Popen(a.argv("peers", "add", f"{host_b}:{port_b}", "--name", "b", "--json"),
                                      stdin=tty, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=a.env)
            os.write(main, b"y\n")
            wait_log(b, re.escape(f"wants to pair; accept with `session-manager peers accept {id_a}`."), timeout=20)
            accepted = b("peers", "accept", id_a.lower().replace("-", ""), "--name", "a", "--json").json()  # ...b's
            out, err = adding.communicate(timeout=30)
        finally:
            os.close(main)
            os.close(tty)
        assert adding.returncode == 0, err
        assert f"id {id_b}; does `session-manager id` there print the same? [y/N]" in out
        assert f"peers accept {id_a}` there" in err
        added = json.loads(out[out.index("{"):])  # after the prompt
        assert added["id"] == id_b and added["address"] == f"{host_b}:{port_b}"
        assert accepted["id"] == id_a and accepted["address"] == f"{host_a}:{port_a}"  # where a's agent listens
        assert [(p["name"], p["id"]) for p in a("peers", "list", "--json").json()] == [("b", id_b)]
        assert [(p["name"], p["id"]) for p in b("peers", "list", "--json").json()] == [("a", id_a)]
        for sm in (a, b):
            assert [p["reachable"] for p in sm("peers", "list", "--check", "--json").json()] == [True]
    assert not list((b.home / "run" / "pairing").glob("*"))  # the request is gone once answered


def test_entering_both_ids_pairs_without_accepting(tmp_path: Path) -> None:
    a, b = Sm(tmp_path / "a"), Sm(tmp_path / "b")
    with serving(a) as port_a, serving(b) as port_b:
        pair_by_ids(a, port_a, b, port_b)
    assert a("peers", "list", "--json").json()[0]["fingerprint"] == load_identity(Home.locate(b.home)).fingerprint
    assert b("peers", "list", "--json").json()[0]["address"] == f"127.0.0.1:{port_a}"
    assert "wants to pair" not in log_text(a)  # a already had b, so it answered b's request at once


def test_a_wrong_or_unconfirmed_id_pairs_nothing(tmp_path: Path) -> None:
    a, b = Sm(tmp_path / "a"), Sm(tmp_path / "b")
    other = my_id(Sm(tmp_path / "c"))
    with serving(b) as port_b:
        one_sentence(a("peers", "add", f"127.0.0.1:{port_b}", "--fingerprint", other, check=False),
                     f"presented id {my_id(b)}, not {other}", "intercepting")
        one_sentence(a("peers", "add", f"127.0.0.1:{port_b}", check=False), f"--fingerprint {my_id(b)}")
        one_sentence(a("peers", "add", f"127.0.0.1:{port_b}", "--fingerprint", "nonsense", check=False),
                     "not an installation id")
        one_sentence(b("peers", "add", f"127.0.0.1:{port_b}", "--yes", check=False), "this installation itself")
    one_sentence(a("peers", "add", f"127.0.0.1:{port_b}", "--yes", check=False), "Cannot reach", "serve")
    assert a("peers", "list", "--json").json() == []
    assert b("peers", "list", "--json").json() == []
    one_sentence(b("peers", "accept", other, check=False), "is waiting to pair")


def test_unpaired_and_mismatched_installations_are_refused(tmp_path: Path) -> None:
    a, b, c = Sm(tmp_path / "a"), Sm(tmp_path / "b"), Sm(tmp_path / "c")
    id_a, id_b = my_id(a), my_id(b)
    with serving(a) as port_a, serving(b) as port_b:
        pair_by_ids(a, port_a, b, port_b)
        # c was never paired with b, but lists it (as a does)
        (c.home / "config").mkdir(parents=True)
        shutil.copy(a.home / "config" / "peers.toml", c.home / "config" / "peers.toml")
        [row] = c("peers", "list", "--check", "--json").json()
        assert row["problem"] == (f"b at 127.0.0.1:{port_b} refuses this installation ({my_id(c)}): it has not "
                                  "paired with it, or removed it; pair again with `session-manager peers add "
                                  f"127.0.0.1:{port_b}`.")
        # b removes a
        assert b("peers", "remove", "a", "--json").json()["id"] == id_a
        assert b("peers", "list", "--json").json() == []
        [row] = a("peers", "list", "--check", "--json").json()
        assert not row["reachable"] and f"refuses this installation ({id_a})" in row["problem"]
        one_sentence(b("peers", "remove", "a", check=False), "no peer named 'a'")
        b("peers", "add", f"127.0.0.1:{port_a}", "--name", "a", "--fingerprint", id_a)  # a still has b: paired at once
    # b is reinstalled: a new identity behind the same address
    shutil.rmtree(b.home / "config" / "identity")
    with serving(a, f"127.0.0.1:{port_a}"), serving(b, f"127.0.0.1:{port_b}"):
        new_b = my_id(b)
        [row] = a("peers", "list", "--check", "--json").json()
        assert row["problem"] == (f"127.0.0.1:{port_b} presented certificate {new_b}, but you paired with {id_b}; "
                                  "someone may be intercepting, or the other installation was reinstalled: remove it "
                                  "(`session-manager peers remove b`) and pair again.")
        [row] = b("peers", "list", "--check", "--json").json()  # a does not know b's new certificate
        assert f"refuses this installation ({new_b})" in row["problem"]
        text = a("peers", "list", "--check").stdout
        assert "presented certificate" in text and "127.0.0.1" in text


# -- the agent's protocol, in this process ------------------------------------------------------------

def test_agent_serves_registered_calls_to_paired_peers_only(tmp_path: Path) -> None:
    server, client, stranger = (Home.locate(tmp_path / n) for n in ("server", "client", "stranger"))
    me, them = load_identity(server), load_identity(client)
    Peers(server).add(new_peer("client", "127.0.0.1:1", them.cert_pem.decode()))
    ran: list[str] = []

    async def count(call: Call) -> dict[str, Any]:
        assert call.peer is not None
        ran.append(call.peer.name)
        for i in range(int(call.args["upto"])):
            await call.send({"i": i})
        return {"by": call.peer.name}

    async def scenario() -> None:
        agent = Agent(server, say=lambda text, level: None)
        agent.register("count", count)
        listener = await agent.start("127.0.0.1", 0)
        address = f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        try:
            Peers(client).add(new_peer("server", address, me.cert_pem.decode()))
            events: list[Any] = []
            async with connect(client, Peers(client).get("server")) as conn:
                assert await conn.call("count", on_event=events.append, upto=3) == {"by": "client"}
                assert await conn.call("count", upto=0) == {"by": "client"}
            assert events == [{"i": 0}, {"i": 1}, {"i": 2}]
            # an installation it has not paired: hello, then a refusal in one sentence
            conn = await _open(address, load_identity(stranger), "server")
            try:
                assert (await conn.hello())["paired"] is False
                with pytest.raises(PeerError) as refused:
                    await conn.call("count", upto=1)
                assert str(refused.value) == (
                    f"{agent.name} ({me.short_id}) refuses an installation it has not paired with: only installations "
                    "paired with it may send or receive sessions; pair them with `session-manager peers add` first.")
            finally:
                await conn.close()
            # one claiming to be the paired client without its key is cut off
            conn = await _open(address, load_identity(stranger), "server")
            try:
                assert (await conn.call("hello", fingerprint=them.fingerprint))["paired"] is True
                with pytest.raises(PeerError, match="broke|closed"):
                    await conn.call("count", upto=1)
            finally:
                await conn.close()
        finally:
            await agent.close(listener)

    asyncio.run(scenario())
    assert ran == ["client", "client"]


# -- identity --------------------------------------------------------------------------------------------

def test_identity_files_and_short_id(tmp_path: Path) -> None:
    home = Home.locate(tmp_path / "home")
    me = load_identity(home)
    assert me.key_file.stat().st_mode & 0o777 == 0o600 and me.key_file.parent.stat().st_mode & 0o777 == 0o700
    assert load_identity(home) == me  # created once
    assert ID_RE.fullmatch(me.short_id) and me.short_id == short_id(me.fingerprint)
    assert len(me.fingerprint) == 64
    for given in (me.short_id, me.short_id.lower(), me.short_id.replace("-", " "), me.fingerprint.upper()):
        assert matches(me.fingerprint, given)
    assert not matches(me.fingerprint, load_identity(Home.locate(tmp_path / "other")).short_id)

    peer = load_identity(Home.locate(tmp_path / "peer"))
    tls = write_qemu_tls_dir(tmp_path / "tls", me, peer.cert_pem, "client")
    assert sorted(p.name for p in tls.iterdir()) == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
    assert (tls / "ca-cert.pem").read_bytes() == peer.cert_pem
    assert tls.stat().st_mode & 0o777 == 0o700 and (tls / "client-key.pem").stat().st_mode & 0o777 == 0o600


class TlsQemu(QmpClient):
    """A QEMU with -machine none and a tls-creds-x509 object "tls0" made from write_qemu_tls_dir's layout."""

    def __init__(self, tmp_path: Path, name: str, tls: Path, endpoint: str, *extra: str) -> None:
        sock, self.log = tmp_path / f"{name}.qmp", tmp_path / f"{name}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [*find_qemu(qemu_path()).command, "-machine", "none", "-nodefaults", "-display", "none",
                 "-object", f"tls-creds-x509,id=tls0,dir={tls},endpoint={endpoint},verify-peer=on,sanity-check=off",
                 "-qmp", f"unix:{sock},server=on,wait=off", *extra], stderr=log)
        super().__init__(sock, self.proc, timeout=20)

    def close(self) -> None:
        super().close()
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize(("text", "expected"), [("host", ("host", 7385)), ("10.0.0.2:9", ("10.0.0.2", 9)),
                                                 ("[::1]:7000", ("::1", 7000)), ("fe80::1", ("fe80::1", 7385))])
def test_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected
    for bad in ("host:99999", "a b", "[::1"):
        with pytest.raises(UsageError, match="not an address"):
            parse_address(bad)


@pytest.mark.qemu
@pytest.mark.parametrize("paired", [True, False])
def test_qemu_migrates_over_tls_to_the_paired_installation_only(tmp_path: Path, paired: bool) -> None:
    """QEMU 7.2 takes write_qemu_tls_dir's layout; a destination refuses a source it has not paired."""
    src, dst, other = (load_identity(Home.locate(tmp_path / n)) for n in ("src", "dst", "other"))
    port = free_port()
    incoming = TlsQemu(tmp_path, "dst", write_qemu_tls_dir(tmp_path / "dst-tls", dst, src.cert_pem, "server"), "server",
                   "-incoming", "defer")
    outgoing = TlsQemu(tmp_path, "src", write_qemu_tls_dir(tmp_path / "src-tls", src if paired else other,
                                                       dst.cert_pem, "client"), "client")
    try:
        incoming("migrate-set-parameters", **{"tls-creds": "tls0"})
        incoming("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        outgoing("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": TLS_HOSTNAME})
        outgoing("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + 20
        # Refused, the destination says so on stderr and keeps waiting, while the source calls it completed.
        while (state := incoming("query-status")["status"]) != "running" and \
                "known issuer" not in incoming.log.read_text():
            assert time.monotonic() < deadline, incoming.log.read_text()
            time.sleep(0.05)
    finally:
        incoming.close()
        outgoing.close()
    assert (state == "running") == paired, incoming.log.read_text()
