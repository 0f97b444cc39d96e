"""A paired peer may do only what pairing is for: send sessions here and see the screens of the sessions it sent.

b is the installation under attack. a is paired with b and sent it a session ("visitor"), so b's repository is
a's (the same identity and key); then b made a session of its own there (running, checkpointed). c is paired
with b too. Both walk the agent's table of calls (agent.py) against
b's real `serve` with hostile arguments, as an in-process client; afterwards b's own session, its checkpoints,
its repository and its keys are as they were.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from helpers import GUEST_CACHE
from helpers.cli import Sm
from helpers.net import pair_by_ids, paired_homes, serving
from session_manager.errors import PeerError
from session_manager.net.agent import connect
from session_manager.net.peers import Peers
from session_manager.paths import Home

pytestmark = pytest.mark.qemu


def config(name: str, **changes: Any) -> dict[str, Any]:
    kernel, initrd = GUEST_CACHE / "vmlinuz", GUEST_CACHE / "initrd.img"
    return {"name": name, "machine": "pc-q35-7.2", "memory_mib": 256, "cpus": 1, "boot": "kernel",
            "disk_size": 1 << 30, "kernel": str(kernel.resolve()), "initrd": str(initrd.resolve()),
            "append": "console=ttyS0", **changes}


def attack(attacker: Sm, calls: list[tuple[str, dict[str, Any]]]) -> list[str | Any]:
    """Make each call to b over one connection: its result, or the sentence it was refused with."""
    home = Home.locate(attacker.home)

    async def run() -> list[str | Any]:
        out: list[str | Any] = []
        async with connect(home, Peers(home).get("b")) as conn:
            for command, args in calls:
                try:
                    out.append(await conn.call(command, timeout=60, **args))
                except PeerError as e:
                    out.append(str(e))
        return out

    return asyncio.run(run())


def refused(answer: str | Any, *words: str) -> None:
    assert isinstance(answer, str), answer
    assert len(answer.splitlines()) == 1, answer
    for w in words:
        assert w in answer, answer


def test_a_paired_peer_may_only_do_what_pairing_is_for(tmp_path: Path, guest: tuple[Path, Path]) -> None:
    with paired_homes(tmp_path) as (a, b, port_b):
        c = Sm(tmp_path / "c")
        a.new_guest("visitor", guest)
        a("start", "visitor")
        a.serial("visitor").wait_counter(2)
        a("checkpoint", "visitor")
        with serving(b, f"127.0.0.1:{port_b}"):
            a("send", "visitor", "b")  # b's repository becomes a's (the same identity and key)
        b("start", "visitor")  # it arrived from a, and runs on b now
        b.new_guest("own", guest)
        b("start", "own")
        b.serial("own").wait_counter(2)
        own = b("checkpoint", "own", "--json").json()
        repo = b.home / "data" / "repository"
        manifest = repo / "checkpoints" / own["id"]
        before = {p: p.read_bytes() for p in [manifest, *(b.home / "data").rglob("repository.key"),
                                              *(b.home / "config").rglob("*.pem")] if p.is_file()}
        b_config = base64.b64encode((repo / "config").read_bytes()).decode()
        secret = b.home / "config" / "identity" / "key.pem"

        with serving(b, f"127.0.0.1:{port_b}"), serving(c) as port_c:
            pair_by_ids(c, port_c, b, port_b, names=("c", "b"))
            answers = attack(a, [
                ("display", {"name": "own"}),  # 0: b's own session
                ("migrate-in", {"config": config("evil", boot="iso", iso="/etc/passwd"), "disk_size": 1 << 20}),
                ("migrate-in", {"config": config("evil", initrd=str(secret)), "disk_size": 1 << 20}),
                ("migrate-in", {"config": config("evil", memory_mib=1 << 30), "disk_size": 1 << 20}),
                ("migrate-in", {"config": config("own"), "disk_size": 1 << 20}),  # 4: takes b's own session's place
                ("migrate-in", {"config": config("../../etc"), "disk_size": 1 << 20}),
                ("migrate-in", {"config": {**config("evil"), "extra": "-vnc 0.0.0.0:0"}, "disk_size": 1 << 20}),
                ("migrate-in", {"config": config("evil", machine="pc-q35-7.2,accel=kvm"), "disk_size": 1 << 20}),
                ("repo-list", {"prefix": "../"}),  # 8
                ("repo-list", {"prefix": "../../config/identity/"}),
                ("repo-load", {"name": "../../config/identity/key.pem"}),
                ("repo-stat", {"name": "/etc/passwd"}),
                ("repo-delete", {"name": f"checkpoints/{own['id']}"}),  # 12
                ("repo-delete", {"name": "locks/" + "0" * 32}),  # someone else's lock: left alone
                ("repo-save", {"name": f"checkpoints/{own['id']}", "data": base64.b64encode(b"forged").decode()}),
                ("repo-open", {"config": b_config, "key": base64.b64encode(bytes(64)).decode()}),  # 15
                ("session-adopt", {"checkpoint": own["id"]}),
                ("session-adopt", {"checkpoint": own["id"][:8]}),
                ("migrate-abort", {"name": "own"}),  # 18
                ("migrate-finish", {"name": "own"}),
                ("qemu-info", {}),  # 20: allowed
                ("repo-list", {"prefix": "checkpoints/"}),  # allowed: reads the repository
                ("repo-save", {"name": "keys/" + "ab" * 8, "data": base64.b64encode(b"{}").decode()}),  # 22
            ])
            refused(answers[0], "has no session named 'own' from a")
            refused(answers[1], "ISO /etc/passwd", "arrivals_boot_dirs")
            refused(answers[2], f"initrd {secret}", "arrivals_boot_dirs")
            refused(answers[3], "more than", "arrivals_max_memory_mib")
            refused(answers[4], "session named 'own' of its own")
            for i in (5, 6, 7):
                refused(answers[i], "malformed")
            for i in (8, 9, 10, 11):
                refused(answers[i], "not")
            refused(answers[12], "deletes nothing")
            assert answers[13] is None
            assert answers[14]["kind"] == "exists"  # objects are never replaced
            refused(answers[15], "keeps another key")
            refused(answers[16], "of its own")
            refused(answers[17], "whole id")
            assert answers[18] == {"running_here": False}  # and nothing about b's own session
            refused(answers[19], "No migration of session 'own' from a")
            assert answers[20]["version"] and sorted(answers[21]) == [f"checkpoints/{c}" for c in sorted(
                p.name for p in (repo / "checkpoints").iterdir())]
            refused(answers[22], "takes no keys")  # a passphrase of a's would open b's repository
            assert not (repo / "keys" / ("ab" * 8)).exists()

            # c, paired as well, cannot reach what a sent.
            visitor = b("checkpoints", "visitor", "--json").json()[-1]["id"]
            answers = attack(c, [("display", {"name": "visitor"}), ("session-adopt", {"checkpoint": visitor}),
                                 ("migrate-abort", {"name": "visitor"}),
                                 ("migrate-in", {"config": config("visitor"), "disk_size": 1 << 20})])
            refused(answers[0], "has no session named 'visitor' from c")
            refused(answers[1], "of its own")
            assert answers[2] == {"running_here": False}
            refused(answers[3], "of its own")

        # Nothing of b's was touched: its session runs on, its checkpoint, key and identity are as they were.
        assert b("status", "own", "--json").json()["run_state"] == "running"
        assert b("status", "visitor", "--json").json()["run_state"] == "running"
        assert {p: p.read_bytes() for p in before} == before
        assert b("check", "--read-data").returncode == 0
        b("checkpoint", "own")  # its key still opens its repository
        assert [s["name"] for s in b("list", "--json").json()] == ["own", "visitor"]
        assert "evil" not in json.dumps(b("list", "--json").json())
