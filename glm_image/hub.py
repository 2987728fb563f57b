"""Turn what a user passes as ``--model`` into a checkpoint folder on disk.

- ``"tiny"`` / ``"wide"``: a synthetic checkpoint (random weights, released layout) built once
  and cached under ``$GLM_IMAGE_CACHE`` (default ``~/.cache/glm-image``), so the engine runs
  with nothing downloaded;
- a local folder holding ``model_index.json``;
- a Hugging Face hub id (``zai-org/GLM-Image``): the Hugging Face cache first; a download only
  when the machine is online and ``HF_HUB_OFFLINE`` is not set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from ._version import __version__
from .errors import CheckpointError

__all__ = ["SYNTHETIC_MODELS", "cache_root", "resolve_checkpoint", "synthetic_cache"]

log = logging.getLogger(__name__)

# glm-image-random: the released architecture, weights drawn on the device (glm_image.synthetic.random)
SYNTHETIC_MODELS = ("tiny", "wide", "glm-image-random")


def cache_root() -> Path:
    return Path(os.environ.get("GLM_IMAGE_CACHE") or Path.home() / ".cache" / "glm-image")


def _cache_error(root: Path, error: OSError) -> CheckpointError:
    """One line naming GLM_IMAGE_CACHE (set or not) and what to do about a cache we cannot write."""
    if os.environ.get("GLM_IMAGE_CACHE"):
        what = f"GLM_IMAGE_CACHE = {root}"
    else:
        what = f"the cache folder {root} (GLM_IMAGE_CACHE is not set)"
    return CheckpointError(
        f"{what}: cannot write the synthetic checkpoint there ({error.strerror or error}); set "
        "GLM_IMAGE_CACHE to a writable folder, or write one with `glm-image make-checkpoint DIR` "
        "and pass --model DIR"
    )


def synthetic_cache() -> Path:
    """``$GLM_IMAGE_CACHE/synthetic``, created and checked writable now: a read-only folder, or a
    file where the folder should be, is a ``CheckpointError`` naming GLM_IMAGE_CACHE before any
    work, not a traceback from deep in the checkpoint writer."""
    folder = cache_root() / "synthetic"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".glm-image-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _cache_error(cache_root(), e) from None
    return folder


def _synthetic_key(preset: str, seed: int) -> str:
    """Changes whenever the preset files or the code that writes them change."""
    from .synthetic import checkpoint as writer

    digest = hashlib.sha256(f"{__version__}:{seed}".encode())
    sources = sorted(writer.preset_dir(preset).rglob("*")) + sorted(Path(writer.__file__).parent.glob("*.py"))
    for path in sources:
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return f"{preset}-seed{seed}-{digest.hexdigest()[:12]}"


def _synthetic(preset: str, seed: int) -> Path:
    from .synthetic import make_checkpoint

    key = _synthetic_key(preset, seed)
    path = cache_root() / "synthetic" / key
    if (path / "model_index.json").is_file():  # built before: a read-only cache serves it as it is
        return path
    path = synthetic_cache() / key
    log.info("building the %s checkpoint (random weights) in %s", preset, path)
    try:
        return make_checkpoint(path, preset, seed=seed)
    except CheckpointError:  # an OSError too, but already a message of its own
        raise
    except OSError as e:
        # Another process finished the same build first; its folder is as good as ours.
        if (path / "model_index.json").is_file():
            return path
        raise _cache_error(cache_root(), e) from None  # e.g. the disk filled up during the build


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as cached_error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if not offline:
            log.info("downloading %s from the Hugging Face hub", repo_id)
            try:
                return Path(snapshot_download(repo_id))
            except Exception as e:
                reason = f"download failed ({type(e).__name__})"
        else:
            reason = f"HF_HUB_OFFLINE is set and it is not in the Hugging Face cache ({type(cached_error).__name__})"
    raise CheckpointError(
        f"model {repo_id!r}: {reason}. Pass a local folder instead (--model /path/to/GLM-Image), "
        f"e.g. after `hf download {repo_id} --local-dir /path/to/GLM-Image` on a machine with internet, "
        f"or use --model tiny to run the built-in tiny model."
    )


def resolve_checkpoint(model: str | os.PathLike, *, seed: int = 0) -> Path:
    """The folder of ``model``: a synthetic preset name, a local folder, or a hub id."""
    name = str(model)
    if name == "glm-image-random":
        from .synthetic.random import cached_random_checkpoint

        return cached_random_checkpoint(synthetic_cache(), seed=seed or None)
    if name in SYNTHETIC_MODELS:
        return _synthetic(name, seed)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(
                f"{path} is not a GLM-Image checkpoint folder (no model_index.json); expected the diffusers "
                "layout with vision_language_encoder/, transformer/, text_encoder/, vae/, ..."
            )
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _from_hub(name)
    raise CheckpointError(
        f"model {name!r} not found; allowed: {', '.join(SYNTHETIC_MODELS)}, a local checkpoint folder, "
        "or a Hugging Face id such as zai-org/GLM-Image"
    )
