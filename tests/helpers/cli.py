"""The command line as a user runs it: ``Sm`` runs ``session-manager --home HOME ...`` as its own process; what one
installation's log says."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import GUEST_CACHE, ROOT
from helpers.qemu import Serial


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
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
        count = lambda: log_text(self).count(log_line)  # noqa: E731
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

    def take_test_guests(self) -> Sm:
        """Let sessions arriving from paired peers boot the test guest (its kernel lives outside this home)."""
        from session_manager.local.settings import Settings
        from session_manager.paths import Home

        Settings(arrivals_boot_dirs=[str(GUEST_CACHE.resolve())]).save(Home.locate(self.home))
        return self

    def serial(self, name: str) -> Serial:
        return Serial(self("status", name, "--json").json()["serial_log"])

    def kill_all(self) -> None:
        """Kill every QEMU this home started (QEMU outlives the CLI on purpose)."""
        for pidfile in self.home.glob("run/*/qemu.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def one_sentence(run: Any, *words: str) -> str:
    """``run`` (a Run) failed and said why in one sentence, with each of ``words``; returns the sentence."""
    assert run.returncode != 0, run.stdout
    message = run.stderr.strip()
    assert len(message.splitlines()) == 1, message  # one sentence, no traceback
    for w in words:
        assert w in message, message
    return message


def log_text(sm: Sm) -> str:
    """The installation's log so far ("" before it has one)."""
    log = sm.home / "state" / "session-manager.log"
    return log.read_text() if log.exists() else ""


def wait_log(sm: Sm, pattern: str, count: int = 1, timeout: float = 120) -> list[re.Match[str]]:
    """Wait until the regular expression ``pattern`` matches ``count`` times in the log (``re.escape`` plain text);
    returns the matches."""
    deadline = time.monotonic() + timeout
    while len(found := list(re.finditer(pattern, log_text(sm)))) < count:
        assert time.monotonic() < deadline, \
            f"{pattern!r} appeared fewer than {count} times in the log within {timeout} s:\n{log_text(sm)[-3000:]}"
        time.sleep(0.02)
    return found
