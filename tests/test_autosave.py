"""Autosave and crash recovery: the policy and the autosaver's timing with fakes; the daemon, recover and a
crashed start with the real test guest under QEMU."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from helpers.cli import Sm, log_text, wait_log
from helpers.qemu import Serial, SessionQmp
from session_manager.errors import QemuError, UsageError
from session_manager.local.autosave import KIND, AutosavePolicy, Autosaver, duration
from session_manager.local.daemon import Daemon
from session_manager.local.engine import Engine
from session_manager.local.settings import Settings
from session_manager.paths import Home
from session_manager.store.backend import LocalBackend
from session_manager.store.repo import CheckpointMeta, Repository

# -- the policy ------------------------------------------------------------------------------------------------


def test_the_default_policy_is_time_machines() -> None:
    policy = AutosavePolicy.from_settings(Settings())
    assert policy == AutosavePolicy()
    assert (policy.enabled, policy.interval_s) == (True, 120)
    assert policy.forget_rules() == {"keep_within": timedelta(hours=1), "keep_hourly": 24, "keep_daily": 30,
                                     "kinds": (KIND,)}
    assert policy.describe() == ("autosaving every 2 min, keeping all from the last 60 min, one an hour for 24 hours, "
                                 "one a day for 30 days")


def test_policy_from_settings() -> None:
    off = AutosavePolicy.from_settings(Settings(autosave_minutes=0))
    assert not off.enabled and off.describe() == "autosave is off"
    few = AutosavePolicy.from_settings(Settings(autosave_minutes=0.5, autosave_keep_last=3, autosave_keep_minutes=0,
                                                autosave_keep_hourly=0, autosave_keep_daily=0))
    assert few.interval_s == 30 and few.forget_rules() == {"keep_last": 3, "kinds": (KIND,)}
    keep_all = AutosavePolicy(keep_within=timedelta(0), keep_hourly=0, keep_daily=0)
    assert keep_all.forget_rules() == {}  # no rule on: nothing is forgotten
    assert keep_all.describe().endswith("keeping every autosave")
    with pytest.raises(ValueError):
        AutosavePolicy(interval_s=0)
    assert [duration(s) for s in (5, 90, 600, 5400, 7200, 86400 * 3)] == ["5 s", "90 s", "10 min", "90 min", "2 h",
                                                                          "3 days"]


def test_forget_with_kinds_thins_only_those(tmp_path: Path) -> None:
    repo = Repository.open(tmp_path / "repo", create=True)
    start = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    kinds = ["autosave", "manual", "autosave", "stop", "autosave", "pre-restore", "autosave", "autosave"]
    made = []
    for i, kind in enumerate(kinds):
        with repo.writer(session="s") as w:
            made.append(w.commit(CheckpointMeta(kind=kind), created=start + timedelta(minutes=2 * i)))
    repo.annotate(made[0], pinned=True)
    removed = repo.forget("s", keep_last=2, keep_ids=[made[4].id], kinds=("autosave",))
    # The newest two autosaves, the pinned one, the one asked for and every other kind stay.
    assert {c.id for c in removed} == {made[2].id}
    assert [c.meta.kind for c in repo.checkpoints("s")] == [k for i, k in enumerate(kinds) if i != 2]


# -- the autosaver, with a fake engine --------------------------------------------------------------------------


class FakeEngine:
    """What the autosaver uses of the engine: sessions with a state file, running or not, and checkpoints."""

    def __init__(self, tmp_path: Path, clock: list[float], names: tuple[str, ...] = ("a", "b")) -> None:
        self.clock = clock
        self.running = {name: True for name in names}
        self.files = {name: tmp_path / f"{name}.json" for name in names}
        for name in names:
            self.touch(name, clock[0])
        self.taken: list[tuple[str, str]] = []  # (session, kind)
        self.forgets: list[tuple[str, dict[str, Any]]] = []
        self.removes = 0  # how many checkpoints each forget reports removed
        self.prunes = 0
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None  # a checkpoint waits for it when set
        self.repo = self

    def touch(self, name: str, when: float) -> None:
        self.files[name].touch()
        os.utime(self.files[name], (when, when))

    def session(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, state_file=self.files[name])

    def sessions(self) -> list[SimpleNamespace]:
        return [self.session(name) for name in self.files]

    def sockets(self, session: SimpleNamespace) -> SimpleNamespace:
        return SimpleNamespace(pid=lambda: 4242 if self.running[session.name] else None)

    async def checkpoint(self, name: str, kind: str, note: str) -> SimpleNamespace:
        if self.gate:
            await self.gate.wait()
        if self.fail:
            raise self.fail
        self.taken.append((name, kind))
        self.touch(name, self.clock[0])  # as the engine's state file changes with every checkpoint
        return SimpleNamespace(id=f"{len(self.taken):064x}", meta=CheckpointMeta(kind=kind, pause_ms=1.0))

    def forget(self, name: str, **rules: Any) -> list[str]:
        self.forgets.append((name, rules))
        return ["gone"] * self.removes

    def prune(self) -> SimpleNamespace:
        self.prunes += 1
        return SimpleNamespace(summary=lambda: "pruned")


def autosaver(engine: FakeEngine, policy: AutosavePolicy | None = None, **kw: Any) -> Autosaver:
    policy = AutosavePolicy() if policy is None else policy
    return Autosaver(engine, policy, clock=lambda: engine.clock[0], **kw)  # type: ignore[arg-type]


def test_autosave_is_due_an_interval_after_the_latest_change(tmp_path: Path) -> None:
    clock = [1000.0]
    engine = FakeEngine(tmp_path, clock)
    saver = autosaver(engine)
    assert saver.due_in("a") == 120
    clock[0] = 1119.5
    assert saver.due_in("a") == 0.5
    engine.touch("a", 1100)  # a manual checkpoint (or a restore, a start): the interval counts from it
    clock[0] = 1200
    assert saver.due_in("a") == 20
    engine.running["a"] = False  # stopped or crashed: nothing to save
    assert saver.due_in("a") is None
    saver.policy = AutosavePolicy(enabled=False, interval_s=0)
    assert saver.due_in("b") is None


def test_an_autosave_thins_the_autosaves_and_prunes_now_and_then(tmp_path: Path) -> None:
    clock = [1000.0]
    engine = FakeEngine(tmp_path, clock)
    saved: list[str] = []
    saver = autosaver(engine, on_saved=lambda name, info: saved.append(name))
    asyncio.run(saver.save("a"))
    assert engine.taken == [("a", KIND)] and saved == ["a"]
    assert engine.forgets == [("a", AutosavePolicy().forget_rules())]
    assert engine.prunes == 0  # nothing was forgotten: nothing to reclaim
    engine.removes = 2
    asyncio.run(saver.save("a"))
    assert engine.prunes == 1
    clock[0] += 3000
    asyncio.run(saver.save("b"))
    assert engine.prunes == 1  # at most once an hour
    clock[0] += 600
    asyncio.run(saver.save("a"))
    assert engine.prunes == 2
    saver.policy = AutosavePolicy(keep_within=timedelta(0), keep_hourly=0, keep_daily=0)
    asyncio.run(saver.save("a"))
    assert len(engine.forgets) == 4  # with no retention rule, every autosave stays


def test_a_failed_autosave_is_reported_and_tried_again_an_interval_later(tmp_path: Path) -> None:
    clock = [1000.0]
    engine = FakeEngine(tmp_path, clock)
    failures: list[tuple[str, str]] = []
    saver = autosaver(engine, on_failed=lambda name, why: failures.append((name, why)))
    clock[0] = 1500
    engine.fail = QemuError("Lost the connection to QEMU during query-status; it may have exited.")
    assert asyncio.run(saver.save("a")) is None
    assert failures == [("a", "Lost the connection to QEMU during query-status; it may have exited.")]
    assert saver.due_in("a") == 120 and engine.forgets == []
    engine.fail = UsageError("Session 'a' is busy with another operation; try again when it finishes.")
    asyncio.run(saver.save("b"))
    assert failures[-1][0] == "b"


def test_run_autosaves_what_is_due_and_lets_a_running_autosave_finish(tmp_path: Path) -> None:
    clock = [1000.0]
    engine = FakeEngine(tmp_path, clock, names=("a", "b", "c"))
    engine.running["c"] = False
    engine.touch("b", 1100)  # b changed later: not due yet
    clock[0] = 1150

    async def scenario() -> None:
        saver = autosaver(engine)
        stop = asyncio.Event()
        engine.gate = asyncio.Event()
        task = asyncio.ensure_future(saver.run(stop))
        while saver.saving != "a":
            await asyncio.sleep(0.01)
        stop.set()  # SIGTERM in the middle of a checkpoint
        await asyncio.sleep(0.05)
        assert not task.done()  # it waits for the checkpoint
        engine.gate.set()
        await asyncio.wait_for(task, 5)
        assert engine.taken == [("a", KIND)]  # and saves nothing more

    asyncio.run(scenario())


def test_an_autosaver_for_one_session_leaves_the_others_alone(tmp_path: Path) -> None:
    clock = [5000.0]
    engine = FakeEngine(tmp_path, clock)
    clock[0] += 1000

    async def one_pass() -> None:
        stop = asyncio.Event()
        saver = autosaver(engine, sessions=["b"], on_saved=lambda name, info: stop.set())
        await asyncio.wait_for(saver.run(stop), 5)

    asyncio.run(one_pass())
    assert engine.taken == [("b", KIND)]


def test_the_daemon_runs_background_work_until_sigterm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events: list[str] = []

    async def replicate() -> None:  # stands in for continuous replication
        events.append("started")
        try:
            await asyncio.Event().wait()
        finally:
            events.append("cancelled")

    async def main() -> None:
        daemon = Daemon(Engine(Home.locate(tmp_path)), background=[replicate])
        asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGTERM)
        await daemon.serve()

    asyncio.run(main())
    assert events == ["started", "cancelled"]
    assert capsys.readouterr().out.splitlines()[-2:] == ["Stopping on SIGTERM.", "Daemon stopped."]


# -- the daemon and recovery with the real guest ------------------------------------------------------------------


def stop_daemon(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"the daemon exited with {proc.returncode}:\n{err}{out}"
    assert out.rstrip().endswith("Daemon stopped."), out
    return out


def started(sm: Sm, name: str, guest: tuple[Path, Path]) -> Serial:
    sm.new_guest(name, guest)
    sm("start", name)
    serial = sm.serial(name)
    serial.wait_counter(2)
    return serial


@pytest.mark.qemu
def test_daemon_autosaves_and_keeps_what_the_policy_says(sm: Sm, guest: tuple[Path, Path]) -> None:
    serial = started(sm, "auto", guest)
    (sm.home / "config").mkdir(parents=True, exist_ok=True)
    (sm.home / "config" / "settings.toml").write_text(
        "autosave_keep_last = 2\nautosave_keep_minutes = 0\nautosave_keep_hourly = 0\nautosave_keep_daily = 0\n")
    share = sm.home.parent / "share"
    sm("remote", "add", "share", str(share))  # the daemon backs every new checkpoint up there
    daemon = sm.popen_until("Daemon watching", "daemon", "--interval", "5s")
    try:
        first = wait_log(sm, r"Autosaved auto: checkpoint (\w{8})")[0][1]
        sm("pin", "auto", first)
        manual = sm("checkpoint", "auto", "-m", "by hand", "--json").json()["id"]
        wait_log(sm, r"Autosaved auto:", count=5)
    finally:
        out = stop_daemon(daemon)
    autosaves = re.findall(r"Autosaved auto: checkpoint (\w{8})", out)
    assert len(autosaves) >= 5
    listing = sm("checkpoints", "auto", "--json").json()
    kept = {(c["id"][:8], c["meta"]["kind"]) for c in listing}
    # The pinned autosave, the manual checkpoint and the newest two autosaves stay; the rest were forgotten.
    assert kept == {(first, "autosave"), (manual[:8], "manual"), (autosaves[-1], "autosave"),
                    (autosaves[-2], "autosave")}
    assert re.search(r"Freed [\d.]+ MiB", log_text(sm))  # prune ran once something was forgotten
    assert sm("check", "--read-data").returncode == 0
    assert sm("status", "auto", "--json").json()["run_state"] == "running"  # a stopped daemon leaves it running
    serial.wait_counter(len(serial.counters()) + 2)
    assert "Backing up every new checkpoint to share" in out
    # Each was pushed as it was taken, and the share was thinned after each push as here (and pruned): it keeps
    # what stays here, give or take the newest autosave and the one that made redundant (in flight at the stop).
    backed_up = {name[:8] for name in os.listdir(share / "checkpoints")}
    assert {first, manual[:8], autosaves[-2]} <= backed_up <= {first, manual[:8], *autosaves[-3:]}
    there = re.escape(str(share))
    forgotten = sum(int(n) for n in re.findall(rf"forgot (\d+) older autosaves in {there}\b", log_text(sm)))
    assert forgotten >= len(autosaves) - 4  # all but the pinned one and the newest three: pushed, then forgotten
    assert re.search(rf"autosave: {there}: Freed [\d.]+ MiB", log_text(sm))
    here = Engine(Home.locate(sm.home)).repo
    assert Repository(LocalBackend(share), here.id, here.master).check(read_data=True).ok  # pruned, not broken


@pytest.mark.qemu
def test_daemon_reports_a_killed_qemu_and_recover_brings_back_the_latest_checkpoint(
        sm: Sm, guest: tuple[Path, Path]) -> None:
    serial = started(sm, "crash", guest)
    daemon = sm.popen_until("Daemon watching", "daemon", "--interval", "1h")
    try:
        run = sm("recover", "crash", check=False)
        assert run.returncode != 0 and run.stderr.strip().splitlines() == [
            "session-manager: Session 'crash' is running; nothing to recover."]
        before = serial.counters()[-1]
        ckpt = sm("checkpoint", "crash", "--json").json()
        after = serial.counters()[-1]
        serial.wait_counter(len(serial.counters()) + 3)  # it runs on past the checkpoint

        pid = sm("status", "crash", "--json").json()["pid"]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        found = wait_log(sm, r"Session crash stopped unexpectedly \(([^)]*)\); recover it with "
                             r"`session-manager recover crash`\.", timeout=30)
        noticed = time.monotonic() - killed
        assert noticed < 3.0, f"the daemon noticed the crash after {noticed:.1f} s"  # the promise is 2 s
        assert found[0][1].startswith("QEMU was killed")
        status = sm("status", "crash", "--json").json()
        assert status["crashed"] and status["pid"] is None
        assert "crash: crashed" in sm("status", "crash").stdout

        run = sm("recover", "crash")
        assert f"Recovered crash from its latest checkpoint {ckpt['id'][:8]} (manual, taken" in run.stdout
        mark = serial.last_start()
        serial.wait_counter(2, since=mark)
        # The guest continues from the checkpoint's counter, not from where it ran on to.
        assert before + 1 <= serial.counters(since=mark)[0] <= after + 1
        assert not sm("status", "crash", "--json").json()["crashed"]

        # A stop on purpose is not a crash.
        sm("stop", "crash", "--no-save")
        time.sleep(2)
        assert len(re.findall("Session crash stopped unexpectedly", log_text(sm))) == 1
        run = sm("recover", "crash", check=False)
        assert run.returncode != 0 and "was stopped, not crashed" in run.stderr
    finally:
        stop_daemon(daemon)


@pytest.mark.qemu
def test_a_guest_that_switches_itself_off_is_stopped_not_crashed(sm: Sm, guest: tuple[Path, Path]) -> None:
    """Shutting the guest down from inside ends the session as a stop would: the daemon neither reports nor
    recovers it, and the next start boots it afresh."""
    serial = started(sm, "off", guest)
    sm("checkpoint", "off")
    daemon = sm.popen_until("Daemon watching", "daemon", "--interval", "1h")
    try:
        SessionQmp(sm, "off").type_upper("o")
        serial.wait_for(r"^power off")
        deadline = time.monotonic() + 30
        while sm("status", "off", "--json").json()["pid"] is not None:
            assert time.monotonic() < deadline, "QEMU did not exit when its guest switched itself off"
            time.sleep(0.1)
        wait_log(sm, "off: the guest switched itself off", timeout=10)
        time.sleep(1)  # the daemon looks every 0.5 s: it had two chances to take it for a crash
        status = sm("status", "off", "--json").json()
        assert not status["crashed"] and status["run_state"] is None
        assert [r["state"] for r in sm("list", "--json").json()] == ["stopped"]
        assert "stopped unexpectedly" not in log_text(sm) and "Recovered" not in log_text(sm)
        run = sm("recover", "off", check=False)
        assert run.returncode != 0 and "was stopped, not crashed" in run.stderr

        sm("start", "off")
        assert " boot at " in serial.text(serial.last_start()).splitlines()[0]  # booted, not restored
        serial.wait_for(r"^ready", since=serial.last_start())
    finally:
        stop_daemon(daemon)


@pytest.mark.qemu
def test_after_a_host_crash_start_brings_back_the_latest_checkpoint(sm: Sm, guest: tuple[Path, Path]) -> None:
    serial = started(sm, "host", guest)
    before = serial.counters()[-1]
    ckpt = sm("checkpoint", "host", "--json").json()
    after = serial.counters()[-1]
    serial.wait_counter(len(serial.counters()) + 2)
    # The host goes down with the session: QEMU is gone and the state is from another boot.
    os.kill(sm("status", "host", "--json").json()["pid"], signal.SIGKILL)
    state_file = sm.home / "data" / "sessions" / "host" / "state.json"
    state = json.loads(state_file.read_text())
    state["running_boot"] = "an-earlier-boot"
    state_file.write_text(json.dumps(state))
    assert "host  crashed" in sm("list").stdout
    run = sm("start", "host")
    assert ("Session host had stopped unexpectedly (the computer shut down or crashed while it ran). "
            f"Recovered host from its latest checkpoint {ckpt['id'][:8]}") in run.stdout
    mark = serial.last_start()
    serial.wait_counter(2, since=mark)
    assert before + 1 <= serial.counters(since=mark)[0] <= after + 1

    # Without a checkpoint there is nothing to recover: `start` boots it afresh.
    fresh = started(sm, "fresh", guest)
    os.kill(sm("status", "fresh", "--json").json()["pid"], signal.SIGKILL)
    time.sleep(0.5)
    run = sm("recover", "fresh", check=False)
    assert run.returncode != 0 and run.stderr.strip().splitlines() == [
        "session-manager: Session 'fresh' has no checkpoint to recover from; start it to boot afresh."]
    assert "It has no checkpoint, so it booted afresh." in sm("start", "fresh").stdout
    fresh.wait_for(r"^ready", since=fresh.last_start())
