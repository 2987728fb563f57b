"""Write a complete GLM-Image checkpoint with random weights, through the reference classes.

Every weights file is written by the reference library's own ``save_pretrained`` (transformers
``GlmImageForConditionalGeneration`` and ``T5EncoderModel``, diffusers
``GlmImageTransformer2DModel`` and ``AutoencoderKL``), so key names, file names, sharding and
index files are the reference's, not ours: a loader that reads these files reads the release.
The configs come from a preset folder (``glm_image/presets/<name>``) in the checkpoint's layout.

Weights are random but not degenerate: zero-initialised tensors (biases, AdaLN-zero modulation,
output projections) get small random values too, so parity tests see every parameter. One
exception, on purpose: the AR lm_head rows of the special tokens are zero (see
``_quiet_special_tokens``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import CheckpointConfig, read_json
from ..errors import CheckpointError
from .reference import REFERENCE_FACTORIES
from .tokenizer import build_glm_tokenizer

__all__ = ["PRESETS", "make_checkpoint", "preset_dir", "randomize_"]

log = logging.getLogger(__name__)

PRESETS = ("tiny", "wide", "glm-image")
_PRESET_ROOT = Path(__file__).resolve().parent.parent / "presets"
# Release shard counts (vision_language_encoder: 4, transformer: 3); we mimic the sharding.
_SHARDS = {"vision_language_encoder": 4, "transformer": 3}

_Writer = Callable[[Path, Path, torch.Generator, torch.dtype], None]


def preset_dir(name: str | os.PathLike) -> Path:
    """The config folder of a named preset, or ``name`` itself if it is a folder."""
    if str(name) in PRESETS:
        return _PRESET_ROOT / str(name)
    path = Path(name)
    if not (path / "model_index.json").is_file():
        raise CheckpointError(
            f"unknown preset {str(name)!r}; allowed: {', '.join(PRESETS)} or a preset folder"
        )
    return path


@torch.no_grad()
def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every floating parameter deterministic random values of a sane scale.

    Matrices and convolutions: N(0, 1/fan_in). Vectors that were initialised to all ones (norm
    gains): 1 + N(0, 0.1). Other vectors (biases, zero-init scales): N(0, 0.02).
    """
    for _, param in module.named_parameters():
        if not param.is_floating_point():
            continue
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if param.ndim >= 2:
            fan_in = math.prod(param.shape[1:])
            value = noise / math.sqrt(fan_in)
        elif bool(torch.all(param == 1)):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.02 * noise
        param.copy_(value.to(param.dtype))


@torch.no_grad()
def _quiet_special_tokens(model: torch.nn.Module) -> None:
    """Zero the lm_head rows of the non-code tokens (EOS and the other specials).

    A random lm_head samples one of its 128 special tokens every ~100 steps and so cuts most
    grids short, which the released model does not do. A zero logit sits below the nucleus of
    top_p 0.75 (and is never the greedy pick), so the synthetic model, like the released one,
    writes whole grids, and any seed can be compared with the reference.
    """
    codes = model.config.vq_config.num_embeddings
    model.lm_head.weight[codes:] = 0.0


def _shard_size(module: torch.nn.Module, dtype: torch.dtype, shards: int) -> int:
    total = sum(p.numel() for p in module.parameters()) * torch.finfo(dtype).bits // 8
    return max(1, math.ceil(total / shards))


def _save_weights(component: str) -> _Writer:
    """A writer that builds the reference class, randomises it and saves it the reference's way."""

    def write(cfg: Path, out: Path, gen: torch.Generator, dtype: torch.dtype) -> None:
        model = REFERENCE_FACTORIES[component](cfg)
        randomize_(model, gen)
        if component == "vision_language_encoder":
            from transformers import GenerationConfig

            _quiet_special_tokens(model)
            model.generation_config = GenerationConfig.from_pretrained(cfg)
        model.to(dtype)
        kwargs = (
            {"max_shard_size": _shard_size(model, dtype, _SHARDS[component])} if component in _SHARDS else {}
        )
        model.save_pretrained(out, **kwargs)

    return write


