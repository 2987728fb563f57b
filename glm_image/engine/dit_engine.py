"""The DiT engine: prior tokens + prompts -> latents -> images.

Each step runs classifier-free guidance as ONE batched forward: the conditional rows (prior
tokens, glyph embeddings of the prompt) and the unconditional rows (prior dropped, glyph of "")
go together, the shorter glyph sequence padded with keys no query can see, so the batch equals
the reference's two forwards. Timesteps, sigmas and the Euler step are the pipeline's, bit for
bit (``sampling.flow``); the DiT sees ``t - 1``. Initial noise is drawn per image from its own
seed, so a batch equals its images generated one by one.

Several prompts in one call: the reference left-pads their glyph sequences with zeros that every
query still sees, so a prompt's image depends on the other prompts of its batch. By default we
hide that padding (``isolate_prompts=True``): each image equals the one its prompt gives alone,
which is what a batch of independent requests needs. ``isolate_prompts=False`` reproduces the
reference's batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import CheckpointConfig
from ..errors import GlmImageError
from ..models.dit import CacheMode, ConditionKVCache, DitModel, image_rotary_tables
from ..models.glyph import GlyphEncoder
from ..ops import Ops
from ..sampling import euler_step, flow_schedule, guidance, image_seeds, image_seq_len
from ..weights import load_model
from .loading import prepare_stage
from .protocol import upsample_grid

__all__ = ["DitEngine"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class _Plan:
    text: torch.Tensor  # glyph embeddings: (B, T) or, with guidance, (2B, T) [cond; uncond]
    keep: torch.Tensor | None  # (2B, T) real glyph tokens when the branches are padded together
    prior: torch.Tensor
    drop: torch.Tensor  # prior dropped: False on conditional rows, True on unconditional rows
    size: torch.Tensor
    crop: torch.Tensor
    guidance: float
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # the image grid's rotary table, built once
    cache: ConditionKVCache | None = None  # image-to-image condition K/V
    read_rows: torch.Tensor | None = None  # rows that attend to it (the conditional branch)


# one condition image: the picture, its VQ codes (h*w,) and its code grid (h, w)
Condition = tuple[object, torch.Tensor, tuple[int, int]]


def _first_half(rows: int, guidance: float) -> torch.Tensor | None:
    """With CFG the first half of the batch is conditional: only those rows read the cache."""
    if guidance == 1:
        return None
    read = torch.zeros(rows, dtype=torch.bool)
    read[: rows // 2] = True
    return read


class DitEngine:
    def __init__(
        self, model: DitModel, glyph: GlyphEncoder, vae, config: CheckpointConfig, device: torch.device
    ) -> None:
        self.model = model.eval()
        self.glyph = glyph
        self.vae = vae.eval()
        self.config = config
        self.device = device
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        attention_backend: str | Ops | None = None,
    ) -> DitEngine:
        """``attention_backend``: as ``ArEngine.from_pretrained``."""
        from diffusers import AutoencoderKL

        setup = prepare_stage(path, device, attention_backend, "DiT")
        root, config, device, ops = setup.root, setup.config, setup.device, setup.ops
        model = load_model(
            lambda: DitModel(config.dit, ops), root / "transformer", device=device, dtype=dtype
        )
        glyph = GlyphEncoder.from_pretrained(root, config, device=device, dtype=dtype)
        # fp16 overflows in this VAE (force_upcast in its config): decode it in float32 then.
        vae_dtype = torch.float32 if dtype == torch.float16 and config.vae.force_upcast else dtype
        vae_config = AutoencoderKL.load_config(root / "vae")
        vae = load_model(
            lambda: AutoencoderKL.from_config(vae_config), root / "vae", device=device, dtype=vae_dtype
        )
        return cls(model, glyph, vae, config, device)

    def to(self, device: str | torch.device) -> DitEngine:
        """Move the DiT, the glyph encoder and the VAE; used to take turns on a small GPU."""
        self.device = torch.device(device)
        for module in (self.model, self.glyph.encoder, self.vae):
            module.to(self.device)
        return self

    def _check(self, prior: torch.Tensor, prompts: Sequence[str], height: int, width: int) -> int:
        factor = self.config.image_grid_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < factor or value % factor:
                raise GlmImageError(f"{name} = {value!r} must be a positive multiple of {factor}")
        patch = self.config.vae.scale_factor * self.config.dit.patch_size
        expected = (height // patch) * (width // patch)
        if prior.dim() != 2 or prior.shape[1] != expected:
            raise GlmImageError(
                f"prior_token_ids: shape {tuple(prior.shape)}, expected (B, {expected}) for {width}x{height}"
            )
        if not prompts or prior.shape[0] % len(prompts):
            raise GlmImageError(
                f"prompts: {len(prompts)} prompts for {prior.shape[0]} images; need a divisor"
            )
        return prior.shape[0] // len(prompts)

    def _noise(self, batch: int, height: int, width: int, seeds) -> torch.Tensor:
        seeds = image_seeds(seeds, batch)
        scale = self.config.vae.scale_factor
        shape = (1, self.config.dit.in_channels, height // scale, width // scale)
        noise = [
            torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=self.dtype)
            for s in seeds
        ]
        return torch.cat(noise).to(self.device)

    @torch.inference_mode()
    def denoise(
        self,
        prior_token_ids: torch.Tensor,
        prompts: str | Sequence[str],
        height: int,
        width: int,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.5,
        seeds: int | Sequence[int] | None = None,
        latents: torch.Tensor | None = None,
        progress: Progress | None = None,
        conditions: Sequence[Sequence[Condition]] | None = None,
        isolate_prompts: bool = True,
    ) -> torch.Tensor:
        """Final latents (B, C, H/8, W/8). ``prompts`` has one entry per image or per prompt.

        ``conditions`` (image-to-image): per prompt, its condition images as (PIL image, VQ codes
        (h*w,), (h, w)); each is encoded once into the condition cache, which the conditional
        branch attends to at every step and the unconditional branch does not.
        ``isolate_prompts``: see the module docstring.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        per_prompt = self._check(prior_token_ids, prompts, height, width)
        if guidance_scale < 1:
            raise GlmImageError(f"guidance_scale = {guidance_scale} must be >= 1")
        prior = prior_token_ids.to(self.device)
        # Given latents keep their dtype until the first step upcasts them, as in the reference.
        latents = (
            self._noise(prior.shape[0], height, width, seeds) if latents is None else latents.to(self.device)
        )

        plan = self._plan(prior, prompts, per_prompt, height, width, guidance_scale, isolate_prompts)
        if conditions is not None:
            if len(conditions) != len(prompts):
                raise GlmImageError(f"conditions: {len(conditions)} lists for {len(prompts)} prompts")
            read_rows = _first_half(plan.prior.shape[0], plan.guidance)
            plan = dataclasses.replace(plan, cache=self._write_conditions(conditions), read_rows=read_rows)
        schedule = flow_schedule(num_inference_steps, image_seq_len(height, width), self.config.scheduler)
        sigmas = schedule.sigmas.to(self.device)
        # The latents stay float32 between steps (the scheduler's upcast); the model sees its dtype.
        latents = latents.float()
        for i, t in enumerate(schedule.timesteps.tolist()):
            velocity = self._velocity(plan, latents, t)
            latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
            if progress is not None:
                progress(i + 1, num_inference_steps)
        return latents

    def _plan(self, prior, prompts, per_prompt, height, width, guidance_scale, isolate_prompts=True) -> _Plan:
        """Everything a step needs besides the latents and t: built once per call."""
        b = prior.shape[0]
        patch = self.config.vae.scale_factor * self.config.dit.patch_size
        rope = image_rotary_tables(
            height // patch, width // patch, self.config.dit.attention_head_dim, self.device
        )
        cond, lengths = self.glyph.encode(prompts, return_lengths=True)
        cond = cond.repeat_interleave(per_prompt, dim=0).to(self.dtype)
        cond_keep = None
        if isolate_prompts and len(set(lengths)) > 1:
            cond_keep = _real_tokens(cond.shape[1], lengths, self.device).repeat_interleave(per_prompt, dim=0)
        size = torch.tensor([[height, width]], dtype=self.dtype, device=self.device).repeat(b, 1)
        crop = torch.zeros((b, 2), dtype=self.dtype, device=self.device)
        keep_prior = torch.zeros_like(prior, dtype=torch.bool)
        if guidance_scale == 1:
            return _Plan(cond, cond_keep, prior, keep_prior, size, crop, 1.0, rope)
        uncond = self.glyph.encode([""] * len(prompts)).repeat_interleave(per_prompt, dim=0).to(self.dtype)
        text, keep = _stack_padded(cond, uncond, cond_keep)
        drop = torch.cat([keep_prior, torch.ones_like(keep_prior)])
        twice = (torch.cat([x, x]) for x in (prior, size, crop))
        return _Plan(text, keep, next(twice), drop, next(twice), next(twice), guidance_scale, rope)

    def _write_conditions(self, conditions: Sequence[Sequence[Condition]]) -> ConditionKVCache:
        """Run each condition image once at t = 0 and keep its per-layer K/V, one sample per prompt."""
        from diffusers.image_processor import VaeImageProcessor

        vae_cfg, multiple = self.config.vae, self.config.vae.scale_factor * self.config.dit.patch_size
        processor = VaeImageProcessor(vae_scale_factor=vae_cfg.scale_factor)
        mean = torch.tensor(vae_cfg.latents_mean, device=self.device, dtype=self.dtype).view(1, -1, 1, 1)
        std = torch.tensor(vae_cfg.latents_std, device=self.device, dtype=self.dtype).view(1, -1, 1, 1)
        cache = ConditionKVCache(self.config.dit.num_layers)
        for prompt_index, prompt_conditions in enumerate(conditions):
            for image_index, (image, codes, (rows, cols)) in enumerate(prompt_conditions):
                height, width = (image.height // multiple) * multiple, (image.width // multiple) * multiple
                if (height // multiple, width // multiple) != (2 * rows, 2 * cols):
                    raise GlmImageError(
                        f"images[{prompt_index}][{image_index}]: {image.width}x{image.height} gives a {cols}x{rows} "
                        f"token grid that does not cover its {width // multiple}x{height // multiple} latent patches; "
                        "allowed: sides that are multiples of 32 within the processor's pixel budget"
                    )
                pixels = processor.preprocess(image, height=height, width=width).to(self.device)
                latent = self.vae.encode(pixels.to(next(self.vae.parameters()).dtype)).latent_dist.mode()
                latent = (latent.to(self.dtype) - mean) / std
                prior = upsample_grid(codes[None].to(self.device), rows, cols)
                self.model(
                    latent,
                    latent.new_zeros((1, 0, self.config.dit.text_embed_dim)),
                    prior,
                    torch.zeros_like(prior, dtype=torch.bool),
                    torch.zeros(1, device=self.device),
                    torch.tensor([[height, width]], device=self.device),
                    torch.zeros((1, 2), device=self.device),
                    cache=cache,
                    mode=CacheMode.WRITE,
                )
            cache.next_sample()
        return cache

    def _velocity(self, plan: _Plan, latents: torch.Tensor, t: float) -> torch.Tensor:
        """The guided velocity (float32) at timestep ``t``: one forward for both CFG branches."""
        b = latents.shape[0]
        x = (torch.cat([latents, latents]) if plan.guidance > 1 else latents).to(self.dtype)
        # the DiT sees t - 1
        step_t = torch.full((x.shape[0],), t - 1, dtype=torch.float32, device=self.device)
        velocity = self.model(
            x,
            plan.text,
            plan.prior,
            plan.drop,
            step_t,
            plan.size,
            plan.crop,
            text_keep=plan.keep,
            cache=plan.cache,
            mode=CacheMode.READ if plan.cache is not None else None,
            read_rows=plan.read_rows,
            rope=plan.rope,
        )
        velocity = velocity.float()
        return guidance(velocity[:b], velocity[b:], plan.guidance) if plan.guidance > 1 else velocity

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, *, tiled: bool | None = None) -> list:
        """Images from final latents: de-normalise with the VAE's statistics, decode, to 8-bit RGB.

        ``tiled`` (default: for images above 1024x1024) decodes in overlapping tiles so a
        2048x2048 decode needs a fraction of the memory; the seams are blended.
        """
        from PIL import Image

        vae_cfg = self.config.vae
        dtype = next(self.vae.parameters()).dtype
        mean = torch.tensor(vae_cfg.latents_mean, device=self.device, dtype=dtype).view(1, -1, 1, 1)
        std = torch.tensor(vae_cfg.latents_std, device=self.device, dtype=dtype).view(1, -1, 1, 1)
        latents = latents.to(dtype) * std + mean
        pixels = latents.shape[-2] * latents.shape[-1] * vae_cfg.scale_factor**2
        if tiled if tiled is not None else pixels > 1024 * 1024:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()
        images = self.vae.decode(latents, return_dict=False)[0]
        images = (images / 2 + 0.5).clamp(0, 1).float().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]


def _real_tokens(length: int, lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    """(B, length) bool: True on the last ``lengths[i]`` positions of row i (left padding)."""
    positions = torch.arange(length, device=device)
    starts = length - torch.tensor(lengths, device=device)
    return positions[None, :] >= starts[:, None]


def _stack_padded(
    cond: torch.Tensor, uncond: torch.Tensor, cond_keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[cond; uncond] along the batch, the shorter left-padded; (B2, T) mask of real tokens.

    ``cond_keep`` marks the real tokens of ``cond`` when its rows carry padding of their own.
    """
    length = max(cond.shape[1], uncond.shape[1])
    parts, keeps = [], []
    for x, own in ((cond, cond_keep), (uncond, None)):
        pad = length - x.shape[1]
        parts.append(torch.cat([x.new_zeros((x.shape[0], pad, x.shape[2])), x], dim=1))
        keep = torch.ones((x.shape[0], length), dtype=torch.bool, device=x.device)
        keep[:, :pad] = False
        if own is not None:
            keep[:, pad:] = own
        keeps.append(keep)
    return torch.cat(parts), torch.cat(keeps)
