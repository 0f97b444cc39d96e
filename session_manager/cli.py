"""session-manager's command line: every operation, headless."""

from __future__ import annotations

import argparse
import asyncio
import errno
import getpass
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import DamagedError, PeerError, SessionManagerError, UsageError
from .guests import desktop
from .guests.testguest import build as build_guest
from .local import downloads
from .local.daemon import Daemon, recovered_message
from .local.engine import DEMO_NAME, UFFD_ADVICE, Engine
from .local.sessions import Session
from .net.agent import Agent, check, pair
from .net.identity import check_id, installation_name, load_identity, matches, short_id
from .net.live_migration import Receiver, describe
from .net.live_migration import migrate as live_migrate
from .net.peers import DEFAULT_PORT, Peers, parse_address
from .net.remotes import (
    KEY_ENV,
    SECRET_ENV,
    Remote,
    Remotes,
    local_target,
    open_remote,
    remote_sessions,
    replicators,
    resume,
)
from .net.send import CheckpointReceiver
from .net.send import send as send_checkpoint
from .paths import HOME_ENV, Home, check_name
from .store import keys as repo_keys
from .store.replicate import Transfer, TransferProgress, replicate
from .store.repo import CheckpointInfo
from .units import size_text
from .vm.migrate import MigrationProgress
from .vm.qemu import account_line

log = logging.getLogger("session_manager")

NEW_PASSPHRASE_ENV = "SESSION_MANAGER_NEW_PASSPHRASE"
DESKTOP_PASSWORD_ENV = "SESSION_MANAGER_DESKTOP_PASSWORD"


def default_account() -> str:
    """The desktop account's name: this user's, unless that is root or no valid account name."""
    name = getpass.getuser()
    return name if name != "root" and re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", name) else "user"


def password_hash(password: str) -> str:
    """crypt(3) SHA-512 of ``password`` (openssl: Python's crypt module is gone in 3.13)."""
    done = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password, capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError("openssl could not hash the password; install it with `sudo apt-get install openssl`.")
    return done.stdout.strip()


def parse_size(text: str, unit: int = 1 << 20) -> int:
    """'2G', '512M', '1.5G', '2048' (in ``unit``) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write it like 512M or 2G")
    scale = {"": unit, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m[2].upper()]
    return int(float(m[1]) * scale)


def parse_duration(text: str) -> float:
    """'30s', '5m', '1.5h' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*", text, re.I)
    if not m or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write it like 30s, 5m or 1h")
    return float(m[1]) * {"s": 1, "m": 60, "h": 3600}[m[2].lower()]


def count(text: str) -> int:
    """A number of checkpoints to keep: a whole number of at least 1 (a negative or zero one would forget them all)."""
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of checkpoints to keep; give 1 or more")
    return int(text)


def rate(text: str) -> int:
    """'10M/s', '512K' -> bytes a second."""
    return parse_size(text.removesuffix("/s"), 1)


