"""Capturing a running machine's whole state, and loading it into a new one.

Capture (a live checkpoint)::

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
    6. the stream is read from a pipe by ``consume`` while the guest runs on

The pause reported is what an observer sees: from our ``stop`` until the guest is seen running.

Without userfaultfd (ordinary users on Debian/Ubuntu until the sysctl is set)
step 4 is a plain migration of the stopped guest, which is then continued: the
same checkpoint, but the guest pauses for the whole copy.
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
from pathlib import Path
from typing import Any, TypeVar

from ..errors import QemuError
from .disk import create_overlay, image_info, new_layer_name
from .machine import DISK_DEVICE, Machine, RunState, layer_of_node, node_name

log = logging.getLogger(__name__)

T = TypeVar("T")
MERGE_JOB = "sm-merge"
UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s; QEMU's default (32 MiB/s) would make checkpoints crawl
UFFD_REFUSAL = "not supported by host kernel"
PIPE_SIZE = 1 << 20  # an ordinary user's maximum (/proc/sys/fs/pipe-max-size)


@dataclass(frozen=True)
class Capture:
    live: bool  # background-snapshot (True) or stop-and-copy (False)
    frozen_layer: str  # the overlay that now holds the checkpoint's disk
    active_layer: str  # the overlay the guest writes to from now on
    pause_ms: float  # from our stop until the guest was seen running again
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
        await machine.run("migrate-set-capabilities",
                          {"capabilities": [{"capability": "background-snapshot", "state": True}]})
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
    live: bool,
) -> tuple[Capture, T]:
    """Checkpoint the running machine; ``consume`` reads the stream (in a thread) and returns a result."""
    if await machine.status() != RunState.RUNNING:
        raise QemuError(
            "The session's guest is not running, so it cannot be checkpointed now; start or resume it first.")
    while (await machine.run("query-migrate")).get("status") in ("setup", "active", "device"):
        await asyncio.sleep(0.1)  # an abandoned checkpoint's stream is still draining
    old = await active_layer(machine)
    new = new_layer_name()
    size = int(image_info(disks / old)["virtual-size"])
    create_overlay(disks / new, disks / old, "qcow2", size)
    await machine.run("blockdev-add", {
        "driver": "qcow2", "node-name": node_name(new), "backing": None,
        "file": {"driver": "file", "filename": str(disks / new)},
    })
    await machine.run("migrate-set-capabilities",
                      {"capabilities": [{"capability": "background-snapshot", "state": live}]})
    await machine.run("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})

    relay = _Relay()
    try:
        await machine.pass_fd(relay.qemu_fd, "sm-checkpoint")
    finally:
        os.close(relay.qemu_fd)
    consumer = asyncio.ensure_future(asyncio.to_thread(relay.run, consume))
    started = time.monotonic()
    stopped_at: float | None = None
    resumed_at: float | None = None
    switched = streaming = False
    try:
        await asyncio.to_thread(_fsync, disks / old)  # so the flush inside `stop` has little left to write
        await machine.run("stop")
        stopped_at = time.monotonic()
        await machine.run("blockdev-snapshot", {"node": node_name(old), "overlay": node_name(new)})
        switched = True
        await machine.run("migrate", {"uri": "fd:sm-checkpoint"})
        streaming = True
        if live:
            await _resume_after_device_state(machine)
            resumed_at = time.monotonic()
        on_layer_switched(new)
        log.info("checkpoint: streaming memory (%s)", "live" if live else "stop-and-copy")
        info = await _wait_migration(machine, "checkpoint", consumer)
        if not live:
            await machine.run("cont")
            resumed_at = time.monotonic()
        result = await consumer
        relay.proc.wait()
    except BaseException:
        relay.cancelled = True
        if not (live and streaming):
            # Never cancel a background snapshot: the relay drains it instead (see _Relay).
            with contextlib.suppress(QemuError):
                await machine.run("migrate_cancel")
        if stopped_at is not None:
            with contextlib.suppress(QemuError):
                if await machine.status() == RunState.PAUSED:
                    await machine.run("cont")
        if switched:
            on_layer_switched(new)
        with contextlib.suppress(QemuError):
            await machine.run("closefd", {"fdname": "sm-checkpoint"})  # ends the relay if QEMU never used it
        with contextlib.suppress(BaseException):
            await consumer  # returns at its next read; its error is secondary
        raise
    assert stopped_at is not None and resumed_at is not None
    return Capture(
        live=live,
        frozen_layer=old,
        active_layer=new,
        pause_ms=(resumed_at - stopped_at) * 1000,
        downtime_ms=float(info.get("downtime", 0)),
        wall_s=time.monotonic() - started,
        stream_bytes=relay.total,
    ), result


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


class _Relay:
    """QEMU -> relay -> us.

    QEMU 7.2 deadlocks when a background snapshot stops mid-stream (cancelled,
    or its reader gone) while a thread is blocked in a userfaultfd fault: the
    clean-up needs the lock that thread holds.  So the stream must always be
    read to its end.  The relay is ``cat`` in a session of its own: when we stop
    reading (an error, Ctrl-C, or this process killed) it drains the rest into
    /dev/null, and QEMU finishes normally.
    """

    def __init__(self) -> None:
        relay_in, self.qemu_fd = _pipe()
        self.fd, relay_out = _pipe()
        self.proc = subprocess.Popen(
            ["sh", "-c", "cat || exec cat >/dev/null"], stdin=relay_in, stdout=relay_out,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        os.close(relay_in)
        os.close(relay_out)
        self.total = 0
        self.cancelled = False

    def read(self, n: int) -> bytes:
        if self.cancelled:
            raise QemuError("The checkpoint was cancelled.")
        data = os.read(self.fd, n)
        self.total += len(data)
        return data

    def run(self, consume: Callable[[Callable[[int], bytes]], T]) -> T:
        """Run ``consume`` on the stream (in a worker thread); closing our end lets the relay drain."""
        try:
            return consume(self.read)
        finally:
            os.close(self.fd)
