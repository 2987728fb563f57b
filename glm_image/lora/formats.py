"""Reading LoRA adapters from disk: PEFT folders and diffusers-style safetensors files.

No PEFT at run time: the two files PEFT's ``save_pretrained`` writes are read here directly.

- PEFT: a folder with ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``,
  ``rank_pattern``, ``alpha_pattern``, ``base_model_name_or_path``) and
  ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight`` /
  ``.lora_B.weight`` (PEFT drops the adapter's name when it saves).
- diffusers: one ``.safetensors`` file as ``save_lora_weights`` writes it, keys
  ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` (its LoraConfig, when saved, in the
  header's ``lora_adapter_metadata``), or the older ``<module>.lora.down.weight`` /
  ``.lora.up.weight`` with an optional ``<module>.alpha`` (scaling ``alpha / r``; none: 1).
- A folder holding ``vision_language_encoder/`` and/or ``transformer/`` subfolders (each one of
  the above): an adapter for both stages at once.

Each module's scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA, per PEFT's patterns) is
folded into its B here, so everything after reads ``delta W = B @ A``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import GlmImageError

__all__ = ["Adapter", "LoraError", "ModuleLora", "read_adapters"]

STAGES = ("ar", "dit")
# subfolders of a two-stage adapter folder, named like the checkpoint's
_STAGE_FOLDERS = {"ar": "vision_language_encoder", "dit": "transformer"}
# PEFT records the class it wrapped; these are GLM-Image's AR and DiT
_BASE_CLASSES = {"GlmImageForConditionalGeneration", "GlmImageTransformer2DModel"}
_PREFIXES = ("base_model.model.", "transformer.", "unet.")
# (A suffix, B suffix) of the naming conventions read
_NAMINGS = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
)


class LoraError(GlmImageError, ValueError):
    """An adapter that cannot be read or does not fit the model it is given to."""


@dataclass(frozen=True)
class ModuleLora:
    """One module's low-rank update: ``delta W = b @ a`` (scaling folded into ``b``)."""

    a: torch.Tensor  # (r, in_features)
    b: torch.Tensor  # (out_features, r), times lora_alpha / r

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Adapter:
    """One stage's adapter: the checkpoint's module names (``model.language_model.layers.0.
    self_attn.q_proj``, ``transformer_blocks.0.attn1.to_q``) -> their update."""

    stage: str  # "ar" | "dit"
    source: str
    modules: dict[str, ModuleLora]
    base_model: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}


def _stage_of(names: list[str], source: str) -> str:
    if all(n.startswith("model.") for n in names):
        return "ar"
    if all(not n.startswith("model.") for n in names):
        return "dit"
    raise LoraError(f"lora {source}: its modules mix the AR's ('model.') and the DiT's; split the adapter")


