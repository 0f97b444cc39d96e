"""A stranger on the network against the real agent (`serve`): it cannot hold connections open, flood pairing
requests, forge log lines or knock the agent over with a malformed request.  Loopback only, bounded in count and
time."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from helpers.cli import Sm, log_text
from helpers.net import serving
from session_manager.net.agent import MAX_PER_ADDRESS, TIMEOUT
from session_manager.net.identity import certificate, fingerprint


@contextmanager
def tls(port: int, as_: tuple[Path, Path] | None = None) -> Iterator[ssl.SSLSocket]:
    """A TLS connection to the agent, as any stranger can open: without a certificate, or ready to present ``as_``
    (certificate and key files) when the agent asks."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if as_:
        ctx.load_cert_chain(*as_)
        ctx.post_handshake_auth = True
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30))
    try:
        yield sock
    finally:
        sock.close()


def stranger(tmp_path: Path, name: str) -> tuple[Path, Path, str]:
    """A new installation's certificate and key files, and the certificate."""
    cert, key = certificate(name, ["127.0.0.1"], 1)
    (tmp_path / f"{name}.pem").write_bytes(cert)
    (tmp_path / f"{name}.key").write_bytes(key)
    return tmp_path / f"{name}.pem", tmp_path / f"{name}.key", cert.decode()


def call(sock: ssl.SSLSocket, command: str, **args: object) -> dict:
    sock.sendall(json.dumps({"call": command, "args": args}).encode() + b"\n")
    return json.loads(sock.makefile("rb").readline())


def closed_by_agent(sock: ssl.SSLSocket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (ssl.SSLError, ConnectionResetError):
        return True
    except TimeoutError:
        return False


def test_silent_connections_are_dropped_and_capped(tmp_path: Path) -> None:
    b = Sm(tmp_path / "b")
    with serving(b) as port:
        with ExitStack() as stack:
            socks = [stack.enter_context(tls(port)) for _ in range(MAX_PER_ADDRESS)]  # the cap from one address
            with tls(port) as over:  # one more: closed at once
                assert closed_by_agent(over, 5)
            started = time.monotonic()
            assert closed_by_agent(socks[0], TIMEOUT + 10)  # said nothing: dropped after TIMEOUT
            assert time.monotonic() - started >= TIMEOUT - 2
            assert all(closed_by_agent(s, 10) for s in socks)
        with tls(port) as again:  # and the agent serves the next caller as before
            assert call(again, "hello", name="x", fingerprint="none")["result"]["paired"] is False
        assert log_text(b).count("Too many connections") == 1  # said once, not once a connection


def test_pairing_requests_are_bounded_and_nothing_forges_the_log(tmp_path: Path) -> None:
    b = Sm(tmp_path / "b")
    with serving(b) as port:
        cert_file, key_file, cert = stranger(tmp_path, "mallory")
        with tls(port) as liar:  # a request for a certificate the caller does not present: refused, nothing filed
            answer = call(liar, "pair", name="mallory", certificate=cert, port=1)
            assert "only for the certificate the caller presents" in answer["error"], answer
        with tls(port, (cert_file, key_file)) as waiting:
            call(waiting, "hello", name="mallory", fingerprint=fingerprint(cert.encode()), certificate=cert)
            waiting.sendall(json.dumps({"call": "pair", "args": {"name": "mallory", "certificate": cert,
                                                                "port": 1}}).encode() + b"\n")
            assert json.loads(waiting.makefile("rb").readline()) == {"event": {"waiting": True}}
            for i in range(20):  # a flood from the same address: one sentence each, no file each
                other_cert, other_key, other = stranger(tmp_path, f"m{i}")
                with tls(port, (other_cert, other_key)) as flood:
                    call(flood, "hello", name=f"m{i}", fingerprint=fingerprint(other.encode()), certificate=other)
                    answer = call(flood, "pair", name=f"m{i}", certificate=other, port=1)
                    assert "pairing requests waiting already" in answer["error"], answer
            assert len(list((b.home / "run" / "pairing").glob("*"))) == 1
            forged = "mallory\n2026-01-01 00:00:00,000 1 session_manager.net.agent WARNING forged\x1b[2J"
            with tls(port) as liar:
                call(liar, "hello", name=forged, fingerprint="x")
                call(liar, forged, x=1)
        log = log_text(b)
        assert "hello from mallory\\n2026-01-01" in log and "\x1b" not in log  # escaped, on its own line
        assert not any(line.startswith("2026-01-01") for line in log.splitlines())
        assert log.count("Refused a pairing request from 127.0.0.1") == 1  # quiet under a flood


def test_a_malformed_request_gets_one_line_and_the_agent_goes_on(tmp_path: Path) -> None:
    b = Sm(tmp_path / "b")
    with serving(b) as port:
        for bad in (b"[" * 200_000 + b"]" * 200_000, b"{\"call\": 5}", b"\xff\xfe",
                    b"{\"call\": \"hello\", \"args\": []}"):
            with tls(port) as sock:
                sock.sendall(bad[:(1 << 20) - 1] + b"\n")
                answer = json.loads(sock.makefile("rb").readline())
                assert "malformed request" in answer["error"] and len(answer["error"].splitlines()) == 1
        with tls(port) as sock:
            assert call(sock, "hello", name="x", fingerprint="none")["result"]["paired"] is False
    assert "Traceback" not in log_text(b) and "RecursionError" not in log_text(b)
