"""Where things live: the runtime directory for sockets, and private directories."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from session_manager.errors import UsageError
from session_manager.paths import APP, HOME_ENV, Home, make_private_dir


def test_without_a_login_runtime_dir_sockets_go_to_a_private_one_in_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)  # e.g. after `su`: no login session of this user
    monkeypatch.delenv(HOME_ENV, raising=False)
    short = Path(tempfile.mkdtemp(prefix="smp", dir="/tmp"))  # as short as /tmp: the sockets' paths must fit
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(short))
        runtime = Home.locate().runtime  # warnings fail tests: platformdirs' own fallback warns, ours does not
        assert runtime == short / f"{APP}-{os.getuid()}"
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o700 and runtime.stat().st_uid == os.getuid()
    finally:
        shutil.rmtree(short)


def test_a_private_directory_made_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a directory another user's needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chmod(theirs, 0o777)
    os.chown(theirs, 65534, 65534)  # nobody made it first, in a shared directory
    with pytest.raises(UsageError, match=r"belongs to another user, so it cannot be kept private; remove it"):
        make_private_dir(theirs)
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o777  # and it was left as it was
    mine = make_private_dir(tmp_path / "mine" / "deeper")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    link = tmp_path / "link"  # another user's link to a directory of ours: not followed, refused
    link.symlink_to(mine)
    os.lchown(link, 65534, 65534)
    with pytest.raises(UsageError, match=r"is a link or not a directory, so it cannot be kept private"):
        make_private_dir(link)
