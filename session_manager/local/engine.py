"""The operations a user asks for, composed from vm/ (QEMU) and store/ (the repository).

No Qt here: the CLI calls these with ``asyncio.run`` and the app awaits them
on its qasync loop.  Operations that change a session hold the session's lock,
so an autosave and a manual checkpoint never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shlex
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import CorruptionError, NotFoundError, QemuError, SessionManagerError, StreamFormatError, UsageError
from ..files import atomic_write
from ..paths import Home, machine_cache
from ..store.repo import CheckpointInfo, CheckpointMeta, Repository
from ..vm import disk as vdisk
from ..vm.guestagent import sync_clock
from ..vm.machine import Machine, RunState, Sockets, launch, wait_exit
from ..vm.migrate import recover_source
from ..vm.qemu import (
    GUEST_SHUTDOWN,
    SHUTDOWN_TRACE,
    Accel,
    Qemu,
    boot_id,
    cannot_load,
    choose_accelerator,
    command_line,
    find_qemu,
    machine_type,
    machine_types,
    qemu_path,
    write_account,
)
from ..vm.snapshot import Capture, Route, capture, choose_route, live_supported, load, merge_layers
from ..vm.stream import REGION_SHIFT, Segment, iter_segments, running_on_load
from .sessions import Session, SessionConfig, SessionState, list_sessions
from .settings import Settings

log = logging.getLogger(__name__)

DEMO_NAME = "demo"
DEMO_APPEND = "console=ttyS0 sm.fill=64 sm.dirty=1 sm.window=16"
SERIAL_MARK = "--- session-manager:"
ACCEL_ENV = "SESSION_MANAGER_ACCEL"  # "kvm" or "tcg": skip the probe
LOCK_TIMEOUT = 600.0
MAX_CHAIN = 8  # disk layers in the running chain before the newest frozen ones are merged
DISK_FILES = ("layer-", "restored-")
UFFD_ADVICE = (
    "Live checkpoints are unavailable: under software emulation QEMU older than 9.0 needs userfaultfd for them, "
    "and this kernel denies it to ordinary users (vm.unprivileged_userfaultfd=0). Use QEMU 9.0 or newer (or KVM), "
    "or allow it with `echo vm.unprivileged_userfaultfd=1 | sudo tee "
    "/etc/sysctl.d/60-session-manager.conf && sudo sysctl --system` (packaging/setup.sh does this), and until "
    "then each checkpoint pauses the session while its memory is copied."
)


Progress = Callable[[str, float], None]
"""Told what an operation is doing and how far it is (0..1, or -1 when unknown); may be called from a worker
thread.  An export's progress callback may raise to cancel it."""


def _no_progress(what: str, fraction: float) -> None:
    pass


def _counting(chunks: Iterable[bytes], total: int, what: str, progress: Progress) -> Iterator[bytes]:
    done = 0
    for chunk in chunks:
        yield chunk
        done += len(chunk)
        progress(what, min(done / max(total, 1), 1.0))


@dataclass
class Status:
    name: str
    running: bool
    run_state: str | None
    pid: int | None
    accel: str | None
    accel_reason: str | None
    live_checkpoints: bool | None
    head: str | None
    saved: str | None
    qmp_socket: str
    vnc_socket: str
    serial_log: str
    qemu_log: str
    memory_mib: int
    cpus: int
    crashed: bool = False  # QEMU died while the session should run: `recover` brings back its latest checkpoint
    moved_to: str | None = None  # the peer it was live-migrated to (and runs on), when it has no QEMU here
    qemu: str | None = None  # the qemu-system-x86_64 that runs it (or would start it)
    qemu_version: str | None = None


