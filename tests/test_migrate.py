"""Live migration without shared storage between two real QEMUs (TCG) on loopback, over TLS.

The source is a session started by the CLI; the destination is launched here with the session's own
command line, a blank qcow2 of the same size, ``-incoming defer`` and ``-S``, and its own serial log.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import ROOT
from helpers.cli import Sm
from helpers.net import free_ports
from helpers.qemu import (
    PATTERN_LEN,
    Serial,
    Source,
    keeps_running,
    pattern_intact,
    self_signed,
    seq_records,
    start_source,
    tls_dir,
)
from session_manager.local.sessions import Session
from session_manager.paths import Home
from session_manager.vm.disk import create_blank, image_info, new_layer_name
from session_manager.vm.machine import Machine, RunState, Sockets, launch, node_name
from session_manager.vm.migrate import (
    Migration,
    MigrationCancelled,
    MigrationError,
    MigrationProgress,
    MigrationResult,
    finish_incoming,
    prepare_incoming,
    recover_source,
    resume_source,
)
from session_manager.vm.qemu import command_line, find_qemu, qemu_path
from session_manager.vm.snapshot import Route, choose_route

pytestmark = pytest.mark.qemu

# A migration driven by its own process, which blocks at the switch-over (and is killed there).
DRIVER = """
import asyncio, json, sys, time
from pathlib import Path
from session_manager.vm.machine import Machine, Sockets
from session_manager.vm.migrate import Migration

args = json.loads(sys.argv[1])

def progress(p):
    print(p.phase, flush=True)
    if p.phase == "switchover":
        time.sleep(600)

async def main():
    async with Machine.connect(Sockets(Path(args["runtime"]))) as m:
        await Migration(m, dest_host="127.0.0.1", nbd_port=args["nbd"], migrate_port=args["ram"],
                        tls_dir=Path(args["tls"]), progress=progress).run()

asyncio.run(main())
"""


@dataclass
class Pair:
    source: Path  # the source's credentials
    dest: Path  # the destination's
    stranger: Path  # a third party's: paired with neither


@pytest.fixture
def tls(tmp_path: Path) -> Pair:
    a, b, c = self_signed("source"), self_signed("destination"), self_signed("stranger")
    return Pair(tls_dir(tmp_path / "tls-a", a, b[0]), tls_dir(tmp_path / "tls-b", b, a[0]),
                tls_dir(tmp_path / "tls-c", c, b[0]))


# -- the two QEMUs ---------------------------------------------------------------------------------------------

@dataclass
class Dest:
    sockets: Sockets
    serial: Serial
    disk: Path
    pid: int
    nbd_port: int
    migrate_port: int

    @property
    def node(self) -> str:
        return node_name(self.disk.name)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def start_destination(sm: Sm, source: Source) -> Dest:
    """The session's command line on a blank disk of the same size, waiting for a migration (-incoming defer -S).

    Its runtime directory is under the test home's run/, so the sm fixture kills it at the end too."""
    session = Session(Home.locate(sm.home), source.name)
    here = sm.home / f"dest-{secrets.token_hex(3)}"
    here.mkdir()
    disk = here / new_layer_name()
    create_blank(disk, int(image_info(source.layer)["virtual-size"]))
    sockets = Sockets(Home.locate(sm.home).session_runtime(here.name))
    serial_log = here / "serial.log"
    argv = command_line(find_qemu(qemu_path()), session.load_config(), accel="tcg", top_layer=disk, sockets=sockets,
                        serial_log=serial_log, incoming=True, paused=True)
    pid = await launch(argv, sockets, here / "qemu.log")
    return Dest(sockets, Serial(serial_log), disk, pid, *free_ports(2))


async def prepare(dest: Dest, tls: Path, postcopy: bool = False) -> None:
    async with Machine.connect(dest.sockets) as m:
        await prepare_incoming(m, listen_host="127.0.0.1", nbd_port=dest.nbd_port, migrate_port=dest.migrate_port,
                               tls_dir=tls, disk_node=dest.node, postcopy=postcopy)


