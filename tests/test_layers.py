"""The import contract can fail: ``lint-imports`` (run by .ci/run against pyproject.toml's
``[tool.importlinter]`` contracts) passes on a copy of the package and fails on the same copy with
one upward import planted, naming both ends (DESIGN.md section 3: imports point one way)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# a function-level import counts as much as a module-level one: the engine reaching up to the CLI
PLANTED = """

def _planted():
    from ..cli import main

    return main
"""


def _lint(folder: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with this checkout's contracts on the package copied to ``folder``, which
    comes first on the path (the editable install's finder is consulted after it)."""
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run(
        [command, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(folder)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_layers_contract_holds_and_fails_on_a_planted_upward_import(tmp_path):
    package = shutil.copytree(
        ROOT / "glm_image", tmp_path / "glm_image", ignore=shutil.ignore_patterns("__pycache__")
    )
    clean = _lint(tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "Contracts: 2 kept, 0 broken" in clean.stdout, clean.stdout

    with (package / "engine" / "ar_engine.py").open("a") as source:
        source.write(PLANTED)
    planted = _lint(tmp_path)
    assert planted.returncode != 0, planted.stdout
    assert "imports point one way (DESIGN.md section 3) BROKEN" in planted.stdout, planted.stdout
    assert "glm_image.engine.ar_engine -> glm_image.cli" in planted.stdout, planted.stdout
