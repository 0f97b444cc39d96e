"""Checkpoint benchmark: session-manager against QEMU's own ways, in one run, on the test guest, on each QEMU.

    .venv/bin/python benchmarks/checkpoint.py [--memory 1536] [--fill 1200] [--dirty 4] [--window 32] [--gap 10]
                                              [--qemu PATH]...

Each ``--qemu`` (default: the system's, and packaging/newer-qemu.sh's in .cache/qemu-backports when it is there)
gets the whole run, and the table has its columns side by side.

Prints Markdown tables (paste them into docs/benchmarks.md):
- guest pause and wall time of our live checkpoint vs HMP ``savevm``, QMP ``snapshot-save`` and a
  plain ``migrate "exec:cat > FILE"`` with background-snapshot;
- stored bytes of two checkpoints ``--gap`` seconds apart vs the raw stream and the qcow2 growth under savevm;
- ingest throughput vs ``cat FILE > FILE2``; restore vs stock QEMU loading the raw file;
- peak RSS of the checkpointing process.

    .venv/bin/python benchmarks/checkpoint.py --sizes 1,4,8 [--count 5] [--dirty 4] [--window 32] [--gap 10]

measures instead the guest's pause of each checkpoint as memory grows (issue #15): for each size (GiB) a test guest
with 80 % of its RAM random-filled, re-dirtying ``--dirty`` MiB/s and its work-rate meter on, ``--count`` of our
checkpoints ``--gap`` s apart, then as many of QEMU's own background snapshots (``migrate`` with
background-snapshot into ``exec:cat > /dev/null``) on the same guest.  Our checkpoints are pre-copy migrations,
which leave the host's mappings of guest memory as they were, so QEMU's first snapshot there is a first one as on
a fresh guest.  Both pauses are QEMU's STOP to RESUME events (QEMU's clock); QEMU's own "downtime" is shown too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qemu.qmp import EventListener

from benchmarks.common import WorkMeter, default_qemus, guest_arguments, machine_line, print_table, wait_serial
from session_manager.cli import _setup_logging
from session_manager.guests.testguest import build
from session_manager.local.engine import Engine
from session_manager.paths import Home
from session_manager.store.repo import CheckpointMeta, Repository
from session_manager.vm import disk as vdisk
from session_manager.vm.machine import Machine, Sockets, launch, node_name, wait_exit
from session_manager.vm.qemu import command_line, find_qemu, qemu_path
from session_manager.vm.snapshot import active_layer
from session_manager.vm.stream import iter_segments

MiB = 1 << 20


def cli(home: Path, *args: str) -> tuple[dict, float, int]:
    """Run the CLI; return its JSON, wall seconds and peak RSS in bytes."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "session_manager.cli", "--home", str(home), *args, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)  # wait4, not wait: it reports this child's peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"session-manager {' '.join(args)} failed; see {home}/state/session-manager.log")
    return json.loads(out), time.monotonic() - start, usage.ru_maxrss * 1024


async def wait_job(m: Machine, job: str) -> None:
    while True:
        jobs = {j["id"]: j for j in await m.run("query-jobs")}
        if jobs[job]["status"] == "concluded":
            if jobs[job].get("error"):
                raise SystemExit(f"{job}: {jobs[job]['error']}")
            await m.run("job-dismiss", {"id": job})
            return
        await asyncio.sleep(0.01)


async def wait_migrated(m: Machine) -> dict:
    while True:
        info = await m.run("query-migrate")
        if info.get("status") == "completed":
            return info
        if info.get("status") in ("failed", "cancelled"):
            raise SystemExit(f"migration {info['status']}: {info.get('error-desc')}")
        await asyncio.sleep(0.005)


async def background_snapshot(m: Machine, uri: str) -> dict:
    """QEMU's own background snapshot of the running guest into ``uri`` (the baseline): its query-migrate answer.
    Our checkpoints leave pause-before-switchover on, which background-snapshot excludes."""
    await m.run("migrate-set-capabilities", {"capabilities": [
        {"capability": "pause-before-switchover", "state": False},
        {"capability": "background-snapshot", "state": True}]})
    await m.run("migrate", {"uri": uri})
    info = await wait_migrated(m)
    await m.run("migrate-set-capabilities", {"capabilities": [{"capability": "background-snapshot", "state": False}]})
    return info


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def main() -> None:
    ap = argparse.ArgumentParser()
    guest_arguments(ap)
    ap.add_argument("--gap", type=float, default=10, help="seconds between the two checkpoints")
    ap.add_argument("--sizes", help="GiB, comma-separated: measure the pause of each checkpoint at these sizes")
    ap.add_argument("--count", type=int, default=5, help="--sizes: checkpoints (and QEMU's own snapshots) per size")
    a = ap.parse_args()
    os.environ.setdefault("SESSION_MANAGER_ACCEL", "tcg")
    if a.sizes:
        sizes(a, [int(n) for n in a.sizes.split(",")])
        return
    results = []
    for path in a.qemu or default_qemus():
        os.environ["SESSION_MANAGER_QEMU"] = path
        print(f"measuring with {find_qemu(path).describe()}...", file=sys.stderr)
        results.append((find_qemu(path).version_text, measure(a)))
    print(f"\n{machine_line([v for v, _ in results])}")
    print(f"Guest: {a.memory} MiB RAM, {a.fill} MiB random-filled, re-dirtying {a.dirty} MiB/s in a {a.window} MiB "
          f"window; checkpoints {a.gap:.0f} s apart.\n")
    print_table(results)


