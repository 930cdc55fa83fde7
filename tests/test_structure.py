"""The package's floors: each sub-package of ``pipeline/`` imports only the floors below it, and ``tasks/``
(what runs on the workers) imports neither ``pipeline/`` nor Dask. Read from the source, every import
counted, the ones inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FLOORS = ["core", "data", "training", "serving", "app"]  # lowest first


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _floor_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["funkflow", "pipeline"] and len(parts) > 2 else None


def test_the_floors_are_the_sub_packages_of_pipeline():
    assert sorted(p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").is_file()) == sorted(FLOORS)


@pytest.mark.parametrize("floor", FLOORS)
def test_a_floor_imports_only_the_floors_below_it(floor):
    below = set(FLOORS[:FLOORS.index(floor) + 1])
    upward = {f"{path.relative_to(ROOT)} imports {module}"
              for path in sorted((ROOT / "pipeline" / floor).glob("*.py"))
              for module in _imports(path) if (_floor_of(module) or floor) not in below}
    assert not upward


def test_tasks_import_neither_pipeline_nor_dask():
    reached = {f"{path.relative_to(ROOT)} imports {module}" for path in sorted((ROOT / "tasks").glob("*.py"))
               for module in _imports(path)
               if module.split(".")[0] in ("dask", "distributed") or module.startswith("funkflow.pipeline")}
    assert not reached
