"""One frozen dataclass per component config file of a GLM-Image checkpoint."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from ._base import _PROVENANCE, _check_type, _Config

# --------------------------------------------------------------------------------------------
# vision_language_encoder/: the AR model (text decoder), its ViT and VQ tokenizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArTextConfig(_Config):
    """The GLM-4-9B style text decoder that writes image tokens (``text_config``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    vision_vocab_size: int
    rope_theta: float
    mrope_section: tuple[int, ...]
    partial_rotary_factor: float
    rope_type: str = "default"
    max_position_embeddings: int = 131072
    attention_bias: bool = True
    hidden_act: str = "silu"
    eos_token_id: int = 16385
    pad_token_id: int = 167841

    _IGNORED: ClassVar[frozenset[str]] = frozenset({"rope_parameters", "rope_scaling"})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> ArTextConfig:
        # transformers 5 nests the rotary settings in `rope_parameters`; older files put
        # rope_theta at the top level and the rest in `rope_scaling`. Read both, prefer the new.
        flat = dict(data)
        for nested in ("rope_scaling", "rope_parameters"):
            if isinstance(data.get(nested), Mapping):
                flat.update(data[nested])
        return super().from_dict(flat, source)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that get rotated (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def _validate(self) -> None:
        self._require_positive(
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "vision_vocab_size",
            "rope_theta",
        )
        if self.hidden_size % self.num_attention_heads:
            self._fail(
                "hidden_size", f"must be a multiple of num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            self._fail("num_key_value_heads", f"must divide num_attention_heads ({self.num_attention_heads})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            self._fail("partial_rotary_factor", "must be in (0, 1]")
        if len(self.mrope_section) != 3 or min(self.mrope_section) <= 0:
            self._fail("mrope_section", "must be three positive integers (t, h, w frequency counts)")
        if 2 * sum(self.mrope_section) != self.rotary_dim:
            self._fail(
                "mrope_section",
                f"must sum to rotary_dim / 2 = {self.rotary_dim // 2} "
                f"(head_dim {self.head_dim} x partial_rotary_factor {self.partial_rotary_factor} / 2)",
            )
        if self.vision_vocab_size > self.vocab_size:
            self._fail("vision_vocab_size", f"must be <= vocab_size ({self.vocab_size})")
        if not 0 <= self.eos_token_id < self.vision_vocab_size:
            self._fail("eos_token_id", f"must be an image-vocabulary id in [0, {self.vision_vocab_size})")
        if self.hidden_act != "silu":
            self._fail("hidden_act", "is not supported; allowed: 'silu'")
        if self.rope_type != "default":
            self._fail("rope_type", "is not supported; allowed: 'default'")


@dataclass(frozen=True)
class VisionConfig(_Config):
    """The ViT that encodes condition images for image-to-image (``vision_config``)."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    attention_bias: bool = True
    spatial_merge_size: int = 1

    def _validate(self) -> None:
        self._require_positive("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size")
        if self.hidden_size % self.num_heads:
            self._fail("hidden_size", f"must be a multiple of num_heads ({self.num_heads})")
        if self.image_size % self.patch_size:
            self._fail("image_size", f"must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_act != "gelu":
            self._fail("hidden_act", "is not supported; allowed: 'gelu'")


@dataclass(frozen=True)
class VqConfig(_Config):
    """The VQ quantizer that turns ViT features into the 16384 image codes (``vq_config``)."""

    embed_dim: int
    num_embeddings: int
    latent_channels: int
    in_channels: int = 3

    def _validate(self) -> None:
        self._require_positive("embed_dim", "num_embeddings", "latent_channels")


@dataclass(frozen=True)
class ArConfig(_Config):
    """``vision_language_encoder/config.json``: text decoder + ViT + VQ and the image token ids."""

    text: ArTextConfig
    vision: VisionConfig
    vq: VqConfig
    image_token_id: int = 167855
    image_start_token_id: int = 16384
    image_end_token_id: int = 16385

    _IGNORED: ClassVar[frozenset[str]] = frozenset(
        {"text_config", "vision_config", "vq_config", "tie_word_embeddings"}
    )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> ArConfig:
        subs = {}
        for key, sub_cls in (
            ("text_config", ArTextConfig),
            ("vision_config", VisionConfig),
            ("vq_config", VqConfig),
        ):
            if not isinstance(data.get(key), Mapping):
                raise ConfigError(f"{source}: missing required section '{key}'")
            subs[key.removesuffix("_config")] = sub_cls.from_dict(data[key], f"{source} [{key}]")
        if data.get("tie_word_embeddings", False):
            raise ConfigError(f"{source}: 'tie_word_embeddings' = true is not supported; allowed: false")
        kwargs = {}
        for name in ("image_token_id", "image_start_token_id", "image_end_token_id"):
            if name in data:
                kwargs[name] = _check_type(data[name], int, f"{source}: '{name}'")
        known = {"image_token_id", "image_start_token_id", "image_end_token_id"}
        unknown = {k: v for k, v in data.items() if k not in known | cls._IGNORED | _PROVENANCE}
        return cls(**subs, **kwargs, source=source, unknown=types.MappingProxyType(unknown))

    def _validate(self) -> None:
        vocab = self.text.vision_vocab_size
        for key in ("image_start_token_id", "image_end_token_id"):
            if not 0 <= getattr(self, key) < vocab:
                self._fail(key, f"must be an image-vocabulary id in [0, {vocab})")
        if not vocab <= self.image_token_id < self.text.vocab_size:
            self._fail("image_token_id", f"must be a text-vocabulary id in [{vocab}, {self.text.vocab_size})")
        if self.vq.num_embeddings > self.image_start_token_id:
            raise ConfigError(
                f"{self.source}: vq_config 'num_embeddings' = {self.vq.num_embeddings} must be <= "
                f"image_start_token_id ({self.image_start_token_id}): image codes come before the specials"
            )
        if self.vision.hidden_size != self.vq.latent_channels:
            raise ConfigError(
                f"{self.source}: vq_config 'latent_channels' = {self.vq.latent_channels} must equal "
                f"vision_config 'hidden_size' ({self.vision.hidden_size})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_config": self.text.to_dict(),
            "vision_config": self.vision.to_dict(),
            "vq_config": self.vq.to_dict(),
            "image_token_id": self.image_token_id,
            "image_start_token_id": self.image_start_token_id,
            "image_end_token_id": self.image_end_token_id,
        }


@dataclass(frozen=True)
class GenerationSettings(_Config):
    """``vision_language_encoder/generation_config.json``: the AR sampling defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    do_sample: bool = True
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def _validate(self) -> None:
        self._require_positive("temperature")
        if not 0.0 < self.top_p <= 1.0:
            self._fail("top_p", "must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            self._fail("top_k", "must be >= 1 (or null for no top-k)")


# --------------------------------------------------------------------------------------------
# transformer/, vae/, text_encoder/, scheduler/, processor/
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DitConfig(_Config):
    """``transformer/config.json``: the single-stream DiT decoder."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    patch_size: int
    in_channels: int
    out_channels: int
    text_embed_dim: int
    time_embed_dim: int
    condition_dim: int
    prior_vq_quantizer_codebook_size: int

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def _validate(self) -> None:
        self._require_positive(*(f.name for f in dataclasses.fields(self) if f.type == "int"))


@dataclass(frozen=True)
class VaeConfig(_Config):
    """``vae/config.json``: diffusers ``AutoencoderKL`` with per-channel latent statistics."""

    latent_channels: int
    block_out_channels: tuple[int, ...]
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    in_channels: int = 3
    out_channels: int = 3
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    down_block_types: tuple[str, ...] = ()
    up_block_types: tuple[str, ...] = ()
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    sample_size: int = 1024

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side (8 for the released VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def _validate(self) -> None:
        self._require_positive("latent_channels", "layers_per_block", "norm_num_groups")
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            self._fail(
                "block_out_channels",
                f"must be non-empty multiples of norm_num_groups ({self.norm_num_groups})",
            )
        for key in ("latents_mean", "latents_std"):
            if len(getattr(self, key)) != self.latent_channels:
                self._fail(key, f"must have one value per latent channel ({self.latent_channels})")
        if min(self.latents_std) <= 0:
            self._fail("latents_std", "must be all > 0")
        for key in ("down_block_types", "up_block_types"):
            if getattr(self, key) and len(getattr(self, key)) != len(self.block_out_channels):
                self._fail(key, f"must have one entry per block ({len(self.block_out_channels)})")


@dataclass(frozen=True)
class GlyphConfig(_Config):
    """``text_encoder/config.json``: the ByT5 encoder that embeds the quoted text (Glyph Encoder)."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    _IGNORED: ClassVar[frozenset[str]] = frozenset(
        {
            "classifier_dropout",
            "decoder_start_token_id",
            "dense_act_fn",  # derived from feed_forward_proj by T5Config
            "dropout_rate",
            "eos_token_id",
            "initializer_factor",
            "is_decoder",  # decoder-side settings: the Glyph Encoder runs the encoder only
            "is_encoder_decoder",
            "is_gated_act",  # derived from feed_forward_proj by T5Config
            "num_decoder_layers",
            "scale_decoder_outputs",
            "pad_token_id",
            "tie_word_embeddings",
            "tokenizer_class",
        }
    )

    def _validate(self) -> None:
        self._require_positive("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
        if self.feed_forward_proj not in ("gated-gelu", "relu", "gated-relu", "gelu"):
            self._fail(
                "feed_forward_proj", "is not supported; allowed: 'gated-gelu', 'gelu', 'gated-relu', 'relu'"
            )


@dataclass(frozen=True)
class SchedulerConfig(_Config):
    """``scheduler/scheduler_config.json``: flow matching with resolution-dependent shift.

    The engine implements the released schedule; the reference's alternative sigma families and
    stochastic sampling are rejected here rather than silently ignored.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    stochastic_sampling: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False

    def _validate(self) -> None:
        self._require_positive("num_train_timesteps", "shift", "base_image_seq_len", "max_image_seq_len")
        if self.time_shift_type not in ("linear", "exponential"):
            self._fail("time_shift_type", "is not supported; allowed: 'linear', 'exponential'")
        for key in (
            "invert_sigmas",
            "stochastic_sampling",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
        ):
            if getattr(self, key):
                self._fail(key, "is not supported by this engine; allowed: false")
        if self.shift_terminal is not None:
            self._fail("shift_terminal", "is not supported by this engine; allowed: null")


@dataclass(frozen=True)
class ImageProcessorConfig(_Config):
    """``processor/preprocessor_config.json``: how condition images are resized and normalised."""

    patch_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    temporal_patch_size: int = 1
    merge_size: int = 1
    resample: int = 3
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    do_resize: bool = True
    do_convert_rgb: bool = True

    _IGNORED: ClassVar[frozenset[str]] = frozenset({"image_processor_type", "processor_class", "size"})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> ImageProcessorConfig:
        # transformers 5 re-saves the pixel budget as size = {shortest_edge: min, longest_edge: max}.
        size = data.get("size")
        if isinstance(size, Mapping):
            data = {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge"), **data}
        return super().from_dict(data, source)

    def _validate(self) -> None:
        self._require_positive("patch_size", "min_pixels", "max_pixels", "temporal_patch_size", "merge_size")
        if self.min_pixels > self.max_pixels:
            self._fail("min_pixels", f"must be <= max_pixels ({self.max_pixels})")
        for key in ("image_mean", "image_std"):
            if len(getattr(self, key)) != 3:
                self._fail(key, "must have three values (R, G, B)")
        if min(self.image_std) <= 0:
            self._fail("image_std", "must be all > 0")


@dataclass(frozen=True)
class PromptTokens(_Config):
    """The special tokens the processor writes around a prompt (``processor/tokenizer_config.json``)."""

    bos_token: str = "<|dit_token_16384|>"
    eos_token: str = "<|dit_token_16385|>"
    pad_token: str = "<|dit_token_16385|>"
    grid_bos_token: str = "<sop>"
    grid_eos_token: str = "<eop>"
    image_token: str = "<|image|>"
    padding_side: str = "left"

    # Tokenizer bookkeeping that the tokenizer itself (tokenizer.json) carries and applies.
    _IGNORED: ClassVar[frozenset[str]] = frozenset(
        {
            "added_tokens_decoder",
            "additional_special_tokens",
            "extra_special_tokens",
            "model_specific_special_tokens",
            "model_input_names",
            "model_max_length",
            "clean_up_tokenization_spaces",
            "do_lower_case",
            "remove_space",
            "tokenizer_class",
            "processor_class",
            "backend",
            "is_local",
            "chat_template",
        }
    )

    def _validate(self) -> None:
        if self.padding_side not in ("left", "right"):
            self._fail("padding_side", "must be 'left' or 'right'")
