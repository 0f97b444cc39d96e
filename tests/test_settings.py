"""The app's settings: defaults, a faithful round trip, clear refusals of a bad file, atomic saves."""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

import pytest

from session_manager.errors import UsageError
from session_manager.local.settings import Settings
from session_manager.paths import Home


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(data=tmp_path / "data", state=tmp_path / "state", runtime=tmp_path / "run",
                config=tmp_path / "config", cache=tmp_path / "cache")


def write(home: Home, text: str | bytes) -> Path:
    home.config.mkdir(parents=True, exist_ok=True)
    path = home.config / "settings.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_no_file_means_the_defaults(home: Home) -> None:
    s = Settings.load(home)
    assert s == Settings()
    assert (s.checkpoint_shortcut, s.confirm_restore, s.keyboard_grab, s.scale, s.show_notifications, s.sound_muted,
            s.session) == ("Ctrl+Alt+S", True, False, "fit", True, False, None)
    assert (s.autosave_minutes, s.autosave_keep_last, s.autosave_keep_minutes, s.autosave_keep_hourly,
            s.autosave_keep_daily) == (2.0, 0, 60.0, 24, 30)  # Time Machine's: the last hour, a day, a month
    assert not home.config.exists()  # loading writes nothing


def test_round_trip(home: Home) -> None:
    s = Settings(checkpoint_shortcut="Ctrl+Shift+F12", confirm_restore=False, keyboard_grab=True, scale="1:1",
                 scale_desktop=True, show_notifications=False, sound_muted=True, session="work", autosave_minutes=0.5,
                 autosave_keep_last=3,
                 autosave_keep_minutes=0, autosave_keep_hourly=0, autosave_keep_daily=7,
                 qemu="/opt/qemu-10/usr/bin/qemu-system-x86_64", arrivals_boot_dirs=["/srv/isos"],
                 arrivals_max_memory_mib=8192, arrivals_max_cpus=4)
    s.save(home)  # creates the config directory
    assert Settings.load(home) == s
    with open(home.config / "settings.toml", "rb") as f:
        assert tomllib.load(f) == {"checkpoint_shortcut": "Ctrl+Shift+F12", "confirm_restore": False,
                                   "keyboard_grab": True, "scale": "1:1", "scale_desktop": True,
                                   "show_notifications": False, "sound_muted": True, "session": "work",
                                   "autosave_minutes": 0.5, "autosave_keep_last": 3,
                                   "autosave_keep_minutes": 0, "autosave_keep_hourly": 0, "autosave_keep_daily": 7,
                                   "qemu": "/opt/qemu-10/usr/bin/qemu-system-x86_64",
                                   "arrivals_boot_dirs": ["/srv/isos"], "arrivals_max_memory_mib": 8192,
                                   "arrivals_max_cpus": 4}
    s.session = None  # TOML has no null: the key is left out
    s.save(home)
    assert "session" not in (home.config / "settings.toml").read_text()
    assert Settings.load(home) == s


def test_a_partial_file_fills_in_the_defaults(home: Home) -> None:
    write(home, 'scale = "1:1"\n')
    assert Settings.load(home) == Settings(scale="1:1")
    write(home, "autosave_minutes = 5\n")  # a whole number of minutes is a number too
    assert Settings.load(home) == Settings(autosave_minutes=5)


def test_unknown_keys_are_ignored_with_a_warning(home: Home, caplog: pytest.LogCaptureFixture) -> None:
    write(home, 'keyboard_grab = true\ntheme = "dark"\n')
    with caplog.at_level(logging.WARNING, logger="session_manager"):
        assert Settings.load(home) == Settings(keyboard_grab=True)
    assert "unknown setting 'theme'" in caplog.text


@pytest.mark.parametrize(("text", "words"), [
    ('confirm_restore = "yes"\n', ['confirm_restore must be true or false, not "yes"']),
    ("keyboard_grab = 1\n", ["keyboard_grab must be true or false, not 1"]),
    ('scale = "2x"\n', ['scale must be "fit" or "1:1", not "2x"']),
    ("checkpoint_shortcut = 5\n", ["checkpoint_shortcut must be a key combination"]),
    ('checkpoint_shortcut = ""\n', ["checkpoint_shortcut must be a key combination"]),
    ('session = "no/such name"\n', ["session must be the name of a session"]),
    ("[show_notifications]\nx = 1\n", ["show_notifications must be true or false, not a table"]),
    ("autosave_minutes = -1\n", ["autosave_minutes must be a number of minutes (0 turns it off), not -1"]),
    ('autosave_minutes = "2m"\n', ["autosave_minutes must be a number of minutes"]),
    ("autosave_keep_minutes = inf\n", ["autosave_keep_minutes must be a number of minutes"]),
    ("autosave_keep_hourly = 1.5\n", ["autosave_keep_hourly must be a whole number (0 turns it off), not 1.5"]),
    ("autosave_keep_daily = true\n", ["autosave_keep_daily must be a whole number"]),
    ("autosave_keep_last = -2\n", ["autosave_keep_last must be a whole number"]),
    ('qemu = "qemu-system-x86_64"\n', ["qemu must be the absolute path of a qemu-system-x86_64"]),
    ('arrivals_boot_dirs = "/srv"\n', ["arrivals_boot_dirs must be a list of absolute directory paths"]),
    ('arrivals_boot_dirs = ["isos"]\n', ["arrivals_boot_dirs must be a list of absolute directory paths"]),
    ("arrivals_max_cpus = -1\n", ["arrivals_max_cpus must be a whole number (0: what fits this machine)"]),
    ("confirm_restore = \n", ["is not valid TOML", "line 1"]),
    ("\xff\n", ["is not valid TOML"]),
    (b"scale = \"\xff\"\n", ["is not valid TOML", "utf-8"]),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_key(home: Home, text: str | bytes, words: list[str]) -> None:
    path = write(home, text)
    with pytest.raises(UsageError) as e:
        Settings.load(home)
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    for w in [str(path), *words, "delete the file"]:
        assert w in message, message
    assert path.read_bytes() == (text if isinstance(text, bytes) else text.encode())  # left to fix


def test_an_unreadable_file_is_refused(home: Home) -> None:
    (home.config / "settings.toml").mkdir(parents=True)
    with pytest.raises(UsageError, match="Could not read .*settings.toml"):
        Settings.load(home)


def test_a_bad_value_in_code_is_a_bug(home: Home) -> None:
    with pytest.raises(ValueError, match="scale must be"):
        Settings(scale="2x")


def test_saving_leaves_no_temporary_file(home: Home) -> None:
    Settings().save(home)
    Settings(keyboard_grab=True).save(home)  # over an existing file
    assert [p.name for p in home.config.iterdir()] == ["settings.toml"]
    assert Settings.load(home).keyboard_grab


def test_a_failed_save_keeps_the_old_file_and_cleans_up(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    Settings(scale="1:1").save(home)
    before = (home.config / "settings.toml").read_bytes()

    def no_space(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(UsageError, match="Could not save the settings .*No space left on device"):
        Settings(scale="fit").save(home)
    monkeypatch.undo()
    assert (home.config / "settings.toml").read_bytes() == before
    assert [p.name for p in home.config.iterdir()] == ["settings.toml"]
