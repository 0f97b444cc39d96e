"""The app's data files: its icons and its .desktop file.

They live in the top-level ``resources/`` directory of the source tree.  A wheel
installs that directory as the data-only package ``session_manager/_resources``
(see ``[tool.setuptools]`` in pyproject.toml); a source checkout or an editable
install reads ``resources/`` beside the package.
"""

from __future__ import annotations

from pathlib import Path

from .errors import NotFoundError

APP_ID = "io.github.session_manager.SessionManager"  # AppStream id, .desktop file name, Wayland app id
DESKTOP_FILE = f"{APP_ID}.desktop"
APP_ICON = "session-manager"
TRAY_ICONS = ("tray-running", "tray-checkpointing", "tray-stopped", "tray-error")
ICONS = (APP_ICON, *TRAY_ICONS)

_PACKAGE = Path(__file__).resolve().parent
_PLACES = (_PACKAGE / "_resources", _PACKAGE.parent / "resources")


def resource_dir() -> Path:
    """The directory holding the data files, installed or in the source tree."""
    for place in _PLACES:
        if (place / f"{APP_ICON}.svg").is_file():
            return place
    raise NotFoundError(
        f"session-manager's icons are in neither {_PLACES[0]} nor {_PLACES[1]}; reinstall session-manager."
    )


def resource_path(filename: str) -> Path:
    """The path of one data file, e.g. ``resource_path(DESKTOP_FILE)``."""
    path = resource_dir() / filename
    if not path.is_file():
        raise NotFoundError(f"session-manager's data file {path} is missing; reinstall session-manager.")
    return path


def icon_path(name: str) -> Path:
    """The SVG of an icon in :data:`ICONS`, named with or without ``.svg``."""
    return resource_path(name if name.endswith(".svg") else f"{name}.svg")
