"""session-manager's command line: every operation, headless."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .engine import DEMO_NAME, UFFD_ADVICE, Engine
from .errors import SessionManagerError, UsageError
from .paths import HOME_ENV, Home
from .store.repo import CheckpointInfo

log = logging.getLogger("session_manager")


def parse_size(text: str, unit: int = 1 << 20) -> int:
    """'2G', '512M', '1.5G', '2048' (in ``unit``) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write it like 512M or 2G")
    scale = {"": unit, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m[2].upper()]
    return int(float(m[1]) * scale)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def local_time(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def checkpoint_row(c: CheckpointInfo) -> list[Any]:
    m = c.meta
    pause = f"{m['pause_ms']:.1f} ms" if m.get("pause_ms") is not None else "-"
    flags = ("pinned " if c.pinned else "") + str(m.get("kind", ""))
    return [c.id[:8], local_time(c.created), (c.parent or "-")[:8], pause, human(c.added_bytes), flags, c.note]


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
        s = self.engine.new_session(
            a.name, disk=a.disk, iso=a.iso, kernel=a.kernel, initrd=a.initrd, append=a.append,
            memory_mib=a.memory >> 20, cpus=a.cpus, disk_size=a.disk_size,
        )
        self.out(asdict(s.load_config()), f"Created session {a.name!r}; start it with `session-manager start {a.name}`.")

    def list(self) -> None:
        rows: list[dict[str, Any]] = []
        for s in self.engine.sessions():
            st = asyncio.run(self.engine.status(s.name))
            state = st.run_state or ("saved" if st.saved else "stopped")
            rows.append({"name": s.name, "state": state, "memory_mib": st.memory_mib, "cpus": st.cpus,
                         "head": st.head, "checkpoints": len(self.engine.checkpoints(s.name))})
        self.out(rows, lambda: table([[r["name"], r["state"], f"{r['memory_mib']} MiB", r["cpus"],
                                       r["checkpoints"], (r["head"] or "-")[:8]] for r in rows],
                                     ["NAME", "STATE", "MEMORY", "CPUS", "CHECKPOINTS", "HEAD"])
                 if rows else "No sessions yet; `session-manager demo` creates one to try.")

    def start(self) -> None:
        st = asyncio.run(self.engine.start(self.args.name))
        self.out(asdict(st), lambda: self._status_text(st) + "\nStarted.")
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

    @staticmethod
    def _status_text(st: Any) -> str:
        lines = [f"Session {st.name}: {st.run_state or ('stopped, state saved' if st.saved else 'stopped')}"]
        if st.pid:
            lines.append(f"  QEMU pid {st.pid}, accelerator {st.accel} ({st.accel_reason})")
            lines.append(f"  checkpoints: {'live (background snapshot)' if st.live_checkpoints else 'stop-and-copy (pauses the guest)'}")
            lines.append(f"  display: VNC on {st.vnc_socket}")
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
        mode = "live" if c.meta["live"] else "stop-and-copy: the guest was paused"
        self.out(c.to_dict(), f"Checkpoint {c.id[:8]}: paused {c.meta['pause_ms']:.1f} ms ({mode}), "
                              f"{c.meta['wall_s']:.2f} s, added {human(c.added_bytes)}.")
        self._advise(c.meta["live"])

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
        st = asyncio.run(self.engine.demo())
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

    def pin(self) -> None:
        s = self.engine.session(self.args.name)
        c = self.engine.find_checkpoint(s, self.args.checkpoint)
        self.engine.repo.annotate(c.id, pinned=not self.args.unpin)
        self.out({"id": c.id, "pinned": not self.args.unpin}, f"{'Unpinned' if self.args.unpin else 'Pinned'} {c.id[:8]}.")


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
    c.add_argument("--initrd", type=Path)
    c.add_argument("--append", help="kernel command line")
    c.add_argument("--memory", type=size, default=2 << 30, help="guest memory, e.g. 4G (default 2G)")
    c.add_argument("--cpus", type=int, default=2)
    c.add_argument("--disk-size", type=lambda t: parse_size(t, 1 << 30), default=32 << 30,
                   help="size of the new disk for --iso/--kernel (default 32G)")
    cmd("list", "list sessions")
    for name, help in (("start", "start a session, resuming its saved state if it has one"),
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
    cmd("demo", "create and start a small demo session")
    c = cmd("check", "verify the checkpoint repository")
    c.add_argument("--read-data", action="store_true", help="also read every blob and check its hash")
    c = cmd("forget", "remove old checkpoints by a retention policy (pinned ones are kept)")
    c.add_argument("name")
    for unit in ("last", "hourly", "daily", "weekly", "monthly"):
        c.add_argument(f"--keep-{unit}", type=int, metavar="N")
    c.add_argument("--keep-manual", action="store_true", help="also keep every checkpoint taken by hand")
    c.add_argument("--prune", action="store_true", help="reclaim the space right away")
    cmd("prune", "reclaim the space of forgotten checkpoints")
    cmd("du", "show how much space checkpoints take").add_argument("name", nargs="?")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cli = Cli(args)
        _setup_logging(cli.engine.home, args.verbose)
        log.info("session-manager %s", " ".join(sys.argv[1:]))
        if not args.command:  # the desktop app
            from .app import run

            return run(cli.engine.home)
        getattr(cli, args.command)()
        return 0
    except SessionManagerError as e:
        log.error("%s", e)
        print(f"session-manager: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("session-manager: interrupted; nothing half-done was kept.", file=sys.stderr)
        return 130
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
