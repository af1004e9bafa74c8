"""The package's layout rules (ARCHITECTURE.md): every command is a module named as users type it, no library module
imports a command module (the arrows point from commands down to the library), the tests mirror the package, and
importing the package changes nothing outside it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
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
    library = [f for f in PACKAGE.rglob("*.py")
               if f"peft_agnews.{f.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}"
               not in COMMAND_MODULES | {"peft_agnews.__init__"}]
    assert len(library) > 10
    offenders = {f.name: sorted(imported_modules(f) & COMMAND_MODULES) for f in library}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


# Test files that test the whole rather than one module, by what they test.
WHOLE_SYSTEM_TESTS = {
    "test_regression": "pinned numbers of the reference recipe",
    "test_equivalence": "process layouts that must train alike",
    "test_configs": "accelerate_configs/ and launch/",
    "test_recipes": "recipes/",
    "test_docs": "the Markdown docs",
    "test_benchmarks": "benchmarks/",
    "test_public_api": "peft_agnews/__init__.py",
    "test_layout": "the package's layout",
    "test_deprecations": "the suite's deprecation rule (pyproject.toml, conftest.py)",
    "test_trainer_options": "the HF Trainer's options, across config, plan and train (docs/trainer-options.md)",
    "test_gpu": "training on a CUDA GPU (benchmarks/gpu_check.sh runs it there)",
}


def test_tests_mirror_the_package():
    """tests/test_<module>.py for peft_agnews/<module>.py, tests/speed/test_<module>.py for peft_agnews/speed/ (its
    entry point, speed/__init__.py, in tests/speed/test_speed.py)."""
    tests = PACKAGE.parent / "tests"
    strays = []
    for file in sorted(tests.rglob("test_*.py")):
        folder = file.parent.relative_to(tests)
        module = file.stem.removeprefix("test_")
        home = PACKAGE / folder / f"{module}.py"
        package = PACKAGE / folder / "__init__.py" if folder.name == module else None
        if not home.is_file() and not (package and package.is_file()) and file.stem not in WHOLE_SYSTEM_TESTS:
            strays.append(str(file.relative_to(tests)))
    assert strays == [], f"these test files test no module of the same name: {strays}"
    assert (tests / "speed" / "test_speed.py").is_file()


def test_importing_the_package_changes_nothing_outside_it():
    """No import-time side effects: importing every module leaves transformers' attention registries, torch's
    threads and default dtype, and the signal handlers as they were."""
    code = """
import importlib, pkgutil, signal
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
def state():
    return (sorted(ALL_ATTENTION_FUNCTIONS.valid_keys()), sorted(ALL_MASK_ATTENTION_FUNCTIONS.valid_keys()),
            torch.get_num_threads(), torch.get_default_dtype(), signal.getsignal(signal.SIGTERM),
            signal.getsignal(signal.SIGINT))
before = state()
import peft_agnews
names = [m.name for m in pkgutil.walk_packages(peft_agnews.__path__, "peft_agnews.")]
for name in names:
    importlib.import_module(name)
assert "peft_agnews.speed.dropout" in names and "peft_agnews.train" in names, names
assert state() == before, (before, state())
print(len(names), "modules")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("modules"), proc.stdout + proc.stderr
