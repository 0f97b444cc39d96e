"""Backup and autosave benchmark: replication to a loopback S3 server and the guest's slowdown, in one run.

    .venv/bin/python benchmarks/backup.py [--memory 1536] [--fill 1200] [--dirty 4] [--window 32] [--gap 10] \\
        [--autosaves 5] [--dump FILE]

A real SeaweedFS (`weed mini`, tests/helpers/s3server.py) on loopback; the test guest with its work-rate
meter on (sm.work=1: a shell loop in the guest prints `work N`, its iterations per second, every
second).  The session is autosaved ``--autosaves`` times, ``--gap`` seconds apart (the same code
path as the app's autosave: Autosaver.save, kind "autosave"), each autosave then pushed to the
server with replicate(), as the app's replicator does.  Prints Markdown tables (paste them into
docs/benchmarks.md):
- push of the 1st and 2nd checkpoint vs obstore puts of the same objects (same sizes, same
  server, as many at once as replicate sends), and bytes sent vs each checkpoint's stored size;
- the guest's work rate in the seconds overlapping each autosave (and each push) vs the seconds
  before it, min / median over the autosaves; the baseline: the same for QEMU's own background
  snapshot into a file (``migrate "exec:cat > FILE"``), as many times, after the autosaves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")  # throwaway keys: key files

import obstore
from obstore.store import S3Store

from benchmarks.checkpoint import background_snapshot
from benchmarks.common import WorkMeter, guest_arguments, machine_line, wait_serial
from helpers.s3server import S3Server, s3_server
from session_manager.cli import _setup_logging
from session_manager.guests.testguest import build
from session_manager.local.autosave import AutosavePolicy, Autosaver
from session_manager.local.engine import Engine
from session_manager.paths import Home
from session_manager.store.backend import Backend
from session_manager.store.replicate import WORKERS, Transfer, replicate
from session_manager.store.repo import CheckpointInfo
from session_manager.vm.machine import Machine

MiB = 1 << 20
OBJECTS = ("keys/", "data/", "index/", "checkpoints/", "annotations/")  # and config; locks/ are not copied


def objects(backend: Backend) -> dict[str, int]:
    """The repository's objects (what a copy sends: no locks) and their sizes."""
    return {"config": backend.stat("config"),
            **{n: size for prefix in OBJECTS for n, size in backend.sizes(prefix).items()}}


