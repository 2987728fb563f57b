"""``glm-image-random``: the released architecture with random weights drawn from a seed on the
device, with no weights written to disk (16B parameters would take minutes to write and read).

The model is a folder like any checkpoint (configs, the processor with a tokenizer of the
released vocabulary size, the ByT5 tokenizer, the scheduler: a few MB, cached once), except that
each weighted component folder holds ``drawn_weights.json`` instead of safetensors files.
``glm_image.weights`` sees that file and, instead of reading a tensor, draws it here
(``draw_tensor``) directly on the device it loads to. So every engine (ours, the server, the
bench, a tensor-parallel rank) loads it through the ordinary strict loader, quantization included.

The tensors a folder declares are exactly those the reference classes save (built on ``meta``
from the folder's configs; a tied alias once), under the reference's names. Each tensor is drawn
from its own generator, seeded by (seed, component, name), so its values do not depend on which
other tensors are loaded, in what order, or by whom: ``reference_module`` gives transformers' and
diffusers' classes the very same tensors (``reference_pipeline`` builds diffusers'
``GlmImagePipeline`` from them). Values are deterministic per seed and device type (CUDA's
generator draws other numbers than the CPU's).

The draw keeps activations finite through 40 AR layers and 30 DiT blocks x 50 steps: norm gains
exactly 1, matrices N(0, 1/fan_in) (unit-variance outputs for unit-variance inputs), other
vectors (biases, zero-initialised scales) N(0, 0.02). ``layers`` overrides every stack's depth
(AR decoder, ViT, DiT, ByT5 encoder) for runs at the released widths on a small machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import CheckpointConfig, read_json
from ..errors import CheckpointError
from ..weights import TensorInfo
from .reference import REFERENCE_FACTORIES

__all__ = [
    "DRAWN_WEIGHTS",
    "RANDOM_MODEL",
    "cached_random_checkpoint",
    "draw_tensor",
    "drawn_index",
    "make_random_checkpoint",
    "reference_module",
    "reference_pipeline",
]

RANDOM_MODEL = "glm-image-random"
DRAWN_WEIGHTS = "drawn_weights.json"
# the environment variables ``--model glm-image-random`` reads (the bench passes them as arguments)
LAYERS_ENV, SEED_ENV = "GLM_IMAGE_RANDOM_LAYERS", "GLM_IMAGE_RANDOM_SEED"
DRY_RUN_MIN_SIDE = 128  # the smallest side a ``layers``-capped model takes
_FORMAT = 2  # bump when the draw changes: cached folders then get a new name
_DTYPE = "BF16"  # the release's dtype; a load casts to the dtype it is asked for

# component -> (config keys path, stack depth key) for ``layers``
_DEPTHS = {
    "vision_language_encoder": (("text_config", "num_hidden_layers"), ("vision_config", "depth")),
    "transformer": (("num_layers",),),
    "text_encoder": (("num_layers",),),
}


def _set_depth(config: dict, component: str, layers: int) -> dict:
    for path in _DEPTHS.get(component, ()):
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = min(layers, node[path[-1]])
    return config


def make_random_checkpoint(
    out_dir: str | os.PathLike, preset: str = "glm-image", *, seed: int = 0, layers: int | None = None
) -> Path:
    """Write the folder of a drawn-weights model of ``preset``'s configs (``layers``: every stack at
    most that deep) to ``out_dir``, atomically, and return it. No weights are written."""
    from .checkpoint import _WRITERS, preset_dir, published

    if layers is not None and layers < 1:
        raise CheckpointError(f"layers must be at least 1, got {layers}")
    cfg_root = preset_dir(preset)
    out = Path(out_dir)
    with published(out) as tmp:
        shutil.copytree(cfg_root, tmp, dirs_exist_ok=True)
        for component in REFERENCE_FACTORIES:
            config_file = tmp / component / "config.json"
            if layers is not None:
                config = _set_depth(read_json(config_file), component, layers)
                config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            marker = {"format": _FORMAT, "seed": seed, "component": component, "dtype": _DTYPE}
            (tmp / component / DRAWN_WEIGHTS).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        for name in ("tokenizer", "processor", "scheduler"):
            _WRITERS[name](cfg_root / name, tmp / name, torch.Generator(), torch.bfloat16)
        if layers is not None:
            # A shallower model is a dry run (a CPU checking a GPU script): it also takes sides
            # from 128 pixels (the release: 512), so one can run in seconds. The widths, the
            # vocabulary and every other rule stay the release's.
            processor = tmp / "processor" / "preprocessor_config.json"
            config = read_json(processor)
            config["min_pixels"] = min(config["min_pixels"], DRY_RUN_MIN_SIDE**2)
            processor.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        CheckpointConfig.from_dir(tmp)  # a bad override fails here, before anything is cached
    return out


def _positive_env(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or (name == LAYERS_ENV and int(text) < 1):
        raise CheckpointError(
            f"{name}={text!r}: expected a {'positive' if name == LAYERS_ENV else 'whole'} number"
        )
    return int(text)


def cached_random_checkpoint(
    cache: Path, *, seed: int | None = None, layers: int | None = None, preset: str = "glm-image"
) -> Path:
    """The folder of ``glm-image-random`` under ``cache``, written once. ``seed`` and ``layers``
    default to $GLM_IMAGE_RANDOM_SEED (else 0) and $GLM_IMAGE_RANDOM_LAYERS (else the released
    depths), so ``--model glm-image-random`` can be shrunk for a dry run on a small machine."""
    from .checkpoint import preset_dir

    seed = seed if seed is not None else (_positive_env(SEED_ENV) or 0)
    layers = layers if layers is not None else _positive_env(LAYERS_ENV)
    digest = hashlib.sha256(f"{_FORMAT}:{seed}:{layers}".encode())
    for path in sorted(preset_dir(preset).rglob("*")) + sorted(Path(__file__).parent.glob("*.py")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    depth = f"layers{layers}" if layers else "released"
    path = cache / f"{RANDOM_MODEL}-{preset}-seed{seed}-{depth}-{digest.hexdigest()[:12]}"
    if (path / "model_index.json").is_file():
        return path
    try:
        return make_random_checkpoint(path, preset, seed=seed, layers=layers)
    except OSError:
        if (path / "model_index.json").is_file():  # another process finished the same folder first
            return path
        raise


def _marker(folder: Path) -> dict:
    try:
        marker = json.loads((folder / DRAWN_WEIGHTS).read_text(encoding="utf-8"))
        if marker["format"] != _FORMAT or marker["component"] not in REFERENCE_FACTORIES:
            raise ValueError(f"format {marker['format']}, component {marker['component']!r}")
        int(marker["seed"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{folder / DRAWN_WEIGHTS}: not a drawn-weights marker this version reads ({e})"
        ) from None
    return marker


def drawn_index(folder: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of the component in ``folder`` as the reference class saves it (names and
    shapes from the class built on ``meta``; a tied alias once), each "stored" in the marker."""
    from ..weights import build_on_meta

    folder = Path(folder)
    marker = _marker(folder)
    module = build_on_meta(lambda: REFERENCE_FACTORIES[marker["component"]](folder))
    seen: set[int] = set()
    tensors = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tensors[name] = TensorInfo(name, folder / DRAWN_WEIGHTS, _DTYPE, tuple(tensor.shape))
    return tensors


