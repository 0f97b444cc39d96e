"""Capturing a running machine's whole state, and loading it into a new one.

A live checkpoint takes one of two routes (``choose_route``).

Pre-copy (KVM, or QEMU 9.0 and later): a migration into a pipe that pauses before its switch-over::

    1. create the next overlay file and blockdev-add it (guest still running)
    2. migrate fd:sm-checkpoint  -- with pause-before-switchover: QEMU copies all of RAM while the guest
                                    runs, then again what the guest dirtied meanwhile, pass after pass
    3. pre-switchover            -- once what is still dirty fits in downtime-limit, QEMU stops the guest:
                                    the instant the checkpoint is of
    4. blockdev-snapshot         -- the disk freezes: the old top becomes read-only
    5. migrate-continue          -- QEMU sends the last dirty pages and the device state, and completes
    6. cont                      -- the guest runs on (QEMU leaves it in postmigrate; cont also takes back
                                    the disks QEMU handed over at completion)

A page sent in an early pass and dirtied later is sent again; the later copy wins when the stream is loaded
(vm/stream.py keeps both).  The guest stops only for the last dirty pages, whatever its RAM size, and no
userfaultfd is needed.

Background snapshot (QEMU older than 9.0 under TCG, where pre-copy loses guest writes: QEMU's TCG kept
writing through TLB entries that the migration's dirty-bitmap sync did not reset, fixed upstream by commit
03bfc2188f06 "physmem: Fix migration dirty bitmap coherency with TCG memory access"; seen here as a restored
guest's kernel panicking on corrupted memory)::

    1. create the next overlay file and blockdev-add it (guest still running)
    2. stop                      -- the instant the checkpoint is of
    3. blockdev-snapshot         -- the disk freezes: the old top becomes read-only
    4. migrate fd:sm-checkpoint  -- with background-snapshot QEMU saves the device
                                    state, write-protects RAM (userfaultfd) and then
                                    restores the run state the guest had when it
                                    began: QEMU 7.2 always resumes the guest, 8.0 and
                                    later leave it paused, since we stopped it
    5. once RAM pages flow (so QEMU is past that point), cont if it is still paused;
                                    memory is saved as it was at step 2

Here QEMU's preparation (reading and write-protecting every page) falls inside the pause, and from the
second snapshot on, the guest's memory is mapped in 4 KiB pages (the first snapshot's write faults split the
huge ones), so that preparation grows with RAM: measured here, 54 ms at 4 GiB for the first checkpoint and
190-220 ms for the next ones (pre-copy: 8-16 ms at 1 and 4 GiB; docs/benchmarks.md).  Without userfaultfd
(ordinary users on Debian/Ubuntu until the sysctl is set) step 4 is a plain migration of the stopped guest,
which is then continued: the same checkpoint, but the guest pauses for the whole copy (stop-and-copy).

Either way the stream is read from a pipe by ``consume`` (in a thread) as it comes, and the pause reported is
the guest's, by QEMU's clock: from its STOP event to its RESUME event.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, cast

from qemu.qmp import EventListener

from ..errors import QemuError
from .disk import create_overlay, image_info, new_layer_name
from .machine import DISK_DEVICE, Machine, RunState, layer_of_node, node_name
from .migrate import ACTIVE, UNLIMITED_BANDWIDTH
from .qemu import release

log = logging.getLogger(__name__)

T = TypeVar("T")
MERGE_JOB = "sm-merge"
DOWNTIME_FIRST_MS, DOWNTIME_MAX_MS = 1, 1000  # pre-copy: the downtime-limit asked for at first, and at most
PRECOPY_POLL_S = 0.25  # pre-copy: how often the passes are looked at between QEMU's events
PRECOPY_MAX_S = 120.0  # pre-copy: after this long, the guest is stopped for the rest of the copy
PRECOPY_TCG_SINCE = (9, 0)  # the first QEMU whose TCG keeps pre-copy's dirty tracking right (see above)
UFFD_REFUSAL = "not supported by host kernel"
PIPE_SIZE = 1 << 20  # an ordinary user's maximum (/proc/sys/fs/pipe-max-size)


class Route(str, Enum):
    """How a checkpoint copies the guest's memory (the module's docstring has each one's steps)."""

    PRECOPY = "pre-copy"
    BACKGROUND = "background-snapshot"
    STOP_AND_COPY = "stop-and-copy"


