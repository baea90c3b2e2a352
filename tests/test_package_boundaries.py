"""Package boundaries, checked in fresh interpreters: lab.scenario never imports lab.conformance (the pipeline,
above both, joins them), and the shipped package imports neither pytest nor the peers test helpers."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lab

LAB = Path(lab.__file__).resolve().parent
MODULES = sorted(
    ".".join(("lab", *path.relative_to(LAB).with_suffix("").parts)).removesuffix(".__init__")
    for path in LAB.rglob("*.py")
    if path.name != "__main__.py"
)


def loaded_after(module: str) -> set[str]:
    """The modules a fresh interpreter holds after importing ``module``."""
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(LAB.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("lab.scenario")])
def test_scenario_does_not_import_conformance(module: str) -> None:
    assert not {m for m in loaded_after(module) if m.startswith("lab.conformance")}


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("lab.conformance")])
def test_conformance_imports_on_its_own(module: str) -> None:
    """Each conformance module imports first in a fresh interpreter (no cycle through lab.scenario)."""
    assert module in loaded_after(module)


def test_the_package_needs_neither_pytest_nor_the_peers() -> None:
    everything = [m for m in MODULES if m != "lab.pytest_plugin"]
    loaded = loaded_after(", ".join(everything))
    assert not {m for m in loaded if m == "pytest" or m.startswith(("_pytest", "peers", "scapy"))}


def imported_names(path: Path) -> set[str]:
    """Every module an ``import`` statement of ``path`` names, at any depth (a deferred import counts too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_import_of_conformance_anywhere_in_scenario() -> None:
    """Not even a deferred one: lab.scenario is below lab.conformance (docs/architecture.md)."""
    offending = {
        str(path.relative_to(LAB.parent)): sorted(n for n in imported_names(path) if n.startswith("lab.conformance"))
        for path in (LAB / "scenario").rglob("*.py")
    }
    assert {k: v for k, v in offending.items() if v} == {}
