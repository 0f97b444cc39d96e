"""Viewer benchmark: our RFB client on QEMU's VNC unix socket, full-screen changes, in one run.

    .venv/bin/python benchmarks/viewer.py [--seconds 10] [--keys 20]

The test guest switches to its graphical framebuffer (typed `M`) and starts its full-frame painter
(typed `P`, see session_manager/testguest.py: it flips the display between random screens in video
memory every few milliseconds), so every screen refresh changes every pixel. For each encoding set
it connects one client, warms up, then counts for ``--seconds``:
- updates: FramebufferUpdate messages carrying pixels, per second;
- screens: updated pixels / screen pixels, per second (full-frame equivalents);
- client CPU: time.process_time() of this process (the server not included) per full-frame equivalent;
- bytes received per second, and the server's own CPU share in the same window, for context.
Ours: Raw (the default on local sockets) and Zlib with CompressLevel 1 (the default over TCP);
the baseline: Zlib at QEMU's default level. Then the same Raw measurement against a VNC server that
is not QEMU: Xvnc (TigerVNC) at 1024x768, where an X client (another process) copies two random
full-screen pixmaps onto the root window in turn, as fast as the X server takes them. Then the
client alone, fed full frames by a local replaying server in another process, for its own ceiling.

Key latency: from our Extended Key Event (press) to the guest's `key X` line in its serial log
(the file QEMU writes), against QMP `send-key` as the baseline; painter off, one key at a time.

Prints Markdown tables (paste them into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_line
from session_manager import rfb
from session_manager.guests.testguest import build
from session_manager.local.engine import Engine
from session_manager.paths import Home
from session_manager.vm.machine import Machine, Sockets

CONFIGS: list[tuple[str, Sequence[int]]] = [
    ("Raw (ours, local sockets)", rfb.LOCAL_ENCODINGS),
    ("Zlib + CompressLevel 1 (ours, TCP)", rfb.NETWORK_ENCODINGS),
    ("Zlib, QEMU's default level (baseline)", tuple(e for e in rfb.NETWORK_ENCODINGS if e != rfb.COMPRESS_LEVEL_1)),
]
SCANCODES = {c: 0x1E + i for i, c in enumerate("asdfghjkl")}

# A VNC server that answers every FramebufferUpdateRequest at once with the next of two random
# full frames (like the guest's painter), for the client's own ceiling. Own process: its CPU is not ours.
REPLAY_SERVER = r"""
import os, socket, struct, sys, zlib
s = socket.socket(fileno=int(sys.argv[1]))
w, h, encoding = 1024, 768, int(sys.argv[2])
frames = [os.urandom(w * h * 4), os.urandom(w * h * 4)]
if encoding == 6:
    z = zlib.compressobj(1)
    data = [z.compress(f) + z.flush(zlib.Z_FULL_FLUSH) for f in frames + frames]  # after a full flush
    data = [data[0], data[3], data[2]]  # blocks need no history: replay A+hdr, then B, A, B, A...
    data = [struct.pack(">I", len(d)) + d for d in data]
else:
    data = frames
msgs = [struct.pack(">BxHHHHHi", 0, 1, 0, 0, w, h, encoding) + d for d in data]
r = s.makefile("rb")
s.sendall(b"RFB 003.008\n"); r.read(12); s.sendall(b"\x01\x01"); r.read(1); s.sendall(bytes(4)); r.read(1)
s.sendall(struct.pack(">HH16sI", w, h, bytes(16), 6) + b"replay")
sent = 0
try:
    while kind := r.read(1):
        rest = r.read({0: 19, 2: 3, 3: 9, 4: 7, 5: 5}[kind[0]])
        if kind[0] == 2:
            r.read(4 * struct.unpack(">xH", rest)[0])
        elif kind[0] == 3:
            s.sendall(msgs[0] if sent == 0 else msgs[1 + (sent - 1) % (len(msgs) - 1)])
            sent += 1
except OSError:
    pass  # the client went away