def choose_route(qemu_version: str, accel: str, userfaultfd: bool) -> Route:
    """Pre-copy wherever QEMU tracks the guest's writes right (KVM; TCG from QEMU 9.0), else background snapshot
    where userfaultfd is allowed, else stop-and-copy."""
    if accel == "kvm" or release(qemu_version) >= PRECOPY_TCG_SINCE:
        return Route.PRECOPY
    return Route.BACKGROUND if userfaultfd else Route.STOP_AND_COPY


@dataclass(frozen=True)
class Capture:
    live: bool  # the guest ran while its memory was copied
    route: Route
    frozen_layer: str  # the overlay that now holds the checkpoint's disk
    active_layer: str  # the overlay the guest writes to from now on
    pause_ms: float  # from the guest's stop to its resume, by QEMU's clock
    downtime_ms: float  # what QEMU reports: its own part of that pause
    wall_s: float
    stream_bytes: int


async def active_layer(machine: Machine) -> str:
    """The overlay file QEMU is writing the disk to (QEMU is the truth, not our state file)."""
    for dev in await machine.run("query-block"):
        if DISK_DEVICE in (dev.get("qdev") or "") and dev.get("inserted"):
            return layer_of_node(dev["inserted"]["node-name"])
    raise QemuError("The session's QEMU has no disk attached; recreate the session.")


async def merge_layers(machine: Machine, active: str, top: str, base: str) -> None:
    """Live block-commit: the layers above ``base`` up to ``top`` are written into ``base`` and drop out of
    the chain, so ``base`` then holds ``top``'s view of the disk.  The guest runs on meanwhile."""
    nodes = {_format_node_file(n): n["node-name"]
             for n in await machine.run("query-named-block-nodes", {"flat": True}) if n.get("drv") == "qcow2"}
    await machine.run("block-commit", {"job-id": MERGE_JOB, "device": node_name(active), "top-node": nodes[top],
                                       "base-node": nodes[base], "backing-file": base, "auto-dismiss": False})
    while True:
        job = next((j for j in await machine.run("query-jobs") if j["id"] == MERGE_JOB), None)
        if job is None:
            raise QemuError("QEMU lost the job merging disk layers; the session's disk is unchanged.")
        if job["status"] == "concluded":
            await machine.run("job-dismiss", {"id": MERGE_JOB})
            if job.get("error"):
                raise QemuError(f"Merging disk layers failed: {job['error']}; the checkpoints are unaffected.")
            return
        await asyncio.sleep(0.05)


def _format_node_file(node: dict[str, Any]) -> str:
    """The image file name of a qcow2 node (QEMU names nodes with a changed backing by a json: description)."""
    name: str = node["file"]
    if name.startswith("json:"):
        name = json.loads(name[len("json:"):])["file"]["filename"]
    return Path(name).name


async def live_supported(machine: Machine) -> bool:
    """Whether QEMU can take background snapshots here (userfaultfd allowed)."""
    capabilities = {c["capability"] for c in await machine.run("query-migrate-capabilities")}
    if "background-snapshot" not in capabilities:
        raise QemuError("This QEMU build lacks the background-snapshot migration capability; install Debian's or "
                        "upstream QEMU 7.2 or newer.")
    try:
        await machine.run("migrate-set-capabilities", {"capabilities": [
            {"capability": "pause-before-switchover", "state": False},  # a pre-copy checkpoint's; excludes it
            {"capability": "background-snapshot", "state": True}]})
    except QemuError as e:
        if UFFD_REFUSAL in str(e):
            return False
        raise
    return True


