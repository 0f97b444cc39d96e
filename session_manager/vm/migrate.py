"""Live migration of a running machine to another host, without shared storage, over TLS.

Destination: a QEMU started with the session's command line, a blank qcow2 of the disk's virtual size as its
top layer, ``-incoming defer`` and ``-S`` (``command_line(..., incoming=True, paused=True)``)::

    prepare_incoming   tls-creds-x509 (server, verify-peer) -> nbd-server-start (TLS) ->
                       block-export-add, writable, of the blank disk -> migrate-incoming tcp:HOST:PORT
    finish_incoming    once the source said so (``Migration.run`` returned, or ``Migration.postcopy_started``):
                       QEMU has the state -> the NBD server stops -> cont

Source: the running session (``Migration(...).run()``, or ``migrate_out``)::

    tls-creds-x509 (client) -> blockdev-add an NBD client of the export -> blockdev-mirror sync=full
    from the disk's top node (the whole backing chain arrives flattened in the destination's one file)
    -> READY: the copy follows every write -> migrate (pre-copy, auto-converge, return-path,
    pause-before-switchover, optionally postcopy-ram) -> pre-switchover: the guest is stopped;
    block-job-cancel the READY mirror, which copies what is still dirty and ends without a pivot ->
    migrate-continue -> completed: the destination has loaded the state (the return path reports it)
    and waits, paused; the source is in postmigrate and the caller quits it.

Both of the source QEMU's connections (NBD and migration) go through relays in this process (a unix socket
of ours, TCP to the destination).  QEMU can wait on a dead peer while it holds its big lock (draining NBD
requests when it stops the guest, writing the final device state), and then answers nothing, not even
migrate_cancel; closing the relay fails those writes at once.  The relays also count the bytes on the wire.

Safety (pre-copy).  The guest runs on one side only, and until the very end that side is the source:

* The destination never starts the guest by itself (``-S``); ``finish_incoming`` continues it, and callers
  call that only after ``run`` returned.  QEMU stops the source's guest before the last pages and device
  state leave, and with return-path reports "completed" only after the destination said it loaded
  everything; a destination that dies or fails to load makes the migration fail, and QEMU restarts the
  source's guest itself.
* Any failure or cancel before "completed" -- TLS refused, the link silent for ``stall_timeout`` (a cut),
  the destination gone, ``cancel()``, a progress callback raising, the task cancelled -- runs the same
  clean-up: cut the relays, migrate_cancel, cancel the mirror, remove the NBD node, continue the source's
  guest if it ran before, put the migration capabilities and parameters back (checkpoints migrate to an fd,
  without TLS), delete the TLS object.  The mirror only reads the source's disk.  The caller kills the
  destination's QEMU.
* Once "completed", the source still holds everything (its guest stopped, its disk complete) while the
  destination waits paused.  If the destination then cannot be continued, kill it and ``resume_source``.
* If the process running ``run`` dies, its relays die with it and QEMU's migration fails or waits at
  pre-switchover; ``recover_source`` tidies such a leftover up (QEMU restarts the guest it stopped).

Post-copy (``postcopy=True``) is for guests that dirty memory faster than the link carries it: after
``postcopy_after_passes`` passes the guest switches to the destination (``postcopy_started`` is set: call
``finish_incoming`` then, while ``run`` still waits) and the rest of its memory follows on demand.  From
that switch on, the guest's memory is split between the two hosts: a failure pauses it on both sides
(QEMU's "postcopy-paused") and the source cannot take over again.  It is off by default for that reason.

TLS: ``tls_dir`` is QEMU's tls-creds-x509 ``dir=`` layout: ca-cert.pem (what the peer's certificate must
chain to: the peer's self-signed certificate, or its CA), server-cert.pem/server-key.pem (destination),
client-cert.pem/client-key.pem (source).  The objects are created with ``sanity-check=off``: QEMU's own
sanity check rejects a certificate with CA:TRUE as a server or client certificate and wants our own
certificate to chain to ca-cert.pem, which a pairing of two self-signed certificates cannot satisfy.  It
looks only at our own files; GnuTLS verifies the peer all the same (verify-peer on both ends; the source
also checks the name ``tls_hostname``, else ``dest_host``, against the destination certificate's SAN).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import QemuError
from ..ratelimit import RateLimiter
from .machine import DISK_DEVICE, Machine, RunState

log = logging.getLogger(__name__)

EXPORT_NAME = "sm-disk"
SERVER_TLS = "sm-mig-tls-server"
SERVER_EXPORT = "sm-mig-export"
PREFIX_TLS, PREFIX_NODE, PREFIX_JOB = "sm-mig-tls-", "smmig", "sm-mig-"
UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s; QEMU's default max-bandwidth is 32 MiB/s
POLL = 0.05
NEAR_SWITCH, SWITCH_POLL = 256 << 20, 0.002  # RAM left, and the polling then: the guest stops at pre-switchover
CLEANUP_TIMEOUT = 20.0
# Capabilities a migration here sets; all are put back afterwards (background-snapshot too, which the engine
# leaves on for checkpoints and which excludes all the others).
OUR_CAPABILITIES = ("auto-converge", "pause-before-switchover", "return-path", "postcopy-ram")
PARAMETERS = ("tls-creds", "tls-hostname", "max-bandwidth", "downtime-limit")
ACTIVE = ("setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug")
POSTCOPY = ("postcopy-active", "postcopy-paused", "postcopy-recover")


class MigrationError(QemuError):
    """A live migration failed; unless it says otherwise, the session runs on at the source."""


class MigrationCancelled(MigrationError):
    """The user cancelled a live migration; the session runs on at the source."""


@dataclass(frozen=True)
class MigrationProgress:
    """What ``Migration.run`` reports about twenty times a second."""

    phase: str  # "connecting", "disk", "memory", "switchover", "postcopy", "completed"
    fraction: float  # of this phase, 0..1; -1 when unknown
    disk_done: int = 0  # the mirror's progress in bytes of the disk (ranges of zeros count, but cost nothing)
    disk_total: int = 0  # what it has to go through so far (grows while the guest writes)
    ram_transferred: int = 0
    ram_remaining: int = 0
    ram_total: int = 0
    passes: int = 0  # RAM passes so far (QEMU's dirty-sync-count)
    dirty_rate: int = 0  # bytes/s the guest dirties (QEMU's dirty-pages-rate x page size)
    mbps: float = 0.0  # the memory stream's throughput as QEMU measures it
    expected_downtime_ms: int = 0
    throttle_percent: int = 0  # auto-converge's vCPU throttle
    wire_bytes: int = 0  # bytes sent to the destination so far, both links, TLS included


@dataclass(frozen=True)
class MigrationResult:
    downtime_ms: float  # QEMU's: from stopping the source's guest to the end (includes the mirror's last sync)
    total_s: float  # from the first QMP command to completion
    disk_s: float  # until the mirror was READY
    disk_bytes: int  # sent on the NBD link (TLS included)
    ram_bytes: int  # sent on the migration link (TLS included): memory and device state
    passes: int
    postcopy: bool  # whether the guest switched over in post-copy

    @property
    def bytes_sent(self) -> int:
        return self.disk_bytes + self.ram_bytes


ProgressCallback = Callable[[MigrationProgress], None]


def _no_progress(p: MigrationProgress) -> None:
    pass


def tls_object(obj_id: str, tls_dir: Path, endpoint: str) -> dict[str, Any]:
    """The object-add arguments of a tls-creds-x509 for ``tls_dir`` (see the module's notes on sanity-check)."""
    return {"qom-type": "tls-creds-x509", "id": obj_id, "dir": str(tls_dir), "endpoint": endpoint,
            "verify-peer": True, "sanity-check": False}


async def top_node(machine: Machine) -> str:
    """The node name of the disk's top layer (what the guest writes to)."""
    for dev in await machine.run("query-block"):
        if DISK_DEVICE in (dev.get("qdev") or "") and dev.get("inserted"):
            return str(dev["inserted"]["node-name"])
    raise QemuError("The session's QEMU has no disk attached; recreate the session.")


# -- destination ---------------------------------------------------------------------------------------------

async def prepare_incoming(
    machine: Machine,
    *,
    listen_host: str,
    nbd_port: int,
    migrate_port: int,
    tls_dir: Path,
    disk_node: str,
    postcopy: bool = False,
) -> None:
    """Make a QEMU started with ``-incoming defer -S`` and a blank disk ready to receive a session.

    ``disk_node`` is its top qcow2 node (``node_name`` of the blank layer); the source's mirror writes the
    whole disk into it through the NBD export.  ``postcopy`` must match the source's.
    """
    if await machine.status() != RunState.INMIGRATE:
        raise MigrationError("The destination's QEMU is not waiting for an incoming migration; start it with "
                             "-incoming defer.")
    await machine.run("object-add", tls_object(SERVER_TLS, tls_dir, "server"))
    await machine.run("nbd-server-start", {
        "addr": {"type": "inet", "data": {"host": listen_host, "port": str(nbd_port)}},
        "tls-creds": SERVER_TLS,
    })
    await machine.run("block-export-add", {"type": "nbd", "id": SERVER_EXPORT, "node-name": disk_node,
                                           "name": EXPORT_NAME, "writable": True})
    await machine.run("migrate-set-capabilities",
                      {"capabilities": [{"capability": "postcopy-ram", "state": postcopy}]})
    await machine.run("migrate-set-parameters", {"tls-creds": SERVER_TLS})
    await machine.run("migrate-incoming", {"uri": f"tcp:{_uri_host(listen_host)}:{migrate_port}"})
    log.info("waiting for a migration on %s (disk on port %d, memory on port %d)", listen_host, nbd_port,
             migrate_port)


async def finish_incoming(machine: Machine, *, run: bool = True, timeout: float = 60.0,
                          running: Callable[[], None] = lambda: None) -> None:
    """Once the source said so (``Migration.run`` returned, or post-copy began): wait until QEMU has the state,
    stop the NBD server, continue the guest (unless ``run`` is False: it was paused at the source), then call
    ``running``: from then on the session lives here, whatever happens next.

    In post-copy this returns once the rest of memory has arrived.  Raises MigrationError if the state does
    not arrive (``running`` was not called; the caller then kills this QEMU and calls ``resume_source`` on the
    source), or if the link broke during post-copy (``running`` was called).
    """
    deadline = time.monotonic() + timeout
    while True:
        info = await machine.run("query-migrate")
        status = info.get("status")
        if status == "completed" or (status == "postcopy-active" and await machine.status() == RunState.PAUSED):
            break
        if status in ("failed", "cancelled"):
            raise MigrationError(f"The destination did not receive the session: {info.get('error-desc', status)}.")
        if time.monotonic() > deadline:
            raise MigrationError(f"The destination did not receive the whole session within {timeout:.0f} s "
                                 f"(its migration is {status}).")
        await asyncio.sleep(POLL / 5)
    with contextlib.suppress(QemuError):
        await machine.run("block-export-del", {"id": SERVER_EXPORT})
    with contextlib.suppress(QemuError):
        await machine.run("nbd-server-stop")
    if run:
        await machine.run("cont")
    running()
    while (status := (await machine.run("query-migrate")).get("status")) in POSTCOPY:
        if status == "postcopy-paused":
            raise MigrationError("The link to the source broke during post-copy; keep both computers running "
                                 "until it is back.")
        await asyncio.sleep(POLL)
    # From now on this is an ordinary session: checkpoints migrate to an fd, without TLS.
    with contextlib.suppress(QemuError):
        await machine.run("migrate-set-parameters", {"tls-creds": ""})
        await machine.run("migrate-set-capabilities",
                          {"capabilities": [{"capability": "postcopy-ram", "state": False}]})
        await machine.run("object-del", {"id": SERVER_TLS})


# -- source --------------------------------------------------------------------------------------------------

async def resume_source(machine: Machine) -> None:
    """Continue the source's guest after a completed migration whose destination was killed before it ran
    (``cont`` makes QEMU take back the disk it handed over)."""
    if await machine.status() in (RunState.POSTMIGRATE, RunState.PAUSED):
        await machine.run("cont")


async def recover_source(machine: Machine) -> str:
    """Tidy up after a migration whose driver died (its relays are gone with it): cancel QEMU's migration if it
    still runs (QEMU restarts a guest it stopped), remove our jobs, nodes and TLS objects, and put the
    migration settings back for checkpoints.  Returns how the migration ended ("completed" means the
    destination may hold the session: this does not resume the source; see ``resume_source``)."""
    status = str((await machine.run("query-migrate")).get("status", "none"))
    if status in ACTIVE:
        await machine.run("migrate_cancel")
        status = await _wait_migration_end(machine, time.monotonic() + CLEANUP_TIMEOUT)
    for job in await machine.run("query-jobs"):
        if job["id"].startswith(PREFIX_JOB):
            await _end_job(machine, job["id"], time.monotonic() + CLEANUP_TIMEOUT)
    await _delete_nodes(machine, [n["node-name"] for n in await machine.run("query-named-block-nodes", {"flat": True})
                                  if n["node-name"].startswith(PREFIX_NODE)])
    await _reset_settings(machine, None, None)
    for obj in await machine.run("qom-list", {"path": "/objects"}):
        if obj["name"].startswith(PREFIX_TLS):
            with contextlib.suppress(QemuError):
                await machine.run("object-del", {"id": obj["name"]})
    return status


@dataclass
class Migration:
    """One outgoing live migration; ``await run()`` once, ``cancel()`` from anywhere meanwhile."""

    machine: Machine
    dest_host: str
    nbd_port: int
    migrate_port: int
    tls_dir: Path
    tls_hostname: str | None = None  # the name the destination's certificate must carry (else dest_host)
    postcopy: bool = False
    postcopy_after_passes: int = 2  # switch to post-copy when pre-copy has not finished after this many passes
    max_bandwidth: int = UNLIMITED_BANDWIDTH  # bytes/s for memory
    mirror_speed: int = 0  # bytes/s on the wire for the disk copy; 0 = unlimited
    downtime_limit_ms: int = 50  # QEMU's default is 300
    stall_timeout: float = 30.0  # nothing moved (or QEMU did not answer) for this long: the link is cut
    progress: ProgressCallback = _no_progress

    postcopy_started: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _cancelled: bool = field(default=False, init=False)
    _switching: bool = field(default=False, init=False)  # migrate-start-postcopy was sent
    _relays: list[_Relay] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        token = secrets.token_hex(4)
        self._tls = PREFIX_TLS + token
        self._node = PREFIX_NODE + token  # node names: at most 31 characters
        self._job = PREFIX_JOB + token

    def cancel(self) -> None:
        """Stop the migration; ``run`` raises MigrationCancelled once the source runs on.  No effect once QEMU
        reported completed, or after the switch to post-copy."""
        self._cancelled = True

    @property
    def _committed(self) -> bool:
        return self.postcopy_started.is_set()

    async def run(self) -> MigrationResult:
        started = time.monotonic()
        state = RunState.parse((await self._q("query-status"))["status"])
        if state not in (RunState.RUNNING, RunState.PAUSED):
            raise MigrationError(f"The session's guest is {state.value}, so it cannot be migrated now.")
        was_running = state == RunState.RUNNING
        if (await self._q("query-migrate")).get("status") in ACTIVE:
            raise MigrationError("Another migration or checkpoint of this session is under way; try again when it "
                                 "has finished.")
        saved_caps = {c["capability"]: c["state"] for c in await self._q("query-migrate-capabilities")}
        saved_params = await self._q("query-migrate-parameters")
        runtime = self.machine.sockets.runtime
        # The disk copy is limited on the wire, by its relay: the mirror's own "speed" counts the empty parts of a
        # sparse disk as if they were data (over NBD they cost a few bytes each), so a limit there would copy an
        # empty 100 GiB disk as slowly as a full one.
        nbd = _Relay(runtime / f"mig-nbd-{self._node}.sock", self.dest_host, self.nbd_port, self.stall_timeout,
                     RateLimiter(self.mirror_speed) if self.mirror_speed else None)
        mig = _Relay(runtime / f"mig-ram-{self._node}.sock", self.dest_host, self.migrate_port, self.stall_timeout)
        self._relays = [nbd, mig]
        hostname = self.tls_hostname or self.dest_host
        try:
            self._report("connecting", -1)
            for relay in self._relays:
                await relay.start()
            await self._q("object-add", tls_object(self._tls, self.tls_dir, "client"))
            await self._q("blockdev-add", {
                "driver": "nbd", "node-name": self._node, "export": EXPORT_NAME, "tls-creds": self._tls,
                "tls-hostname": hostname, "server": {"type": "unix", "path": str(nbd.path)},
            })
            await self._q("blockdev-mirror", {
                "job-id": self._job, "device": await top_node(self.machine), "target": self._node,
                "sync": "full", "auto-dismiss": False,
            })
            await self._wait_mirror_ready()
            mirror_ready_at = time.monotonic()
            # background-snapshot (the engine's, for checkpoints) excludes every capability used here.
            await self._q("migrate-set-capabilities", {"capabilities": [
                {"capability": "background-snapshot", "state": False},
                {"capability": "auto-converge", "state": True},
                {"capability": "pause-before-switchover", "state": True},
                {"capability": "return-path", "state": True},
                {"capability": "postcopy-ram", "state": self.postcopy},
            ]})
            await self._q("migrate-set-parameters", {
                "tls-creds": self._tls, "tls-hostname": hostname, "max-bandwidth": self.max_bandwidth,
                "downtime-limit": self.downtime_limit_ms,
            })
            await self._q("migrate", {"uri": f"unix:{mig.path}"})
            info = await self._wait_migration()
            result = MigrationResult(
                downtime_ms=float(info.get("downtime", 0)),
                total_s=time.monotonic() - started,
                disk_s=mirror_ready_at - started,
                disk_bytes=nbd.sent,
                ram_bytes=mig.sent,
                passes=int(info.get("ram", {}).get("dirty-sync-count", 0)),
                postcopy=self._committed,
            )
            self._report("completed", 1.0)
            log.info("migrated to %s: downtime %.0f ms, %.1f s, %d MB sent", self.dest_host, result.downtime_ms,
                     result.total_s, result.bytes_sent >> 20)
            return result
        except BaseException as e:
            if self._committed:
                log.error("migration failed after the post-copy switch: %s", e)
                raise MigrationError(
                    "The migration failed after the session switched to the destination (post-copy): it is "
                    "paused on both computers until the link is back; keep both running.") from e
            log.warning("migration to %s failed, rolling back: %s", self.dest_host, e)
            try:
                await asyncio.shield(asyncio.wait_for(self._roll_back(was_running), 3 * CLEANUP_TIMEOUT))
            except TimeoutError:
                log.error("QEMU did not answer while the migration was rolled back")
            if self._cancelled and not isinstance(e, MigrationCancelled):
                raise MigrationCancelled("The migration was cancelled; the session runs on here.") from e
            if isinstance(e, QemuError) and not isinstance(e, MigrationError):
                raise MigrationError(f"The migration failed: {e} The session runs on here.") from e
            raise
        finally:
            await asyncio.shield(self._finish(saved_caps, saved_params))

    # -- phases ------------------------------------------------------------------------------------------------
    async def _q(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """A QMP command that must be answered within stall_timeout (QEMU may wait on a dead link holding its
        lock; the roll-back cuts the relays, after which it answers again)."""
        try:
            return await asyncio.wait_for(self.machine.run(cmd, args), self.stall_timeout)
        except TimeoutError:
            raise MigrationError(f"QEMU did not answer {cmd} within {self.stall_timeout:.0f} s; the link to the "
                                 "destination seems cut.") from None

    def _report(self, phase: str, fraction: float, **details: Any) -> None:
        wire = sum(r.sent for r in self._relays)
        self.progress(MigrationProgress(phase, fraction, wire_bytes=wire, **details))

    def _check_cancel(self) -> None:
        if self._cancelled and not self._committed:
            raise MigrationCancelled("The migration was cancelled; the session runs on here.")

    def _moved(self) -> int:
        return sum(r.sent + r.received for r in self._relays)

    async def _query_job(self) -> dict[str, Any]:
        for job in await self._q("query-jobs"):
            if job["id"] == self._job:
                return dict(job)
        raise MigrationError("QEMU lost the job copying the disk to the destination.")

    async def _wait_mirror_ready(self) -> None:
        watch = _Stall(self.stall_timeout)
        while True:
            self._check_cancel()
            job = await self._query_job()
            if job["status"] in ("aborting", "concluded", "null"):
                raise MigrationError(f"Copying the disk to the destination failed: {job.get('error', job['status'])}.")
            done, total = int(job.get("current-progress", 0)), int(job.get("total-progress", 0))
            self._report("disk", done / total if total else -1, disk_done=done, disk_total=total)
            if job["status"] == "ready":
                return
            watch.check((done, self._moved()), "the disk copy")
            await asyncio.sleep(POLL)

    async def _wait_migration(self) -> dict[str, Any]:
        """Until QEMU reports completed; returns its query-migrate answer."""
        watch = _Stall(self.stall_timeout)
        mirror_done = False
        while True:
            self._check_cancel()
            info = await self._q("query-migrate")
            status = info.get("status")
            ram = info.get("ram", {})
            if status == "completed":
                return dict(info)
            if status in ("failed", "cancelled"):
                raise MigrationError(f"The migration {status}: {info.get('error-desc', 'no reason given')}.")
            if status == "postcopy-paused":
                raise MigrationError("The link to the destination broke during post-copy.")
            if not mirror_done:  # it runs until the switch-over
                job = await self._query_job()
                if job["status"] not in ("ready", "running"):
                    raise MigrationError(f"Keeping the destination's disk in step failed: "
                                         f"{job.get('error', job['status'])}.")
            total, remaining = int(ram.get("total", 0)), int(ram.get("remaining", 0))
            details = dict(
                ram_transferred=int(ram.get("transferred", 0)), ram_remaining=remaining, ram_total=total,
                passes=int(ram.get("dirty-sync-count", 0)),
                dirty_rate=int(ram.get("dirty-pages-rate", 0)) * int(ram.get("page-size", 4096)),
                mbps=float(ram.get("mbps", 0.0)), expected_downtime_ms=int(info.get("expected-downtime", 0)),
                throttle_percent=int(info.get("cpu-throttle-percentage", 0)),
            )
            fraction = 1 - remaining / total if total else -1
            if status == "pre-switchover":
                if mirror_done:  # QEMU 10 may still say so for a moment after migrate-continue: wait, once only
                    await asyncio.sleep(SWITCH_POLL)
                    continue
                # The guest is stopped: bring the disk copy up to date, end it without a pivot, and let QEMU
                # send the last pages and the device state.
                self._report("switchover", -1, **details)
                await self._finish_mirror()
                mirror_done = True
                await self._q("migrate-continue", {"state": "pre-switchover"})
                continue
            if status in POSTCOPY:
                if not self._committed:
                    log.info("migration: switched to post-copy")
                    self.postcopy_started.set()
                self._report("postcopy", fraction, **details)
            elif status == "active":
                self._report("memory", fraction, **details)
                if self.postcopy and not self._switching and details["passes"] >= self.postcopy_after_passes:
                    await self._q("migrate-start-postcopy")
                    self._switching = True
            watch.check(self._moved(), "the migration")
            await asyncio.sleep(SWITCH_POLL if status == "active" and remaining < NEAR_SWITCH else POLL)

    async def _finish_mirror(self) -> None:
        """block-job-cancel of a READY mirror: it copies what is still dirty, then ends without a pivot."""
        await self._q("block-job-cancel", {"device": self._job})
        watch = _Stall(self.stall_timeout)
        while True:
            self._check_cancel()
            job = await self._query_job()
            if job["status"] == "concluded":
                if job.get("error"):
                    raise MigrationError(f"The last copy of the disk failed: {job['error']}.")
                await self._q("job-dismiss", {"id": self._job})
                await self._q("blockdev-del", {"node-name": self._node})
                return
            if job["status"] == "aborting":
                raise MigrationError(f"The last copy of the disk failed: {job.get('error', 'aborted')}.")
            watch.check((int(job.get("current-progress", 0)), self._moved()), "the disk's last copy")
            await asyncio.sleep(0.002)

    # -- clean-up ----------------------------------------------------------------------------------------------
    async def _roll_back(self, was_running: bool) -> None:
        """Leave the source as it was: its guest running (if it ran), no job, no NBD node."""
        m = self.machine
        deadline = time.monotonic() + CLEANUP_TIMEOUT
        for relay in self._relays:  # first: QEMU may be stuck writing to the destination
            await relay.close()
        try:
            if (await m.run("query-migrate")).get("status") in ACTIVE:
                await m.run("migrate_cancel")
            log.info("migration rolled back (it ended %s)", await _wait_migration_end(m, deadline))
            if any(j["id"] == self._job for j in await m.run("query-jobs")):
                await _end_job(m, self._job, deadline)
            await _delete_nodes(m, [self._node])
            # QEMU restarts a guest it stopped for a failed migration; one stopped for good (a cancel too
            # late, after "completed") is continued here: the destination never ran it (-S).
            while was_running and time.monotonic() < deadline:
                state = await m.status()
                if state in (RunState.PAUSED, RunState.POSTMIGRATE):
                    await m.run("cont")
                elif state != RunState.FINISH_MIGRATE:
                    break
                await asyncio.sleep(POLL)
        except QemuError as e:
            log.error("could not tidy up after the migration: %s", e)

    async def _finish(self, caps: dict[str, bool], params: dict[str, Any]) -> None:
        try:
            await _wait_migration_end(self.machine, time.monotonic() + CLEANUP_TIMEOUT)
            await _reset_settings(self.machine, caps, params)
            with contextlib.suppress(QemuError):
                await self.machine.run("object-del", {"id": self._tls})
        except QemuError as e:
            log.warning("could not restore the migration settings: %s", e)
        for relay in self._relays:
            await relay.close()


async def migrate_out(machine: Machine, **kwargs: Any) -> MigrationResult:
    """``Migration(machine, **kwargs).run()``: see Migration for the arguments."""
    return await Migration(machine, **kwargs).run()


async def _wait_migration_end(machine: Machine, deadline: float) -> str:
    status = str((await machine.run("query-migrate")).get("status", "none"))
    while status in ACTIVE + POSTCOPY and time.monotonic() < deadline:
        await asyncio.sleep(POLL)
        status = str((await machine.run("query-migrate")).get("status", "none"))
    return status


async def _end_job(machine: Machine, job_id: str, deadline: float) -> None:
    job = next((j for j in await machine.run("query-jobs") if j["id"] == job_id), None)
    if job and job["status"] not in ("concluded", "null", "aborting"):
        with contextlib.suppress(QemuError):
            await machine.run("block-job-cancel", {"device": job_id, "force": True})
    while job and job["status"] not in ("concluded", "null") and time.monotonic() < deadline:
        await asyncio.sleep(POLL)
        job = next((j for j in await machine.run("query-jobs") if j["id"] == job_id), None)
    with contextlib.suppress(QemuError):
        await machine.run("job-dismiss", {"id": job_id})


async def _delete_nodes(machine: Machine, names: Iterable[str]) -> None:
    present = {n["node-name"] for n in await machine.run("query-named-block-nodes", {"flat": True})}
    for name in names:
        if name in present:
            with contextlib.suppress(QemuError):
                await machine.run("blockdev-del", {"node-name": name})


async def _reset_settings(machine: Machine, caps: dict[str, bool] | None, params: dict[str, Any] | None) -> None:
    """Our capabilities off, TLS off; then what was there before (when known)."""
    await machine.run("migrate-set-capabilities",
                      {"capabilities": [{"capability": c, "state": False} for c in OUR_CAPABILITIES]})
    if caps is not None and caps.get("background-snapshot"):
        await machine.run("migrate-set-capabilities",
                          {"capabilities": [{"capability": "background-snapshot", "state": True}]})
    back = {k: params[k] for k in PARAMETERS if k in params} if params is not None else {}
    await machine.run("migrate-set-parameters", {**back, "tls-creds": back.get("tls-creds", ""),
                                                 "tls-hostname": back.get("tls-hostname", "")})


class _Stall:
    """Raises when a value has not changed for ``timeout`` seconds."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.value: object = None
        self.since = time.monotonic()

    def check(self, value: object, what: str) -> None:
        now = time.monotonic()
        if value != self.value:
            self.value, self.since = value, now
        elif now - self.since > self.timeout:
            raise MigrationError(f"Nothing moved in {what} for {self.timeout:.0f} s; the link to the destination "
                                 "seems cut.")


class _Relay:
    """QEMU -> a unix socket of ours -> TCP to the destination, and back.  ``close`` cuts it at once, whatever
    TCP would do with a silent peer; QEMU's pending writes and reads fail."""

    def __init__(self, path: Path, host: str, port: int, connect_timeout: float,
                 limiter: RateLimiter | None = None) -> None:
        self.path = path
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self.limiter = limiter  # of what goes to the destination
        self.sent = 0
        self.received = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._closed = False

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def _serve(self, q_reader: asyncio.StreamReader, q_writer: asyncio.StreamWriter) -> None:
        self._writers.append(q_writer)
        try:
            if self._closed:
                return
            try:
                d_reader, d_writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                            self.connect_timeout)
            except (OSError, TimeoutError) as e:
                log.warning("could not reach %s:%d: %s", self.host, self.port, e)
                return
            self._writers.append(d_writer)
            await asyncio.gather(self._pump(q_reader, d_writer, True), self._pump(d_reader, q_writer, False))
        except Exception as e:
            log.warning("relay to %s:%d: %s", self.host, self.port, e)
        finally:
            self._abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        try:
            while data := await reader.read(1 << 20):
                if up and self.limiter is not None:
                    await asyncio.sleep(self.limiter.take(len(data)))
                writer.write(data)
                if up:
                    self.sent += len(data)
                else:
                    self.received += len(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            self._abort()  # one side ended: end both, as a broken link would

    def _abort(self) -> None:
        for w in self._writers:
            w.transport.abort()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        self._abort()
        await asyncio.sleep(0)  # the transports close on the next turn of the loop
        self.path.unlink(missing_ok=True)


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
