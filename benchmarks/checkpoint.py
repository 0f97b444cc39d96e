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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import default_qemus, guest_arguments, machine_line, print_table, wait_serial  # noqa: E402
from session_manager.cli import _setup_logging  # noqa: E402
from session_manager.engine import Engine  # noqa: E402
from session_manager.paths import Home  # noqa: E402
from session_manager.store.repo import Repository  # noqa: E402
from session_manager.testguest import build  # noqa: E402
from session_manager.vm import disk as vdisk  # noqa: E402
from session_manager.vm.machine import Machine, Sockets, launch, wait_exit  # noqa: E402
from session_manager.vm.qemu import command_line, find_qemu, qemu_path  # noqa: E402
from session_manager.vm.snapshot import active_layer, node_name  # noqa: E402
from session_manager.vm.stream import iter_segments  # noqa: E402

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


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def main() -> None:
    ap = argparse.ArgumentParser()
    guest_arguments(ap)
    ap.add_argument("--gap", type=float, default=10, help="seconds between the two checkpoints")
    a = ap.parse_args()
    os.environ.setdefault("SESSION_MANAGER_ACCEL", "tcg")
    results = []
    for path in a.qemu or default_qemus():
        os.environ["SESSION_MANAGER_QEMU"] = path
        print(f"measuring with {find_qemu(path).describe()}...", file=sys.stderr)
        results.append((find_qemu(path).version_text, measure(a)))
    m1, m2 = c1["meta"], c2["meta"]
    rows.append(("guest pause, 1st checkpoint (of which QEMU's downtime)",
                 f"{m1['pause_ms']:.1f} ms ({m1['downtime_ms']:.0f} ms)",
                 f"savevm {b['savevm_pause'] * 1000:.0f} ms; snapshot-save {b['job_pause'] * 1000:.0f} ms",
                 f"{m1['pause_ms'] / (b['savevm_pause'] * 1000):.4f}× savevm"))
    rows.append(("guest pause, 2nd checkpoint (of which QEMU's downtime)",
                 f"{m2['pause_ms']:.1f} ms ({m2['downtime_ms']:.0f} ms)",
                 f"background snapshot, 3rd: downtime {b['raw_downtime']:.0f} ms", ""))
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
