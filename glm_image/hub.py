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
from pathlib import Path

from ._version import __version__
from .errors import CheckpointError

__all__ = ["SYNTHETIC_MODELS", "cache_root", "resolve_checkpoint"]

log = logging.getLogger(__name__)

SYNTHETIC_MODELS = ("tiny", "wide")


def cache_root() -> Path:
    return Path(os.environ.get("GLM_IMAGE_CACHE") or Path.home() / ".cache" / "glm-image")


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

    path = cache_root() / "synthetic" / _synthetic_key(preset, seed)
    if (path / "model_index.json").is_file():
        return path
    log.info("building the %s checkpoint (random weights) in %s", preset, path)
    try:
        return make_checkpoint(path, preset, seed=seed)
    except OSError:
        # Another process finished the same build first; its folder is as good as ours.
        if (path / "model_index.json").is_file():
            return path
        raise


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
