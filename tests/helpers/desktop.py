"""The desktop guest (guests/desktop.py) for tests: its base image, built once per machine, and a running desktop
session driven through its guest agent.

The base is built into this user's cache (``SM_TEST_CACHE``/bases, else ~/.cache/session-manager/bases): a fresh
clone on the same machine (CI) reuses it; the first build on a new machine takes about 3 minutes."""

from __future__ import annotations

import asyncio
import os
import shlex
from pathlib import Path

from helpers.cli import Sm
from helpers.qemu import Serial
from session_manager.guests import desktop
from session_manager.paths import Home, machine_cache
from session_manager.vm.guestagent import ExecResult, GuestAgent
from session_manager.vm.machine import Sockets

BASES = Path(os.environ["SM_TEST_CACHE"]) / "bases" if "SM_TEST_CACHE" in os.environ else machine_cache() / "bases"
USER = "alice"
PASSWORD = "correct horse"
BOOT_TIMEOUT = 360  # power-on to Xfce: about 40 s under TCG, far more while the other core boots another guest


def base() -> Path:
    """The built base image's directory (built now if this machine has none of this recipe)."""
    return desktop.build(BASES / desktop.recipe_id())


def give_base(sm: Sm) -> None:
    """Let the installation at ``sm.home`` find the base already built, as a second desktop would."""
    bases = Home.locate(sm.home).bases
    bases.mkdir(parents=True, exist_ok=True)
    link = bases / desktop.recipe_id()
    if not link.exists():
        link.symlink_to(base())


class Desktop:
    """A desktop session of a test installation: ``new --desktop``, started, up to its desktop."""

    def __init__(self, sm: Sm, name: str = "desk") -> None:
        self.sm = sm
        self.name = name
        self.sockets = Sockets(Home.locate(sm.home).runtime / name)

    def create(self, memory: str = "2G") -> Desktop:
        give_base(self.sm)
        self.sm.env["SESSION_MANAGER_DESKTOP_PASSWORD"] = PASSWORD
        self.sm("new", self.name, "--desktop", "--user", USER, "--memory", memory)
        return self

    @property
    def serial(self) -> Serial:
        return self.sm.serial(self.name)

    def boot(self) -> Desktop:
        """Start it and wait for its desktop (the guest says so on its serial line)."""
        since = self.serial.size()
        self.sm("start", self.name)
        self.serial.wait_for(desktop.READY_LINE, since=since, timeout=BOOT_TIMEOUT)
        # No key repeat: under TCG on a busy machine xdotool's release can come late enough to repeat a key.
        self.out("xset r off")
        return self

    def run(self, command: str, *, user: bool = True, timeout: float = 60) -> ExecResult:
        """Run a shell command in the guest, as the account on its X display (or as root)."""
        argv = (["su", "-", USER, "-c", f"export DISPLAY=:0; {command}"] if user else ["/bin/sh", "-c", command])

        async def go() -> ExecResult:
            async with GuestAgent.connect(self.sockets.guest_agent, timeout=30) as agent:
                return await agent.exec(argv, timeout=timeout)
        return asyncio.run(go())

    def out(self, command: str, *, user: bool = True, timeout: float = 60) -> str:
        """Its output; AssertionError if it fails."""
        r = self.run(command, user=user, timeout=timeout)
        assert r.exitcode == 0, f"{command}: exit {r.exitcode}: {r.stderr.decode(errors='replace')}"
        return r.stdout.decode(errors="replace")

    def window_ids(self, name: str) -> list[str]:
        """Shown X windows whose title contains ``name``."""
        r = self.run(f"xdotool search --onlyvisible --name {shlex.quote(name)}")
        return r.stdout.decode().split()

    def kill(self, program: str) -> None:
        """End every ``program`` of the account and wait until they are gone."""
        self.run(f"pkill -x {program}; while pgrep -x {program} >/dev/null; do sleep 0.1; done")
