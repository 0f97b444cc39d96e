"""What the benchmark scripts share: the machine line that heads each table in docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from pathlib import Path

from session_manager.vm.qemu import find_qemu


def guest_arguments(ap: argparse.ArgumentParser, dirty_help: str = "MiB/s the guest re-dirties") -> None:
    """The test guest's size and workload, the same defaults in every benchmark (1.5 GiB, 1.2 GB filled)."""
    ap.add_argument("--memory", type=int, default=1536, help="guest MiB")
    ap.add_argument("--fill", type=int, default=1200, help="MiB of random data in the guest")
    ap.add_argument("--dirty", type=int, default=4, help=dirty_help)
    ap.add_argument("--window", type=int, default=32, help="MiB window it re-dirties")


def machine_line() -> str:
    """``Machine: CPU, N cores, M GiB, Linux …, QEMU …, accelerator …, Python ….`` (the script sets
    SESSION_MANAGER_ACCEL)."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 30
    return (f"Machine: {cpu}, {os.cpu_count()} cores, {memory} GiB, Linux {platform.release()}, "
            f"QEMU {find_qemu().version_text}, accelerator {os.environ['SESSION_MANAGER_ACCEL']}, "
            f"Python {platform.python_version()}.")


def wait_serial(path: Path, pattern: str, timeout: float = 900) -> None:
    """Wait until the guest's serial log at ``path`` has a line matching ``pattern``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace"), re.M):
            return
        time.sleep(0.5)
    raise SystemExit(f"the guest never printed {pattern!r}")
