"""`session-manager migrate` between two hosts: two installations in two network namespaces joined by a veth pair.

a (10.199.0.1) runs the session: its QEMU and the CLI run inside a's namespace, so the disk, the memory and the
agents' calls cross the veth to b (10.199.0.2), whose `serve` starts the destination's QEMU inside b's namespace.
The link is cut (a's end of the veth set down) or the destination's QEMU killed in the middle of a migration; the
session must run on at a, intact, b must be left with nothing of it, and the next migration must succeed.

Needs root (network namespaces), as the `netns` fixture says; CI runs as root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.cli import Run, one_sentence
from helpers.net import NsSm, pair_by_ids, serving
from helpers.qemu import PATTERN_LEN, Serial, Source, keeps_running, pattern_intact, start_source
from session_manager.local.sessions import Session
from session_manager.paths import Home

pytestmark = pytest.mark.qemu

HOST_A, HOST_B = "10.199.0.1", "10.199.0.2"  # the netns fixture's addresses (veth0 in a, veth1 in b)
LIMIT = "64mbit"  # a's side of the link, while a migration is to be broken: each phase lasts seconds
CLI_AFTER_CUT = 90  # s: the stall timeout (30 s) and the roll-back; not an abort call waiting out 120 s
# How the CLI's phase lines begin
DISK, MEMORY, SWITCHOVER = "  Copying the disk to b", "  Copying memory", "  Switching over"


@pytest.fixture
def hosts(tmp_path: Path, netns: tuple[str, str]) -> Iterator[tuple[NsSm, NsSm]]:
    """Installations a and b, one in each namespace, paired; b's agent serves throughout (and must stop cleanly
    at the end: it survived what the test did to it)."""
    a, b = NsSm(tmp_path / "a", netns[0]), NsSm(tmp_path / "b", netns[1])
    b.take_test_guests()
    try:
        with serving(b, "0.0.0.0:0") as port_b:
            with serving(a, "0.0.0.0:0") as port_a:
                pair_by_ids(a, port_a, b, port_b, host_a=HOST_A, host_b=HOST_B)
            assert a("peers", "list", "--json").json()[0]["address"] == f"{HOST_B}:{port_b}"
            yield a, b
    finally:
        a.kill_all()
        b.kill_all()


# -- the link ---------------------------------------------------------------------------------------------------

def link(a: NsSm, state: str) -> None:
    """a's end of the veth up or down (down: a's packets to b go nowhere, and nothing from b arrives)."""
    subprocess.run(["ip", "-n", a.netns, "link", "set", "veth0", state], check=True, capture_output=True)


def throttle(a: NsSm, on: bool) -> None:
    """Limit what a sends to b to LIMIT (a token bucket on a's end of the veth), or lift the limit."""
    if on:
        cmd = ["replace", "dev", "veth0", "root", "tbf", "rate", LIMIT, "burst", "64kb", "latency", "200ms"]
    else:
        cmd = ["del", "dev", "veth0", "root"]
    subprocess.run(["tc", "-n", a.netns, "qdisc", *cmd], check=True, capture_output=True)


def sent_on_veth(a: NsSm) -> int:
    out = subprocess.run(["ip", "-n", a.netns, "-j", "-s", "link", "show", "veth0"], check=True,
                         capture_output=True, text=True).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


# -- the CLI migrating, in the background -------------------------------------------------------------------------

class Migrating:
    """`session-manager migrate NAME b` running; the lines it prints (a line per phase, disk quarter and memory
    pass) are read as it prints them."""

    def __init__(self, sm: NsSm, name: str) -> None:
        self.proc = sm.popen("migrate", name, "b")
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def printed(self, start: str) -> bool:
        return any(line.startswith(start) for line in self.lines)

    def wait_line(self, start: str, timeout: float = 120) -> None:
        """Until it prints a line beginning with ``start``."""
        deadline = time.monotonic() + timeout
        while not self.printed(start):
            if not self._reader.is_alive():  # its stdout closed: it has ended
                run = self.end(10)
                raise AssertionError(f"migrate ended ({run.returncode}) before printing {start!r}:\n"
                                     f"{run.stdout}\n{run.stderr}")
            assert time.monotonic() < deadline, f"migrate did not print {start!r} within {timeout} s: {self.lines}"
            time.sleep(0.01)

    def end(self, timeout: float) -> Run:
        """Wait until it ends; what it printed."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"migrate did not end within {timeout} s; it printed {self.lines}") from None
        finally:
            self._reader.join(10)
            err = self.proc.stderr.read()
            self.proc.stdout.close()
            self.proc.stderr.close()
        return Run(self.proc.returncode, "\n".join(self.lines), err)


# -- checks -----------------------------------------------------------------------------------------------------

def live_qemus(sm: NsSm) -> list[int]:
    """The pids of this home's QEMUs that still run."""
    pids = []
    for pidfile in sm.home.glob("run/*/qemu.pid"):
        try:
            pid = int(pidfile.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue
        pids.append(pid)
    return pids


def runs_on_at_the_source(a: NsSm, source: Source, boot: int) -> None:
    """After a failed migration: the same run of the guest goes on at a (no restart), its counter continuing,
    its disk checks passing, the data on its disk intact."""
    status = a("status", source.name, "--json").json()
    assert status["run_state"] == "running" and status["moved_to"] is None and not status["crashed"], status
    assert source.serial.last_start() == boot, "the guest was restarted"
    keeps_running(source.serial, boot)  # consecutive since its boot: no step back, no gap
    assert pattern_intact(source.layer)


def nothing_left(b: NsSm, timeout: float = 30) -> None:
    """b has no session left of a migration that was broken off, and no QEMU running."""
    deadline = time.monotonic() + timeout
    while rows := b("list", "--json").json():
        assert time.monotonic() < deadline, f"b kept the half-made session {rows}; its QEMUs: {live_qemus(b)}"
        time.sleep(0.5)
    assert live_qemus(b) == []


def migrates(a: NsSm, b: NsSm, source: Source) -> dict[str, Any]:
    """`migrate NAME b` succeeds across the veth: the guest goes on at b from where it stopped at a, with its disk,
    and a says it runs on b.  Returns the CLI's JSON answer."""
    on_the_wire = sent_on_veth(a)
    result: dict[str, Any] = a("migrate", source.name, "b", "--json").json()
    last_here = source.serial.counters()[-1]
    assert result["peer"] == "b" and result["downtime_ms"] > 0
    assert result["disk_bytes"] >= PATTERN_LEN and result["ram_bytes"] > 16 << 20
    assert sent_on_veth(a) - on_the_wire >= result["bytes_sent"]  # it went over the veth, not some other way

    there_status = b("status", source.name, "--json").json()
    assert there_status["run_state"] == "running"
    there = Serial(there_status["serial_log"])
    since = there.last_start()
    there.wait_counter(3, since=since)
    first = there.counters(since)[0]
    assert last_here < first <= last_here + 2  # on from where it stopped at a: no step back, no jump
    keeps_running(there, since)  # consecutive, and its disk checks pass ("disk ok")
    session = Session(Home.locate(b.home), source.name)
    assert pattern_intact(session.layer_path(session.load_state().active_layer))  # the disk arrived whole

    gone = a("status", source.name, "--json").json()
    assert gone["pid"] is None and gone["moved_to"] == "b" and not gone["crashed"]
    assert f"Session {source.name}: running on b" in a("status", source.name).stdout
    assert live_qemus(a) == []
    assert source.serial.counters()[-1] == last_here  # nothing runs at a any more
    return result


# -- tests ------------------------------------------------------------------------------------------------------

def test_a_running_session_migrates_to_the_other_host(hosts: tuple[NsSm, NsSm], guest: tuple[Path, Path]) -> None:
    a, b = hosts
    source = start_source(a, guest, "desk", fill=16, pattern=True)
    taken = a("checkpoint", "desk", "-m", "before the move", "--json").json()["id"]
    started = time.monotonic()
    result = migrates(a, b, source)
    took = time.monotonic() - started
    # Its timeline went along: the checkpoint taken at a is in b's repository, under the same session.
    assert [(c["id"], c["note"]) for c in b("checkpoints", "desk", "--json").json()] == [(taken, "before the move")]
    assert [r["state"] for r in a("list", "--json").json()] == ["running on b"]
    print(f"\nacross the veth: downtime {result['downtime_ms']:.0f} ms, {result['total_s']:.1f} s of migration, "
          f"{took:.1f} s for the CLI, {result['bytes_sent'] / 1e6:.1f} MB sent")


def test_losing_the_destination_mid_disk_copy_leaves_the_session_at_the_source(
        hosts: tuple[NsSm, NsSm], guest: tuple[Path, Path]) -> None:
    a, b = hosts
    source = start_source(a, guest, "desk", fill=16, pattern=True)
    boot = source.serial.last_start()
    throttle(a, True)
    migrating = Migrating(a, "desk")
    migrating.wait_line(DISK)
    os.kill(int((b.home / "run" / "desk" / "qemu.pid").read_text()), signal.SIGKILL)
    killed = time.monotonic()
    run = migrating.end(60)
    took = time.monotonic() - killed
    assert not migrating.printed(MEMORY), "the disk copy was over before the destination died"
    message = one_sentence(run)
    runs_on_at_the_source(a, source, boot)
    nothing_left(b)
    throttle(a, False)
    migrates(a, b, source)
    print(f"\nthe destination killed mid-disk: the CLI ended {took:.1f} s later: {message}")


def test_a_cut_link_mid_memory_copy_leaves_the_session_at_the_source(
        hosts: tuple[NsSm, NsSm], guest: tuple[Path, Path]) -> None:
    a, b = hosts
    source = start_source(a, guest, "desk", fill=16, pattern=True)
    boot = source.serial.last_start()
    throttle(a, True)
    migrating = Migrating(a, "desk")
    migrating.wait_line(MEMORY)
    link(a, "down")
    cut = time.monotonic()
    try:
        run = migrating.end(CLI_AFTER_CUT)
        took = time.monotonic() - cut
        assert not migrating.printed(SWITCHOVER), "the memory copy was over before the link was cut"
        message = one_sentence(run)
        runs_on_at_the_source(a, source, boot)
        b_while_cut = [(r["name"], r["state"]) for r in b("list", "--json").json()]  # b alone: not asserted
    finally:
        link(a, "up")
    nothing_left(b)
    throttle(a, False)
    migrates(a, b, source)
    print(f"\nthe link cut mid-memory: the CLI ended {took:.1f} s later: {message} (b while cut off: {b_while_cut})")
