"""What the desktop sees: valid .desktop and AppStream files, icons that render, resources in the wheel.

Needs the Debian packages desktop-file-utils (desktop-file-validate) and appstream (appstreamcli).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from configparser import ConfigParser
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage, QPainter
from PySide6.QtSvg import QSvgRenderer

from helpers import ROOT
from session_manager import __version__
from session_manager.resources import (
    APP_ICON,
    APP_ID,
    DESKTOP_FILE,
    ICONS,
    TRAY_ICONS,
    icon_path,
    resource_path,
)

METAINFO = ROOT / "packaging" / f"{APP_ID}.metainfo.xml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing; install the Debian package {package} (apt-get install {package}).")
    return path


def run(*argv: str) -> None:
    p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}{p.stderr}"


def test_desktop_file_is_valid() -> None:
    run(tool("desktop-file-validate", "desktop-file-utils"), str(resource_path(DESKTOP_FILE)))


def test_metainfo_is_valid() -> None:
    run(tool("appstreamcli", "appstream"), "validate", "--no-net", str(METAINFO))


def test_metainfo_desktop_file_and_package_agree() -> None:
    component = ET.parse(METAINFO).getroot()
    assert component.findtext("id") == APP_ID
    assert component.findtext("launchable[@type='desktop-id']") == DESKTOP_FILE
    assert component.findtext("icon[@type='stock']") == APP_ICON
    assert component.findtext("provides/binary") in PYPROJECT["project"]["scripts"]
    assert component.findtext("project_license") == PYPROJECT["project"]["license"]
    assert component.find("releases/release").get("version") == __version__ == PYPROJECT["project"]["version"]
    desktop = ConfigParser(interpolation=None)
    desktop.optionxform = str  # type: ignore[assignment,method-assign]
    desktop.read(resource_path(DESKTOP_FILE))
    entry = desktop["Desktop Entry"]
    assert entry["Icon"] == APP_ICON
    assert entry["Exec"].split()[0] in PYPROJECT["project"]["scripts"]


def test_every_icon_is_found_and_nothing_else_is_shipped() -> None:
    for name in ICONS:
        assert icon_path(name).is_file()
        assert icon_path(f"{name}.svg") == icon_path(name)
    assert sorted(p.stem for p in (ROOT / "resources").glob("*.svg")) == sorted(ICONS)


def render(name: str, size: int) -> QImage:
    renderer = QSvgRenderer(str(icon_path(name)))
    assert renderer.isValid(), name
    image = QImage(size, size, QImage.Format.Format_RGBA8888)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    renderer.render(painter)
    painter.end()
    return image


@pytest.mark.parametrize("size", [16, 22, 32, 256])
def test_icons_render_at_tray_and_app_sizes(qapp, size: int) -> None:
    images = {}
    for name in ICONS:
        pixels = bytes(render(name, size).constBits())
        opaque = sum(1 for a in pixels[3::4] if a > 128)
        assert opaque > size * size // 2, f"{name} at {size} px covers only {opaque} pixels"
        images[name] = pixels
    assert len({images[n] for n in TRAY_ICONS}) == len(TRAY_ICONS)  # every state looks different


def test_every_python_package_is_listed_in_pyproject() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "session_manager").rglob("__init__.py")}
    assert found <= listed, (f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml, "
                             "or they are left out of the installed package")


def test_an_installed_wheel_finds_its_resources(tmp_path: Path) -> None:
    """A normal (non-editable) install carries resources/ inside the package and finds it there."""
    src = tmp_path / "src"
    for name in ("session_manager", "resources"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    site = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
        "--target", str(site), str(src))
    probe = ("import json, sys; sys.path.insert(0, sys.argv[1]); from session_manager import resources as r; "
             "print(json.dumps([str(r.icon_path(n)) for n in r.ICONS] + [str(r.resource_path(r.DESKTOP_FILE))]))")
    p = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True, cwd=tmp_path,
                       check=True, timeout=60)
    found = [Path(f) for f in json.loads(p.stdout)]
    assert all(f.parent == site / "session_manager" / "_resources" and f.is_file() for f in found), found
    def modules(root: Path) -> set[str]:
        return {m.relative_to(root).as_posix() for m in (root / "session_manager").rglob("*.py")}

    assert modules(site) == modules(src)


@pytest.mark.parametrize(("unit_name", "command"), [("session-manager.service", "daemon"),
                                                     ("session-manager-agent.service", "serve")])
def test_systemd_user_unit_is_valid(tmp_path: Path, unit_name: str, command: str) -> None:
    """systemd accepts the daemon's and the host agent's units, with the command where their comment says
    (~/.local/bin)."""
    unit = ROOT / "packaging" / unit_name
    home, runtime = tmp_path / "home", tmp_path / "run"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "session-manager").symlink_to(sys.executable)
    runtime.mkdir(mode=0o700)
    p = subprocess.run([tool("systemd-analyze", "systemd"), "verify", "--user", str(unit)], capture_output=True,
                       text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(home),
                                                   "XDG_RUNTIME_DIR": str(runtime)})
    assert p.returncode == 0 and unit.name not in p.stderr, p.stderr
    service = ConfigParser(interpolation=None, strict=False)
    service.read(unit)
    assert service["Service"]["ExecStart"].split()[1:] == [command]
    assert service["Service"]["KillMode"] == "process"  # the QEMU processes it starts outlive it