class Engine:
    def __init__(self, home: Home) -> None:
        self.home = home
        self._repo: Repository | None = None

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = Repository.open(self.home.repository, create=True)
        return self._repo

    @property
    def qemu(self) -> Qemu:
        """The QEMU that starts sessions: $SESSION_MANAGER_QEMU, the ``qemu`` setting, or the one on PATH."""
        return find_qemu(qemu_path(Settings.load(self.home).qemu))

    def session(self, name: str) -> Session:
        return Session(self.home, name).require()

    def sessions(self) -> list[Session]:
        return list_sessions(self.home)

    def sockets(self, session: Session) -> Sockets:
        return Sockets(session.runtime)

    # -- creating ------------------------------------------------------------
    def new_session(
        self,
        name: str,
        *,
        disk: Path | None = None,
        iso: Path | None = None,
        kernel: Path | None = None,
        initrd: Path | None = None,
        append: str | None = None,
        memory_mib: int = 2048,
        cpus: int = 2,
        disk_size: int = 32 << 30,
        desktop: bool = False,
        account: str | None = None,
    ) -> Session:
        """A new session; ``desktop``: a disk with the kernel it was built with (guests/desktop.py), whose first boot
        creates ``account``."""
        session = Session(self.home, name)
        if session.exists():
            raise UsageError(f"A session named {name!r} already exists; choose another name or delete it first.")
        if sum(x is not None for x in (disk, iso, kernel)) != 1 and not (desktop and disk and kernel and not iso):
            raise UsageError("Give exactly one of --disk IMAGE, --iso ISO or --kernel KERNEL.")
        for label, path in (("disk image", disk), ("ISO", iso), ("kernel", kernel), ("initrd", initrd)):
            if path is not None and not Path(path).is_file():
                raise NotFoundError(f"The {label} {path} does not exist; check the path.")
        if memory_mib < 64:
            raise UsageError("--memory must be at least 64M.")
        if cpus < 1:
            raise UsageError("--cpus must be at least 1.")
        qemu = self.qemu
        base_format = None
        if disk is not None:
            info = vdisk.image_info(Path(disk))
            base_format, disk_size = info["format"], int(info["virtual-size"])
        config = SessionConfig(
            name=name,
            machine=machine_type(qemu),
            memory_mib=memory_mib,
            cpus=cpus,
            boot="kernel" if kernel else "disk" if disk else "iso",
            disk_size=disk_size,
            base_image=str(Path(disk).resolve()) if disk else None,
            base_format=base_format,
            kernel=str(Path(kernel).resolve()) if kernel else None,
            initrd=str(Path(initrd).resolve()) if initrd else None,
            append=append,
            iso=str(Path(iso).resolve()) if iso else None,
            desktop=desktop,
            account=account,
        )
        first = vdisk.new_layer_name()
        session.disks.mkdir(parents=True, exist_ok=True)
        try:
            if disk is not None:
                vdisk.create_overlay(session.layer_path(first), Path(config.base_image or ""), base_format or "raw",
                                     disk_size)
            else:
                vdisk.create_blank(session.layer_path(first), disk_size)
            session.create(config, first)
        except BaseException:
            session.remove()
            raise
        log.info("created session %s (%s)", name, config.boot)
        return session

    def delete(self, name: str) -> int:
        """Delete a session and forget its checkpoints; returns how many were forgotten."""
        session = self.session(name)
        self._set_running(session, False)  # first, or its QEMU's death would read as a crash
        asyncio.run(self._kill(self.sockets(session)))
        count = 0
        for ckpt in self.repo.checkpoints(session=name):
            self.repo.delete_checkpoint(ckpt.id)
            count += 1
        session.remove()
        return count

    async def demo(self, build_guest: Callable[[Path], tuple[Path, Path]]) -> Status:
        """Create (once) and start the demo session: the test guest (``build_guest``: guests/testguest.py), counting on
        its screen."""
        if not Session(self.home, DEMO_NAME).exists():
            kernel, initrd = await asyncio.to_thread(build_guest, self.home.cache / "testguest")
            self.new_session(DEMO_NAME, kernel=kernel, initrd=initrd, append=DEMO_APPEND,
                             memory_mib=512, cpus=1, disk_size=64 << 20)
        if self.sockets(self.session(DEMO_NAME)).pid() is None:
            return await self.start(DEMO_NAME)
        return await self.status(DEMO_NAME)

    # -- running -------------------------------------------------------------
    def accelerator(self) -> Accel:
        forced = os.environ.get(ACCEL_ENV)
        if forced in ("kvm", "tcg"):
            return Accel(forced, f"{ACCEL_ENV}={forced}")
        return choose_accelerator(machine_cache(), self.qemu)

    async def start(self, name: str) -> Status:
        """Start a session: resume its saved state if it was stopped with one, its latest checkpoint if it
        crashed (as `recover` does), else boot it."""
        session = self.session(name)
        async with self._locked(session):
            state = session.load_state()
            if state.running_boot and self.sockets(session).pid() is None:
                self._switched_off(session, state)
            if state.moved_to and self.sockets(session).pid() is not None:
                await self._kill(self.sockets(session))  # handed over, but its driver died before it quit QEMU
            if self.sockets(session).pid() is not None:
                async with Machine.connect(self.sockets(session)) as m:
                    if await m.status() not in (RunState.PAUSED, RunState.POSTMIGRATE):
                        raise UsageError(f"Session {name!r} is already running; use `session-manager status {name}`.")
                    await m.run("cont")  # left paused by a checkpoint killed in its pause, or an unconfirmed migration
                await self.set_clock(session)
                return await self.status(name)
            self._refuse_moved(session)
            latest = state.saved or (state.head if state.running_boot else None)
            if latest:
                await self._restore_locked(session, self.repo.get(latest), take_before=False)
            else:
                await self._launch(session, session.load_config(), session.layer_path(state.active_layer), "boot")
                self._set_running(session, True)
                async with Machine.connect(self.sockets(session)) as m:
                    await self._note_live_support(m, session)
        return await self.status(name)

    async def _launch(self, session: Session, config: SessionConfig, top: Path, why: str,
                      incoming: bool = False, paused: bool = False) -> None:
        accel = self.accelerator()
        log.info("accelerator %s: %s", accel.name, accel.reason)
        sockets = self.sockets(session)
        session.state_dir.mkdir(parents=True, exist_ok=True)
        with open(session.serial_log, "a") as f:  # so the log shows where each run of the guest begins
            f.write(f"\n{SERIAL_MARK} {why} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        qemu = self.qemu
        if config.machine not in machine_types(qemu):
            raise QemuError(f"Session {session.name!r} has machine type {config.machine}, which QEMU "
                            f"{qemu.version_text} ({qemu.system}) does not have; run it with the newer QEMU it was "
                            "made with (the `qemu` setting in settings.toml).")
        argv = command_line(qemu, config, accel=accel.name, top_layer=top, sockets=sockets,
                            serial_log=session.serial_log, incoming=incoming, paused=paused)
        write_account(config, sockets)
        await launch(argv, sockets, session.qemu_log)
        atomic_write(sockets.runtime / "accel", f"{accel.name}\n{accel.reason}\n".encode())
        atomic_write(sockets.runtime / "qemu", f"{qemu.version_text}\n{qemu.system}\n".encode())

    async def set_clock(self, session: Session) -> None:
        """After a jump in time (the guest ran on from a checkpoint's time, or from when it was paused): set a desktop
        guest's clock to this computer's.  Best effort: logged if its agent never answers."""
        if session.load_config().desktop:
            await sync_clock(self.sockets(session).guest_agent)

    @staticmethod
    def config_of(ckpt: CheckpointInfo) -> SessionConfig:
        """The session config a checkpoint recorded; CorruptionError (one sentence) if it has none or a bad one."""
        try:
            return SessionConfig.from_json(ckpt.meta.config)
        except ValueError:
            raise CorruptionError(f"Checkpoint {ckpt.id[:8]} of {ckpt.session} records no usable session settings, so "
                                  "it cannot be restored; restore another checkpoint.") from None

    def require_loadable(self, ckpt: CheckpointInfo) -> None:
        """Refuse, before anything changes, a checkpoint that this computer's QEMU cannot load."""
        qemu = self.qemu
        why = cannot_load(qemu.version_text, machine_types(qemu), ckpt.meta.qemu, self.config_of(ckpt).machine)
        if why:
            raise QemuError(f"Checkpoint {ckpt.id[:8]} of {ckpt.session} cannot run here: {why}: install one, or "
                            "point the `qemu` setting in settings.toml at it.")

    def running_qemu(self, session: Session) -> tuple[str, str]:
        """(version, path) of the QEMU that runs the session, or of the one that would start it."""
        text = _read(self.sockets(session).runtime / "qemu") if self.sockets(session).pid() is not None else None
        if text and len(lines := text.splitlines()) == 2:
            return lines[0], lines[1]
        qemu = self.qemu  # reads the settings once
        return qemu.version_text, qemu.system

    async def _note_live_support(self, machine: Machine, session: Session) -> Route:
        """How this session's checkpoints are taken (vm/snapshot.py, choose_route), noted for `status`."""
        version = self.running_qemu(session)[0]
        accel = (_read(self.sockets(session).runtime / "accel") or "").partition("\n")[0]
        route = choose_route(version, accel, userfaultfd=True)
        if route != Route.PRECOPY:
            route = choose_route(version, accel, await live_supported(machine))
        atomic_write(session.runtime / "live", b"0" if route == Route.STOP_AND_COPY else b"1")
        if route == Route.STOP_AND_COPY:
            log.warning(UFFD_ADVICE)
        return route

    async def stop(self, name: str, save: bool = True) -> CheckpointInfo | None:
        """Stop a running session; by default its state is checkpointed first and resumed by `start`."""
        session = self.session(name)
        async with self._locked(session):
            sockets = self.sockets(session)
            if sockets.pid() is None:
                raise UsageError(f"Session {name!r} is not running.")
            saved = None
            async with Machine.connect(sockets) as m:
                run_state = await m.status()
                if save and run_state == RunState.PAUSED:
                    await m.run("cont")  # a checkpoint needs a running guest; its state is what we keep
                if save and run_state in (RunState.RUNNING, RunState.PAUSED):
                    saved = await self._checkpoint_locked(session, m, "saved on stop", "stop")
                await m.quit()
            state = session.load_state()
            if saved is not None:
                state.saved = saved.id
            state.running_boot = None  # stopped on purpose: not a crash
            session.save_state(state)
            return saved

    async def status(self, name: str) -> Status:
        session = self.session(name)
        config = session.load_config()
        state = session.load_state()
        sockets = self.sockets(session)
        pid = sockets.pid()
        run_state = None
        if pid is not None:
            async with Machine.connect(sockets) as m:
                run_state = (await m.status()).value
        accel = _read(sockets.runtime / "accel")
        live = _read(sockets.runtime / "live")
        qemu = self.running_qemu(session)
        return Status(
            name=name,
            running=run_state == RunState.RUNNING.value,
            run_state=run_state,
            pid=pid,
            accel=accel.splitlines()[0] if pid and accel else None,
            accel_reason=accel.splitlines()[1] if pid and accel else None,
            live_checkpoints=(live == "1") if pid and live else None,
            head=state.head,
            saved=state.saved,
            qmp_socket=str(sockets.qmp),
            vnc_socket=str(sockets.vnc),
            serial_log=str(session.serial_log),
            qemu_log=str(session.qemu_log),
            memory_mib=config.memory_mib,
            cpus=config.cpus,
            crashed=pid is None and self.crashed(name),
            moved_to=state.moved_to if pid is None else None,
            qemu=qemu[1],
            qemu_version=qemu[0],
        )

    # -- crashes -------------------------------------------------------------------
    def crashed(self, name: str) -> bool:
        """Whether QEMU died while the session should be running (killed, out of memory, its own crash or the
        host's); False while an operation holds the session, for that operation sees QEMU die and says so."""
        session = self.session(name)
        fd = self._lock_file(session)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            state = session.load_state()
            if state.running_boot is None or self.sockets(session).pid() is not None:
                return False
            return not self._switched_off(session, state)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    def _switched_off(self, session: Session, state: SessionState) -> bool:
        """Whether a session whose QEMU is gone had its guest switch itself off (shut down from inside); then it
        is recorded as stopped, not crashed, and the next start boots it.  Call it holding the session's lock."""
        if state.running_boot != boot_id() or not any(
                line == f"{SHUTDOWN_TRACE}{GUEST_SHUTDOWN}" for line in _since_launch(session.qemu_log)):
            return False
        state.running_boot = None
        session.save_state(state)
        log.info("%s: the guest switched itself off", session.name)
        return True

    def crash_reason(self, name: str) -> str:
        """Why a crashed session's QEMU is gone, as far as can be told, e.g. "QEMU was killed: ..."."""
        session = self.session(name)
        if session.load_state().running_boot != boot_id():
            return "the computer shut down or crashed while it ran"
        if self.sockets(session).pidfile.exists():  # QEMU removes it when it exits, unless it is killed
            return "QEMU was killed: by SIGKILL, the out-of-memory killer or a crash of its own"
        last = _last_words(session.qemu_log)
        return f"QEMU exited saying {last!r}" if last else "QEMU exited; the guest may have switched itself off"

    async def recover(self, name: str, progress: Progress = _no_progress) -> CheckpointInfo:
        """Bring a crashed session back from its latest checkpoint, as `start` does; returns that checkpoint.

        The latest is the head (autosaves advance it), or the state kept by a restore that did not finish;
        QEMU is dead, so there is nothing to checkpoint first.
        """
        session = self.session(name)
        async with self._locked(session):
            state = session.load_state()
            latest = state.saved or state.head
            if self.sockets(session).pid() is not None:
                raise UsageError(f"Session {name!r} is running; nothing to recover.")
            if state.running_boot is None:
                raise UsageError(f"Session {name!r} was stopped, not crashed; `session-manager start {name}` "
                                 "starts it.")
            if latest is None:
                raise UsageError(f"Session {name!r} has no checkpoint to recover from; start it to boot afresh.")
            ckpt = self.repo.get(latest)
            await self._restore_locked(session, ckpt, take_before=False, progress=progress)
            return ckpt

    @staticmethod
    def _set_running(session: Session, running: bool) -> None:
        state = session.load_state()
        state.running_boot = boot_id() if running else None
        session.save_state(state)

    # -- checkpoints -----------------------------------------------------------
    async def checkpoint(self, name: str, note: str = "", kind: str = "manual",
                         progress: Progress = _no_progress) -> CheckpointInfo:
        session = self.session(name)
        async with self._locked(session):
            if self.sockets(session).pid() is None:
                raise UsageError(f"Session {name!r} is not running; start it with `session-manager start {name}`.")
            async with Machine.connect(self.sockets(session)) as m:
                return await self._checkpoint_locked(session, m, note, kind, progress)

    async def _checkpoint_locked(self, session: Session, m: Machine, note: str, kind: str,
                                 progress: Progress = _no_progress) -> CheckpointInfo:
        progress("Checkpointing", -1)
        route = await self._note_live_support(m, session)
        thumbnail = await m.screendump_png(session.runtime / "thumbnail.png")
        state = session.load_state()
        config = session.load_config()

        def switched(layer: str) -> None:
            state.active_layer = layer
            session.save_state(state)

        ram = config.memory_mib << 20

        def memory(segments: Iterable[Segment]) -> Iterator[Segment]:
            for i, segment in enumerate(segments, 1):  # each segment is at most one 2 MiB region of RAM
                yield segment
                if i % 16 == 0:
                    progress("Saving memory", min((i << REGION_SHIFT) / ram, 0.99))

        with self.repo.writer(session=session.name, parent=state.head) as w:
            try:
                cap, _ = await capture(m, session.disks, lambda read: w.add_memory(memory(iter_segments(read))),
                                       switched, route)
            except StreamFormatError as e:  # the stream broke off: say why when it is because QEMU died
                deadline = time.monotonic() + 1.0  # a killed QEMU's pid goes a moment after its stream
                while self.sockets(session).pid() is not None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if self.sockets(session).pid() is None:
                    raise QemuError(f"QEMU exited in the middle of the checkpoint of {session.name}, so it was "
                                    f"not kept; earlier checkpoints are intact, and `session-manager recover "
                                    f"{session.name}` restores the latest.") from e
                raise
            progress("Saving disk changes", -1)
            await asyncio.to_thread(self._ingest_disk, w, session, cap.frozen_layer, _layer_of(state, state.head))
            if thumbnail:
                w.set_thumbnail(thumbnail)
            info = w.commit(self._meta(cap, note, kind, config, self.running_qemu(session)[0]))
        state.head = info.id
        state.layers[cap.frozen_layer] = info.id
        session.save_state(state)
        await self._tidy_disk(session, m, state)
        log.info("checkpoint %s of %s: pause %.1f ms (%s), %.2f s", info.id, session.name, cap.pause_ms,
                 cap.route.value if cap.live else "paused for the copy", cap.wall_s)
        return info

    def _ingest_disk(self, w: Any, session: Session, frozen: str, parent_layer: tuple[str, str] | None) -> None:
        """Store the frozen disk: only what changed since the parent checkpoint when its disk file is here."""
        with vdisk.ChainReader(session.layer_path(frozen)) as reader:
            depth = reader.depth_of(session.layer_path(parent_layer[0])) if parent_layer else None
            base = parent_layer[1] if parent_layer and depth is not None else None
            changed = 0

            def counted() -> Iterator[tuple[int, bytes]]:
                nonlocal changed
                for chunk in reader.chunks_above(depth):
                    changed += 1
                    yield chunk

            w.add_disk(reader.size, counted(), base)
        log.info("disk of %s: %s", session.name, f"{changed} chunks changed since {base[:8]}" if base
                 else f"stored whole ({changed} chunks with data)")

    async def _tidy_disk(self, session: Session, m: Machine, state: SessionState) -> None:
        """Keep the disk chain short and drop disk files nothing needs.

        Each checkpoint adds a layer; past MAX_CHAIN layers the newest frozen layers are merged
        (live block-commit) into the lowest layer that no other file or branch depends on, which
        then holds the newest one's disk.  Files that back nothing, are not running, and hold no
        existing checkpoint's disk (a forgotten one, the abandoned top of a branch) are deleted.
        """
        def backing() -> dict[str, str | None]:
            return {p.name: vdisk.backing_of(p) for p in session.disks.iterdir() if p.name.startswith(DISK_FILES)}

        files = backing()
        uses = Counter(b for b in files.values() if b)
        chain = [state.active_layer]
        while (below := files.get(chain[-1])) in files:
            assert below is not None
            chain.append(below)
        if len(chain) > MAX_CHAIN:
            j = 1
            while j + 1 < len(chain) and uses[chain[j + 1]] == 1 and chain[j + 1].endswith(".qcow2"):
                j += 1
            if j >= 2:
                top, base = chain[1], chain[j]
                await merge_layers(m, state.active_layer, top, base)
                merged = state.layers.pop(top, None)
                for layer in chain[1:j + 1]:
                    state.layers.pop(layer, None)
                if merged:
                    state.layers[base] = merged
                session.save_state(state)
                for layer in chain[1:j]:
                    session.layer_path(layer).unlink()
                log.info("merged %d disk layers of %s into %s", j - 1, session.name, base)
                files = backing()
        kept = {c.id for c in self.repo.checkpoints(session=session.name)}
        while True:
            uses = Counter(b for b in files.values() if b)
            garbage = [f for f in files if not uses[f] and f != state.active_layer and state.layers.get(f) not in kept]
            if not garbage:
                break
            for f in garbage:
                session.layer_path(f).unlink()
                state.layers.pop(f, None)
                del files[f]
        session.save_state(state)

    @staticmethod
    def _meta(cap: Capture, note: str, kind: str, config: SessionConfig, qemu: str) -> CheckpointMeta:
        return CheckpointMeta(kind=kind, note=note, live=cap.live, pause_ms=round(cap.pause_ms, 3),
                              downtime_ms=cap.downtime_ms, wall_s=round(cap.wall_s, 3), stream_bytes=cap.stream_bytes,
                              disk_layer=cap.frozen_layer, qemu=qemu, config=asdict(config))

    def forget(self, name: str, **rules: Any) -> list[CheckpointInfo]:
        """Apply a retention policy; the checkpoint the session runs from and its saved state always stay."""
        self.session(name)
        return self.repo.forget(name, keep_ids=self.keep_ids(name), **rules)

    def keep_ids(self, name: str) -> list[str]:
        """What no retention policy may forget of a session, here or in a remote's copy: the checkpoint it runs
        from and its saved state (nothing when it does not exist here)."""
        session = Session(self.home, name)
        if not session.exists():
            return []
        state = session.load_state()
        return [i for i in (state.head, state.saved) if i]

    def has_repository(self) -> bool:
        """Whether this home has a repository yet; commands that only read make none (nor its key)."""
        return (self.home.repository / "config").is_file()

    def checkpoints(self, name: str) -> list[CheckpointInfo]:
        self.session(name)
        return self.repo.checkpoints(session=name) if self.has_repository() else []

    def cannot_delete(self, name: str, ckpt: CheckpointInfo) -> str | None:
        """Why one of a session's checkpoints may not be deleted (one sentence), or None: it is pinned, the session
        runs from it, or resumes to it.  The rule of every deletion by hand (retention has keep_ids and pins)."""
        state = self.session(name).load_state()
        if ckpt.pinned:
            return f"Checkpoint {ckpt.id[:8]} is pinned, so it cannot be deleted; unpin it first."
        if ckpt.id == state.head:
            return f"The running session {name} continues from checkpoint {ckpt.id[:8]}, so it cannot be deleted."
        if ckpt.id == state.saved:
            return f"Session {name} resumes from checkpoint {ckpt.id[:8]} when started, so it cannot be deleted."
        return None

    async def delete_checkpoint(self, name: str, ref: str) -> CheckpointInfo:
        """Delete one checkpoint of a session, under the session's lock, unless :meth:`cannot_delete` refuses
        (UsageError); prune frees its space."""
        session = self.session(name)
        async with self._locked(session):
            ckpt = self.find_checkpoint(session, ref)
            why = self.cannot_delete(name, ckpt)
            if why:
                raise UsageError(why)
            self.repo.delete_checkpoint(ckpt)
            return ckpt

    def find_checkpoint(self, session: Session, ref: str) -> CheckpointInfo:
        if not self.has_repository():
            raise NotFoundError(f"Checkpoint {ref} does not exist: this computer has no checkpoints yet; "
                                f"`session-manager checkpoint {session.name}` takes one.")
        ckpt = self.repo.get(ref)
        if ckpt.session != session.name:
            raise NotFoundError(
                f"Checkpoint {ref} belongs to session {ckpt.session!r}, not {session.name!r}; "
                f"`session-manager checkpoints {session.name}` lists this session's checkpoints."
            )
        return ckpt

    # -- restoring ---------------------------------------------------------------
    async def restore(self, name: str, ref: str, discard_current: bool = False,
                      progress: Progress = _no_progress) -> CheckpointInfo | None:
        """Roll a session back to a checkpoint; returns the checkpoint taken of the state it replaced."""
        session = self.session(name)
        async with self._locked(session):
            self._refuse_moved(session)
            return await self._restore_locked(session, self.find_checkpoint(session, ref), not discard_current,
                                              progress)

    async def adopt(self, ckpt: CheckpointInfo, progress: Progress = _no_progress, start: bool = True,
                    config: SessionConfig | None = None, arrived_from: str | None = None) -> Status:
        """Create a checkpoint's session from its recorded config (the checkpoint came from another computer)
        and start it from that checkpoint; its disk is rebuilt from the repository.

        Should the start fail, the session stays, stopped with the checkpoint as its saved state (which is all
        that happens without ``start``: `start` resumes it later).  A checkpoint a paired peer sent comes with the
        ``config`` that net/arrivals.py allows it here, and that peer as ``arrived_from``.
        """
        config = config or self.config_of(ckpt)
        for label, path in (("kernel", config.kernel), ("initrd", config.initrd), ("ISO", config.iso)):
            if path and not Path(path).is_file():
                raise NotFoundError(f"Checkpoint {ckpt.id[:8]} needs the {label} {path}, which this computer does "
                                    "not have; copy it to the same place and try again.")
        session = Session(self.home, ckpt.session)
        session.create(config, vdisk.new_layer_name())
        state = session.load_state()
        state.head = state.saved = ckpt.id
        state.arrived_from = arrived_from
        session.save_state(state)
        if not start:
            return await self.status(session.name)
        async with self._locked(session):
            await self._restore_locked(session, ckpt, take_before=False, progress=progress)
        return await self.status(session.name)

    async def _restore_locked(self, session: Session, ckpt: CheckpointInfo, take_before: bool,
                              progress: Progress = _no_progress) -> CheckpointInfo | None:
        # Everything that can be checked is checked before QEMU sees a byte.
        self.require_loadable(ckpt)
        progress("Verifying the checkpoint", -1)
        started = time.monotonic()
        await asyncio.to_thread(self.repo.verify, ckpt)
        log.info("verified checkpoint %s in %.2f s", ckpt.id, time.monotonic() - started)
        config = self.config_of(ckpt)
        state = session.load_state()
        sockets = self.sockets(session)
        before = None
        if sockets.pid() is not None:
            async with Machine.connect(sockets) as m:
                if take_before and await m.status() == RunState.RUNNING:
                    before = await self._checkpoint_locked(
                        session, m, f"before restoring {ckpt.id[:8]}", "pre-restore", progress)
                    state = session.load_state()
                    state.saved = before.id
                    session.save_state(state)
                await m.quit()
        top = self._layer_for(session, state, ckpt)
        state.active_layer = top.name
        session.save_state(state)
        await self._launch(session, config, top, f"restore of checkpoint {ckpt.id}", incoming=True)
        try:
            async with Machine.connect(sockets) as m:
                seconds = await load(m, _counting(self.repo.memory_stream(ckpt), ckpt.stream_bytes,
                                                  "Loading memory", progress))
                await m.run("cont")
                await self._note_live_support(m, session)
        except BaseException as e:
            await self._kill(sockets)
            self._set_running(session, False)  # we stopped it: no crash to report
            if isinstance(e, SessionManagerError):
                hint = (f" The state it was replacing is checkpoint {before.id[:8]}; `session-manager start "
                        f"{session.name}` resumes it.") if before else ""
                raise QemuError(f"Restoring checkpoint {ckpt.id[:8]} failed: {e}{hint}") from e
            raise
        state.head, state.saved, state.running_boot = ckpt.id, None, boot_id()
        session.save_state(state)
        log.info("restored %s to %s: stream loaded in %.2f s", session.name, ckpt.id, seconds)
        await self.set_clock(session)
        return before

    async def receive(self, config: SessionConfig, disk_size: int, why: str, peer: str) -> Session:
        """Create a session to receive a live migration from ``peer`` (vm/migrate.py; ``config`` as net/arrivals.py
        allows it): a blank qcow2 of ``disk_size`` as its only layer, and its QEMU waiting for the incoming state,
        paused.  It starts a fresh checkpoint history."""
        session = Session(self.home, config.name)
        first = vdisk.new_layer_name()
        session.create(config, first)
        state = session.load_state()
        state.arrived_from = peer
        session.save_state(state)
        try:
            vdisk.create_blank(session.layer_path(first), disk_size)
            await self._launch(session, config, session.layer_path(first), why, incoming=True, paused=True)
        except BaseException:
            await self._kill(self.sockets(session))
            session.remove()
            raise
        return session

    def _layer_for(self, session: Session, state: SessionState, ckpt: CheckpointInfo) -> Path:
        """A new overlay on the checkpoint's disk: its file if still here, else rebuilt from the repository."""
        size = self.repo.disk_size(ckpt)
        local = _layer_of(state, ckpt.id)
        if local and session.layer_path(local[0]).is_file():
            backing = session.layer_path(local[0])
            fmt = "qcow2" if backing.suffix == ".qcow2" else "raw"
        else:
            backing, fmt = session.disks / f"restored-{ckpt.id[:16]}.raw", "raw"
            if not backing.exists():
                vdisk.write_raw(backing, size, self.repo.disk_chunks(ckpt))
            state.layers[backing.name] = ckpt.id
        top = session.layer_path(vdisk.new_layer_name())
        vdisk.create_overlay(top, backing, fmt, size)
        return top

    async def _kill(self, sockets: Sockets) -> None:
        pid = sockets.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            await wait_exit(pid)

    # -- export ------------------------------------------------------------------
    def export(self, name: str, ref: str, out_dir: Path, progress: Progress = _no_progress) -> list[str]:
        """Write a plain migration stream and a standalone qcow2; return the stock QEMU command that loads them.

        If ``progress`` raises, the export stops and leaves no files behind.
        """
        session = self.session(name)
        ckpt = self.find_checkpoint(session, ref)
        progress("Verifying the checkpoint", -1)
        self.repo.verify(ckpt)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"{name}-{ckpt.id[:8]}"
        stream, qcow2, raw = stem.with_suffix(".migration"), stem.with_suffix(".qcow2"), stem.with_suffix(".raw.part")
        for path in (stream, qcow2):
            if path.exists():
                raise UsageError(f"{path} already exists; choose an empty directory.")
        try:
            with open(stream.with_suffix(".migration.part"), "wb") as f:
                for chunk in _counting(running_on_load(self.repo.memory_stream(ckpt)), ckpt.stream_bytes,
                                       "Exporting memory", progress):
                    f.write(chunk)
            os.replace(stream.with_suffix(".migration.part"), stream)
            progress("Exporting the disk", -1)
            vdisk.write_raw(raw, self.repo.disk_size(ckpt), self.repo.disk_chunks(ckpt))
            vdisk.qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
        except BaseException:
            stream.unlink(missing_ok=True)
            qcow2.unlink(missing_ok=True)
            raise
        finally:
            raw.unlink(missing_ok=True)
            stream.with_suffix(".migration.part").unlink(missing_ok=True)
        config = self.config_of(ckpt)
        argv = command_line(self.qemu, config, accel=self.accelerator().name, top_layer=qcow2, sockets=Sockets(out_dir),
                            serial_log=out_dir / f"{name}-serial.log")
        write_account(config, Sockets(out_dir))  # the command line names it, though the guest made its account
        return _standalone(argv, stream)

    # -- locking -------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _locked(self, session: Session) -> AsyncIterator[None]:
        fd = self._lock_file(session)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise UsageError(
                            f"Session {session.name!r} is busy with another operation; try again when it finishes."
                        ) from None
                    await asyncio.sleep(0.1)
            if self.migration_mark(session).exists():
                await self._tidy_migration(session)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _refuse_moved(session: Session) -> None:
        moved_to = session.load_state().moved_to
        if moved_to:
            raise UsageError(f"Session {session.name!r} runs on {moved_to} now (it was migrated there); migrate it "
                             "back from there to run it here.")

    @staticmethod
    def migration_mark(session: Session) -> Path:
        """Exists while a live migration of the session runs (live_migration.migrate); left behind only when
        the process driving it died."""
        return session.runtime / "migrating"

    async def _tidy_migration(self, session: Session) -> None:
        """After a migration whose driver died: QEMU has restarted the guest it stopped (unless the migration
        completed: then the destination may run it, and it stays paused here until `start`), and our jobs,
        nodes and migration settings go, so that checkpoints work again."""
        if self.sockets(session).pid() is not None:
            async with Machine.connect(self.sockets(session)) as m:
                ended = await recover_source(m)
            log.warning("%s: tidied up after an interrupted migration (it ended %s)", session.name, ended)
        self.migration_mark(session).unlink(missing_ok=True)

    @staticmethod
    def _lock_file(session: Session) -> int:
        session.state_dir.mkdir(parents=True, exist_ok=True)
        return os.open(session.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)


def _layer_of(state: SessionState, ckpt_id: str | None) -> tuple[str, str] | None:
    """(file name, checkpoint id) of the local disk file holding a checkpoint's disk, if there is one."""
    return next(((name, c) for name, c in state.layers.items() if c == ckpt_id), None) if ckpt_id else None


def _standalone(argv: list[str], stream: Path) -> list[str]:
    """Turn our command line into one for a user's stock QEMU: no pidfile, monitor or trace, a window instead of
    VNC."""
    out: list[str] = []
    skip = {"-pidfile", "-mon", "-display", "-vnc", "-trace"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in skip or (arg == "-chardev" and argv[i + 1].startswith("socket,id=qmp")):
            i += 2
            continue
        out.append(arg)
        i += 1
    return out + ["-incoming", f"exec:cat {shlex.quote(str(stream))}"]


def _since_launch(qemu_log: Path) -> list[str]:
    """The lines QEMU wrote to its log since it was last launched (each launch writes a '--- ' line first)."""
    lines = [ln.strip() for ln in (_read(qemu_log) or "").splitlines() if ln.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("--- ")]
    return lines[starts[-1] + 1:] if starts else lines


def _last_words(qemu_log: Path) -> str | None:
    """The last line QEMU wrote to its log since it was last launched, but for its note of why it shut down."""
    lines = [line for line in _since_launch(qemu_log) if not line.startswith(SHUTDOWN_TRACE)]
    return lines[-1] if lines else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
