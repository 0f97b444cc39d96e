"""Migration streams: recorded from a real QEMU (record_stream, recorded_streams), built by hand (Synthetic), and
read back in pieces (reader)."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from helpers.qemu import QmpClient
from session_manager.vm.qemu import find_qemu, qemu_path
from session_manager.vm.stream import PAGE_SIZE

QEMU = find_qemu(qemu_path()).command  # $SESSION_MANAGER_QEMU or the system's; CI installs it: missing means failing
FILL_AT = 16 << 20  # guest-physical address where the recorder loads its random data


# -- from a real QEMU -----------------------------------------------------------------------------------------------

def record_stream(out: Path, memory_mib: int, fill: bytes, background: bool, capability: str = "") -> Path:
    """A migration stream of a real QEMU (TCG, started with -S) whose RAM holds ``fill`` at 16 MiB.

    Plain: the guest never ran, migrated while stopped.  Background: the guest runs the BIOS
    (a background snapshot from the prelaunch state makes QEMU 7.2 abort) during a
    background-snapshot migration.  ``capability``: one more migration capability to enable.
    """
    work = out.parent / f"{out.name}.d"
    work.mkdir(parents=True, exist_ok=True)
    (work / "fill.bin").write_bytes(fill)
    sock = work / "qmp.sock"
    qemu = subprocess.Popen(
        [*QEMU, "-accel", "tcg", "-m", str(memory_mib), "-display", "none", "-nodefaults", "-S",
         "-qmp", f"unix:{sock},server=on,wait=off",
         "-device", f"loader,file={work / 'fill.bin'},addr={FILL_AT:#x},force-raw=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cmd = None
    try:
        cmd = QmpClient(sock)
        if background:
            cmd("cont")
        for cap in ["background-snapshot"] * background + [capability] * bool(capability):
            cmd("migrate-set-capabilities", capabilities=[{"capability": cap, "state": True}])
        cmd("migrate", uri=f"exec:cat > {out}")
        deadline = time.monotonic() + 60
        while (status := cmd("query-migrate").get("status")) not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, "the migration did not finish"
            time.sleep(0.02)
        assert status == "completed"
        cmd("quit")
        qemu.wait(30)
    finally:
        if cmd:
            cmd.close()
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        shutil.rmtree(work)
    return out


def fill_data(mib: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(mib << 20)


def recorded_streams(base: Path) -> dict[str, Path]:
    """Streams recorded into ``base``, by name ("small-plain", "large-bg", ...): two guest sizes, plain and
    background (the session fixture qemu_streams records them once)."""
    base.mkdir(parents=True, exist_ok=True)
    return {
        f"{size}-{mode}": record_stream(base / f"{size}-{mode}.stream", memory, fill_data(fill, 1), mode == "bg")
        for size, memory, fill in (("small", 48, 4), ("large", 160, 24))
        for mode in ("plain", "bg")
    }


def reader(data: bytes, max_read: int | None = None, seed: int = 0) -> Callable[[int], bytes]:
    """A read(n) over ``data``; with max_read, short reads of random sizes, like a pipe."""
    pos = 0
    rnd = random.Random(seed)

    def read(n: int) -> bytes:
        nonlocal pos
        if max_read:
            n = min(n, rnd.randint(1, max_read))
        chunk = data[pos:pos + n]
        pos += len(chunk)
        return chunk

    return read


# -- built by hand --------------------------------------------------------------------------------------------------

def be32(n: int) -> bytes:
    return struct.pack(">I", n)


def be64(n: int) -> bytes:
    return struct.pack(">Q", n)


def name(s: bytes) -> bytes:
    """A name as the stream holds it: its length in one byte, then the name."""
    return bytes([len(s)]) + s


class Synthetic:
    """Builds a version-3 stream the way QEMU 7.2 writes one."""

    RAM_ID = 2

    def __init__(self, blocks: dict[bytes, int] | None = None) -> None:
        self.blocks = blocks or {b"pc.ram": 16 << 20, b"vga.vram": 4 << 20}
        self.out = bytearray(b"QEVM" + be32(3) + b"\x07" + be32(10) + b"pc-q35-7.2")
        self.last: bytes | None = None
        self.pages: list[bytes] = []

    def section(self, kind: int) -> Synthetic:
        self.out += bytes([kind]) + be32(self.RAM_ID)
        if kind == 0x01:
            self.out += name(b"ram") + be32(0) + be32(4)
            self.out += be64(sum(self.blocks.values()) | 0x04)
            for block, size in self.blocks.items():
                self.out += name(block) + be64(size)
            self.end()
        return self

    def page(self, block: bytes, addr: int, data: bytes | None = None) -> Synthetic:
        flags = 0x08 if data is not None else 0x02
        if block == self.last:
            flags |= 0x20
        self.out += be64(addr | flags)
        if block != self.last:
            self.out += name(block)
            self.last = block
        if data is None:
            self.out += b"\x00"
        else:
            assert len(data) == PAGE_SIZE
            self.out += data
            self.pages.append(data)
        return self

    def end(self) -> Synthetic:
        self.out += be64(0x10) + b"\x7e" + be32(self.RAM_ID)
        return self

    def devices(self, state: bytes = b"\x00\x01\x02\x03" * 100) -> bytes:
        self.out += b"\x04" + be32(0) + name(b"timer") + be32(0) + be32(2) + state + b"\x7e" + be32(0)
        desc = json.dumps({"page_size": 4096, "devices": []}).encode()
        self.out += b"\x00" + b"\x06" + be32(len(desc)) + desc
        return bytes(self.out)
