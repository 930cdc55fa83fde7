"""The installed package type-checks: mypy over funkflow.pipeline and funkflow.tasks, as installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_package_type_checks(tmp_path):
    # mypy does not follow an editable install's import hook: give it the package under its own name.
    package = Path(importlib.util.find_spec("funkflow").submodule_search_locations[0])
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "funkflow").symlink_to(package, target_is_directory=True)
    config = Path(__file__).parents[1] / "pyproject.toml"
    command = [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(tmp_path / "cache"),
               "-p", "funkflow.pipeline", "-p", "funkflow.tasks", "-m", "funkflow"]
    done = subprocess.run(command, cwd=tmp_path / "root", capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
