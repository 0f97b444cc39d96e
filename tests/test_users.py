"""As an ordinary user: live checkpoints when userfaultfd is allowed, a correct paused fallback when not -- unless
this QEMU takes pre-copy checkpoints (9.0 and later, vm/snapshot.py), which need no userfaultfd."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import GUEST_CACHE, ROOT
from helpers.cli import Sm
from session_manager.vm.qemu import find_qemu, qemu_path
from session_manager.vm.snapshot import Route, choose_route

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating a test user and setting the sysctl need root"),
]
USER = "sm-test-user"
SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")


def _python_for(user: str) -> list[str]:
    """An interpreter the user may run, with this checkout and its venv's packages on the path."""
    if subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", ""], capture_output=True).returncode == 0:
        return [sys.executable]
    # The venv's interpreter lives where the user cannot reach (/root/.pyenv): use the system's same version.
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/usr/local/bin")
    assert system, "no Python the test user can run"
    site = next(p for p in sys.path if p.endswith("site-packages") and str(ROOT) in p)
    return ["env", f"PYTHONPATH={ROOT}:{site}", system]


class UserSm(Sm):
    def __init__(self, home: Path, user: str) -> None:
        super().__init__(home)
        self.python = _python_for(user)
        self.user = user

    def argv(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", "env", "SESSION_MANAGER_ACCEL=tcg", f"PATH={os.environ['PATH']}",
                *self.python, "-m", "session_manager.cli", "--home", str(self.home), *args]


@pytest.fixture
def user_sm(guest: tuple[Path, Path]) -> Iterator[UserSm]:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)
    top = Path(tempfile.mkdtemp(prefix="sm-user-"))
    os.chmod(top, 0o755)
    home = top / "home"
    home.mkdir()
    shutil.chown(home, USER)
    for path in guest:  # the test guest must be readable by the user
        assert os.stat(path).st_mode & 0o004
    original = SYSCTL.read_text()
    s = UserSm(home, USER)
    yield s
    s.kill_all()
    SYSCTL.write_text(original)
    shutil.rmtree(top, ignore_errors=True)


def test_ordinary_user_without_userfaultfd_gets_a_correct_checkpoint(
        user_sm: UserSm, guest: tuple[Path, Path]) -> None:
    SYSCTL.write_text("0\n")
    live = choose_route(find_qemu(qemu_path()).version_text, "tcg", userfaultfd=False) == Route.PRECOPY
    user_sm.new_guest("u", guest)
    user_sm("start", "u")
    status = user_sm("status", "u", "--json").json()
    assert status["live_checkpoints"] is live
    serial = user_sm.serial("u")
    serial.wait_counter(3)
    run = user_sm("checkpoint", "u")
    c = user_sm("checkpoints", "u", "--json").json()[-1]
    assert c["meta"]["live"] is live
    assert c["meta"]["pause_ms"] > 0
    log = (user_sm.home / "state" / "session-manager.log").read_text()
    if live:  # pre-copy: nothing to explain
        assert "(live)" in run.stdout and "vm.unprivileged_userfaultfd" not in log
    else:
        assert "stop-and-copy" in run.stdout and "paused" in run.stdout
        assert "vm.unprivileged_userfaultfd" in log  # the one-sentence explanation with the fix
    value = serial.counters()[-1]
    serial.wait_counter(value + 3)
    user_sm("restore", "u", c["id"])
    mark = serial.last_start()
    serial.wait_counter(2, since=mark)
    assert abs(serial.counters(since=mark)[0] - value) <= 1
    assert "disk-mismatch" not in serial.text(since=mark)


def test_ordinary_user_with_userfaultfd_gets_live_checkpoints(user_sm: UserSm, guest: tuple[Path, Path]) -> None:
    SYSCTL.write_text("1\n")
    user_sm.new_guest("u", guest)
    user_sm("start", "u")
    assert user_sm("status", "u", "--json").json()["live_checkpoints"] is True
    user_sm.serial("u").wait_counter(2)
    user_sm("checkpoint", "u")
    c = user_sm("checkpoints", "u", "--json").json()[-1]
    assert c["meta"]["live"] is True
    assert c["meta"]["pause_ms"] > 0  # measured and recorded


def test_setup_goes_on_without_sudo_and_starts_the_demo(user_sm: UserSm) -> None:
    """`packaging/setup.sh run demo` as an ordinary user who may not use sudo (it is missing here, or refuses someone
    not in sudoers): with the packages already there nothing needs it; the userfaultfd step says what is lost and
    how to get it, and the demo session starts."""
    SYSCTL.write_text("0\n")
    top = user_sm.home.parent
    repo, home = top / "repo", top / "user-home"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        (repo / name.decode()).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name.decode(), repo / name.decode())
    # The demo's kernel and busybox packages, as setup.sh's own first run would have downloaded them.
    shutil.copytree(GUEST_CACHE / "cache", home / ".cache" / "session-manager" / "testguest" / "cache")
    subprocess.run(["chown", "-R", USER, str(repo), str(home)], check=True)
    as_user = ["runuser", "-u", USER, "--", "env", "-i", f"HOME={home}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
               "SESSION_MANAGER_ACCEL=tcg", *([f"SESSION_MANAGER_QEMU={os.environ['SESSION_MANAGER_QEMU']}"]
                                              if "SESSION_MANAGER_QEMU" in os.environ else [])]
    # Its virtual environment, made beforehand with the system's Python and given this one's packages (a .pth
    # file), so that pip finds every dependency installed and setup.sh downloads only its build backend.
    subprocess.run([*as_user, "python3", "-m", "venv", str(repo / ".venv")], check=True)
    site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_relative_to(ROOT))
    pth = next((repo / ".venv" / "lib").glob("python3*/site-packages")) / "session-manager-test.pth"
    pth.write_text(site + "\n")
    try:
        run = subprocess.run([*as_user, "bash", str(repo / "packaging" / "setup.sh"), "run", "demo"],
                             capture_output=True, text=True, timeout=600)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out
        assert "Not done: sudo is missing here or was refused" in out and "ask an\nadministrator" in out, out
        assert "Installing Debian packages" not in out
        listed = subprocess.run([*as_user, str(repo / ".venv" / "bin" / "session-manager"), "list", "--json"],
                                capture_output=True, text=True, check=True).stdout
        assert [(s["name"], s["state"]) for s in json.loads(listed)] == [("demo", "running")]
    finally:
        subprocess.run([*as_user, str(repo / ".venv" / "bin" / "session-manager"), "stop", "demo", "--no-save"],
                       capture_output=True)
