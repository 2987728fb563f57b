"""Shared fixtures. Nothing here downloads: the hub is forced offline and checkpoints are built.

The suite runs in two worker processes (pytest-xdist): ``python -m pytest -q -n 2 --dist loadfile``
(.ci/run). Each test file stays on one worker, so a module-scoped fixture (a server, a rank group)
starts once; tests must not depend on the order of files or on a file that ran before them.
A worker gives torch one thread per core it owns (two workers on two cores: one each), so
the workers do not fight over the cores; rank and CLI processes the tests start inherit that.

Session fixtures (built once per worker process; use them instead of loading your own):

- ``tiny_checkpoint``: Path of the tiny preset, fp32, seed 0, written through the reference
  classes. Read-only: a test that damages files takes ``tiny_copy`` (a private copy) instead.
  It is the very folder ``--model tiny`` resolves to in the tests' private cache, so CLI runs
  with ``--model tiny`` or ``--model <tiny_checkpoint>`` build nothing.
- ``glm``: our ``GlmImage`` on it (CPU, float32) for read-only use. A test that changes an
  attribute restores it (``monkeypatch.setattr``) before it ends.
- ``tiny_ar`` / ``tiny_dit``: an ``ArEngine`` / ``DitEngine`` on it (CPU, float32, the default
  options), read-only like ``glm``.
- ``reference_pipeline``: diffusers' ``GlmImagePipeline`` on it, the oracle; read-only.
- ``cli``: runs the ``glm-image`` command in a subprocess, as a user would.
- ``warm_path``: a PATH whose ``python`` / ``python3`` are this interpreter, each command forked
  from a server that imported torch, transformers and diffusers once (``warm_python.py``): for
  scripts that call ``python3`` many times (``benchmarks/gpu_run.sh``'s dry runs).
"""

from __future__ import annotations

import os

# Before torch is imported: the workers split the cores between them (see above).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

import torch

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep `--model tiny` builds out of the user's real cache."""
    os.environ["GLM_IMAGE_CACHE"] = str(tmp_path_factory.mktemp("glm-image-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(_private_cache: None) -> Path:
    """The tiny preset written through the reference classes, fp32, seed 0 (read-only for tests):
    built where ``--model tiny`` finds it (``hub.resolve_checkpoint``), so it is built once."""
    from glm_image.hub import resolve_checkpoint

    return resolve_checkpoint("tiny", seed=0)


@pytest.fixture
def tiny_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    import shutil

    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "tiny"))


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory):
    """Run a ``glm-image`` command in a process of its own, as a user would: ``cli(*args)`` gives a
    ``subprocess.CompletedProcess`` (returncode, stdout, stderr as text). The process is forked
    from a server that imported torch, transformers and diffusers once (``cli_server.py``), which
    saves about 6 s of CPU a command; the environment, working folder and exit status are the
    test's and the command's own."""
    import json
    import subprocess
    import sys
    import threading

    folder = tmp_path_factory.mktemp("cli")
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("cli_server.py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(folder / "server.log", "wb"),  # noqa: SIM115 (the server's lifetime)
        text=True,
    )
    lock, count = threading.Lock(), iter(range(1 << 30))

    def run(*args: str) -> subprocess.CompletedProcess:
        with lock:
            n = next(count)
            out, err = folder / f"{n}.out", folder / f"{n}.err"
            request = {"argv": list(args), "env": dict(os.environ), "cwd": os.getcwd()}
            server.stdin.write(json.dumps({**request, "out": str(out), "err": str(err)}) + "\n")
            server.stdin.flush()
            answer = server.stdout.readline()
            assert answer, "the cli server died: " + (folder / "server.log").read_text()[-3000:]
            text = {path: path.read_bytes().decode(errors="replace") for path in (out, err)}
            out.unlink(), err.unlink()
        return subprocess.CompletedProcess(["glm-image", *args], int(answer), text[out], text[err])

    yield run
    server.stdin.close()
    server.wait(timeout=60)


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


@pytest.fixture(scope="session")
def tiny_ar(tiny_checkpoint: Path):
    """An ``ArEngine`` on the tiny checkpoint (CPU, float32, default options), read-only."""
    from glm_image.engine import ArEngine

    return ArEngine.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_dit(tiny_checkpoint: Path):
    """A ``DitEngine`` on the tiny checkpoint (CPU, float32, default options), read-only."""
    from glm_image.engine import DitEngine

    return DitEngine.from_pretrained(tiny_checkpoint)


@pytest.fixture
def gpu_run(warm_path):
    """``gpu_run(out, stages, timeout=..., **env)``: ``benchmarks/gpu_run.sh OUT STAGES`` as a dry
    run on the CPU (``GPU_RUN_DEVICE=cpu`` and the ``GPU_RUN_*`` settings given), each ``python3``
    it calls forked warm (``warm_path``); the ``subprocess.CompletedProcess``, output captured.
    What a GPU session runs, so a typo in the script fails here rather than on a lent GPU."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_run.sh"

    def run(out: Path, stages: str, *, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
        environ = {**os.environ, "PATH": warm_path, "GPU_RUN_DEVICE": "cpu", **env}
        return subprocess.run(
            ["bash", str(script), str(out), stages],
            env=environ,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture(scope="session")
def warm_path(tmp_path_factory):
    """PATH with a warm ``python`` / ``python3`` first (see the module docstring), then this
    interpreter's folder (a virtual environment's scripts), then the rest."""
    import sys

    from warm_python import warm_bin

    rest = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with warm_bin(tmp_path_factory.mktemp("warm-bin"), {**os.environ, "PATH": rest}) as bin_dir:
        yield f"{bin_dir}{os.pathsep}{rest}"
