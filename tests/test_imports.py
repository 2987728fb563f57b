"""Importing the package, and the command's help, stay light: no torch until a model is used."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_import_glm_image_does_not_import_torch():
    assert "torch" not in _modules_after("import glm_image")


def test_the_command_help_does_not_import_torch():
    code = "from glm_image.cli import build_parser\nbuild_parser().format_help()"
    loaded = _modules_after(code)
    assert "glm_image.cli" in loaded and "torch" not in loaded


def test_a_public_name_loads_on_first_use():
    loaded = _modules_after("import glm_image\nglm_image.GlmImage")
    assert {"torch", "glm_image.pipeline"} <= loaded
