"""The app's preferences, kept as TOML in ``settings.toml`` in the config directory.

A missing file means the defaults.  A file that cannot be used (broken TOML, a
value of the wrong type) is refused with a :class:`UsageError` naming the file
and the key; keys this version does not know are ignored with a logged warning.
The file is written atomically (files.atomic_write).
"""

from __future__ import annotations

import logging
import math
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import UsageError
from ..files import atomic_write
from ..paths import Home, valid_name

log = logging.getLogger(__name__)

FILENAME = "settings.toml"
SCALES = ("fit", "1:1")


@dataclass
class Settings:
    checkpoint_shortcut: str = "Ctrl+Alt+S"  # a QKeySequence in portable text form
    confirm_restore: bool = True
    keyboard_grab: bool = False  # grab the keyboard while the viewer has focus
    scale: str = "fit"  # "fit": scale the guest's screen to the window; "1:1": one guest pixel per pixel
    scale_desktop: bool = False  # a desktop keeps its screen size and is scaled, instead of following the window
    show_notifications: bool = True
    sound_muted: bool = False  # the session's sound does not play (the window's Mute button)
    session: str | None = None  # the session the app shows; None: the only (or first) one
    # Autosave checkpoints each running session this often (0: never), then thins the autosaves (every other
    # checkpoint stays) to the newest keep_last, all from the last keep_minutes, and the newest of each of the
    # last keep_hourly hours and keep_daily days; 0 turns a rule off, and with every rule off all autosaves stay.
    autosave_minutes: float = 2.0
    autosave_keep_last: int = 0
    autosave_keep_minutes: float = 60.0
    autosave_keep_hourly: int = 24
    autosave_keep_daily: int = 30
    # The qemu-system-x86_64 that runs sessions (None: the one on PATH); $SESSION_MANAGER_QEMU overrides it.
    # A QEMU unpacked into a directory of its own (PREFIX/usr/bin/qemu-system-x86_64) finds its firmware there.
    qemu: str | None = None
    # What a session arriving from a paired machine (migrate, send) may be here: it boots a kernel, initrd or ISO
    # only from this home's demo guest or these directories, and gets at most this much memory and these many
    # CPUs (0: three quarters of this machine's memory, all its cores).
    arrivals_boot_dirs: list[str] = field(default_factory=list)
    arrivals_max_memory_mib: int = 0
    arrivals_max_cpus: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _problem(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(problem)

    @staticmethod
    def path(home: Home) -> Path:
        return home.config / FILENAME

    @classmethod
    def load(cls, home: Home) -> Settings:
        path = cls.path(home)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            return cls()
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{_shown(path)} is not valid TOML: {e}; {_ADVICE}") from None
        except OSError as e:
            raise UsageError(f"Could not read {_shown(path)} ({e.strerror}); {_ADVICE}") from None
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                log.warning("%s: ignoring the unknown setting %r", path, key)
                continue
            problem = _problem(key, value)
            if problem:
                raise UsageError(f"{_shown(path)}: {problem}; {_ADVICE}")
            values[key] = value
        return cls(**values)

    def save(self, home: Home) -> None:
        path = self.path(home)
        data = tomli_w.dumps({k: v for k, v in asdict(self).items() if v is not None}).encode()
        try:
            atomic_write(path, data)
        except OSError as e:
            raise UsageError(
                f"Could not save the settings to {_shown(path)} ({e.strerror}); check that its directory is writable."
            ) from None


_ADVICE = "fix it, or delete the file to go back to the defaults."


def _problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the setting ``key``, or None."""
    if key in ("confirm_restore", "keyboard_grab", "scale_desktop", "show_notifications", "sound_muted"):
        ok = isinstance(value, bool)
        wanted = "true or false"
    elif key == "checkpoint_shortcut":
        ok = isinstance(value, str) and value.strip() != ""
        wanted = 'a key combination in quotes, like "Ctrl+Alt+S"'
    elif key == "scale":
        ok = value in SCALES
        wanted = " or ".join(f'"{s}"' for s in SCALES)
    elif key == "qemu":
        ok = value is None or (isinstance(value, str) and os.path.isabs(value))
        wanted = "the absolute path of a qemu-system-x86_64 in quotes"
    elif key == "arrivals_boot_dirs":
        ok = isinstance(value, list) and all(isinstance(v, str) and os.path.isabs(v) for v in value)
        wanted = "a list of absolute directory paths in quotes"
    elif key in ("arrivals_max_memory_mib", "arrivals_max_cpus"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        wanted = "a whole number (0: what fits this machine)"
    elif key == "session":
        ok = value is None or (isinstance(value, str) and valid_name(value))
        wanted = "the name of a session in quotes"
    elif key in ("autosave_minutes", "autosave_keep_minutes"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        wanted = "a number of minutes (0 turns it off)"
    elif key in ("autosave_keep_last", "autosave_keep_hourly", "autosave_keep_daily"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        wanted = "a whole number (0 turns it off)"
    else:
        raise AssertionError(key)
    return None if ok else f"{key} must be {wanted}, not {_toml(value)}"


def _toml(value: Any) -> str:
    """``value`` as it is written in TOML (near enough for a message)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a table"
    return str(value)


def _shown(path: Path) -> str:
    """``path`` with the user's home directory written as ``~``."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)
