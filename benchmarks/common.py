"""What the benchmark scripts share: the machine line that heads each table in docs/benchmarks.md, the test guest's
arguments, the guest's work-rate meter."""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import threading
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


class WorkMeter(threading.Thread):
    """Follows the guest's serial log; each `work N` line becomes (previous line's arrival, arrival, N)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.lines: list[tuple[float, float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            rest, last = b"", None
            while not self.done.wait(0.01):
                chunk = f.read()
                now = time.monotonic()
                *complete, rest = (rest + chunk).split(b"\n")
                for line in complete:
                    m = re.fullmatch(rb"work (\d+)\r?", line)
                    if m:
                        if last is not None:
                            self.lines.append((last, now, int(m[1])))
                        last = now

    def wait_lines(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines) < n:
            if time.monotonic() > deadline:
                raise SystemExit("the guest prints no `work N` lines (sm.work=1)")
            time.sleep(0.1)

    def before(self, start: float, end: float) -> float:
        """Mean rate of the seconds wholly inside [start, end]."""
        rates = [n for a, b, n in self.lines if a >= start and b <= end]
        if not rates:
            raise SystemExit(f"no `work N` line between {start:.1f} and {end:.1f}")
        return statistics.fmean(rates)

    def during(self, start: float, end: float) -> tuple[float, int]:
        """Rate over [start, end] (each overlapping second weighted by its overlap) and the lowest of those seconds."""
        parts = [(min(b, end) - max(a, start), n) for a, b, n in self.lines if b > start and a < end]
        if not parts:
            raise SystemExit(f"no `work N` line overlaps {start:.1f}..{end:.1f}")
        return sum(w * n for w, n in parts) / sum(w for w, _ in parts), min(n for _, n in parts)
