"""The whole checkpoint folder: every component config, validated alone and against each other."""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ConfigError, GlmImageError
from ._base import _Config, read_json
from .components import (
    ArConfig,
    DitConfig,
    GenerationSettings,
    GlyphConfig,
    ImageProcessorConfig,
    PromptTokens,
    SchedulerConfig,
    VaeConfig,
)

# --------------------------------------------------------------------------------------------
# The whole checkpoint
# --------------------------------------------------------------------------------------------

# The components of model_index.json and the classes the reference libraries use for them.
PIPELINE_COMPONENTS: Mapping[str, tuple[str, str]] = types.MappingProxyType(
    {
        "vision_language_encoder": ("transformers", "GlmImageForConditionalGeneration"),
        "transformer": ("diffusers", "GlmImageTransformer2DModel"),
        "text_encoder": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "ByT5Tokenizer"),
        "processor": ("transformers", "GlmImageProcessor"),
        "vae": ("diffusers", "AutoencoderKL"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    }
)


def _processor_image_config(folder: Path) -> ImageProcessorConfig:
    # The release writes preprocessor_config.json; a transformers-5 `save_pretrained` writes the
    # same values nested under "image_processor" in processor_config.json.
    direct = folder / "preprocessor_config.json"
    if direct.is_file():
        return ImageProcessorConfig.from_json(direct)
    nested = folder / "processor_config.json"
    if nested.is_file():
        data = read_json(nested).get("image_processor")
        if isinstance(data, Mapping):
            return ImageProcessorConfig.from_dict(data, f"{nested} [image_processor]")
    raise CheckpointError(f"missing config file: {direct} (or an 'image_processor' section in {nested})")


@dataclass(frozen=True)
class SizeLimits:
    """Allowed image sides: ``minimum``..``maximum`` pixels, multiples of ``multiple``.

    The one size check of the engine: the API, the CLI, the server and both engines use it.
    """

    minimum: int
    maximum: int
    multiple: int

    def check(self, name: str, value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise GlmImageError(f"{name} = {value!r} must be an integer number of pixels")
        if not self.minimum <= value <= self.maximum or value % self.multiple:
            raise GlmImageError(
                f"{name} = {value} is not allowed; allowed: {self.minimum}..{self.maximum} in multiples of {self.multiple}"
            )

    def check_size(self, height: object, width: object) -> None:
        self.check("height", height)
        self.check("width", width)


@dataclass(frozen=True)
class CheckpointConfig:
    """Every config of a checkpoint folder, validated alone and against each other."""

    root: Path
    ar: ArConfig
    generation: GenerationSettings
    dit: DitConfig
    vae: VaeConfig
    glyph: GlyphConfig
    scheduler: SchedulerConfig
    image_processor: ImageProcessorConfig
    prompt_tokens: PromptTokens

    @classmethod
    def from_dir(cls, root: str | Path) -> CheckpointConfig:
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {root}")
        index = read_json(root / "model_index.json")
        if index.get("_class_name") != "GlmImagePipeline":
            raise ConfigError(
                f"{root / 'model_index.json'}: '_class_name' = {index.get('_class_name')!r}; "
                "allowed: 'GlmImagePipeline'"
            )
        missing = [name for name in PIPELINE_COMPONENTS if name not in index]
        if missing:
            raise ConfigError(f"{root / 'model_index.json'}: missing components {missing}")
        processor_dir = root / "processor"
        tokens_file = processor_dir / "tokenizer_config.json"
        tokens = (
            PromptTokens.from_json(tokens_file) if tokens_file.is_file() else PromptTokens(source="defaults")
        )
        vle = root / "vision_language_encoder"
        return cls(
            root=root,
            ar=ArConfig.from_json(vle / "config.json"),
            generation=GenerationSettings.from_json(vle / "generation_config.json"),
            dit=DitConfig.from_json(root / "transformer" / "config.json"),
            vae=VaeConfig.from_json(root / "vae" / "config.json"),
            glyph=GlyphConfig.from_json(root / "text_encoder" / "config.json"),
            scheduler=SchedulerConfig.from_json(root / "scheduler" / "scheduler_config.json"),
            image_processor=_processor_image_config(processor_dir),
            prompt_tokens=tokens,
        )

    def __post_init__(self) -> None:
        pairs = [
            (
                ("transformer/config.json", "text_embed_dim", self.dit.text_embed_dim),
                ("text_encoder/config.json", "d_model", self.glyph.d_model),
            ),
            (
                (
                    "transformer/config.json",
                    "prior_vq_quantizer_codebook_size",
                    self.dit.prior_vq_quantizer_codebook_size,
                ),
                (
                    "vision_language_encoder/config.json",
                    "vq_config.num_embeddings",
                    self.ar.vq.num_embeddings,
                ),
            ),
            (
                ("transformer/config.json", "in_channels", self.dit.in_channels),
                ("vae/config.json", "latent_channels", self.vae.latent_channels),
            ),
            (
                ("processor/preprocessor_config.json", "patch_size", self.image_processor.patch_size),
                (
                    "vision_language_encoder/config.json",
                    "vision_config.patch_size",
                    self.ar.vision.patch_size,
                ),
            ),
        ]
        for (file_a, key_a, a), (file_b, key_b, b) in pairs:
            if a != b:
                raise ConfigError(
                    f"{self.root}: {file_a} '{key_a}' = {a} must equal {file_b} '{key_b}' = {b}"
                )

    @property
    def image_grid_factor(self) -> int:
        """Pixels per AR token along each side: VAE x8 times DiT patch 2, times the x2 upsampling."""
        return self.vae.scale_factor * self.dit.patch_size * 2

    def unknown_keys(self) -> list[tuple[str, str]]:
        """(file, key) of every config key this engine does not know and so never reads: a newer
        checkpoint may carry settings that matter; ``glm-image info`` shows them."""
        found: list[tuple[str, str]] = []

        def walk(config: _Config) -> None:
            found.extend((config.source, key) for key in sorted(config.unknown))
            for f in dataclasses.fields(config):
                value = getattr(config, f.name)
                if isinstance(value, _Config):
                    walk(value)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Config):
                walk(value)
        return found

    @property
    def size_limits(self) -> SizeLimits:
        """Image sides this checkpoint takes: the processor's pixel budget as sides, in multiples
        of the AR grid factor (the released budget 512^2..2048^2 is the service's 512..2048 rule;
        a smaller preset states its own budget in its config)."""
        multiple = self.image_grid_factor

        def side(pixels: int, rounding) -> int:
            return int(rounding(math.sqrt(pixels) / multiple)) * multiple

        budget = self.image_processor
        return SizeLimits(side(budget.min_pixels, math.ceil), side(budget.max_pixels, math.floor), multiple)