def local_time(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def checkpoint_row(c: CheckpointInfo) -> list[Any]:
    m = c.meta
    pause = f"{m.pause_ms:.1f} ms" if m.pause_ms is not None else "-"
    flags = ("pinned " if c.pinned else "") + (m.kind or "")
    return [c.id[:8], local_time(c.created), (c.parent or "-")[:8], pause, size_text(c.added_bytes), flags, c.note]


def ask_passphrase(prompt: str) -> str:
    try:
        return getpass.getpass(prompt)
    except EOFError:
        raise UsageError("No passphrase was typed; run the command again and type it.") from None


class Cli:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engine = Engine(Home.locate(args.home))

    def out(self, data: Any, text: str | Callable[[], str]) -> None:
        if getattr(self.args, "json", False):
            print(json.dumps(data, indent=2, default=str))
        else:
            print(text() if callable(text) else text)

    # -- sessions ------------------------------------------------------------
    def new(self) -> None:
        a = self.args
        if a.desktop:
            s = self._new_desktop()
        else:
            s = self.engine.new_session(
                a.name, disk=a.disk, iso=a.iso, kernel=a.kernel, initrd=a.initrd, append=a.append,
                memory_mib=a.memory >> 20, cpus=a.cpus, disk_size=a.disk_size,
            )
        self.out(asdict(s.load_config()),
                 f"Created session {a.name!r}; start it with `session-manager start {a.name}`.")

    def _new_desktop(self) -> Session:
        """Build the desktop base image once (guests/desktop.py; later desktops reuse it), then a session on it."""
        a = self.args
        check_name(a.name)
        if Session(self.engine.home, a.name).exists():
            raise UsageError(f"A session named {a.name!r} already exists; choose another name or delete it first.")
        try:
            account_line(a.user, "!")  # the name, before the password is asked for
        except ValueError as e:
            raise UsageError(f"{a.user!r} cannot be an account name: {e}") from None
        account = account_line(a.user, password_hash(self._desktop_password(a.user)))
        outdir = self.engine.home.bases / desktop.recipe_id()
        if not desktop.built(outdir):
            print(f"Building the desktop image from Debian's packages into {outdir} (once; about 3 minutes and "
                  "1.7 GB; later desktops share it).", file=sys.stderr)
        base = desktop.build(outdir, progress=lambda percent, text: print(f"{percent:3d}% {text}", file=sys.stderr))
        return self.engine.new_session(a.name, disk=base / "base.qcow2", kernel=base / "vmlinuz",
                                       initrd=base / "initrd.img", append=desktop.KERNEL_APPEND,
                                       memory_mib=a.memory >> 20, cpus=a.cpus, desktop=True, account=account)

    @staticmethod
    def _desktop_password(user: str) -> str:
        """From SESSION_MANAGER_DESKTOP_PASSWORD, else typed twice in a terminal."""
        if DESKTOP_PASSWORD_ENV in os.environ:
            return os.environ[DESKTOP_PASSWORD_ENV]
        if not sys.stdin.isatty():
            raise UsageError(f"No password was given for the desktop's account {user!r}; set {DESKTOP_PASSWORD_ENV} "
                             "or run the command in a terminal.")
        first = ask_passphrase(f"Password for {user} in the desktop (for sudo and the screen lock): ")
        if ask_passphrase("The same again: ") != first:
            raise UsageError("The two passwords differ, so no session was made; try again.")
        return first

    def list(self) -> None:
        rows: list[dict[str, Any]] = []
        damaged: list[str] = []
        for s in self.engine.sessions():
            try:
                st = asyncio.run(self.engine.status(s.name))
            except DamagedError as e:  # one session's damaged file: the others are listed all the same
                damaged.append(str(e))
                rows.append({"name": s.name, "state": "damaged", "memory_mib": None, "cpus": None, "head": None,
                             "checkpoints": len(self.engine.checkpoints(s.name))})
                continue
            state = st.run_state or ("crashed" if st.crashed else f"running on {st.moved_to}" if st.moved_to
                                     else "saved" if st.saved else "stopped")
            rows.append({"name": s.name, "state": state, "memory_mib": st.memory_mib, "cpus": st.cpus,
                         "head": st.head, "checkpoints": len(self.engine.checkpoints(s.name))})
        self.out(rows, lambda: table([[r["name"], r["state"], f"{r['memory_mib']} MiB" if r["memory_mib"] else "-",
                                       r["cpus"] or "-", r["checkpoints"], (r["head"] or "-")[:8]] for r in rows],
                                     ["NAME", "STATE", "MEMORY", "CPUS", "CHECKPOINTS", "HEAD"])
                 if rows else "No sessions yet; `session-manager demo` creates one to try.")
        if damaged:
            raise DamagedError(" ".join(damaged))

    def start(self) -> None:
        name = self.args.name
        crash = self.engine.crash_reason(name) if self.engine.crashed(name) else None
        st = asyncio.run(self.engine.start(name))
        done = "Started."
        if crash:  # start brought back its latest checkpoint, as recover does
            done = f"Session {name} had stopped unexpectedly ({crash}). " + (
                recovered_message(name, self.engine.repo.get(st.head)) if st.head
                else "It has no checkpoint, so it booted afresh.")
        self.out(asdict(st), lambda: self._status_text(st) + "\n" + done)
        self._advise(st.live_checkpoints)

    @staticmethod
    def _advise(live: bool | None) -> None:
        if live is False:
            print(f"session-manager: note: {UFFD_ADVICE}", file=sys.stderr)

    def stop(self) -> None:
        saved = asyncio.run(self.engine.stop(self.args.name, save=not self.args.no_save))
        self.out({"saved": saved.id if saved else None},
                 f"Stopped; its state is checkpoint {saved.id[:8]} and `start` resumes it." if saved else "Stopped.")

    def status(self) -> None:
        st = asyncio.run(self.engine.status(self.args.name))
        self.out(asdict(st), lambda: self._status_text(st))

    def recover(self) -> None:
        name = self.args.name
        ckpt = asyncio.run(self.engine.recover(name))
        self.out({"recovered": ckpt.id, "kind": ckpt.meta.kind, "created": ckpt.created},
                 recovered_message(name, ckpt))

    def copy_in(self) -> None:
        a = self.args
        files = downloads.plan(a.files, a.as_name)
        shown = ""

        def progress(what: str, fraction: float) -> None:  # a line on a terminal, redrawn at each whole percent
            nonlocal shown
            line = f"{what}: {fraction:.0%}" if fraction >= 0 else what
            if line != shown and not a.json and sys.stderr.isatty():
                print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
                shown = line

        try:
            names = asyncio.run(downloads.copy_in(self.engine, a.name, files, progress))
        finally:
            if shown:
                print(file=sys.stderr)
        self.out([{"file": str(f.source), "name": n} for f, n in zip(files, names, strict=True)],
                 "\n".join(f"Copied {f.source} into Downloads as {n!r}." for f, n in zip(files, names, strict=True)))

    def daemon(self) -> None:
        for name in self.args.session or ():
            self.engine.session(name)
        async def serve() -> None:
            say = lambda name, text: print(text, flush=True)  # noqa: E731
            daemon = Daemon(self.engine, self.args.session, interval_s=self.args.interval, recover=self.args.recover)
            reps = replicators(self.engine, say, thin=daemon.autosaver.thin_copy)
            daemon.background = [r.run for r in reps]
            daemon.wakes.extend(r.wake for r in reps)
            for r in reps:
                print(f"Backing up every new checkpoint to {r.remote.name} ({r.remote.url}).", flush=True)
            await daemon.serve()

        asyncio.run(serve())

    @staticmethod
    def _status_text(st: Any) -> str:
        state = st.run_state or ("crashed" if st.crashed else f"running on {st.moved_to}" if st.moved_to
                                 else "stopped, state saved" if st.saved else "stopped")
        lines = [f"Session {st.name}: {state}"]
        if st.crashed:
            lines.append(f"  QEMU died while it ran; `session-manager recover {st.name}` (or `start`) restores its "
                         "latest checkpoint")
        if st.pid:
            lines.append(f"  QEMU {st.qemu_version} ({st.qemu}), pid {st.pid}, "
                         f"accelerator {st.accel} ({st.accel_reason})")
            mode = "live (the guest runs on)" if st.live_checkpoints else "stop-and-copy (pauses the guest)"
            lines.append(f"  checkpoints: {mode}")
            lines.append(f"  display: VNC on {st.vnc_socket}")
        else:
            lines.append(f"  starts with QEMU {st.qemu_version} ({st.qemu})")
        lines.append(f"  serial console log: {st.serial_log}")
        lines.append(f"  head checkpoint: {st.head[:8] if st.head else 'none yet'}")
        return "\n".join(lines)

    def delete(self) -> None:
        name = self.args.name
        self.engine.session(name)
        if not self.args.yes:
            if not sys.stdin.isatty():
                raise UsageError(f"Deleting {name!r} removes its disk overlays and checkpoints; add --yes to confirm.")
            answer = input(f"Delete session {name!r}, its disk changes and all its checkpoints? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise UsageError("Nothing was deleted.")
        n = self.engine.delete(name)
        self.out({"deleted": name, "checkpoints": n},
                 f"Deleted {name!r} and {n} checkpoints; `session-manager prune` reclaims their space.")

    # -- checkpoints -------------------------------------------------------------
    def checkpoint(self) -> None:
        c = asyncio.run(self.engine.checkpoint(self.args.name, self.args.message or ""))
        mode = "live" if c.meta.live else "stop-and-copy: the guest was paused"
        self.out(c.to_dict(), f"Checkpoint {c.id[:8]}: paused {c.meta.pause_ms or 0:.1f} ms ({mode}), "
                              f"{c.meta.wall_s or 0:.2f} s, added {size_text(c.added_bytes)}.")
        self._advise(bool(c.meta.live))

    def checkpoints(self) -> None:
        cs = self.engine.checkpoints(self.args.name)
        self.out([c.to_dict() for c in cs], lambda: table([checkpoint_row(c) for c in cs],
                 ["ID", "TIME", "PARENT", "PAUSE", "ADDED", "KIND", "NOTE"]) if cs else "No checkpoints yet.")

    def restore(self) -> None:
        before = asyncio.run(self.engine.restore(self.args.name, self.args.checkpoint, self.args.discard_current))
        self.out({"restored": self.args.checkpoint, "previous_state": before.id if before else None},
                 f"Restored {self.args.name} to {self.args.checkpoint}"
                 + (f"; the state it replaced is checkpoint {before.id[:8]}." if before else "."))

    def export(self) -> None:
        argv = self.engine.export(self.args.name, self.args.checkpoint, Path(self.args.dir))
        self.out({"command": argv}, "Exported. Stock QEMU resumes it with:\n" + shlex.join(argv))

    def demo(self) -> None:
        st = asyncio.run(self.engine.demo(build_guest))
        self.out(asdict(st), lambda: self._status_text(st) + (
            f"\nThe demo guest counts on its serial console ({st.serial_log}).\n"
            f"Try: session-manager checkpoint {DEMO_NAME} -m 'first'; session-manager checkpoints {DEMO_NAME}; "
            f"session-manager restore {DEMO_NAME} ID"))

    # -- repository ----------------------------------------------------------------
    def check(self) -> None:
        report = self.engine.repo.check(read_data=self.args.read_data)
        self.out(report.to_dict(), report.summary())
        if not report.ok:
            raise SystemExit(1)

    def forget(self) -> None:
        a = self.args
        removed = self.engine.forget(
            a.name, keep_last=a.keep_last, keep_hourly=a.keep_hourly,
            keep_daily=a.keep_daily, keep_weekly=a.keep_weekly, keep_monthly=a.keep_monthly,
            keep_manual=a.keep_manual,
        )
        if a.prune:
            self.engine.repo.prune()
        self.out([c.id for c in removed], f"Forgot {len(removed)} checkpoints"
                 + ("; space reclaimed." if a.prune else "; `session-manager prune` reclaims their space."))

    def prune(self) -> None:
        stats = self.engine.repo.prune()
        self.out(stats.to_dict(), stats.summary())

    def du(self) -> None:
        if self.args.name:
            self.engine.session(self.args.name)
        stats = self.engine.repo.du(session=self.args.name)
        self.out(stats.to_dict(), stats.summary())

    def key(self) -> None:
        a, repo = self.args, self.engine.repo
        if a.key_command == "add":
            info = repo.add_key(self._new_passphrase())
            self.out(info.to_dict(), f"Added key {info.id}: its passphrase unlocks the repository, here and elsewhere.")
        elif a.key_command == "list":
            keys = repo.keys()
            self.out([k.to_dict() for k in keys], lambda: table(
                [[k.id, local_time(k.created) if k.created else "-", k.kdf] for k in keys], ["ID", "CREATED", "KDF"])
                if keys else "The repository has no passphrase yet; `session-manager key add` sets one.")
        else:
            info = repo.remove_key(a.id)
            self.out(info.to_dict(), f"Removed key {info.id}; its passphrase no longer unlocks the repository.")

    @staticmethod
    def _new_passphrase() -> str:
        """From SESSION_MANAGER_NEW_PASSPHRASE, else typed twice in a terminal."""
        if NEW_PASSPHRASE_ENV in os.environ:
            return os.environ[NEW_PASSPHRASE_ENV]
        if not sys.stdin.isatty():
            raise UsageError(f"No new passphrase was given; set {NEW_PASSPHRASE_ENV} or run the command in a terminal.")
        first = ask_passphrase("New passphrase: ")
        if ask_passphrase("The same again: ") != first:
            raise UsageError("The two passphrases differ, so nothing was changed; try again.")
        return first

    def pin(self) -> None:
        s = self.engine.session(self.args.name)
        c = self.engine.find_checkpoint(s, self.args.checkpoint)
        self.engine.repo.annotate(c.id, pinned=not self.args.unpin)
        self.out({"id": c.id, "pinned": not self.args.unpin},
                 f"{'Unpinned' if self.args.unpin else 'Pinned'} {c.id[:8]}.")

    def delete_checkpoint(self) -> None:
        c = asyncio.run(self.engine.delete_checkpoint(self.args.name, self.args.checkpoint))
        self.out({"deleted": c.id}, f"Deleted checkpoint {c.id[:8]} of {c.session}; `session-manager prune` frees "
                                    "its space.")

    # -- other installations -----------------------------------------------------------
    def serve(self) -> None:
        agent = Agent(self.engine.home)
        Receiver(self.engine).register(agent)
        CheckpointReceiver(self.engine).register(agent)
        asyncio.run(agent.serve(*parse_address(self.args.listen)))

    def migrate(self) -> None:
        a = self.args
        say = (lambda line: None) if a.json else (lambda line: print(line, flush=True))
        shown: tuple[str, int] | None = None

        def progress(p: MigrationProgress) -> None:  # a line per phase, disk quarter and memory pass
            nonlocal shown
            step = (p.phase, p.passes if p.phase == "memory" else int(p.fraction * 4) if p.phase == "disk" else 0)
            if step != shown:
                shown = step
                say(f"  {describe(p, a.peer)}")

        r = asyncio.run(live_migrate(self.engine, a.name, a.peer, say, progress, postcopy=a.postcopy, limit=a.limit))
        self.out({"session": a.name, "peer": a.peer, **asdict(r), "bytes_sent": r.bytes_sent},
                 f"Migrated {a.name} to {a.peer}: the guest paused {r.downtime_ms:.0f} ms, {r.total_s:.1f} s in all, "
                 f"{size_text(r.bytes_sent)} sent ({size_text(r.disk_bytes)} disk, {size_text(r.ram_bytes)} memory and "
                 f"devices). It runs there now; its checkpoints stay here.")

    def send(self) -> None:
        a = self.args
        r = asyncio.run(send_checkpoint(self.engine, a.name, a.peer, a.checkpoint,
                                        progress=self._transfer_progress("Sending")))
        self.out({"session": a.name, "peer": a.peer, "checkpoint": r.checkpoint.to_dict(),
                  "transfer": r.transfer.to_dict(), "status": r.status},
                 f"Sent checkpoint {r.checkpoint.id[:8]} of {a.name} ({local_time(r.checkpoint.created)}) to {a.peer}: "
                 f"{r.transfer.objects_done} objects, {size_text(r.transfer.bytes_done)}. "
                 f"`session-manager start {a.name}` there resumes it; the session stays here as it was.")

    def id(self) -> None:
        me = load_identity(self.engine.home)
        self.out({"id": me.short_id, "fingerprint": me.fingerprint, "name": installation_name()}, me.short_id)

    def peers(self) -> None:
        a, home, peers = self.args, self.engine.home, Peers(self.engine.home)
        if a.peers_command == "add":
            if a.fingerprint:
                check_id(a.fingerprint)
            me = load_identity(home).short_id
            waiting = lambda: print(f"Waiting for {a.address} to accept: run `session-manager peers accept {me}` "  # noqa: E731
                                    "there.", file=sys.stderr, flush=True)
            peer = asyncio.run(pair(home, a.address, self._confirm_peer, name=a.name, waiting=waiting))
            self.out(peer.summary(), f"Paired with {peer.name} ({peer.short_id}) at {peer.address}; each side lists "
                                     "the other now.")
        elif a.peers_command == "accept":
            peer = peers.accept(check_id(a.id), a.name)
            self.out(peer.summary(), f"Paired with {peer.name} ({peer.short_id}) at {peer.address}.")
        elif a.peers_command == "remove":
            peer = peers.remove(a.name)
            self.out(peer.summary(), f"Removed {peer.name}; it can no longer send sessions here or receive them.")
        else:
            ps = peers.all()
            rows = [p.summary() for p in ps]
            if a.check:
                for row, problem in zip(rows, asyncio.run(check(home, ps)), strict=True):
                    row.update(reachable=problem is None, problem=problem)
            self.out(rows, lambda: table(
                [[r["name"], r["address"], r["id"], local_time(r["added"])]
                 + (["reachable" if r["reachable"] else r["problem"]] if a.check else []) for r in rows],
                ["NAME", "ADDRESS", "ID", "ADDED"] + (["CHECK"] if a.check else []))
                if rows else "No peers yet; pair with another computer with `session-manager peers add HOST`.")

    def _confirm_peer(self, name: str, fingerprint: str) -> None:
        """Confirm the id of the installation ``peers add`` reached: --fingerprint, --yes or the user's answer."""
        a, theirs = self.args, short_id(fingerprint)
        if a.fingerprint:
            if not matches(fingerprint, a.fingerprint):
                raise PeerError(f"{a.address} presented id {theirs}, not {a.fingerprint}; someone may be intercepting, "
                                "or the id was mistyped: compare with what `session-manager id` prints there.")
        elif a.yes:
            print(f"{a.address} is {name}, id {theirs}.", file=sys.stderr, flush=True)
        elif not sys.stdin.isatty():
            raise UsageError(f"Check that `session-manager id` on {name} prints {theirs}, then run again with "
                             f"--fingerprint {theirs} (or in a terminal, to confirm it there).")
        elif input(f"{a.address} is {name}, id {theirs}; does `session-manager id` there print the same? [y/N] "
                   ).strip().lower() not in ("y", "yes"):
            raise UsageError("You did not confirm the id, so nothing was paired.")

    # -- remotes -------------------------------------------------------------------
    def remote(self) -> None:
        a, remotes = self.args, Remotes(self.engine.home)
        if a.remote_command == "add":
            remote = Remote(a.name, a.url, a.endpoint, a.region, a.limit)
            stored = remotes.add(remote)
            self.out(asdict(remote), f"Added remote {a.name} ({remote.url})" + ("." if stored else (
                f"; no keyring could keep its credentials, so set {KEY_ENV} and {SECRET_ENV} whenever you use it.")))
        elif a.remote_command == "remove":
            remotes.remove(a.name)
            self.out({"removed": a.name}, f"Removed remote {a.name}; what it holds stays there.")
        else:
            rs = remotes.all()
            self.out([asdict(r) for r in rs], lambda: table(
                [[r.name, r.url, r.endpoint or "-", f"{size_text(r.limit)}/s" if r.limit else "-"] for r in rs],
                ["NAME", "URL", "ENDPOINT", "LIMIT"]) if rs else
                "No remotes yet; add one with `session-manager remote add NAME s3://BUCKET/PREFIX --endpoint URL`.")

    def push(self) -> None:
        remotes = Remotes(self.engine.home)
        remote = remotes.pick(self.args.remote)
        sent = replicate(self.engine.repo, remotes.backend(remote), limit=self.args.limit or remote.limit,
                         progress=self._transfer_progress("Pushing"))
        self.out(sent.to_dict(), f"Pushed {sent.objects_done} objects ({size_text(sent.bytes_done)}) to {remote.name}; "
                                 "it holds every checkpoint of this computer.")

    def pull(self) -> None:
        home, remotes = self.engine.home, Remotes(self.engine.home)
        remote = remotes.pick(self.args.remote)
        repo = open_remote(home, remotes.backend(remote, create=False))
        sent = replicate(repo, local_target(home, repo), limit=self.args.limit or remote.limit,
                         progress=self._transfer_progress("Pulling"))
        self.out(sent.to_dict(), f"Pulled {sent.objects_done} objects ({size_text(sent.bytes_done)}) from "
                                 f"{remote.name}; this computer holds every checkpoint in it.")

    def resume(self) -> None:
        a = self.args
        backend, limit = Remotes(self.engine.home).source(a.source, a.endpoint, a.region)
        repo = open_remote(self.engine.home, backend)
        if a.checkpoint:
            ckpt = repo.get(a.checkpoint)
            if a.session and ckpt.session != a.session:
                raise UsageError(f"Checkpoint {a.checkpoint} belongs to session {ckpt.session!r}, not {a.session!r}.")
        else:
            sessions = remote_sessions(repo)
            if not sessions:
                raise UsageError(f"{backend} holds no checkpoints; push some there first.")
            if a.session is None and len(sessions) > 1:
                rows: list[dict[str, Any]] = [{"session": n, "checkpoints": len(cs), "latest": cs[-1].id,
                                                "created": cs[-1].created} for n, cs in sessions.items()]
                self.out(rows, lambda: table([[r["session"], r["checkpoints"], r["latest"][:8],
                                               local_time(r["created"])] for r in rows],
                                             ["SESSION", "CHECKPOINTS", "LATEST", "TIME"])
                         + f"\nName one: session-manager resume {a.source} SESSION")
                return
            name = a.session or next(iter(sessions))
            if name not in sessions:
                raise UsageError(f"{backend} holds no session {name!r}; leave the name out to list those it holds.")
            ckpt = sessions[name][-1]
        st, sent = asyncio.run(resume(self.engine, repo, ckpt, limit=a.limit or limit,
                                      transfer=self._transfer_progress("Pulling")))
        self.out({"checkpoint": ckpt.to_dict(), "transfer": sent.to_dict(), "status": asdict(st)},
                 lambda: f"Resumed {ckpt.session} from checkpoint {ckpt.id[:8]} of {local_time(ckpt.created)} "
                         f"(pulled {size_text(sent.bytes_done)}).\n" + self._status_text(st))

    def _transfer_progress(self, verb: str) -> TransferProgress | None:
        """A progress line on a terminal's stderr."""
        if self.args.json or not sys.stderr.isatty():
            return None

        def show(t: Transfer) -> None:
            end = "\n" if t.objects_done == t.objects_total else ""
            print(f"\r{verb}: {t.objects_done}/{t.objects_total} objects, {size_text(t.bytes_done)} of "
                  f"{size_text(t.bytes_total)}", end=end, file=sys.stderr, flush=True)
        return show


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not the whole usage text."""
        self.exit(2, f"{self.prog}: {message}; see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="session-manager", description="Your desktop in a QEMU VM that can never be lost. "
                "Without a command, starts the desktop app (or brings its window forward).")
    p.add_argument("--home", help=f"keep all data, state and sockets under DIR (or set {HOME_ENV})", metavar="DIR")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the log")
    p.add_argument("--version", action="version", version=f"session-manager {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    js = _Parser(add_help=False)
    js.add_argument("--json", action="store_true", help="print machine-readable JSON")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[js])

    size = lambda t: parse_size(t)  # noqa: E731
    c = cmd("new", "create a session from a disk image, an installer ISO or a kernel")
    c.add_argument("name")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--disk", type=Path, help="your disk image (never written: changes go to an overlay)")
    src.add_argument("--iso", type=Path, help="an installer ISO; a new empty disk is created")
    src.add_argument("--kernel", type=Path, help="a Linux kernel to boot directly")
    src.add_argument("--desktop", action="store_true",
                     help="a Debian desktop (Xfce, Firefox) built from Debian's packages, logged in automatically")
    c.add_argument("--user", default=default_account(), help="the desktop's account (default: yours)")
    c.add_argument("--initrd", type=Path)
    c.add_argument("--append", help="kernel command line")
    c.add_argument("--memory", type=size, default=2 << 30, help="guest memory, e.g. 4G (default 2G)")
    c.add_argument("--cpus", type=int, default=2)
    c.add_argument("--disk-size", type=lambda t: parse_size(t, 1 << 30), default=32 << 30,
                   help="size of the new disk for --iso/--kernel (default 32G)")
    cmd("list", "list sessions")
    for name, help in (("start", "start a session, resuming its saved state if it has one (after a crash, its "
                                 "latest checkpoint)"),
                       ("status", "show a session's state, sockets and logs")):
        cmd(name, help).add_argument("name")
    c = cmd("stop", "checkpoint a session and stop its QEMU; `start` resumes it")
    c.add_argument("name")
    c.add_argument("--no-save", action="store_true", help="power off without checkpointing (unsaved work is lost)")
    c = cmd("delete", "delete a session and its checkpoints")
    c.add_argument("name")
    c.add_argument("--yes", action="store_true", help="do not ask")
    c = cmd("checkpoint", "take a live checkpoint of a running session")
    c.add_argument("name")
    c.add_argument("-m", "--message", help="a note to remember it by")
    cmd("checkpoints", "list a session's checkpoints").add_argument("name")
    c = cmd("restore", "roll a session back to a checkpoint (the current state is checkpointed first)")
    c.add_argument("name")
    c.add_argument("checkpoint", help="checkpoint id or unique prefix")
    c.add_argument("--discard-current", action="store_true", help="do not checkpoint the state being replaced")
    c = cmd("export", "write a checkpoint as a plain QEMU migration stream and qcow2 disk")
    c.add_argument("name")
    c.add_argument("checkpoint")
    c.add_argument("dir")
    c = cmd("pin", "keep a checkpoint forever (forget never removes it)")
    c.add_argument("name")
    c.add_argument("checkpoint")
    c.add_argument("--unpin", action="store_true")
    c = cmd("delete-checkpoint", "delete one checkpoint (not a pinned one, nor the one the session runs from)")
    c.add_argument("name")
    c.add_argument("checkpoint")
    cmd("demo", "create and start a small demo session")
    c = cmd("check", "verify the checkpoint repository")
    c.add_argument("--read-data", action="store_true", help="also read every blob and check its hash")
    c = cmd("forget", "remove old checkpoints by a retention policy (pinned ones are kept)")
    c.add_argument("name")
    for unit in ("last", "hourly", "daily", "weekly", "monthly"):
        c.add_argument(f"--keep-{unit}", type=count, metavar="N")
    c.add_argument("--keep-manual", action="store_true", help="also keep every checkpoint taken by hand")
    c.add_argument("--prune", action="store_true", help="reclaim the space right away")
    cmd("prune", "reclaim the space of forgotten checkpoints")
    cmd("du", "show how much space checkpoints take").add_argument("name", nargs="?")
    cmd("recover", "restore the latest checkpoint of a session whose QEMU died").add_argument("name")
    c = cmd("copy-in", "copy files into a running desktop session's Downloads folder (a name taken gets \" (2)\")")
    c.add_argument("name")
    c.add_argument("files", nargs="+", type=Path, metavar="FILE")
    c.add_argument("--as", dest="as_name", metavar="NAME", help="the name it gets there (one FILE only)")
    c = sub.add_parser("daemon", help="autosave running sessions and watch them for crashes, without the app",
                       description="autosave running sessions and watch them for crashes until SIGTERM or SIGINT "
                       "(packaging/session-manager.service runs it as a systemd user service)")
    c.add_argument("--session", action="append", metavar="NAME", help="look after this session only (repeatable)")
    c.add_argument("--interval", type=parse_duration, metavar="DURATION",
                   help="autosave this often, like 30s, 5m or 1h (default: autosave_minutes in the settings)")
    c.add_argument("--recover", action="store_true", help="recover crashed sessions at once")
    c = sub.add_parser("key", help="manage the passphrases of the checkpoint repository",
                       description="manage the passphrases of the checkpoint repository (one opens it on another "
                       "computer; commands take it from SESSION_MANAGER_PASSPHRASE or ask)")
    keys = c.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    keys.add_parser("add", parents=[js], help=f"add a passphrase (typed twice, or from {NEW_PASSPHRASE_ENV})")
    keys.add_parser("list", parents=[js], help="list the passphrases' keys")
    keys.add_parser("remove", parents=[js], help="remove a passphrase (never the last one)").add_argument(
        "id", help="key id or unique prefix")
    c = sub.add_parser("remote", help="manage remote repositories (S3 storage or a directory) for push, pull, resume",
                       description="manage remote repositories: s3://BUCKET/PREFIX (credentials go to the keyring) "
                       "or a directory, e.g. a mounted share")
    remotes = c.add_subparsers(dest="remote_command", metavar="ACTION", required=True)
    c = remotes.add_parser("add", parents=[js], help="add or replace a remote (asks for S3 credentials, or reads "
                           f"{KEY_ENV} and {SECRET_ENV})")
    c.add_argument("name")
    c.add_argument("url", help="s3://BUCKET/PREFIX, a directory or file:///DIRECTORY")
    c.add_argument("--endpoint", help="the S3 server, e.g. https://s3.example.com:9000 (default: AWS)")
    c.add_argument("--region")
    c.add_argument("--limit", type=rate, help="bandwidth limit, e.g. 10M/s")
    remotes.add_parser("list", parents=[js], help="list the remotes")
    remotes.add_parser("remove", parents=[js], help="forget a remote (its data stays)").add_argument("name")
    for name, help in (("push", "send a remote every checkpoint it lacks"),
                       ("pull", "fetch every checkpoint this computer lacks from a remote")):
        c = cmd(name, help)
        c.add_argument("remote", nargs="?", help="the remote's name (default: the only one)")
        c.add_argument("--limit", type=rate, help="bandwidth limit, e.g. 10M/s (default: the remote's)")
    c = cmd("resume", "continue a session from another computer: pull its latest checkpoint from a remote and start it")
    c.add_argument("source", help="a remote's name, s3://BUCKET/PREFIX or a directory")
    c.add_argument("session", nargs="?", help="which session (without it: the only one, or a list of them)")
    c.add_argument("--checkpoint", help="a checkpoint id or prefix instead of the latest")
    c.add_argument("--endpoint", help="the S3 server of an s3:// source (default: AWS)")
    c.add_argument("--region")
    c.add_argument("--limit", type=rate, help="bandwidth limit, e.g. 10M/s")
    c = sub.add_parser("serve", help="run the host agent, which paired computers connect to",
                       description="run the host agent until SIGTERM or SIGINT: installations paired with this one "
                       "connect to it (TLS) to send or receive sessions, and others ask it to pair "
                       "(packaging/session-manager-agent.service runs it as a systemd user service)")
    c.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_PORT}", metavar="ADDR:PORT",
                   help=f"where to listen (default 0.0.0.0:{DEFAULT_PORT}; port 0 picks a free one)")
    c = cmd("migrate", "move a running session to a paired computer without stopping it (live migration)")
    c.add_argument("name")
    c.add_argument("peer", help="the paired computer (`session-manager peers list`), whose agent must run")
    c.add_argument("--postcopy", action="store_true",
                   help="for a guest that changes memory faster than the link carries it: switch over after two "
                   "memory passes and send the rest on demand (if the link then breaks, the session goes back to "
                   "its latest checkpoint)")
    c.add_argument("--limit", type=rate, metavar="RATE",
                   help="bandwidth limit for the disk copy and for memory, each, e.g. 20M/s (default: none)")
    c = cmd("send", "copy a session's latest checkpoint to a paired computer, where `start` resumes it later "
                   "(migration by checkpoint)")
    c.add_argument("name")
    c.add_argument("peer", help="the paired computer (`session-manager peers list`), whose agent must run")
    c.add_argument("--checkpoint", help="a checkpoint id or prefix instead of the latest")
    cmd("id", "print this installation's id, which other computers confirm when they pair with it")
    c = sub.add_parser("peers", help="pair with other computers, list and remove them",
                       description="pair with other computers (each runs `session-manager serve`); only paired "
                       "installations may send or receive sessions")
    peers = c.add_subparsers(dest="peers_command", metavar="ACTION", required=True)
    c = peers.add_parser("add", parents=[js], help="pair with the computer whose agent runs at HOST[:PORT]: confirm "
                         "its id here, accept this one there")
    c.add_argument("address", metavar="HOST[:PORT]", help=f"its agent (default port {DEFAULT_PORT})")
    c.add_argument("--name", help="what to call it here (default: its host name)")
    c.add_argument("--fingerprint", metavar="ID", help="its id as `session-manager id` prints it there, instead of "
                   "confirming; given on both sides, it pairs without `peers accept`")
    c.add_argument("--yes", action="store_true", help="trust whatever id it presents")
    c = peers.add_parser("accept", parents=[js], help="accept a computer waiting to pair (`serve` shows its id)")
    c.add_argument("id")
    c.add_argument("--name", help="what to call it here (default: its host name)")
    peers.add_parser("list", parents=[js], help="list the paired computers").add_argument(
        "--check", action="store_true", help="also connect to each one")
    peers.add_parser("remove", parents=[js], help="unpair a computer").add_argument("name")
    return p


def _setup_logging(home: Home, verbose: bool) -> None:
    root = logging.getLogger("session_manager")
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    try:
        home.state.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(home.log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    except OSError:
        pass  # a read-only or full state dir must not stop the command itself
    if verbose:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)  # whatever the caller's umask: the user's disks, logs and keys are theirs alone (QEMU inherits it)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cli = Cli(args)
        _setup_logging(cli.engine.home, args.verbose)
        log.info("session-manager %s", " ".join(sys.argv[1:]))
        if args.command and sys.stdin.isatty():
            repo_keys.ask = ask_passphrase
        if not args.command:  # the desktop app
            from .app import run

            return run(cli.engine.home)
        getattr(cli, args.command.replace("-", "_"))()
        return 0
    except SessionManagerError as e:
        log.error("%s", e)
        print(f"session-manager: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("session-manager: interrupted; nothing half-done was kept.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read our output stopped (`... | head`): quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor fail again flushing at exit
        return 128 + signal.SIGPIPE
    except OSError as e:
        log.exception("OS error")
        if e.errno == errno.ENOSPC:
            print(f"session-manager: the disk is full ({e.filename or 'writing data'}); free some space and try "
                  "again — nothing half-written was kept.", file=sys.stderr)
        else:
            print(f"session-manager: {e.strerror or e} ({e.filename or 'no file'}); check the path and permissions.",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