async def migrate(source: Source, dest: Dest, tls: Path, on_progress: Callable[[Migration, MigrationProgress], None]
                  = lambda mig, p: None, **kwargs: object) -> MigrationResult:
    async with Machine.connect(source.sockets) as m:
        mig = Migration(m, dest_host="127.0.0.1", nbd_port=dest.nbd_port, migrate_port=dest.migrate_port,
                        tls_dir=tls, **kwargs)  # type: ignore[arg-type]
        mig.progress = lambda p: on_progress(mig, p)
        return await mig.run()


async def run_state(sockets: Sockets) -> RunState:
    async with Machine.connect(sockets) as m:
        return await m.status()


async def source_is_clean(source: Source, background_snapshot: bool | None = None) -> None:
    """No job, no NBD node, no TLS object left; the migration settings are back (checkpoints need them so)."""
    async with Machine.connect(source.sockets) as m:
        assert await m.run("query-jobs") == []
        assert not [n for n in await m.run("query-named-block-nodes", {"flat": True})
                    if n["node-name"].startswith("smmig")]
        caps = {c["capability"]: c["state"] for c in await m.run("query-migrate-capabilities")}
        if background_snapshot is None:  # as `start` left it: on where checkpoints take background snapshots
            route = choose_route(find_qemu(qemu_path()).version_text, "tcg", userfaultfd=True)
            background_snapshot = route == Route.BACKGROUND
        assert caps["background-snapshot"] is background_snapshot
        assert not (caps["pause-before-switchover"] or caps["return-path"] or caps["postcopy-ram"])
        assert (await m.run("query-migrate-parameters"))["tls-creds"] == ""
        assert not [o for o in await m.run("qom-list", {"path": "/objects"}) if o["name"].startswith("sm-mig")]


# -- tests ---------------------------------------------------------------------------------------------------

def test_live_migration_carries_memory_and_disk(sm: Sm, guest: tuple[Path, Path], tls: Pair) -> None:
    source = start_source(sm, guest, "mig", fill=64, pattern=True)
    seen: list[MigrationProgress] = []

    async def scenario() -> tuple[MigrationResult, Dest, int, float]:
        dest = await start_destination(sm, source)
        await prepare(dest, tls.dest)
        result = await migrate(source, dest, tls.source, lambda mig, p: seen.append(p))
        # The source stopped its guest for good; the destination holds the state, paused, until we continue it.
        assert await run_state(source.sockets) == RunState.POSTMIGRATE
        assert await run_state(dest.sockets) == RunState.PAUSED
        last_on_source = source.serial.counters()[-1]
        async with Machine.connect(dest.sockets) as m:
            started = time.monotonic()
            await finish_incoming(m)
            handoff = time.monotonic() - started
            assert await m.status() == RunState.RUNNING
        async with Machine.connect(source.sockets) as m:
            await m.quit()
        return result, dest, last_on_source, handoff

    result, dest, last_on_source, handoff = asyncio.run(scenario())
    dest.serial.wait_counter(4)
    on_dest = dest.serial.counters()
    # The guest's own counter goes on from where it stopped: no step back, no jump (one line may be cut in two
    # by the switch: its first half in the source's log).
    assert last_on_source < on_dest[0] <= last_on_source + 2
    assert on_dest == list(range(on_dest[0], on_dest[-1] + 1))
    # Its disk checks pass on the destination: the records written on the source arrived.
    dest.serial.wait_for(rf"^disk ok {on_dest[-1]}")
    assert "disk-mismatch" not in dest.serial.text()
    records = seq_records(dest.disk)
    assert records == list(range(1, len(records) + 1)) and records[-1] >= on_dest[-1]
    assert pattern_intact(dest.disk)  # and the data outside what the guest touches

    phases = [p.phase for p in seen]
    assert phases[0] == "connecting" and phases[-1] == "completed"
    assert {"disk", "memory", "switchover"} <= set(phases)
    assert result.disk_bytes >= PATTERN_LEN and result.ram_bytes > 64 << 20
    print(f"\nmigration: downtime {result.downtime_ms:.0f} ms (+ {handoff * 1000:.0f} ms for finish_incoming), "
          f"total {result.total_s:.2f} s (disk ready after {result.disk_s:.2f} s), {result.passes} RAM passes, "
          f"sent {result.bytes_sent / 1e6:.1f} MB (disk {result.disk_bytes / 1e6:.1f} MB, "
          f"memory {result.ram_bytes / 1e6:.1f} MB)")


