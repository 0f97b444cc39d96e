"""QEMU and the test guest: its serial log, its disk records, sessions of it started by the CLI (with checkpoints,
or as a live migration's source), QMP (a synchronous client over a socket, and a session's QMP by name), and TLS
credentials for two QEMUs that migrate to each other.

No pytest here: benchmarks/migration.py uses self_signed and tls_dir.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from session_manager.local.sessions import Session
from session_manager.net.identity import certificate
from session_manager.paths import Home
from session_manager.vm.machine import Machine, Sockets

if TYPE_CHECKING:
    from helpers.cli import Sm


# -- the test guest's serial log and disk ----------------------------------------------------------------------

class Serial:
    """The guest's serial console log, read as the guest writes it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def text(self, since: int = 0) -> str:
        try:
            return self.path.read_bytes().decode(errors="replace")[since:]
        except FileNotFoundError:
            return ""

    def size(self) -> int:
        return len(self.text())

    def last_start(self) -> int:
        """Offset where the latest run of the guest (a boot or a restore) begins."""
        return self.text().rfind("--- session-manager:")

    def counters(self, since: int = 0) -> list[int]:
        return [int(n) for n in re.findall(r"^counter (\d+)\r?$", self.text(since), re.MULTILINE)]

    def wait_counter(self, at_least: int, since: int = 0, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counters = self.counters(since)
            if len(counters) >= at_least:
                return counters[-1]
            time.sleep(0.2)
        raise AssertionError(f"the guest printed {len(self.counters(since))} counters, not {at_least}, "
                             f"in {timeout} s:\n{self.text(since)[-2000:]}")

    def wait_for(self, pattern: str, since: int = 0, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text(since), re.MULTILINE)
            if m:
                return m
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} did not appear within {timeout} s:\n{self.text(since)[-2000:]}")


def keeps_running(serial: Serial, since: int, count: int = 3) -> None:
    """The guest prints ``count`` more counters, consecutive, and its disk checks pass."""
    before = serial.counters(since)[-1:] or [0]
    serial.wait_counter(len(serial.counters(since)) + count, since=since, timeout=60)
    after = serial.counters(since)
    assert after == list(range(after[0], after[-1] + 1)), "the counter went back or jumped"
    assert after[-1] >= before[0] + count
    serial.wait_for(rf"^disk ok {after[-1]}", since=since)
    assert "disk-mismatch" not in serial.text()


def seq_records(qcow2: Path) -> list[int]:
    """The test guest's ``seq N`` records (sector N holds "seq N"), read from a qcow2 image (and its backing chain)
    on the host, even while QEMU has it open."""
    raw = qcow2.with_suffix(".records.raw")
    subprocess.run(["qemu-img", "dd", "-U", "-f", "qcow2", "-O", "raw", f"if={qcow2}", f"of={raw}", "bs=512",
                    "count=4096"], check=True, capture_output=True)
    data = raw.read_bytes()
    raw.unlink()
    records = []
    for sector in range(1, len(data) // 512):
        chunk = data[sector * 512:(sector + 1) * 512]
        if not chunk.startswith(b"seq "):
            break
        records.append(int(chunk[4:].split(b"\n")[0]))
    return records


# -- sessions of the test guest, started by the CLI ----------------------------------------------------------------

def two_checkpoints(sm: Sm, name: str, guest: tuple[Path, Path]) -> tuple[Serial, dict, dict, int, int]:
    """A running test guest ``name`` with two checkpoints three counts apart: (its serial log, the first, the
    latest, the last counter before the latest was taken, the last one after)."""
    sm.new_guest(name, guest, fill=16)
    sm("start", name)
    serial = sm.serial(name)
    serial.wait_for(r"^ready")
    serial.wait_counter(3)
    first = sm("checkpoint", name, "--json").json()
    serial.wait_counter(serial.counters()[-1] + 3)
    before = serial.counters()[-1]
    latest = sm("checkpoint", name, "--json").json()
    return serial, first, latest, before, serial.counters()[-1]


PATTERN_AT, PATTERN_LEN = 256 << 20, 48 << 20  # a region of a migration source's disk the guest never touches


@dataclass
class Source:
    """A running session to migrate."""

    name: str
    sockets: Sockets
    serial: Serial
    layer: Path


def start_source(sm: Sm, guest: tuple[Path, Path], name: str, *, fill: int = 16, dirty: int = 0,
                 window: int = 8, pattern: bool = False) -> Source:
    """The test guest started as session ``name``, counting; with ``pattern``, its disk holds 0xa5 bytes at
    PATTERN_AT (see pattern_intact) besides the guest's records."""
    sm.new_guest(name, guest, fill=fill, dirty=dirty, window=window)
    session = Session(Home.locate(sm.home), name)
    layer = session.layer_path(session.load_state().active_layer)
    if pattern:  # data for the mirror to carry, besides the guest's few records
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0xa5 {PATTERN_AT} {PATTERN_LEN}", str(layer)],
                       check=True, capture_output=True)
    sm("start", name)
    serial = sm.serial(name)
    serial.wait_for(r"^ready")
    serial.wait_counter(3)
    return Source(name, Sockets(session.runtime), serial, layer)


