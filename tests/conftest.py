"""Shared fixtures. Nothing here downloads: the hub is forced offline and checkpoints are built."""

from __future__ import annotations

import os

import torch

# No GPU: Triton kernels run in Triton's interpreter on CPU tensors. Triton reads the variable
# when a kernel is defined, so it is set before any test imports glm_image_kernels.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

# Set before transformers / diffusers / huggingface_hub are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path

import pytest

from glm_image.synthetic import make_checkpoint


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep `--model tiny` builds out of the user's real cache."""
    os.environ["GLM_IMAGE_CACHE"] = str(tmp_path_factory.mktemp("glm-image-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset written through the reference classes, fp32, seed 0 (read-only for tests)."""
    return make_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny", "tiny", seed=0)


@pytest.fixture
def tiny_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    import shutil

    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "tiny"))


@pytest.fixture(scope="session")
def cli():
    """Run the installed `glm-image` console script as a user would (the module when not installed)."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("glm-image")
    command = [exe] if exe else [sys.executable, "-m", "glm_image.cli"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *args], capture_output=True, text=True, check=False)

    return run


@pytest.fixture(scope="session")
def reference_pipeline(tiny_checkpoint: Path):
    """diffusers' GlmImagePipeline on the tiny checkpoint: the oracle most tests compare with."""
    from diffusers import GlmImagePipeline

    return GlmImagePipeline.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def glm(tiny_checkpoint: Path):
    """Our GlmImage on the same checkpoint, CPU, float32."""
    from glm_image import GlmImage

    return GlmImage.from_pretrained(tiny_checkpoint, device="cpu")