def _pattern_value(name: str, patterns: dict, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module whose name ends with it
    (after a '.') or matches it as a regular expression."""
    for key, value in (patterns or {}).items():
        if name == key or name.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def _scaling(name: str, rank: int, config: dict) -> float:
    r = _pattern_value(name, config.get("rank_pattern"), config.get("r", rank))
    alpha = _pattern_value(name, config.get("alpha_pattern"), config.get("lora_alpha", r))
    if r != rank:
        raise LoraError(f"lora module {name}: its A has rank {rank}, its config says r = {r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _modules(tensors: dict[str, torch.Tensor], config: dict | None, source: str) -> dict[str, ModuleLora]:
    """Pair A and B per module, check them, fold the scaling in. ``config``: PEFT's (None: use
    the per-module ``alpha`` tensors, scaling 1 where there are none)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, tensor in tensors.items():
        name = key
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        for a_suffix, b_suffix in _NAMINGS:
            if name.endswith(a_suffix):
                pairs.setdefault(name.removesuffix(a_suffix), {})["a"] = tensor
                break
            if name.endswith(b_suffix):
                pairs.setdefault(name.removesuffix(b_suffix), {})["b"] = tensor
                break
        else:
            if name.endswith(".alpha") and tensor.numel() == 1:
                alphas[name.removesuffix(".alpha")] = float(tensor)
            elif "lora_magnitude" in name:
                raise LoraError(f"lora {source}: DoRA ({key}) is not supported; allowed: plain LoRA")
            elif ".lora_B.bias" in name:
                raise LoraError(f"lora {source}: a bias on lora_B ({key}) is not supported")
            elif "lora_embedding" in name:
                raise LoraError(f"lora {source}: embedding adapters ({key}) are not supported")
            else:
                raise LoraError(f"lora {source}: tensor {key!r} is not a LoRA A/B weight or alpha")
    if not pairs:
        raise LoraError(f"lora {source}: no LoRA weights in it (expected keys ending in .lora_A.weight)")
    modules = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"a", "b"}:
            raise LoraError(f"lora {source}: module {name} has lora_{'B' if 'a' in pair else 'A'} only")
        a, b = pair["a"], pair["b"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise LoraError(
                f"lora {source}: module {name}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a "
                f"rank-r pair (A: (r, in), B: (out, r))"
            )
        rank = a.shape[0]
        scaling = _scaling(name, rank, config) if config is not None else alphas.get(name, rank) / rank
        modules[name] = ModuleLora(a.float(), b.float() * scaling)
    return modules


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise LoraError(f"lora {path}: cannot read it as safetensors ({exc})") from exc


def _read_peft(folder: Path) -> Adapter:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoraError(f"lora {folder}: adapter_config.json is unreadable ({exc})") from exc
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise LoraError(f"lora {folder}: peft_type {kind!r}; allowed: LORA")
    if config.get("use_dora"):
        raise LoraError(f"lora {folder}: use_dora = true; allowed: plain LoRA")
    if config.get("fan_in_fan_out"):
        raise LoraError(f"lora {folder}: fan_in_fan_out = true (Conv1D models); allowed: false")
    if config.get("modules_to_save"):
        raise LoraError(
            f"lora {folder}: modules_to_save = {config['modules_to_save']} (whole modules replaced); "
            f"allowed: none, only LoRA updates are applied"
        )
    base_class = (config.get("auto_mapping") or {}).get("base_model_class")
    if base_class is not None and base_class not in _BASE_CLASSES:
        raise LoraError(
            f"lora {folder}: made for a {base_class} (base_model_name_or_path: "
            f"{config.get('base_model_name_or_path')}); allowed: an adapter of "
            f"{' or '.join(sorted(_BASE_CLASSES))}"
        )
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoraError(f"lora {folder}: adapter_model.safetensors is missing (only safetensors is read)")
    tensors, _ = _read_safetensors(weights)
    modules = _modules(tensors, config, str(folder))
    return Adapter(
        _stage_of(list(modules), str(folder)), str(folder), modules, config.get("base_model_name_or_path")
    )


def _read_file(path: Path) -> Adapter:
    tensors, metadata = _read_safetensors(path)
    config = None
    if "lora_adapter_metadata" in metadata:  # diffusers' save_lora_weights(..., *_adapter_metadata)
        config = json.loads(metadata["lora_adapter_metadata"])
        if isinstance(config, dict) and "transformer" in config and "r" not in config:
            config = config["transformer"]
    modules = _modules(tensors, config, str(path))
    base = (config or {}).get("base_model_name_or_path")
    return Adapter(_stage_of(list(modules), str(path)), str(path), modules, base)


def read_adapters(path: str | Path) -> dict[str, Adapter]:
    """The adapter(s) at ``path``, by stage ("ar", "dit"): a PEFT folder, a diffusers
    ``.safetensors`` file, or a folder with one of those per stage subfolder."""
    path = Path(path).expanduser()
    if path.is_file():
        adapter = _read_file(path)
        return {adapter.stage: adapter}
    if not path.is_dir():
        raise LoraError(f"lora {path}: no such file or folder")
    if (path / "adapter_config.json").is_file():
        adapter = _read_peft(path)
        return {adapter.stage: adapter}
    found: dict[str, Adapter] = {}
    for stage, sub in _STAGE_FOLDERS.items():
        if (path / sub).is_dir():
            found.update(read_adapters(path / sub))
            if stage not in found:
                raise LoraError(f"lora {path / sub}: holds no {stage.upper()} modules")
    files = sorted(path.glob("*.safetensors"))
    if not found and len(files) == 1:
        return read_adapters(files[0])
    if not found:
        raise LoraError(
            f"lora {path}: no adapter_config.json + adapter_model.safetensors, no single .safetensors "
            f"file and no {' or '.join(_STAGE_FOLDERS.values())} subfolder in it"
        )
    return found
