"""What the benchmark scripts share: the machine line that heads each table in docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from pathlib import Path

from session_manager.vm.qemu import find_qemu, qemu_path

ROOT = Path(__file__).resolve().parent.parent


def guest_arguments(ap: argparse.ArgumentParser, dirty_help: str = "MiB/s the guest re-dirties") -> None:
    """The test guest's size and workload, the same defaults in every benchmark (1.5 GiB, 1.2 GB filled), and the
    QEMUs to run it on."""
    ap.add_argument("--memory", type=int, default=1536, help="guest MiB")
    ap.add_argument("--fill", type=int, default=1200, help="MiB of random data in the guest")
    ap.add_argument("--dirty", type=int, default=4, help=dirty_help)
    ap.add_argument("--window", type=int, default=32, help="MiB window it re-dirties")
    ap.add_argument("--qemu", action="append", help="a qemu-system-x86_64 to measure (repeat it for more; default: "
                                                    "the system's and the one packaging/newer-qemu.sh unpacked)")


def default_qemus() -> list[str]:
    """The system's QEMU, and the newer one that `packaging/setup.sh test` unpacks for the tests, if it is there."""
    newer = ROOT / ".cache" / "qemu-backports" / "usr" / "bin" / "qemu-system-x86_64"
    return [find_qemu(None).system] + ([str(newer)] if newer.exists() else [])


def print_table(results: list[tuple[str, list[tuple[str, str, str, str]]]]) -> None:
    """One Markdown table: a row per measurement, and for each QEMU (version, rows) its three columns (ours, the
    baseline, the ratio) side by side."""
    head = "| what |" + "".join(f" QEMU {v}: session-manager | baseline | ratio |" for v, _ in results)
    print(head)
    print("|---|" + "---|---|---|" * len(results))
    for i, (what, *_) in enumerate(results[0][1]):
        print(f"| {what} |" + "".join(f" {rows[i][1]} | {rows[i][2]} | {rows[i][3]} |" for _, rows in results))


def machine_line(qemus: list[str] | None = None) -> str:
    """``Machine: CPU, N cores, M GiB, Linux …, QEMU …, accelerator …, Python ….`` (the script sets
    SESSION_MANAGER_ACCEL)."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 30
    return (f"Machine: {cpu}, {os.cpu_count()} cores, {memory} GiB, Linux {platform.release()}, "
            f"QEMU {', '.join(qemus or [find_qemu(qemu_path()).version_text])}, "
            f"accelerator {os.environ['SESSION_MANAGER_ACCEL']}, "
            f"Python {platform.python_version()}.")


def wait_serial(path: Path, pattern: str, timeout: float = 900) -> None:
    """Wait until the guest's serial log at ``path`` has a line matching ``pattern``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace"), re.M):
            return
        time.sleep(0.5)
    raise SystemExit(f"the guest never printed {pattern!r}")