def _save_tokenizer(cfg: Path, out: Path, gen: torch.Generator, dtype: torch.dtype) -> None:
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(out)


def _save_processor(cfg: Path, out: Path, gen: torch.Generator, dtype: torch.dtype) -> None:
    from transformers import GlmImageImageProcessorPil, GlmImageProcessor, PreTrainedTokenizerFast

    tokens = read_json(cfg / "tokenizer_config.json")
    ar = read_json(cfg.parent / "vision_language_encoder" / "config.json")
    specials = {int(i): entry["content"] for i, entry in tokens["added_tokens_decoder"].items()}
    specials |= {
        ar[key]: f"<|dit_token_{ar[key]}|>" for key in ("image_start_token_id", "image_end_token_id")
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_glm_tokenizer(
            specials, vision_vocab_size=ar["text_config"]["vision_vocab_size"]
        ),
        bos_token=tokens["bos_token"],
        eos_token=tokens["eos_token"],
        pad_token=tokens["pad_token"],
        padding_side=tokens.get("padding_side", "left"),
        model_max_length=tokens.get("model_max_length", 65536),
        clean_up_tokenization_spaces=False,
        extra_special_tokens={
            key: tokens[key] for key in ("grid_bos_token", "grid_eos_token", "image_token")
        },
    )
    image_keys = ("image_processor_type", "processor_class")
    image_cfg = {k: v for k, v in read_json(cfg / "preprocessor_config.json").items() if k not in image_keys}
    processor = GlmImageProcessor(
        image_processor=GlmImageImageProcessorPil(**image_cfg),
        tokenizer=tokenizer,
        chat_template=(cfg / "chat_template.jinja").read_text(encoding="utf-8"),
    )
    processor.save_pretrained(out)


def _save_scheduler(cfg: Path, out: Path, gen: torch.Generator, dtype: torch.dtype) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler.from_config(
        FlowMatchEulerDiscreteScheduler.load_config(cfg)
    ).save_pretrained(out)


_WRITERS: dict[str, _Writer] = {
    **{component: _save_weights(component) for component in REFERENCE_FACTORIES},
    "tokenizer": _save_tokenizer,
    "processor": _save_processor,
    "scheduler": _save_scheduler,
}


def make_checkpoint(
    out_dir: str | os.PathLike,
    preset: str | os.PathLike = "tiny",
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint for ``preset`` to ``out_dir`` and return its path.

    Deterministic: the same preset, seed and dtype give byte-identical files. ``dtype`` defaults to
    float32 for ``tiny`` (exact parity tests) and bfloat16 otherwise (the release's dtype). The
    folder appears atomically: it is written beside ``out_dir`` and renamed when complete.
    """
    if str(preset) == "glm-image":
        raise CheckpointError(
            "preset 'glm-image' is the released size (9B + 7B): it is for meta-device shape checks, "
            "not for writing random weights; allowed here: tiny, wide"
        )
    cfg_root = preset_dir(preset)
    CheckpointConfig.from_dir(cfg_root)  # fail on a bad preset before writing anything
    dtype = dtype or (torch.float32 if str(preset) == "tiny" else torch.bfloat16)
    out = Path(out_dir)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise CheckpointError(
            f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    with published(out) as tmp:
        for index, (name, write) in enumerate(_WRITERS.items()):
            log.info("writing %s (%s)", name, preset)
            # One generator per component, so changing one component's size leaves the others.
            gen = torch.Generator().manual_seed(seed * 1000 + index)
            write(cfg_root / name, tmp / name, gen, dtype)
        shutil.copyfile(cfg_root / "model_index.json", tmp / "model_index.json")
    return out


@contextmanager
def published(out: Path) -> Iterator[Path]:
    """A private folder beside ``out`` to write a checkpoint into, put in ``out``'s place in one
    rename when the block ends (replacing what was there), removed if the block fails: a reader
    never sees half a checkpoint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint folder is an ordinary folder
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