def plain_upload(server: S3Server, prefix: str, root: Path, names: Iterable[str]) -> float:
    """Seconds to put the files ``names`` of ``root`` to the server as they are, WORKERS at a time."""
    store = S3Store(server.bucket, prefix=prefix, endpoint=server.endpoint, region="us-east-1",
                    access_key_id=server.access_key, secret_access_key=server.secret_key,
                    client_options={"allow_http": True})

    def one(name: str) -> None:
        obstore.put(store, name, (root / name).read_bytes())

    start = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(one, names))
    return time.monotonic() - start


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def main() -> None:
    ap = argparse.ArgumentParser()
    guest_arguments(ap)
    ap.add_argument("--gap", type=float, default=10, help="quiet seconds before each autosave")
    ap.add_argument("--autosaves", type=int, default=5)
    ap.add_argument("--dump", type=Path, help="write the guest's `work N` lines and the measured windows here (JSON)")
    a = ap.parse_args()
    os.environ.setdefault("SESSION_MANAGER_ACCEL", "tcg")
    load_start = os.getloadavg()

    work = Path(tempfile.mkdtemp(prefix="sm-bench-", dir=os.environ.get("BENCH_DIR")))
    (work / "s3").mkdir()
    engine = Engine(Home.locate(work / "home"))
    _setup_logging(engine.home, verbose=False)
    kernel, initrd = build(ROOT / ".cache" / "testguest")
    append = f"console=ttyS0 quiet sm.fill={a.fill} sm.dirty={a.dirty} sm.window={a.window} sm.work=1"
    engine.new_session("bench", kernel=kernel, initrd=initrd, append=append, memory_mib=a.memory, cpus=1,
                       disk_size=1 << 30)
    session = engine.session("bench")
    root = engine.home.repository

    async def run(server: S3Server) -> dict:
        await engine.start("bench")
        print(f"filling {a.fill} MiB in the guest...", file=sys.stderr)
        await asyncio.to_thread(wait_serial, session.serial_log, r"^ready")
        meter = WorkMeter(session.serial_log)
        meter.start()
        await asyncio.to_thread(meter.wait_lines, 2)
        autosaver = Autosaver(engine, AutosavePolicy(), ["bench"])
        dst = server.backend("replica")
        r: dict = {"saves": [], "pushes": [], "raw": []}
        quiet = time.monotonic()
        try:
            for i in range(a.autosaves):
                await asyncio.sleep(max(0.0, quiet + a.gap - time.monotonic()))
                print(f"autosave {i + 1} of {a.autosaves}...", file=sys.stderr)
                t0 = time.monotonic()
                info: CheckpointInfo | None = await autosaver.save("bench")
                t1 = time.monotonic()
                if info is None:
                    raise SystemExit(f"the autosave failed; see {engine.home.log_file}")
                before = await asyncio.to_thread(objects, engine.repo.backend)
                started = time.monotonic()
                sent: Transfer = await asyncio.to_thread(replicate, engine.repo, dst)
                t2 = time.monotonic()
                new = sorted(set(before) - set().union(*(p["names"] for p in r["pushes"])))
                push = {"names": new, "bytes": sum(before[n] for n in new), "sent": sent, "s": t2 - started,
                        "window": (t1, t2)}
                if push["bytes"] != sent.bytes_done:
                    print(f"note: replicate sent {sent.bytes_done} bytes, the new objects hold {push['bytes']}",
                          file=sys.stderr)
                if i < 2:  # the baseline: the same objects, put as they are
                    push["plain_s"] = await asyncio.to_thread(plain_upload, server, f"plain{i + 1}", root, new)
                r["saves"].append({"info": info, "window": (t0, t1), "quiet": quiet})
                r["pushes"].append(push)
                quiet = time.monotonic() + 1  # the next second still overlaps what was just done
            raw = work / "raw.stream"
            for i in range(a.autosaves):
                await asyncio.sleep(max(0.0, quiet + a.gap - time.monotonic()))
                print(f"QEMU's own background snapshot {i + 1} of {a.autosaves}...", file=sys.stderr)
                async with Machine.connect(engine.sockets(session)) as m:
                    t0 = time.monotonic()
                    await background_snapshot(m, f"exec:cat > {raw}")
                    t1 = time.monotonic()
                raw.unlink()
                r["raw"].append({"window": (t0, t1), "quiet": quiet})
                quiet = time.monotonic() + 1
            await asyncio.sleep(2)  # the seconds overlapping the last push are printed
        finally:
            meter.done.set()
            await engine.stop("bench", save=False)
        r["meter"] = meter
        return r

    with s3_server(work / "s3") as server:
        r = asyncio.run(run(server))
    load_end = os.getloadavg()

    meter: WorkMeter = r["meter"]
    saves, pushes = r["saves"], r["pushes"]
    if a.dump:
        a.dump.write_text(json.dumps({"work": meter.lines, "autosaves": [s["window"] for s in saves],
                                      "pushes": [p["window"] for p in pushes],
                                      "qemu_snapshots": [b["window"] for b in r["raw"]]}))
    ratios, lows, push_ratios = [], [], []
    for save, push in zip(saves, pushes):
        outside = meter.before(max(save["quiet"], save["window"][0] - a.gap), save["window"][0])
        during, low = meter.during(*save["window"])
        ratios.append(during / outside)
        lows.append(low / outside)
        save["outside"] = outside
        push_ratios.append(meter.during(*push["window"])[0] / outside)
    raw_ratios = [meter.during(*b["window"])[0] / meter.before(max(b["quiet"], b["window"][0] - a.gap), b["window"][0])
                  for b in r["raw"]]

    print(f"\n{machine_line()}")
    print(f"Guest: {a.memory} MiB RAM, {a.fill} MiB random-filled, re-dirtying {a.dirty} MiB/s in a {a.window} MiB "
          f"window, work-rate meter on (sm.work=1); {a.autosaves} autosaves, each {a.gap:.0f} s after the "
          f"previous one's push (and baseline upload). Server: SeaweedFS `weed mini` on 127.0.0.1, same disk. "
          f"Load average (1 min) "
          f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end.\n")
    print("| what | session-manager (replicate) | plain upload (baseline) | ratio |")
    print("|---|---|---|---|")
    for n, push in enumerate(pushes[:2], 1):
        mib = push["bytes"] / MiB
        ours, plain = mib / push["s"], mib / push["plain_s"]
        print(f"| push of checkpoint {n}: {len(push['names'])} objects, {mib:.1f} MiB | {ours:.0f} MiB/s "
              f"({push['s']:.2f} s) | obstore put of the same objects, {WORKERS} at a time: {plain:.0f} MiB/s "
              f"({push['plain_s']:.2f} s) | {ours / plain:.2f}× |")
    for n, (save, push) in enumerate(zip(saves[:2], pushes[:2]), 1):
        sent, stored = push["sent"].bytes_done, save["info"].added_bytes
        print(f"| bytes sent, push of checkpoint {n} | {sent / MiB:.1f} MiB ({push['sent'].objects_done} objects) "
              f"| stored size of checkpoint {n} (added_bytes): {stored / MiB:.1f} MiB | {sent / stored:.2f}× |")
    later = [p["sent"].bytes_done / s["info"].added_bytes for s, p in zip(saves[1:], pushes[1:])]
    if len(later) > 1:
        print(f"| bytes sent / stored size, checkpoints 2–{len(saves)} | {min(later):.2f}–{max(later):.2f}× | | |")

    print(f"\n| guest work rate (`work N`), during / the {a.gap:.0f} s before | min | median | max |")
    print("|---|---|---|---|")
    print(f"| during an autosave ({len(saves)} autosaves) | {pct(min(ratios))} | {pct(statistics.median(ratios))} "
          f"| {pct(max(ratios))} |")
    print(f"| during QEMU's own background snapshot, `migrate exec:cat > FILE` (baseline, {len(raw_ratios)} runs) "
          f"| {pct(min(raw_ratios))} | {pct(statistics.median(raw_ratios))} | {pct(max(raw_ratios))} |")
    print(f"| slowest single second overlapping an autosave | {pct(min(lows))} | {pct(statistics.median(lows))} "
          f"| {pct(max(lows))} |")
    print(f"| during the push that follows it | {pct(min(push_ratios))} | {pct(statistics.median(push_ratios))} "
          f"| {pct(max(push_ratios))} |")
    detail = ", ".join(f"{pct(x)} over {s['window'][1] - s['window'][0]:.1f} s ({s['outside']:.0f}/s before)"
                       for x, s in zip(ratios, saves))
    raw_detail = ", ".join(f"{pct(x)} over {b['window'][1] - b['window'][0]:.1f} s"
                           for x, b in zip(raw_ratios, r["raw"]))
    print(f"\nPer autosave (the 1st stores the whole {a.fill} MiB fill): {detail}. Outside, the guest's loop ran "
          f"{statistics.median(s['outside'] for s in saves):.0f} iterations/s (median); pauses "
          + ", ".join(f"{s['info'].meta.pause_ms:.1f}" for s in saves) + f" ms. QEMU's own snapshots: {raw_detail}.")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
