"""The network: free ports; two installations (homes of their own, each with `session-manager serve` as its own
process) paired through their agents, on loopback or in network namespaces (the netns fixture)."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers.cli import Sm, log_text, wait_log


def free_ports(n: int) -> list[int]:
    """``n`` different loopback TCP ports that nothing listens on (just now)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A loopback TCP port that nothing listens on (just now)."""
    return free_ports(1)[0]


class NsSm(Sm):
    """``session-manager`` run inside a network namespace."""

    def __init__(self, home: Path, netns: str) -> None:
        super().__init__(home)
        self.netns = netns

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().argv(*args)]


@contextmanager
def serving(sm: Sm, listen: str = "127.0.0.1:0") -> Iterator[int]:
    """`serve` running for ``sm``; yields its port and checks that SIGTERM stops it cleanly."""
    proc = sm.popen_until("Listening on", "serve", "--listen", listen)
    try:
        yield int(re.findall(r"Listening on \S+:(\d+) as", log_text(sm))[-1])
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Agent stopped." in out, err + out


def my_id(sm: Sm) -> str:
    """The installation's id, as `session-manager id` prints it."""
    return str(sm("id", "--json").json()["id"])


def pair_by_ids(a: Sm, port_a: int, b: Sm, port_b: int, host_a: str = "127.0.0.1", host_b: str = "127.0.0.1",
                names: tuple[str, str] = ("a", "b")) -> None:
    """Pair a and b (both serving, at host_a and host_b) by entering each other's id on both sides; each knows the
    other by its name in ``names``."""
    first = a.popen("peers", "add", f"{host_b}:{port_b}", "--name", names[1], "--fingerprint", my_id(b))
    wait_log(b, "wants to pair", timeout=20)
    b("peers", "add", f"{host_a}:{port_a}", "--name", names[0], "--fingerprint", my_id(a))
    out, err = first.communicate(timeout=30)
    assert first.returncode == 0 and f"Paired with {names[1]}" in out, err


@contextmanager
def paired_homes(tmp: Path) -> Iterator[tuple[Sm, Sm, int]]:
    """Installations a and b on loopback, paired through their agents (stopped again: a test serves b's where it
    needs it, on the same port); yields (a, b, b's port), and kills their QEMUs at the end."""
    a, b = Sm(tmp / "a").take_test_guests(), Sm(tmp / "b").take_test_guests()
    try:
        with serving(a) as port_a, serving(b) as port_b:
            pair_by_ids(a, port_a, b, port_b)
        yield a, b, port_b
    finally:
        a.kill_all()
        b.kill_all()
