"""As an ordinary user: live checkpoints when userfaultfd is allowed, a correct paused fallback when not."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, Sm

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


def test_ordinary_user_without_userfaultfd_gets_a_correct_paused_checkpoint(
        user_sm: UserSm, guest: tuple[Path, Path]) -> None:
    SYSCTL.write_text("0\n")
    user_sm.new_guest("u", guest)
    user_sm("start", "u")
    status = user_sm("status", "u", "--json").json()
    assert status["live_checkpoints"] is False
    serial = user_sm.serial("u")
    serial.wait_counter(3)
    run = user_sm("checkpoint", "u")
    assert "stop-and-copy" in run.stdout and "paused" in run.stdout
    c = user_sm("checkpoints", "u", "--json").json()[-1]
    assert c["meta"]["live"] is False
    assert c["meta"]["pause_ms"] > 0
    log = (user_sm.home / "state" / "session-manager.log").read_text()
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
