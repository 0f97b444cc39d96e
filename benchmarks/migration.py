"""Live-migration benchmark: our migration (TLS, NBD disk mirror) against QEMU's plain migration, in one run.

    .venv/bin/python benchmarks/migration.py [--memory 1536] [--fill 1200] [--dirty 4] [--window 32] [--qemu PATH]...
                                             [--limits 300,50]

Two test guests in turn, on loopback: an idle one (sm.dirty=0) and one that re-dirties ``--dirty`` MiB/s in a
``--window`` MiB window; both random-fill ``--fill`` MiB at boot.  For each guest and each downtime limit:

- ours: ``Migration(...).run()`` to a destination QEMU (the session's command line, a blank disk, ``-incoming
  defer -S``) prepared with ``prepare_incoming``: TLS on both links, the whole disk mirrored over NBD, then
  ``finish_incoming`` (the destination runs the guest);
- baseline: QEMU's plain unencrypted ``migrate tcp:127.0.0.1:PORT`` to a destination that opens the source's
  own disk chain (shared storage: no disk copied), default capabilities, the same max-bandwidth (unlimited)
  and downtime-limit as ours.

After each migration the destination is killed and the source's guest continued, so every row migrates the
same running guest.  Prints Markdown tables (paste them into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


from benchmarks.common import default_qemus, guest_arguments, machine_line, print_table, wait_serial
from helpers.qemu import self_signed, tls_dir
from session_manager.cli import _setup_logging
from session_manager.guests.testguest import build
from session_manager.local.engine import Engine
from session_manager.paths import Home
from session_manager.vm.disk import create_blank, image_info, new_layer_name
from session_manager.vm.machine import Machine, Sockets, launch, node_name
from session_manager.vm.migrate import (
    UNLIMITED_BANDWIDTH,
    Migration,
    finish_incoming,
    prepare_incoming,
    resume_source,
)
from session_manager.vm.qemu import command_line, find_qemu, qemu_path

MB = 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Row:
    guest: str
    who: str  # "ours" / "baseline"
    limit_ms: int
    downtime_ms: float
    handoff_ms: float | None  # ours: finish_incoming until the destination's guest runs
    total_s: float
    disk_bytes: int
    ram_bytes: int
    passes: int


class Bench:
    def __init__(self, work: Path, engine: Engine, name: str, tls_src: Path, tls_dst: Path) -> None:
        self.work, self.engine, self.name = work, engine, name
        self.session = engine.session(name)
        self.sockets = Sockets(self.session.runtime)
        self.tls_src, self.tls_dst = tls_src, tls_dst
        self.n = 0

    def top_layer(self) -> Path:
        return self.session.layer_path(self.session.load_state().active_layer)

    async def destination(self, disk: Path) -> tuple[Sockets, int]:
        self.n += 1
        rt = Sockets(self.work / f"{self.name}-d{self.n}")
        rt.runtime.mkdir(mode=0o700)
        argv = command_line(find_qemu(qemu_path()), self.session.load_config(),
                            accel=os.environ["SESSION_MANAGER_ACCEL"],
                            top_layer=disk, sockets=rt, serial_log=rt.runtime / "serial.log", incoming=True,
                            paused=True)
        return rt, await launch(argv, rt, rt.runtime / "qemu.log")

    @staticmethod
    def kill(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def settle(self, m: Machine) -> None:
        await resume_source(m)
        await asyncio.sleep(3)  # the guest runs (and re-dirties) again before the next migration

    async def ours(self, guest: str, limit: int) -> Row:
        disk = self.work / new_layer_name()
        create_blank(disk, int(image_info(self.top_layer())["virtual-size"]))
        rt, pid = await self.destination(disk)
        nbd_port, ram_port = free_port(), free_port()
        try:
            async with Machine.connect(rt) as d:
                await prepare_incoming(d, listen_host="127.0.0.1", nbd_port=nbd_port, migrate_port=ram_port,
                                       tls_dir=self.tls_dst, disk_node=node_name(disk.name))
            async with Machine.connect(self.sockets) as m:
                r = await Migration(m, dest_host="127.0.0.1", nbd_port=nbd_port, migrate_port=ram_port,
                                    tls_dir=self.tls_src, downtime_limit_ms=limit).run()
                async with Machine.connect(rt) as d:
                    t = time.monotonic()
                    await finish_incoming(d)
                    handoff = (time.monotonic() - t) * 1000
                self.kill(pid)
                await self.settle(m)
        finally:
            self.kill(pid)
            disk.unlink(missing_ok=True)
        return Row(guest, "ours", limit, r.downtime_ms, handoff, r.total_s, r.disk_bytes, r.ram_bytes, r.passes)

    async def baseline(self, guest: str, limit: int) -> Row:
        rt, pid = await self.destination(self.top_layer())  # shared storage: the source's own disk chain
        port = free_port()
        try:
            async with Machine.connect(rt) as d:
                # With -S QEMU would otherwise take the disk's locks when the state arrives; we continue the
                # source afterwards, so the destination must never touch the shared disk.
                await d.run("migrate-set-capabilities",
                            {"capabilities": [{"capability": "late-block-activate", "state": True}]})
                await d.run("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
            async with Machine.connect(self.sockets) as m:
                caps = {c["capability"]: c["state"] for c in await m.run("query-migrate-capabilities")}
                params = await m.run("query-migrate-parameters")
                await m.run("migrate-set-capabilities",
                            {"capabilities": [{"capability": "background-snapshot", "state": False}]})
                await m.run("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH, "downtime-limit": limit})
                t = time.monotonic()
                await m.run("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
                while True:
                    info = await m.run("query-migrate")
                    if info.get("status") == "completed":
                        break
                    if info.get("status") in ("failed", "cancelled"):
                        raise SystemExit(f"baseline migration {info['status']}: {info.get('error-desc')}")
                    await asyncio.sleep(0.005)
                total = time.monotonic() - t
                self.kill(pid)
                await m.run("migrate-set-parameters", {k: params[k] for k in ("max-bandwidth", "downtime-limit")})
                await m.run("migrate-set-capabilities", {"capabilities": [
                    {"capability": "background-snapshot", "state": caps.get("background-snapshot", False)}]})
                await self.settle(m)
        finally:
            self.kill(pid)
        ram = info.get("ram", {})
        return Row(guest, "baseline", limit, float(info.get("downtime", 0)), None, total, 0,
                   int(ram.get("transferred", 0)), int(ram.get("dirty-sync-count", 0)))


def main() -> None:
    ap = argparse.ArgumentParser()
    guest_arguments(ap, "MiB/s the busy guest re-dirties")
    ap.add_argument("--limits", default="300,50", help="downtime-limit values (ms) to run, comma-separated")
    a = ap.parse_args()
    os.environ.setdefault("SESSION_MANAGER_ACCEL", "tcg")
    load_start = os.getloadavg()[0]
    results = []
    for path in a.qemu or default_qemus():
        os.environ["SESSION_MANAGER_QEMU"] = path
        print(f"measuring with {find_qemu(path).describe()}...", file=sys.stderr)
        results.append((find_qemu(path).version_text, measure(a, [int(x) for x in a.limits.split(",")])))
    print(f"\n{machine_line([v for v, _ in results])}")
    print(f"Guest: {a.memory} MiB RAM, {a.fill} MiB random-filled; idle (sm.dirty=0) or re-dirtying {a.dirty} MiB/s "
          f"in a {a.window} MiB window. Loopback, max-bandwidth unlimited on both sides. session-manager: TLS + NBD "
          f"disk mirror; baseline: QEMU's plain `migrate tcp:` with a shared disk. Load average (1 min) "
          f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n")
    print_table(results)


def measure(a: argparse.Namespace, limits: list[int]) -> list[tuple[str, str, str, str]]:
    """Every guest and limit, ours and the baseline, on the QEMU that $SESSION_MANAGER_QEMU names: rows of (what,
    ours, baseline, ratio)."""
    work = Path(tempfile.mkdtemp(prefix="sm-mig-", dir=os.environ.get("BENCH_DIR")))
    engine = Engine(Home.locate(work / "home"))
    _setup_logging(engine.home, verbose=False)
    kernel, initrd = build(ROOT / ".cache" / "testguest")
    src, dst = self_signed("source"), self_signed("destination")
    tls_src, tls_dst = tls_dir(work / "tls-src", src, dst[0]), tls_dir(work / "tls-dst", dst, src[0])

    rows: list[Row] = []
    guests = [("idle", 0, 0), ("re-dirtying", a.dirty, a.window)]
    for guest, dirty, window in guests:
        name = "idle" if dirty == 0 else "busy"
        append = f"console=ttyS0 quiet sm.fill={a.fill} sm.dirty={dirty} sm.window={window or dirty}"
        engine.new_session(name, kernel=kernel, initrd=initrd, append=append, memory_mib=a.memory, cpus=1,
                           disk_size=1 << 30)
        asyncio.run(engine.start(name))
        serial = engine.session(name).serial_log
        print(f"{guest} guest: filling {a.fill} MiB...", file=sys.stderr)
        wait_serial(serial, r"^ready")
        wait_serial(serial, r"^counter 3")
        b = Bench(work, engine, name, tls_src, tls_dst)
        try:
            for limit in limits:
                for who in ("ours", "baseline"):
                    row = asyncio.run(b.ours(guest, limit) if who == "ours" else b.baseline(guest, limit))
                    print(f"  {row}", file=sys.stderr)
                    rows.append(row)
            if "disk-mismatch" in serial.read_text(errors="replace"):
                raise SystemExit(f"the {guest} guest reported a disk mismatch")
        finally:
            asyncio.run(engine.stop(name, save=False))
    subprocess.run(["rm", "-rf", str(work)])

    table: list[tuple[str, str, str, str]] = []
    for guest, _, _ in guests:
        for limit in limits:
            o = next(r for r in rows if r.guest == guest and r.limit_ms == limit and r.who == "ours")
            p = next(r for r in rows if r.guest == guest and r.limit_ms == limit and r.who == "baseline")
            table.append((f"{guest}, {limit} ms: downtime",
                          f"{o.downtime_ms:.0f} ms (+ {o.handoff_ms:.0f} ms until the destination runs)",
                          f"{p.downtime_ms:.0f} ms", f"{o.downtime_ms / max(p.downtime_ms, 1):.2f}×"))
            table.append((f"{guest}, {limit} ms: total time", f"{o.total_s:.2f} s ({o.passes} RAM passes)",
                          f"{p.total_s:.2f} s ({p.passes} RAM passes)", f"{o.total_s / p.total_s:.2f}×"))
            table.append((f"{guest}, {limit} ms: bytes sent",
                          f"{(o.disk_bytes + o.ram_bytes) / MB:.0f} MB (disk {o.disk_bytes / MB:.1f} MB + memory "
                          f"{o.ram_bytes / MB:.0f} MB, on the wire, TLS included)",
                          f"{p.ram_bytes / MB:.0f} MB (memory; QEMU's ram transferred)",
                          f"{(o.disk_bytes + o.ram_bytes) / p.ram_bytes:.2f}×"))
    return table


if __name__ == "__main__":
    main()
