"""Shared fixtures: the test guest, isolated homes, the CLI as a real process, serial-log helpers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUEST_CACHE = Path(os.environ.get("SM_TEST_CACHE", ROOT / ".cache")) / "testguest"


@pytest.fixture(scope="session")
def guest() -> tuple[Path, Path]:
    """The project's own test guest (kernel, initrd), built once from Debian packages."""
    from session_manager.testguest import build

    return build(GUEST_CACHE)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self):  # noqa: ANN201
        return json.loads(self.stdout)


class Sm:
    """Runs ``session-manager --home HOME ...`` as its own process, as a user would."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = {**os.environ, "SESSION_MANAGER_ACCEL": "tcg", **(env or {})}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "session_manager.cli", "--home", str(self.home), *args]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> Run:
        p = subprocess.run(self.argv(*args), capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=timeout)
        run = Run(p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise AssertionError(f"session-manager {' '.join(args)} failed ({p.returncode}):\n{p.stderr}{p.stdout}")
        return run

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, cwd=ROOT)

    def popen_until(self, log_line: str, *args: str, timeout: float = 60) -> subprocess.Popen[str]:
        """Start a command and return once it has written ``log_line`` to the log (once more than before)."""
        log = self.home / "state" / "session-manager.log"
        count = lambda: log.read_text().count(log_line) if log.exists() else 0  # noqa: E731
        seen = count()
        proc = self.popen(*args)
        deadline = time.monotonic() + timeout
        while count() <= seen:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                out, err = proc.communicate()
                raise AssertionError(f"{log_line!r} never appeared in the log: {err}{out}")
            time.sleep(0.02)
        return proc

    def new_guest(self, name: str, guest: tuple[Path, Path], *, memory: str = "256M", fill: int = 16,
                  dirty: int = 0, window: int = 8) -> None:
        kernel, initrd = guest
        append = f"console=ttyS0 sm.fill={fill} sm.dirty={dirty} sm.window={window}"
        self("new", name, "--kernel", str(kernel), "--initrd", str(initrd), "--append", append,
             "--memory", memory, "--cpus", "1", "--disk-size", "1G")

    def serial(self, name: str) -> Serial:
        return Serial(self("status", name, "--json").json()["serial_log"])

    def kill_all(self) -> None:
        """Kill every QEMU this home started (QEMU outlives the CLI on purpose)."""
        for pidfile in self.home.glob("run/*/qemu.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass


@pytest.fixture
def sm(tmp_path: Path) -> Iterator[Sm]:
    home = tmp_path / "home"
    s = Sm(home)
    yield s
    s.kill_all()


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
        return [int(n) for n in re.findall(r"^counter (\d+)\r?$", self.text(since), re.M)]

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
            m = re.search(pattern, self.text(since), re.M)
            if m:
                return m
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} did not appear within {timeout} s:\n{self.text(since)[-2000:]}")