def test_failures_and_cancel_leave_the_session_running_at_the_source(
        sm: Sm, guest: tuple[Path, Path], tls: Pair) -> None:
    source = start_source(sm, guest, "stay", fill=64, pattern=True)

    async def scenario() -> None:
        # A source the destination is not paired with: its TLS refuses the client certificate.
        assert await attempt(sm, source, tls, tls.stranger, None, "none") is MigrationError
        # The destination dies while the disk is copied (the mirror throttled to make it last seconds) ...
        assert await attempt(sm, source, tls, tls.source, in_disk, "kill", mirror_speed=16 << 20) is MigrationError
        # ... while memory is copied (bandwidth throttled) ...
        assert await attempt(sm, source, tls, tls.source, in_memory, "kill", max_bandwidth=16 << 20) is MigrationError
        # ... at the switch-over itself, the source's guest stopped.
        assert await attempt(sm, source, tls, tls.source, at_switchover, "kill") is MigrationError
        # The user cancels, during the disk copy and during the memory copy.
        assert await attempt(sm, source, tls, tls.source, in_disk, "cancel",
                             mirror_speed=16 << 20) is MigrationCancelled
        assert await attempt(sm, source, tls, tls.source, in_memory, "cancel",
                             max_bandwidth=16 << 20) is MigrationCancelled

    asyncio.run(scenario())
    assert "disk-mismatch" not in source.serial.text()


def test_cut_link_lost_driver_and_lost_destination_leave_the_session_at_the_source(
        sm: Sm, guest: tuple[Path, Path], tls: Pair) -> None:
    source = start_source(sm, guest, "cut", fill=64, pattern=True)
    serial = source.serial

    async def scenario() -> None:
        # The link goes silent (the destination frozen: no reset, no answer, TCP stays up) during the memory
        # copy, and at the switch-over, when QEMU waits on the disk's last writes with the guest stopped.
        assert await attempt(sm, source, tls, tls.source, in_memory, "freeze", max_bandwidth=16 << 20,
                             stall_timeout=4) is MigrationError
        assert await attempt(sm, source, tls, tls.source, at_switchover, "freeze", stall_timeout=4) is MigrationError

        # The process driving the migration dies at the switch-over: QEMU keeps the guest stopped, waiting;
        # recover_source brings it back.
        dest = await start_destination(sm, source)
        await prepare(dest, tls.dest)
        mark = serial.size()
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps({
            "runtime": str(source.sockets.runtime), "nbd": dest.nbd_port, "ram": dest.migrate_port,
            "tls": str(tls.source)})], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert driver.stdout is not None
        while (line := driver.stdout.readline()) and line.strip() != "switchover":
            pass
        assert line.strip() == "switchover", "the driver ended before the switch-over"
        driver.kill()
        driver.communicate()
        dest.kill()
        assert await run_state(source.sockets) in (RunState.FINISH_MIGRATE, RunState.PAUSED)
        async with Machine.connect(source.sockets) as m:
            assert await recover_source(m) in ("cancelled", "failed")
        assert await run_state(source.sockets) == RunState.RUNNING
        await source_is_clean(source, background_snapshot=False)  # set again by the next checkpoint
        await asyncio.to_thread(keeps_running, serial, mark)

        # The migration completed, then the destination was lost before it ran the guest: the source resumes.
        dest = await start_destination(sm, source)
        await prepare(dest, tls.dest)
        mark = serial.size()
        await migrate(source, dest, tls.source)
        dest.kill()
        assert await run_state(source.sockets) == RunState.POSTMIGRATE
        async with Machine.connect(source.sockets) as m:
            await resume_source(m)
        assert await run_state(source.sockets) == RunState.RUNNING
        await asyncio.to_thread(keeps_running, serial, mark)

    asyncio.run(scenario())
    # Checkpoints work again (no TLS, no return path left; no dead link for QEMU to drain) ...
    sm("checkpoint", "cut")

    async def finally_migrate() -> Dest:
        # ... and the same source still migrates.
        dest = await start_destination(sm, source)
        await prepare(dest, tls.dest)
        await migrate(source, dest, tls.source)
        async with Machine.connect(dest.sockets) as m:
            await finish_incoming(m)
        async with Machine.connect(source.sockets) as m:
            await m.quit()
        return dest

    dest = asyncio.run(finally_migrate())
    keeps_running(dest.serial, 0)
    assert pattern_intact(dest.disk)
    assert "disk-mismatch" not in serial.text() + dest.serial.text()