async def capture(
    machine: Machine,
    disks: Path,
    consume: Callable[[Callable[[int], bytes]], T],
    on_layer_switched: Callable[[str], None],
    route: Route,
) -> tuple[Capture, T]:
    """Checkpoint the running machine; ``consume`` reads the stream (in a thread) and returns a result."""
    if (await machine.run("query-migrate")).get("status") == "pre-switchover":
        await machine.run("migrate_cancel")  # a pre-copy checkpoint whose process died in the pause: QEMU
        # restarts the guest it stopped
    while (await machine.run("query-migrate")).get("status") in ACTIVE:
        await asyncio.sleep(0.1)  # an abandoned checkpoint's stream is still draining
    if await machine.status() != RunState.RUNNING:
        raise QemuError(
            "The session's guest is not running, so it cannot be checkpointed now; start or resume it first.")
    old = await active_layer(machine)
    new = new_layer_name()
    size = int(image_info(disks / old)["virtual-size"])
    create_overlay(disks / new, disks / old, "qcow2", size)
    await machine.run("blockdev-add", {
        "driver": "qcow2", "node-name": node_name(new), "backing": None,
        "file": {"driver": "file", "filename": str(disks / new)},
    })
    precopy = route == Route.PRECOPY
    await machine.run("migrate-set-capabilities", {"capabilities": [
        {"capability": "background-snapshot", "state": route == Route.BACKGROUND},
        {"capability": "pause-before-switchover", "state": precopy},
        {"capability": "events", "state": True},
    ]})
    await machine.run("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH,
                                                 "downtime-limit": DOWNTIME_FIRST_MS})

    # Pre-copy writes into our pipe: should this process die, QEMU's writes fail and its migration ends (the guest
    # runs on).  A background snapshot must always be read to its end: the relay (see _Relay).
    stream: _Stream = _Stream() if precopy else _Relay()
    try:
        await machine.pass_fd(stream.qemu_fd, "sm-checkpoint")
    finally:
        os.close(stream.qemu_fd)
    consumer = asyncio.ensure_future(asyncio.to_thread(stream.run, consume))
    started = time.monotonic()
    stopped = switched = streaming = forced = False
    events = EventListener(("STOP", "RESUME", "MIGRATION"))
    try:
        with machine.qmp.listen(events):
            await asyncio.to_thread(_fsync, disks / old)  # so the flush when the guest stops has little left to write
            if not precopy:
                await machine.run("stop")
                stopped = True
                await machine.run("blockdev-snapshot", {"node": node_name(old), "overlay": node_name(new)})
                switched = True
            await machine.run("migrate", {"uri": "fd:sm-checkpoint"})
            streaming = True
            log.info("checkpoint: streaming memory (%s)", route.value)
            if precopy:
                forced = await _precopy(machine, events, consumer)
                stopped = True  # by QEMU, at pre-switchover: the instant the checkpoint is of
                # Both commands at once (QEMU runs them in order): one round trip less in the pause.  Should the
                # snapshot fail, the checkpoint fails all the same, before anything is kept.
                await asyncio.gather(
                    machine.run("blockdev-snapshot", {"node": node_name(old), "overlay": node_name(new)}),
                    machine.run("migrate-continue", {"state": "pre-switchover"}))
                switched = True
                on_layer_switched(new)
                await _until(events, consumer, "completed")
                await _cont_after_migration(machine)
            else:
                if route == Route.BACKGROUND:
                    await _resume_after_device_state(machine)
                on_layer_switched(new)
                await _wait_migration(machine, "checkpoint", consumer)
                if route == Route.STOP_AND_COPY:
                    await _cont_after_migration(machine)
            info = await machine.run("query-migrate")
            pause_ms = _pause(events)
        result = await consumer
        stream.finish()
    except BaseException:
        stream.cancelled = True
        if not (route == Route.BACKGROUND and streaming):
            # Never cancel a background snapshot: the relay drains it instead (see _Relay).
            with contextlib.suppress(QemuError):
                await machine.run("migrate_cancel")
        if stopped or precopy:  # (pre-copy: we may have stopped a guest that dirtied memory too fast)
            with contextlib.suppress(QemuError):
                while (await machine.run("query-migrate")).get("status") in ACTIVE:
                    await asyncio.sleep(0.01)  # a cancelled pre-copy restarts the guest QEMU stopped
                if await machine.status() in (RunState.PAUSED, RunState.POSTMIGRATE):
                    await machine.run("cont")
        if switched:
            on_layer_switched(new)
        with contextlib.suppress(QemuError):
            await machine.run("closefd", {"fdname": "sm-checkpoint"})  # ends the stream if QEMU never used it
        with contextlib.suppress(BaseException):
            await consumer  # returns at its next read; its error is secondary
        raise
    return Capture(
        live=route != Route.STOP_AND_COPY and not forced,
        route=route,
        frozen_layer=old,
        active_layer=new,
        pause_ms=pause_ms,
        downtime_ms=float(info.get("downtime", 0)),
        wall_s=time.monotonic() - started,
        stream_bytes=stream.total,
    ), result


