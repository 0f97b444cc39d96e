"""Files in (issue #14): `copy-in` (and a drop on the session window) puts files into the desktop session's
Downloads, byte for byte, the account's, never over a file already there and never anywhere else."""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
from pathlib import Path

import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent

from helpers.aio import until
from helpers.cli import Sm, one_sentence
from helpers.desktop import USER, Desktop
from session_manager.app import App
from session_manager.errors import UsageError
from session_manager.local.downloads import MAX_NAME, safe_name
from session_manager.local.engine import Engine
from session_manager.local.settings import Settings
from session_manager.paths import Home

DOWNLOADS = f"/home/{USER}/Downloads"


# -- names -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "a/b", "/etc/passwd", "nul\0byte"])
def test_a_name_that_would_leave_downloads_is_refused(name: str) -> None:
    with pytest.raises(UsageError, match="cannot be a file name in Downloads"):
        safe_name(name)


@pytest.mark.parametrize(("name", "safe"), [
    ("report.pdf", "report.pdf"),
    (".bashrc", ".bashrc"),
    ("..hidden", "..hidden"),
    ("line\nbreak\x7f.txt", "line_break_.txt"),
    ("caf\udcc3\udca9.txt", "café.txt"),  # UTF-8 bytes as os.fsdecode gives them: the same name
    ("bad\udcff.txt", "bad\ufffd.txt"),  # bytes that are not UTF-8
])
def test_names_are_kept_printable(name: str, safe: str) -> None:
    assert safe_name(name) == safe


def test_a_long_name_is_cut_keeping_its_extension() -> None:
    cut = safe_name("é" * 300 + ".tar.gz")
    assert cut.endswith(".tar.gz") and len(cut.encode()) <= MAX_NAME and cut.startswith("éé")
    cut = safe_name("x" * 300 + "." + "y" * 40)  # no extension that long: only cut
    assert len(cut.encode()) == MAX_NAME and set(cut) == {"x"}


# -- the real desktop ------------------------------------------------------------------------------------------------

def sha256_in_guest(desktop: Desktop, name: str) -> str:
    return desktop.out(f"sha256sum {shlex.quote(f'{DOWNLOADS}/{name}')}", user=False).split()[0]


@pytest.mark.qemu
@pytest.mark.desktop
def test_a_file_copied_in_appears_in_downloads_and_a_second_of_its_name_does_not_overwrite_it(
        desktop: Desktop, tmp_path: Path) -> None:
    name = f"holiday {secrets.token_hex(4)}.tar.gz"
    first, second = tmp_path / "first" / name, tmp_path / "second" / name
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(os.urandom(3 << 20))  # several of the agent's chunks
    assert desktop.sm("copy-in", desktop.name, str(first), "--json").json() == [{"file": str(first), "name": name}]
    assert sha256_in_guest(desktop, name) == hashlib.sha256(first.read_bytes()).hexdigest()
    assert desktop.out(f"stat -c %U:%G:%a {shlex.quote(f'{DOWNLOADS}/{name}')}", user=False).strip() == \
        f"{USER}:{USER}:644"

    run = desktop.sm("copy-in", desktop.name, str(second))
    renamed = name.replace(".tar.gz", " (2).tar.gz")
    assert f"into Downloads as {renamed!r}" in run.stdout
    assert sha256_in_guest(desktop, name) == hashlib.sha256(first.read_bytes()).hexdigest()
    assert sha256_in_guest(desktop, renamed) == hashlib.sha256(second.read_bytes()).hexdigest()
    # no half-copied file is left behind
    assert ".session-manager-" not in desktop.out(f"ls -A {DOWNLOADS}", user=False)


@pytest.mark.qemu
@pytest.mark.desktop
def test_copy_in_refuses_a_bad_name_a_missing_file_and_a_folder_in_one_sentence(
        desktop: Desktop, tmp_path: Path) -> None:
    source = tmp_path / "note.txt"
    source.write_text("hello")
    for bad in ("../escape", "sub/dir", ".."):
        one_sentence(desktop.sm("copy-in", desktop.name, str(source), "--as", bad, check=False),
                     "cannot be a file name in Downloads")
    listed = desktop.out(f"ls -A / /home /home/{USER} {DOWNLOADS}", user=False).split()
    assert not {"escape", "sub", "dir", "note.txt"} & set(listed)
    one_sentence(desktop.sm("copy-in", desktop.name, str(tmp_path / "missing.txt"), check=False),
                 "missing.txt cannot be read (No such file or directory)")
    one_sentence(desktop.sm("copy-in", desktop.name, str(tmp_path), check=False), "is a folder")


@pytest.mark.qemu
@pytest.mark.desktop
def test_copy_in_needs_a_running_desktop_session(sm: Sm, guest: tuple[Path, Path], tmp_path: Path) -> None:
    source = tmp_path / "note.txt"
    source.write_text("hello")
    sm.new_guest("small", guest)
    one_sentence(sm("copy-in", "small", str(source), check=False), "is not a desktop session")
    stopped = Desktop(sm, "stopped").create(memory="1G")
    one_sentence(sm("copy-in", stopped.name, str(source), check=False), "is not running; start it first")


@pytest.mark.qemu
@pytest.mark.desktop
def test_files_dropped_on_the_session_window_go_into_downloads(desktop: Desktop, aloop, qtbot,
                                                                tmp_path: Path) -> None:
    files = [tmp_path / f"dropped {secrets.token_hex(4)}.txt", tmp_path / f"photo {secrets.token_hex(4)}.jpg"]
    for path in files:
        path.write_bytes(os.urandom(100_000))
    app = App(Engine(Home.locate(desktop.sm.home)), desktop.name, Settings())
    window, service = app.window, app.service
    qtbot.addWidget(window)
    qtbot.addWidget(app.timeline)
    window.show()
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path)) for path in files])
    where = (QPointF(300, 300), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
             Qt.KeyboardModifier.NoModifier)
    enter = QDragEnterEvent(QPoint(300, 300), *where[1:])
    window.dragEnterEvent(enter)
    assert enter.isAccepted()

    async def scenario() -> None:
        with qtbot.waitSignal(service.info, timeout=120_000) as copied:
            window.dropEvent(QDropEvent(*where))
            await until(lambda: copied.signal_triggered, "the copy", 120)
        assert window.statusBar().currentMessage() == f"Copied into Downloads: {files[0].name}, {files[1].name}."
        await until(lambda: not service.busy, "the copy finishing", 30)

    aloop.run_until_complete(scenario())
    aloop.run_until_complete(app.close())
    for path in files:
        assert sha256_in_guest(desktop, path.name) == hashlib.sha256(path.read_bytes()).hexdigest()