def test_postcopy_moves_a_guest_that_dirties_memory_faster_than_the_link(
        sm: Sm, guest: tuple[Path, Path], tls: Pair) -> None:
    source = start_source(sm, guest, "busy", fill=0, dirty=16, window=32)
    seen: list[MigrationProgress] = []

    async def scenario() -> tuple[MigrationResult, Dest, int, float]:
        dest = await start_destination(sm, source)
        await prepare(dest, tls.dest, postcopy=True)
        async with Machine.connect(source.sockets) as m:
            # 8 MiB/s against 16 MiB/s of dirtying: pre-copy alone would hardly finish.
            mig = Migration(m, dest_host="127.0.0.1", nbd_port=dest.nbd_port, migrate_port=dest.migrate_port,
                            tls_dir=tls.source, postcopy=True, max_bandwidth=8 << 20, progress=seen.append)
            run = asyncio.ensure_future(mig.run())
            switched = asyncio.ensure_future(mig.postcopy_started.wait())
            await asyncio.wait([run, switched], return_when=asyncio.FIRST_COMPLETED)
            assert switched.done(), "pre-copy finished: the guest did not outpace the link"
            switched_at = time.monotonic()
            last_on_source = source.serial.counters()[-1]
            async with Machine.connect(dest.sockets) as d:
                await asyncio.gather(finish_incoming(d), run)
            resumed_after = time.monotonic() - switched_at
            await m.quit()
        return run.result(), dest, last_on_source, resumed_after

    result, dest, last_on_source, resumed_after = asyncio.run(scenario())
    assert result.postcopy
    assert "postcopy" in [p.phase for p in seen]
    dest.serial.wait_counter(3)
    on_dest = dest.serial.counters()
    assert last_on_source < on_dest[0] <= last_on_source + 2
    assert on_dest == list(range(on_dest[0], on_dest[-1] + 1))
    dest.serial.wait_for(rf"^disk ok {on_dest[-1]}")
    assert "disk-mismatch" not in dest.serial.text()
    print(f"\npost-copy migration: downtime {result.downtime_ms:.0f} ms, total {result.total_s:.2f} s, "
          f"{result.passes} passes before the switch, rest of memory {resumed_after:.2f} s, "
          f"sent {result.bytes_sent / 1e6:.1f} MB")


# -- failure scenarios -----------------------------------------------------------------------------------------

def in_disk(p: MigrationProgress) -> bool:
    return p.phase == "disk" and p.disk_done > 24 << 20


def in_memory(p: MigrationProgress) -> bool:
    return p.phase == "memory" and p.ram_transferred > 8 << 20


def at_switchover(p: MigrationProgress) -> bool:
    return p.phase == "switchover"


async def attempt(sm: Sm, source: Source, pair: Pair, tls_dir: Path,
                  trigger: Callable[[MigrationProgress], bool] | None, action: str,
                  **kwargs: object) -> type[BaseException]:
    """One migration that ``action`` ("kill" or "freeze" the destination, "cancel") breaks when ``trigger``
    first holds; then the session must run on at the source, intact and tidy."""
    dest = await start_destination(sm, source)
    await prepare(dest, pair.dest)
    fired = False

    def on_progress(mig: Migration, p: MigrationProgress) -> None:
        nonlocal fired
        if not fired and trigger is not None and trigger(p):
            fired = True
            if action == "kill":
                dest.kill()
            elif action == "freeze":
                os.kill(dest.pid, signal.SIGSTOP)
            else:
                mig.cancel()

    mark = source.serial.size()
    started = time.monotonic()
    try:
        with pytest.raises(MigrationError) as caught:
            await migrate(source, dest, tls_dir, on_progress, **kwargs)
    finally:
        dest.kill()
    took = time.monotonic() - started
    assert trigger is None or fired
    assert await run_state(source.sockets) == RunState.RUNNING
    await source_is_clean(source)
    await asyncio.to_thread(keeps_running, source.serial, mark)
    assert pattern_intact(source.layer)
    print(f"\n{action} {trigger.__name__ if trigger else 'refused'}: {caught.value} ({took:.1f} s)")
    return caught.type