def sizes(a: argparse.Namespace, gibs: list[int]) -> None:
    rows = []
    for path in a.qemu or default_qemus():
        os.environ["SESSION_MANAGER_QEMU"] = path
        for gib in gibs:
            print(f"{gib} GiB on {find_qemu(path).describe()}...", file=sys.stderr)
            rows.append((find_qemu(path).version_text, gib, pauses_at(a, gib)))
    shown = sorted({1, 2, a.count})
    print(f"\n{machine_line([v for v in dict.fromkeys(v for v, _, _ in rows)])}")
    print(f"Guest: 80 % of its RAM random-filled, re-dirtying {a.dirty} MiB/s in a {a.window} MiB window, work-rate "
          f"meter on; {a.count} checkpoints {a.gap:.0f} s apart, then {a.count} of QEMU's own background snapshots "
          "on the same guest. Pause: QEMU's STOP to RESUME events; in brackets QEMU's own \"downtime\".\n")
    nth = " / ".join(f"#{n}" for n in shown)
    print(f"| QEMU | RAM | ours: pause {nth} | QEMU's background snapshot: pause {nth} | ours: wall {nth} "
          f"| ours: stored #2–#{a.count} (median) | guest work rate during ours / QEMU's (of the rate before) |")
    print("|---|---|---|---|---|---|---|")
    for version, gib, r in rows:
        def cell(key: str, which: str, r: dict = r) -> str:
            return " / ".join(f"{r[which][n - 1][key]:.0f}" for n in shown)
        ours = " / ".join(f"{x['pause']:.1f}" for x in (r["ours"][n - 1] for n in shown))
        theirs = " / ".join(f"{x['pause']:.0f} ({x['downtime']:.0f})" for x in (r["theirs"][n - 1] for n in shown))
        walls = " / ".join(f"{r['ours'][n - 1]['wall']:.1f}" for n in shown)
        stored = statistics.median(x["added"] for x in r["ours"][1:]) / MiB
        rate = [statistics.median(x["rate"] for x in r[k]) for k in ("ours", "theirs")]
        print(f"| {version} | {gib} GiB | {ours} ms | {theirs} ms | {walls} s | {stored:.1f} MiB "
              f"| {rate[0]:.0%} / {rate[1]:.0%} |")


def pauses_at(a: argparse.Namespace, gib: int) -> dict[str, list[dict[str, float]]]:
    """``--count`` of our checkpoints, then as many QEMU background snapshots, on one guest of ``gib`` GiB."""
    work = Path(tempfile.mkdtemp(prefix="sm-bench-", dir=os.environ.get("BENCH_DIR")))
    engine = Engine(Home.locate(work / "home"))
    _setup_logging(engine.home, verbose=False)
    kernel, initrd = build(ROOT / ".cache" / "testguest")
    append = f"console=ttyS0 quiet sm.fill={gib * 1024 * 4 // 5} sm.dirty={a.dirty} sm.window={a.window} sm.work=1"
    engine.new_session("bench", kernel=kernel, initrd=initrd, append=append, memory_mib=gib * 1024, cpus=1,
                       disk_size=1 << 30)
    session = engine.session("bench")
    out: dict[str, list[dict[str, float]]] = {"ours": [], "theirs": []}

    async def run() -> None:
        await engine.start("bench")
        await asyncio.to_thread(wait_serial, session.serial_log, r"^ready")
        meter = WorkMeter(session.serial_log)
        meter.start()
        await asyncio.to_thread(meter.wait_lines, 3)
        quiet = time.monotonic()
        try:
            for which in ("ours", "theirs"):
                for _ in range(a.count):
                    await asyncio.sleep(max(0.0, quiet + a.gap - time.monotonic()))
                    t0 = time.monotonic()
                    if which == "ours":
                        info = await engine.checkpoint("bench")
                        r = {"pause": info.meta.pause_ms or 0.0, "downtime": info.meta.downtime_ms or 0.0,
                             "wall": info.meta.wall_s or 0.0, "added": float(info.added_bytes)}
                    else:
                        r = await qemu_snapshot(engine.sockets(session))
                    t1 = time.monotonic()
                    r["rate"] = meter.during(t0, t1)[0] / meter.before(quiet, t0)
                    out[which].append(r)
                    quiet = time.monotonic() + 1
        finally:
            meter.done.set()
            await engine.stop("bench", save=False)

    asyncio.run(run())
    subprocess.run(["rm", "-rf", str(work)])
    return out


