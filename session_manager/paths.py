"""Where everything lives.

By default the XDG directories (through platformdirs); ``--home DIR`` or
``SESSION_MANAGER_HOME`` relocates all of it below one directory, which tests
and multi-user hosts rely on.  Sockets live in a 0700 runtime directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from .errors import UsageError

APP = "session-manager"
HOME_ENV = "SESSION_MANAGER_HOME"
# A unix socket path must fit in sun_path (108 bytes on Linux).
_SOCKET_ROOM = 100 - len("/longest-session-name-here/qmp-app.sock")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")


def valid_name(name: str) -> bool:
    return bool(_NAME_RE.fullmatch(name))


def check_name(name: str) -> str:
    if not valid_name(name):
        raise UsageError(
            f"{name!r} is not a valid session name; use 1-48 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
    return name


@dataclass(frozen=True)
class Home:
    data: Path
    state: Path
    runtime: Path
    config: Path
    cache: Path

    @classmethod
    def locate(cls, home: str | os.PathLike[str] | None = None) -> Home:
        home = home or os.environ.get(HOME_ENV) or None
        if home:
            root = Path(home).expanduser().resolve()
            return cls(
                data=root / "data",
                state=root / "state",
                runtime=_short_runtime(root / "run"),
                config=root / "config",
                cache=root / "cache",
            )
        return cls(
            data=Path(platformdirs.user_data_dir(APP)),
            state=Path(platformdirs.user_state_dir(APP)),
            runtime=_short_runtime(_runtime_root()),
            config=Path(platformdirs.user_config_dir(APP)),
            cache=Path(platformdirs.user_cache_dir(APP)),
        )

    @property
    def repository(self) -> Path:
        return self.data / "repository"

    @property
    def sessions(self) -> Path:
        return self.data / "sessions"

    @property
    def bases(self) -> Path:
        """Built base images (guests/desktop.py), the read-only backing of the sessions made from them."""
        return self.data / "bases"

    @property
    def log_file(self) -> Path:
        return self.state / "session-manager.log"

    def session_data(self, name: str) -> Path:
        return self.sessions / check_name(name)

    def session_state(self, name: str) -> Path:
        return self.state / "sessions" / check_name(name)

    def session_runtime(self, name: str) -> Path:
        path = self.runtime / check_name(name)
        make_private_dir(path)
        return path


def machine_cache() -> Path:
    """This user's cache on this machine, whatever ``--home`` says: for what belongs to the machine, not a home."""
    return Path(platformdirs.user_cache_dir(APP))


def make_private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter; refused when another user made it first (in a shared
    directory such as /tmp, someone could otherwise put their own sockets in our place)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path)  # not stat: a link someone else put there is not followed
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is a link or not a directory, so it cannot be kept private; remove it (as its owner "
                         "or root) and try again.")
    if st.st_uid != os.getuid():
        raise UsageError(f"{path} belongs to another user, so it cannot be kept private; remove it (as that user or "
                         "root) and try again.")
    os.chmod(path, 0o700)
    return path


def _runtime_root() -> Path:
    """The login session's runtime directory (XDG_RUNTIME_DIR: per user, 0700, made by the login manager); without
    one (e.g. after `su`), a private directory of ours in the system's temporary directory."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(platformdirs.user_runtime_dir(APP))
    return make_private_dir(Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}")


def _short_runtime(wanted: Path) -> Path:
    """Return a runtime directory whose socket paths fit in sun_path.

    When ``wanted`` is too deep (a test's temporary home, say), the sockets go
    to a short private directory under the system temp dir named after it, and
    ``wanted`` becomes a symlink to it so the layout stays discoverable.
    """
    if len(str(wanted)) <= _SOCKET_ROOM:
        return wanted
    digest = hashlib.sha256(str(wanted).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"sm-{os.getuid()}-{digest}"
    make_private_dir(short)
    if not wanted.is_symlink():
        wanted.parent.mkdir(parents=True, exist_ok=True)
        if not wanted.exists():
            wanted.symlink_to(short)
    return short