async def _precopy(machine: Machine, events: EventListener, reader: asyncio.Future[Any]) -> bool:
    """Wait while QEMU copies RAM with the guest running, until it stops the guest at pre-switchover; whether we
    had to stop it ourselves.

    QEMU stops the guest once what is still dirty fits in ``downtime-limit`` at the rate it has been sending.
    A guest that dirties memory faster than that would never get there: from the third pass on the limit
    doubles with each pass (up to DOWNTIME_MAX_MS), and after PRECOPY_MAX_S we stop the guest ourselves, which
    ends the dirtying (the rest is then copied with the guest stopped)."""
    started = time.monotonic()
    limit, forced = DOWNTIME_FIRST_MS, False
    while not await _until(events, reader, "pre-switchover", PRECOPY_POLL_S):
        passes = int((await machine.run("query-migrate")).get("ram", {}).get("dirty-sync-count", 0))
        wanted = min(DOWNTIME_FIRST_MS << max(passes - 2, 0), DOWNTIME_MAX_MS)
        if wanted != limit:
            limit = wanted
            await machine.run("migrate-set-parameters", {"downtime-limit": limit})
        if not forced and time.monotonic() - started > PRECOPY_MAX_S:
            log.warning("checkpoint: the guest changes its memory faster than it can be saved; stopping it for "
                        "the rest of the copy")
            await machine.run("stop")
            forced = True
    return forced


async def _until(events: EventListener, reader: asyncio.Future[Any], status: str, timeout: float = 60.0) -> bool:
    """Wait up to ``timeout`` for QEMU's MIGRATION event ``status``: whether it came.  QemuError if the migration
    failed, or the error that stopped the stream's reader."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = await asyncio.wait_for(events.get(), min(left, 0.05))
        except TimeoutError:
            event = None
        if reader.done() and (exc := reader.exception()) is not None:
            raise exc
        if event is not None and event["event"] == "MIGRATION":
            said = str(cast(dict[str, Any], event["data"]).get("status"))
            if said == status:
                return True
            if said in ("failed", "cancelled"):
                raise QemuError(f"QEMU's checkpoint stream {said}.")
    if status == "completed":
        raise QemuError("QEMU did not finish the checkpoint's stream within a minute of stopping the guest.")
    return False


async def _cont_after_migration(machine: Machine) -> None:
    """``cont`` once QEMU has finalized a completed migration: it reports "completed" while the guest is still in
    finish-migrate, and refuses ``cont`` until its clean-up has moved it to postmigrate (seen on QEMU 10.0)."""
    while await machine.status() == RunState.FINISH_MIGRATE:
        await asyncio.sleep(0.001)
    await machine.run("cont")


def _pause(events: EventListener) -> float:
    """Milliseconds from the guest's first STOP to the RESUME after it, by QEMU's clock (the events' timestamps).

    Called once ``cont`` has answered: QEMU sends the RESUME before the answer."""
    stop = None
    for event in events.history:
        when = cast(dict[str, int], event["timestamp"])
        stamp = float(when["seconds"]) + float(when["microseconds"]) / 1e6
        if event["event"] == "STOP" and stop is None:
            stop = stamp
        elif event["event"] == "RESUME" and stop is not None:
            return (stamp - stop) * 1000
    raise QemuError("QEMU did not report the guest's stop and resume during the checkpoint.")


async def _resume_after_device_state(machine: Machine) -> None:
    """Make sure the guest runs again once a background snapshot has saved the device state and write-protected RAM.

    QEMU resumes the guest (7.2) or leaves it paused (8.0 and later, which restore the run state it had at the
    start) in a bottom half scheduled just before it sends the first RAM page; a ``cont`` before that point would
    let the guest run ahead of the memory being saved, so wait for pages (or the end), then ``cont`` if needed."""
    while True:
        info = await machine.run("query-migrate")
        ram = info.get("ram") or {}
        if info.get("status") not in ("setup", "active") or ram.get("normal", 0) + ram.get("duplicate", 0) > 0:
            break
    if info.get("status") in ("failed", "cancelled"):
        raise QemuError(f"QEMU's checkpoint stream {info['status']}: {info.get('error-desc', 'no reason given')}.")
    if await machine.status() == RunState.PAUSED:
        await machine.run("cont")


async def load(machine: Machine, chunks: Iterable[bytes]) -> float:
    """Feed a saved stream to a QEMU started with ``-incoming defer``; returns seconds taken.

    The guest stays paused; the caller continues it.
    """
    rfd, wfd = _pipe()
    try:
        await machine.pass_fd(rfd, "sm-restore")
    finally:
        os.close(rfd)
    started = time.monotonic()
    writer = asyncio.ensure_future(asyncio.to_thread(_write_all, wfd, chunks))
    try:
        await machine.run("migrate-incoming", {"uri": "fd:sm-restore"})
        await writer
        await _wait_migration(machine, "restore")
    except BaseException:
        writer.cancel()
        raise
    return time.monotonic() - started


def _pipe() -> tuple[int, int]:
    """A pipe with a 1 MiB buffer (Linux's default 64 KiB costs a context switch every 64 KiB)."""
    rfd, wfd = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return rfd, wfd


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, chunks: Iterable[bytes]) -> None:
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)