async def qemu_snapshot(sockets: Sockets) -> dict[str, float]:
    """QEMU's own background snapshot into /dev/null: its pause (STOP to RESUME events) and downtime."""
    events = EventListener(("STOP", "RESUME"))
    async with Machine.connect(sockets) as m:
        with m.qmp.listen(events):
            info = await background_snapshot(m, "exec:cat > /dev/null")
            stamps: dict[str, float] = {}
            for e in events.history:
                when: dict = e["timestamp"]  # type: ignore[assignment]
                stamps[str(e["event"])] = when["seconds"] + when["microseconds"] / 1e6
    return {"pause": (stamps["RESUME"] - stamps["STOP"]) * 1000, "downtime": float(info.get("downtime", 0))}


def measure(a: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """One whole run on the QEMU that $SESSION_MANAGER_QEMU names: rows of (what, ours, baseline, ratio)."""
    rows: list[tuple[str, str, str, str]] = []
    work = Path(tempfile.mkdtemp(prefix="sm-bench-", dir=os.environ.get("BENCH_DIR")))
    home_dir = work / "home"
    engine = Engine(Home.locate(home_dir))
    _setup_logging(engine.home, verbose=False)
    kernel, initrd = build(ROOT / ".cache" / "testguest")
    append = f"console=ttyS0 quiet sm.fill={a.fill} sm.dirty={a.dirty} sm.window={a.window}"
    engine.new_session("bench", kernel=kernel, initrd=initrd, append=append, memory_mib=a.memory, cpus=1,
                       disk_size=1 << 30)
    session = engine.session("bench")
    asyncio.run(engine.start("bench"))
    print(f"filling {a.fill} MiB in the guest...", file=sys.stderr)
    wait_serial(session.serial_log, r"^ready")
    wait_serial(session.serial_log, r"^counter 3")

    c1, c1_wall, c1_rss = cli(home_dir, "checkpoint", "bench", "-m", "first")
    time.sleep(a.gap)
    c2, c2_wall, c2_rss = cli(home_dir, "checkpoint", "bench", "-m", "second")

    raw = work / "raw.stream"
    sockets = Sockets(session.runtime)

    async def baselines() -> dict:
        r: dict = {}
        async with Machine.connect(sockets) as m:
            t = time.monotonic()
            info = await background_snapshot(m, f"exec:cat > {raw}")
            r["raw_wall"], r["raw_downtime"] = time.monotonic() - t, info.get("downtime", 0)
            top = session.layer_path(await active_layer(m))
            before = allocated(top)
            t = time.monotonic()
            await m.run("human-monitor-command", {"command-line": "savevm bench-savevm"})
            r["savevm_pause"], r["savevm_growth"] = time.monotonic() - t, allocated(top) - before
            node = node_name(top.name)
            t = time.monotonic()
            await m.run("snapshot-save", {"job-id": "save", "tag": "bench-job", "vmstate": node, "devices": [node]})
            await wait_job(m, "save")
            r["job_pause"] = time.monotonic() - t
        return r

    b = asyncio.run(baselines())

    # Ingest replay: the same raw stream into a fresh repository, vs copying it with cat.
    t = time.monotonic()
    subprocess.run(f"cat {raw} > {work / 'copy.stream'}", shell=True, check=True)
    os.sync()
    cat_s = time.monotonic() - t
    (work / "copy.stream").unlink()
    repo2 = Repository.open(work / "replay-repo", create=True)
    t = time.monotonic()
    with open(raw, "rb", buffering=0) as f, repo2.writer(session="replay") as w:
        w.add_memory(iter_segments(f.read))
        w.commit(CheckpointMeta(kind="benchmark"))
    os.sync()
    ingest_s = time.monotonic() - t
    raw_bytes = raw.stat().st_size

    # Restore: ours (verify + new QEMU + regenerated stream) vs stock QEMU loading the raw file.
    t = time.monotonic()
    asyncio.run(engine.restore("bench", c2["id"], discard_current=True))
    ours_restore = time.monotonic() - t
    log = engine.home.log_file.read_text() if engine.home.log_file.exists() else ""
    verify_s = float(re.findall(r"verified checkpoint \w+ in ([\d.]+) s", log)[-1])
    load_s = float(re.findall(r"stream loaded in ([\d.]+) s", log)[-1])
    asyncio.run(engine.stop("bench", save=False))

    async def raw_load() -> float:
        rt = Sockets(work / "rawrun")
        rt.runtime.mkdir(mode=0o700)
        top = work / "raw-top.qcow2"
        vdisk.create_overlay(top, session.layer_path(c2["meta"]["disk_layer"]), "qcow2", 1 << 30)
        argv = command_line(find_qemu(qemu_path()), session.load_config(), accel=os.environ["SESSION_MANAGER_ACCEL"],
                            top_layer=top, sockets=rt, serial_log=work / "raw-serial.log")
        argv[argv.index("-vnc") + 1] = f"unix:{rt.vnc}"
        t0 = time.monotonic()
        await launch(argv + ["-incoming", f"exec:cat {raw}"], rt, work / "raw-qemu.log")
        async with Machine.connect(rt) as m:
            await wait_migrated(m)
            elapsed = time.monotonic() - t0
            pid = rt.pid()
            await m.quit()
            await wait_exit(pid)
        return elapsed

    raw_restore = asyncio.run(raw_load())

    engine_repo = engine.repo
    regen_t = time.monotonic()
    regen = sum(len(c) for c in engine_repo.memory_stream(engine_repo.get(c2["id"])))
    regen_s = time.monotonic() - regen_t

    m1, m2 = c1["meta"], c2["meta"]
    rows.append(("guest pause, 1st checkpoint (of which QEMU's downtime)",
                 f"{m1['pause_ms']:.1f} ms ({m1['downtime_ms']:.0f} ms)",
                 f"savevm {b['savevm_pause'] * 1000:.0f} ms; snapshot-save {b['job_pause'] * 1000:.0f} ms",
                 f"{m1['pause_ms'] / (b['savevm_pause'] * 1000):.4f}× savevm"))
    rows.append(("guest pause, 2nd checkpoint (of which QEMU's downtime)",
                 f"{m2['pause_ms']:.1f} ms ({m2['downtime_ms']:.0f} ms)",
                 f"QEMU's own background snapshot: downtime {b['raw_downtime']:.0f} ms", ""))
    rows.append(("checkpoint wall time (1st, in-process)", f"{m1['wall_s']:.2f} s",
                 f"migrate exec:cat > file {b['raw_wall']:.2f} s", f"{m1['wall_s'] / b['raw_wall']:.2f}×"))
    rows.append(("checkpoint wall time (2nd, in-process)", f"{m2['wall_s']:.2f} s", "",
                 f"{m2['wall_s'] / b['raw_wall']:.2f}×"))
    rows.append(("checkpoint command, end to end (1st / 2nd)", f"{c1_wall:.2f} s / {c2_wall:.2f} s", "", ""))
    rows.append(("stored bytes, 1st checkpoint", f"{c1['added_bytes'] / MiB:.1f} MiB",
                 f"raw stream {raw_bytes / MiB:.1f} MiB; savevm qcow2 growth {b['savevm_growth'] / MiB:.1f} MiB",
                 f"{c1['added_bytes'] / raw_bytes:.2f}× raw"))
    dirtied = min(a.dirty * a.gap, a.window)
    rows.append(("stored bytes, 2nd checkpoint", f"{c2['added_bytes'] / MiB:.1f} MiB",
                 f"at most {dirtied:.0f} MiB of pages dirtied", f"{c2['added_bytes'] / MiB / dirtied:.2f}× dirtied"))
    rows.append(("ingest of the raw stream (replay)", f"{raw_bytes / ingest_s / MiB:.0f} MiB/s",
                 f"cat > file {raw_bytes / cat_s / MiB:.0f} MiB/s", f"{cat_s / ingest_s:.2f}×"))
    rows.append(("restore (verify, start QEMU, load, run)", f"{ours_restore:.2f} s",
                 f"stock QEMU -incoming exec:cat file {raw_restore:.2f} s", f"{ours_restore / raw_restore:.2f}×"))
    rows.append(("… of which verification / streaming into QEMU", f"{verify_s:.2f} s / {load_s:.2f} s", "", ""))
    rows.append(("regenerate the stream from the repository", f"{regen / regen_s / MiB:.0f} MiB/s", "", ""))
    rows.append(("peak RSS of the checkpoint command (1st / 2nd)", f"{c1_rss / MiB:.0f} / {c2_rss / MiB:.0f} MiB",
                 "", ""))
    subprocess.run(["rm", "-rf", str(work)])
    return rows


if __name__ == "__main__":
    main()
