"""`session-manager send NAME PEER`: migration by checkpoint to a paired installation's agent.

Two homes on loopback, each its own installation, paired through their `serve` processes (as test_peers.py does).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.cli import one_sentence
from helpers.net import paired_homes, serving
from helpers.qemu import Serial, two_checkpoints
from session_manager.store.backend import LocalBackend

pytestmark = pytest.mark.qemu


def test_send_copies_the_latest_checkpoint_and_start_resumes_it_there(tmp_path: Path,
                                                                      guest: tuple[Path, Path]) -> None:
    with paired_homes(tmp_path) as (a, b, port_b):
        serial, first, latest, before, after = two_checkpoints(a, "desk", guest)

        one_sentence(a("send", "desk", "b", check=False), "Cannot reach", "serve")  # b's agent is off

        # b has a repository of its own: refused while it holds a checkpoint, taken over once it holds none.
        b("key", "list")  # creates it
        stray = tmp_path / "b" / "data" / "repository" / "checkpoints" / "stray"
        stray.write_bytes(b"x")
        with serving(b, f"127.0.0.1:{port_b}"):
            one_sentence(a("send", "desk", "b", check=False), "holds checkpoints", "another --home")
            stray.unlink()
            sent = a("send", "desk", "b", "--json").json()
            again = a("send", "desk", "b", "--json").json()
        assert sent["checkpoint"]["id"] == latest["id"] and sent["transfer"]["bytes_done"] > 16 << 20  # chunked
        assert not sent["status"]["running"] and sent["status"]["saved"] == latest["id"]
        assert again["transfer"]["objects_done"] == 0  # nothing new the second time
        assert a("status", "desk", "--json").json()["run_state"] == "running"  # it goes on here

        # Only what the latest checkpoint needs went over.
        assert [c["id"] for c in b("checkpoints", "desk", "--json").json()] == [latest["id"]]
        assert first["id"] not in str(list(LocalBackend(tmp_path / "b" / "data" / "repository").list("")))
        assert b("list", "--json").json()[0]["state"] == "saved"

        resumed = b("start", "desk", "--json").json()  # later, without a's agent or a's repository
        assert resumed["running"]
        there = Serial(resumed["serial_log"])
        mark = there.last_start()
        there.wait_counter(2, since=mark)
        counter = there.counters(since=mark)[0]
        assert before + 1 <= counter <= after + 1  # from the checkpoint's memory
        there.wait_for(rf"^disk ok {counter + 1}", since=mark)  # and its disk, record for record
        assert "disk-mismatch" not in there.text()
        b("checkpoint", "desk")  # it goes on there
        assert b("check", "--read-data").returncode == 0
