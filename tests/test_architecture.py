"""The packages keep their layers: read from the imports, so the rule survives the next contributor.

README's "Layout" paragraph says the same in words: each package imports only the packages below it, and Qt only
where widgets and signals live.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "session_manager"
LEAVES = {"__init__", "__version__", "errors", "files", "keychain", "paths", "ratelimit", "resources", "rfb", "units"}
# What each part may import of session_manager, besides itself and the leaves.
ALLOWED: dict[str, set[str]] = {
    "leaf": set(),
    "store": set(),
    "vm": set(),
    "guests": set(),
    "local": {"store", "vm"},
    "net": {"store", "vm", "local"},
    "services": {"store", "vm", "local", "net"},
    "ui": {"services"},  # widgets: never QEMU, the store, the engine or other machines (but see RECORDS)
    "entry": {"store", "vm", "guests", "local", "net", "services", "ui"},  # cli.py, app.py
}
# Plain records a widget shows or edits, which ui/ may import by name from a lower layer.
RECORDS = {"session_manager.store.repo.CheckpointInfo", "session_manager.local.settings.Settings"}
QT = ("PySide6", "shiboken6", "qasync")
QT_ALLOWED = {"services", "ui", "entry"}


def part_of(module: str) -> str:
    """The part of ``session_manager.a.b`` (or of a module path relative to the package)."""
    if module == "session_manager":
        return "leaf"
    top = module.split(".")[1] if module.startswith("session_manager.") else module.split(".")[0]
    if top in LEAVES:
        return "leaf"
    if top in ("cli", "app", "__main__"):
        return "entry"
    return top


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """What ``path`` imports, absolute (relative imports resolved), at any depth of the file: ``module`` for
    ``import module``, ``module.name`` for ``from module import name`` (a submodule or a name in it)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
                found |= {f"{prefix}.{alias.name}" for alias in node.names}
            elif node.module:
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_known_part() -> None:
    unknown = {module_name(p) for p in SOURCES if part_of(module_name(p)) not in ALLOWED}
    assert not unknown, f"add these to a part in tests/test_architecture.py and README's Layout: {sorted(unknown)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path: Path) -> None:
    part = part_of(module_name(path))
    allowed = ALLOWED[part] | {part, "leaf"}
    ours = {m for m in imports(path) if m.startswith("session_manager.")}
    upward = sorted(m for m in ours if part_of(m) not in allowed and not (part == "ui" and m in RECORDS))
    assert not upward, f"{part} may not import {upward}"
    qt = sorted(m for m in imports(path) if m.split(".")[0] in QT)
    assert part in QT_ALLOWED or not qt, f"{part} may not import Qt ({qt})"


def test_the_checker_resolves_relative_imports() -> None:
    """So that a pass above means something: ``from ..vm.machine import Machine`` in local/engine.py is read as
    session_manager.vm.machine, which ui/ may not import."""
    found = imports(PACKAGE / "local" / "engine.py")
    assert "session_manager.vm.machine.Machine" in found
    assert part_of("session_manager.vm.machine.Machine") == "vm" and "vm" not in ALLOWED["ui"]