def pattern_intact(path: Path) -> bool:
    out = subprocess.run(["qemu-io", "-U", "-r", "-f", "qcow2", "-c", f"read -P 0xa5 {PATTERN_AT} {PATTERN_LEN}",
                          str(path)], capture_output=True, text=True)
    return out.returncode == 0 and "verification failed" not in out.stdout + out.stderr


# -- QMP -------------------------------------------------------------------------------------------------------------

class QmpClient:
    """A minimal synchronous QMP client over a unix socket: ``client("query-status")`` returns what QEMU returned
    (events are skipped; an error fails the test).  ``proc``: the QEMU, which must not exit while we connect."""

    def __init__(self, path: Path, proc: subprocess.Popen[Any] | None = None, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + timeout
        while self.sock.connect_ex(str(path)):
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                self.sock.close()
                raise AssertionError(f"QEMU did not start: nothing answered at {path}")
            time.sleep(0.05)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())
        self("qmp_capabilities")

    def __call__(self, command: str, **args: Any) -> Any:
        self.file.write(json.dumps({"execute": command, "arguments": args}) + "\n")
        self.file.flush()
        while "event" in (reply := json.loads(self.file.readline() or '{"error": "QEMU exited"}')):
            pass
        assert "return" in reply, f"QMP {command}: {reply.get('error', reply)}"
        return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class SessionQmp:
    """QMP of a session the CLI started, one command per connection, so the test itself stays synchronous."""

    def __init__(self, sm: Sm, name: str) -> None:
        self.sockets = Sockets(Path(sm("status", name, "--json").json()["qmp_socket"]).parent)

    def __call__(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        async def go() -> Any:
            async with Machine.connect(self.sockets) as m:
                return await m.run(cmd, args)
        return asyncio.run(go())

    def pointer(self, x: int | None = None, y: int | None = None, left: bool | None = None) -> None:
        events: list[dict[str, Any]] = [{"type": "abs", "data": {"axis": axis, "value": v}}
                                        for axis, v in (("x", x), ("y", y)) if v is not None]
        if left is not None:
            events.append({"type": "btn", "data": {"down": left, "button": "left"}})
        self("input-send-event", {"events": events})

    def type_upper(self, letter: str) -> None:
        self("send-key", {"keys": [{"type": "qcode", "data": "shift"}, {"type": "qcode", "data": letter}]})

    def screen(self, tmp: Path) -> tuple[int, int, bytes]:
        """Width, height and RGB bytes of the screen."""
        path = tmp / "screen.ppm"
        self("screendump", {"filename": str(path), "format": "ppm"})
        magic, size, _maxval, rgb = path.read_bytes().split(b"\n", 3)
        assert magic == b"P6"
        width, height = map(int, size.split())
        return width, height, rgb


# -- TLS between two QEMUs -------------------------------------------------------------------------------------------
# Each side a self-signed certificate, each trusting the other's (the migration tests and benchmarks/migration.py;
# the product lays them out with identity.write_qemu_tls_dir from an installation's identity).

def self_signed(cn: str) -> tuple[bytes, bytes]:
    return certificate(cn, ["localhost", "127.0.0.1"], 1)


def tls_dir(path: Path, own: tuple[bytes, bytes], peer_cert: bytes) -> Path:
    """QEMU's tls-creds-x509 dir= layout: the peer's certificate as the CA, our own for both roles."""
    path.mkdir(mode=0o700)
    (path / "ca-cert.pem").write_bytes(peer_cert)
    for role in ("server", "client"):
        (path / f"{role}-cert.pem").write_bytes(own[0])
        (path / f"{role}-key.pem").write_bytes(own[1])
    return path
