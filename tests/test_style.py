"""The code base stays ruff-clean, ruff-formatted and mypy --strict clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's scripts sit next to its python

CHECKS = {
    "ruff-check": [str(BIN / "ruff"), "check", "src", "tests", "examples", "fuzz"],
    "ruff-format": [str(BIN / "ruff"), "format", "--check", "src", "tests", "examples", "fuzz"],
    "mypy": [str(BIN / "mypy"), "--strict"],  # files and options come from pyproject.toml
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_style(name: str) -> None:
    command = CHECKS[name]
    if not Path(command[0]).exists():
        pytest.fail(f"{command[0]} is missing: install the dev extra (pip install -e '.[dev]')")
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=280, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}"