async def _wait_migration(machine: Machine, what: str, reader: asyncio.Future[T] | None = None) -> dict[str, Any]:
    delay = 0.005
    while True:
        if reader is not None and reader.done() and (exc := reader.exception()) is not None:
            raise exc
        info: dict[str, Any] = await machine.run("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise QemuError(f"QEMU's {what} stream {status}: {info.get('error-desc', 'no reason given')}.")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


class _Stream:
    """QEMU -> a pipe -> us: ``qemu_fd`` is QEMU's end (to pass it and close it here), ``run`` reads ours."""

    def __init__(self) -> None:
        self.fd, self.qemu_fd = _pipe()
        self.total = 0
        self.cancelled = False

    def read(self, n: int) -> bytes:
        if self.cancelled:
            raise QemuError("The checkpoint was cancelled.")
        data = os.read(self.fd, n)
        self.total += len(data)
        return data

    def run(self, consume: Callable[[Callable[[int], bytes]], T]) -> T:
        """Run ``consume`` on the stream (in a worker thread), then close our end (QEMU's further writes fail)."""
        try:
            return consume(self.read)
        finally:
            os.close(self.fd)

    def finish(self) -> None:
        """Called once the stream was read to its end."""


class _Relay(_Stream):
    """QEMU -> relay -> us.

    QEMU 7.2 deadlocks when a background snapshot stops mid-stream (cancelled,
    or its reader gone) while a thread is blocked in a userfaultfd fault: the
    clean-up needs the lock that thread holds.  So the stream must always be
    read to its end.  The relay is ``cat`` in a session of its own: when we stop
    reading (an error, Ctrl-C, or this process killed) it drains the rest into
    /dev/null, and QEMU finishes normally.
    """

    def __init__(self) -> None:
        super().__init__()
        relay_in = self.fd  # the relay reads QEMU's pipe, and writes a second one, which we read
        self.fd, relay_out = _pipe()
        self.proc = subprocess.Popen(
            ["sh", "-c", "cat || exec cat >/dev/null"], stdin=relay_in, stdout=relay_out,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        os.close(relay_in)
        os.close(relay_out)

    def finish(self) -> None:
        self.proc.wait()