"""
SHIFT = (0xFFE1, 0x2A)

# The X client for Xvnc: two random full-screen pixmaps, copied onto the root window in turn, one
# round trip per copy. Own process: its CPU is not ours.
X_PAINTER = r"""
import os, sys
from Xlib import X, display
d = display.Display(sys.argv[1])
screen = d.screen()
root, w, h = screen.root, screen.width_in_pixels, screen.height_in_pixels
gc = root.create_gc()
images = [root.create_pixmap(w, h, screen.root_depth) for _ in range(2)]
for image in images:
    pixels = os.urandom(w * h * 4)
    for y in range(0, h, 32):  # PutImage requests stay under X's 256 KiB limit
        image.put_image(gc, 0, y, w, 32, X.ZPixmap, screen.root_depth, 0, pixels[y * w * 4:(y + 32) * w * 4])
d.sync()
print("ready", flush=True)
while True:
    for image in images:
        root.copy_area(gc, image, 0, 0, w, h, 0, 0)
        d.sync()
"""
# Xvnc sends at most FrameRate (default 60) updates a second to a client: lifted, to find ours.
XVNC = ["Xvnc", "-geometry", "1024x768", "-depth", "24", "-rfbport", "-1", "-SecurityTypes", "None",
        "-nolisten", "tcp", "-FrameRate", "1000"]


class Serial:
    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        return self.path.read_bytes().decode(errors="replace") if self.path.exists() else ""

    async def wait(self, pattern: str, since: int = 0, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text()[since:], re.MULTILINE)
            if m:
                return m
            await asyncio.sleep(0.001)
        raise SystemExit(f"the guest never printed {pattern!r}")


def cpu_time(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def type_upper(client: rfb.RfbClient, ch: str) -> None:
    client.key_event(True, *SHIFT)
    client.key_event(True, ord(ch), {"M": 0x32, "P": 0x19}[ch])
    await asyncio.sleep(0.03)
    client.key_event(False, ord(ch), {"M": 0x32, "P": 0x19}[ch])
    client.key_event(False, *SHIFT)


async def measure(vnc: Path, encodings: Sequence[int], seconds: float, server_pid: int) -> dict[str, float]:
    client = await rfb.RfbClient.open_unix(vnc, encodings=encodings)
    received = 0
    buffer_updated = client._conn.buffer_updated  # count bytes off the socket (benchmark only)

    def counting(nbytes: int) -> None:
        nonlocal received
        received += nbytes
        buffer_updated(nbytes)

    client._conn.buffer_updated = counting  # type: ignore[method-assign]
    area = messages = 0

    def on_update(x: int, y: int, w: int, h: int) -> None:
        nonlocal area
        area += w * h

    def on_frame() -> None:
        nonlocal messages
        messages += 1

    client.on_update = on_update
    client.on_frame = on_frame
    task = asyncio.create_task(client.run())
    await asyncio.sleep(2)  # warm up: the first full frame, QEMU's refresh rate settles
    area = messages = received = 0
    cpu0, server0, t0 = time.process_time(), cpu_time(server_pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu, server, wall = time.process_time() - cpu0, cpu_time(server_pid) - server0, time.monotonic() - t0
    screens = area / (client.width * client.height)
    n_messages, n_bytes = messages, received
    await client.close()
    await task
    return {"updates": n_messages / wall, "screens": screens / wall, "cpu_ms": cpu * 1000 / max(screens, 1e-9),
            "mb_s": n_bytes / wall / 1e6, "server_cpu": server / wall * 100, "client_cpu": cpu / wall * 100}


async def key_latency(vnc: Path, sockets: Sockets, serial: Serial, keys: int) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    qmp: list[float] = []
    client = await rfb.RfbClient.open_unix(vnc)
    task = asyncio.create_task(client.run())
    async with Machine.connect(sockets) as m:
        for i in range(keys):
            ch = "asdfghjkl"[i % 9]
            since = len(serial.text())
            t = time.monotonic()
            client.key_event(True, ord(ch), SCANCODES[ch])
            await serial.wait(rf"^key {ch}\r?$", since)
            ours.append(time.monotonic() - t)
            client.key_event(False, ord(ch), SCANCODES[ch])
            await asyncio.sleep(0.2)
            since = len(serial.text())
            t = time.monotonic()
            await m.run("send-key", {"keys": [{"type": "qcode", "data": ch}]})
            await serial.wait(rf"^key {ch}\r?$", since)
            qmp.append(time.monotonic() - t)
            await asyncio.sleep(0.2)
    await client.close()
    await task
    return ours, qmp


def xvnc_measure(seconds: float, work: Path) -> dict[str, float]:
    """The Raw measurement against Xvnc, with X_PAINTER drawing; also the X client's CPU share."""
    r, w = os.pipe()
    xvnc = subprocess.Popen([*XVNC, "-rfbunixpath", str(work / "xvnc.sock"), "-displayfd", str(w)], pass_fds=[w],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    with os.fdopen(r) as f:
        display = ":" + f.readline().strip()
    painter = subprocess.Popen([sys.executable, "-c", X_PAINTER, display], stdout=subprocess.PIPE, text=True)
    try:
        assert painter.stdout is not None and painter.stdout.readline().strip() == "ready"
        x0, t0 = cpu_time(painter.pid), time.monotonic()
        result = asyncio.run(measure(work / "xvnc.sock", rfb.LOCAL_ENCODINGS, seconds, xvnc.pid))
        result["x_client_cpu"] = (cpu_time(painter.pid) - x0) / (time.monotonic() - t0) * 100
    finally:
        painter.kill()
        xvnc.terminate()
        painter.wait()
        xvnc.wait()
    return result


async def client_alone(encodings: Sequence[int], seconds: float) -> dict[str, float]:
    """Full frames per second and CPU per frame of the client fed by REPLAY_SERVER."""
    ours, theirs = socket.socketpair()
    encoding = rfb.ZLIB if encodings[0] == rfb.ZLIB else rfb.RAW
    server = await asyncio.create_subprocess_exec(sys.executable, "-c", REPLAY_SERVER, str(theirs.fileno()),
                                                  str(encoding), pass_fds=[theirs.fileno()])
    theirs.close()
    client = await rfb.RfbClient.open_socket(ours, encodings=encodings)
    frames = 0

    def on_frame() -> None:
        nonlocal frames
        frames += 1

    client.on_frame = on_frame
    task = asyncio.create_task(client.run())
    await asyncio.sleep(1)
    frames, cpu0, t0 = 0, time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    n, cpu, wall = frames, time.process_time() - cpu0, time.monotonic() - t0
    await client.close()
    await task
    await server.wait()
    return {"fps": n / wall, "cpu_ms": cpu * 1000 / n}


def ms(values: list[float]) -> str:
    values = sorted(values)
    return f"{statistics.median(values) * 1000:.0f} ms (p90 {values[int(len(values) * 0.9) - 1] * 1000:.0f} ms)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10, help="measuring time per encoding")
    ap.add_argument("--keys", type=int, default=20, help="keys timed per method")
    a = ap.parse_args()
    os.environ.setdefault("SESSION_MANAGER_ACCEL", "tcg")

    work = Path(tempfile.mkdtemp(prefix="sm-viewer-", dir=os.environ.get("BENCH_DIR")))
    engine = Engine(Home.locate(work / "home"))
    kernel, initrd = build(ROOT / ".cache" / "testguest")
    engine.new_session("view", kernel=kernel, initrd=initrd, append="console=ttyS0 quiet", memory_mib=256, cpus=1,
                       disk_size=1 << 30)
    session = engine.session("view")
    asyncio.run(engine.start("view"))
    sockets = Sockets(session.runtime)
    pid = sockets.pid()
    assert pid is not None
    serial = Serial(session.serial_log)

    async def run_all() -> tuple[str, dict[str, dict[str, float]], tuple[list[float], list[float]]]:
        await serial.wait(r"^ready\r?$")
        await serial.wait(r"^counter 2\r?$")
        client = await rfb.RfbClient.open_unix(sockets.vnc)
        task = asyncio.create_task(client.run())
        latency = await key_latency(sockets.vnc, sockets, serial, a.keys)  # text console, painter off
        since = len(serial.text())
        await type_upper(client, "M")
        mode = (await serial.wait(r"^mode (\d+x\d+)\r?$", since))[1]
        since = len(serial.text())
        await type_upper(client, "P")
        await serial.wait(r"^paint on\r?$", since)
        await client.close()
        await task
        results = {}
        for label, encodings in CONFIGS:
            print(f"measuring {label}...", file=sys.stderr)
            results[label] = await measure(sockets.vnc, encodings, a.seconds, pid)
        return mode, results, latency

    try:
        mode, results, (ours, qmp) = asyncio.run(run_all())
    finally:
        asyncio.run(engine.stop("view", save=False))
    print("measuring Xvnc...", file=sys.stderr)
    xvnc = xvnc_measure(a.seconds, work)
    xvnc_version = re.search(r"TigerVNC [\d.]+", subprocess.run(["Xvnc", "-version"], capture_output=True,
                                                                 text=True).stderr)
    alone = {label: asyncio.run(client_alone(encodings, a.seconds)) for label, encodings in CONFIGS[:2]}

    print(f"\n{machine_line()}")
    print(f"Guest: test guest in its {mode} 32 bpp framebuffer mode, full-frame painter on (random screens); "
          f"{a.seconds:.0f} s per encoding over the VNC unix socket.\n")
    labels = [label for label, _ in CONFIGS]
    print("| what | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    rows = [("full-screen updates per second", "screens", "{:.1f}"),
            ("update messages per second", "updates", "{:.1f}"),
            ("client CPU per full-screen update", "cpu_ms", "{:.2f} ms"),
            ("client CPU (share of one core)", "client_cpu", "{:.0f} %"),
            ("received", "mb_s", "{:.0f} MB/s"),
            ("server's CPU (share of one core; QEMU: guest included)", "server_cpu", "{:.0f} %")]
    for title, key, fmt in rows:
        print(f"| {title} | " + " | ".join(fmt.format(results[label][key]) for label in labels) + " |")
    version = xvnc_version[0] if xvnc_version else "TigerVNC"
    print(f"\nThe same Raw client against Xvnc ({version}, FrameRate 1000: its default caps updates at 60 a second), "
          f"where an X client in its own process copies two random full-screen images onto the root window in turn, "
          f"one round trip each (X client: {xvnc['x_client_cpu']:.0f} % of a core).\n")
    short = ["full screens/s", "messages/s", "client CPU per full screen", "client CPU", "received", "server's CPU"]
    print("| Raw over the unix socket of | " + " | ".join(short) + " |")
    print("|---|" + "---|" * len(rows))
    for server, r in [("QEMU, the test guest's painter (Raw column above)", results[labels[0]]), ("Xvnc", xvnc)]:
        print(f"| {server} | " + " | ".join(fmt.format(r[key]) for _, key, fmt in rows) + " |")
    print("\n| client alone: a local server replays two random 1024x768 frames as fast as asked | "
          + " | ".join(alone) + " |")
    print("|---|---|---|")
    print("| full frames per second | " + " | ".join(f"{r['fps']:.0f}" for r in alone.values()) + " |")
    print("| client CPU per frame | " + " | ".join(f"{r['cpu_ms']:.2f} ms" for r in alone.values()) + " |")
    print("\n| key press → guest's `key X` serial line | ours (QEMU Extended Key Event) | QMP send-key (baseline) |")
    print("|---|---|---|")
    print(f"| median (p90) of {a.keys} keys, text console | {ms(ours)} | {ms(qmp)} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