def _tensor_seed(seed: int, component: str, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{component}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _is_norm_gain(name: str, shape: tuple[int, ...]) -> bool:
    """RMSNorm / LayerNorm / GroupNorm gains, by the reference's names (``input_layernorm.weight``,
    ``norm1.weight``, ``final_layer_norm.weight``, ``conv_norm_out.weight``, ...)."""
    parts = name.split(".")
    return len(shape) == 1 and parts[-1] == "weight" and "norm" in parts[-2]


@torch.no_grad()
def draw_tensor(info: TensorInfo, device: torch.device | str = "cpu") -> torch.Tensor:
    """The values of ``info`` (a tensor of ``drawn_index``), drawn on ``device`` in bfloat16."""
    marker = _marker(info.file.parent)
    device = torch.device(device)
    shape = info.shape
    if _is_norm_gain(info.name, shape):
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    generator = torch.Generator(device=device).manual_seed(
        _tensor_seed(marker["seed"], marker["component"], info.name)
    )
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
    scale = 1.0 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.02
    return noise.mul_(scale).to(torch.bfloat16)


@contextmanager
def _parameters_on_meta():
    """Build a module with its parameters on ``meta`` (no memory, no random init) and its buffers
    real: the rotary tables are non-persistent buffers the class computes when built, in no state
    dict."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def reference_module(
    root: str | os.PathLike,
    component: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """The reference class of ``component`` (transformers / diffusers) holding the drawn tensors:
    built with its parameters on ``meta``, every state-dict key (tied aliases too) assigned the
    tensor of its name, then moved to ``device`` (its computed buffers with it)."""
    folder = Path(root) / component
    index = drawn_index(folder)
    with _parameters_on_meta():
        module = REFERENCE_FACTORIES[component](folder)
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # the aliases (T5's shared embedding) one tensor again, as on meta
    owner: dict[int, str] = {}
    state = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        source = owner.setdefault(id(tensor), name)
        if source not in state:
            drawn = draw_tensor(index[source], device)
            state[source] = drawn.to(dtype) if dtype is not None else drawn
        state[name] = state[source]
    module.load_state_dict(state, strict=True, assign=True)
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # assign=True gives each alias its own Parameter; tie them back
    return module.to(device).eval()


def reference_pipeline(root: str | os.PathLike, *, device: torch.device | str, dtype: torch.dtype):
    """diffusers' ``GlmImagePipeline`` on the drawn tensors of ``root`` (the same as ours loads)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline
    from transformers import ByT5Tokenizer, GenerationConfig, GlmImageProcessor

    root = Path(root)
    vle = reference_module(root, "vision_language_encoder", device=device, dtype=dtype)
    vle.generation_config = GenerationConfig.from_pretrained(root / "vision_language_encoder")
    return GlmImagePipeline(
        tokenizer=ByT5Tokenizer.from_pretrained(root / "tokenizer"),
        processor=GlmImageProcessor.from_pretrained(root / "processor"),
        text_encoder=reference_module(root, "text_encoder", device=device, dtype=dtype),
        vision_language_encoder=vle,
        vae=reference_module(root, "vae", device=device, dtype=dtype),
        transformer=reference_module(root, "transformer", device=device, dtype=dtype),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
    )
