"""The package's layout rules (ARCHITECTURE.md): every command is a module named as users type it, and no library
module imports a command module (the arrows point from commands down to the library)."""

from __future__ import annotations

import ast
from pathlib import Path

from peft_agnews.cli import COMMANDS

PACKAGE = Path(__file__).resolve().parents[1] / "peft_agnews"
COMMAND_MODULES = {module for module, _ in COMMANDS.values()} | {"peft_agnews.cli"}


def imported_modules(file: Path) -> set[str]:
    """Every peft_agnews module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peft_agnews"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from peft_agnews import train`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("peft_agnews"))
    return found


def test_every_command_is_a_module_named_as_typed():
    for name, (module, _) in COMMANDS.items():
        assert module == f"peft_agnews.{name}", f"`peft-agnews {name}` runs {module}"
        source = (PACKAGE / f"{name}.py").read_text()
        assert 'if __name__ == "__main__":' in source and "def cli(" in source, name


def test_no_library_module_imports_a_command():
    library = [f for f in PACKAGE.glob("*.py") if f"peft_agnews.{f.stem}" not in COMMAND_MODULES | {"peft_agnews.__init__"}]
    assert len(library) > 10
    offenders = {f.name: sorted(imported_modules(f) & COMMAND_MODULES) for f in library}
    assert {name: mods for name, mods in offenders.items() if mods} == {}
