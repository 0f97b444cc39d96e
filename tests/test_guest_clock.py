"""The desktop guest's clock is right after every jump in time (issue #14): a guest brought back from a checkpoint
runs on from the checkpoint's time, so session-manager sets its clock through the guest agent."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from helpers.desktop import Desktop
from session_manager.vm.guestagent import sync_clock

LAG = 20  # seconds between the checkpoint and bringing it back


def assert_clock_right(desktop: Desktop) -> None:
    before = time.time()
    guest = int(desktop.out("date +%s", user=False))
    after = time.time()
    assert before - 2 <= guest <= after + 2, f"the guest's clock is {guest - after:+.0f} s off"


@pytest.mark.qemu
@pytest.mark.desktop
def test_restore_of_an_older_checkpoint_sets_the_guest_clock(desktop: Desktop) -> None:
    ckpt = desktop.sm("checkpoint", desktop.name, "--json").json()["id"]
    time.sleep(LAG)
    desktop.sm("restore", desktop.name, ckpt, "--discard-current")
    assert_clock_right(desktop)


@pytest.mark.qemu
@pytest.mark.desktop
def test_start_after_a_saving_stop_sets_the_guest_clock(desktop: Desktop) -> None:
    desktop.sm("stop", desktop.name)
    time.sleep(LAG)
    desktop.sm("start", desktop.name)
    assert_clock_right(desktop)


@pytest.mark.qemu
@pytest.mark.desktop
def test_recover_after_a_crash_sets_the_guest_clock(desktop: Desktop) -> None:
    desktop.sm("checkpoint", desktop.name)
    time.sleep(LAG)
    pid = desktop.sm("status", desktop.name, "--json").json()["pid"]
    os.kill(pid, signal.SIGKILL)
    while desktop.sm("status", desktop.name, "--json").json()["pid"] is not None:
        time.sleep(0.1)
    desktop.sm("recover", desktop.name)
    assert_clock_right(desktop)


def test_setting_the_clock_gives_up_quietly_when_the_agent_never_answers(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A guest whose agent is silent (or not there) is left as it is: the restore does not fail for it."""
    async def silent() -> tuple[bool, bool]:
        held: list[asyncio.StreamWriter] = []
        server = await asyncio.start_unix_server(lambda _, writer: held.append(writer), path=str(tmp_path / "agent"))
        async with server:
            answered = await sync_clock(tmp_path / "agent", patience=2)
        for writer in held:
            writer.close()
        return answered, await sync_clock(tmp_path / "nobody", patience=1)

    caplog.set_level(logging.INFO)
    assert asyncio.run(silent()) == (False, False)
    assert caplog.text.count("could not set the guest's clock") == 2
