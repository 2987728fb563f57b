"""The DiT engine: prior tokens + prompts -> latents -> images.

Each step runs classifier-free guidance as ONE batched forward: the conditional rows (prior
tokens, glyph embeddings of the prompt) and the unconditional rows (prior dropped, glyph of "")
go together, the shorter glyph sequence left-padded with keys no query can see, so the batch
equals the reference's two forwards. Which keys each row sees is planned once per call
(``models.dit.attention_groups``): the rows that see the same keys attend together, without a
mask. Timesteps, sigmas and the Euler step are the pipeline's, bit for bit
(``sampling.flow``); the DiT sees ``t - 1``. Initial noise is drawn per image from its own
seed, so a batch equals its images generated one by one.

Batch invariance (``batch_invariant``, as the AR engine's): the maths never mixes images, but a
CPU's kernels round an image's numbers by the batch's shape (GEMM row counts, the glyph padding's
alignment in attention, the VAE's batched convolutions): a batch's latents differed from each
image's solo run by about 1e-6 and 2 pixels by 1/255 (tiny, 3 prompts). So on a CPU the images of
a call are denoised and decoded apart, each as a call of one (its CFG pair still together), and
an image equals its solo run bit for bit. Accelerators batch (that is their throughput) unless
``batch_invariant=True``.

Several prompts in one call: the reference left-pads their glyph sequences with zeros that every
query still sees, so a prompt's image depends on the other prompts of its batch. By default we
hide that padding (``isolate_prompts=True``): each image equals the one its prompt gives alone,
which is what a batch of independent requests needs. ``isolate_prompts=False`` reproduces the
reference's batch.

Step caching (``dit_cache``, off by default): a ``StepCache`` decides per step and per row (one
image in one CFG branch) whether blocks 1.. run or their last residual is reused; the rows that
run go through those blocks together, their key groups sliced from the call's (``row_groups``).
See ``engine.step_cache``.

Several devices (``groups``, ``glm_image.parallel``), composable: CFG-parallel puts the
conditional rows on the first rank of the ``cfg`` group and the unconditional rows on the second
(only the conditional rank writes and reads the condition cache); each step's velocities are
gathered, and every rank runs the guidance and the scheduler step in float32 on the same numbers,
so the latents are the same on every rank. Sequence parallel (``sp``, Ulysses) splits the joint
text + image sequence inside the model; the glyph sequence is left-padded with hidden tokens to a
multiple of the SP size (no query ever sees them, as the CFG padding), so the keys each row sees
are the reference's. The step cache's probe is averaged over the SP ranks, so they all decide the
same. Only the answering rank (``DitGroups.leads``) decodes images.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import CheckpointConfig
from ..errors import GlmImageError, check_finite
from ..lora import narrowed
from ..models.dit import (
    CacheMode,
    ConditionKVCache,
    DitModel,
    KeyGroup,
    attention_groups,
    image_rotary_tables,
    row_groups,
)
from ..models.glyph import GlyphEncoder
from ..ops import Ops
from ..parallel.comm import DitGroups
from ..progress import Progress, one_of
from ..quant import QuantScheme
from ..sampling import euler_step, flow_schedule, guidance, image_seeds, image_seq_len
from ..weights import load_model
from .loading import prepare_stage, verify_ops
from .protocol import upsample_grid
from .step_cache import StepCache

__all__ = ["DitEngine"]


@dataclass(frozen=True)
class _Plan:
    text: torch.Tensor  # glyph embeddings: (B, T, d) or, with guidance, (2B, T, d) [cond; uncond]
    prior: torch.Tensor
    drop: torch.Tensor  # prior dropped: False on conditional rows, True on unconditional rows
    size: torch.Tensor
    crop: torch.Tensor
    guidance: float
    rope: tuple[torch.Tensor, torch.Tensor]  # the image grid's rotary table, built once
    groups: tuple[KeyGroup, ...]  # rows that see the same keys (glyph padding, cache reads)
    cache: ConditionKVCache | None = None  # image-to-image condition K/V
    split: bool = False  # CFG-parallel: this rank's rows are one branch; the velocities are gathered


# one condition image: the picture, its VQ codes (h*w,) and its code grid (h, w)
Condition = tuple[object, torch.Tensor, tuple[int, int]]


def _first_half(rows: int, guidance: float) -> torch.Tensor | None:
    """With CFG the first half of the batch is conditional: only those rows read the cache."""
    if guidance == 1:
        return None
    read = torch.zeros(rows, dtype=torch.bool)  # on the CPU: planning reads it, the device never
    read[: rows // 2] = True
    return read


class DitEngine:
    def __init__(
        self,
        model: DitModel,
        glyph: GlyphEncoder,
        vae,
        config: CheckpointConfig,
        device: torch.device,
        groups: DitGroups | None = None,
        batch_invariant: bool | None = None,
    ) -> None:
        """``groups``: this rank's CFG and SP groups (see the module docstring); the model must be
        built with ``groups.sp``. None: one process. ``batch_invariant``: denoise and decode a
        call's images apart (see the module docstring); None: on a CPU only."""
        if batch_invariant is not None and not isinstance(batch_invariant, bool):
            raise GlmImageError(f"batch_invariant = {batch_invariant!r}; allowed: true, false or none (auto)")
        self.batch_invariant = batch_invariant
        self.groups = groups or DitGroups()
        self.model = model.eval()
        self.glyph = glyph
        self.vae = vae.eval()
        self.config = config
        self.device = device
        self.dtype = next(model.parameters()).dtype
        # the VAE's latents_mean and latents_std (2, 1, C, 1, 1): float32, cast where used, as the
        # reference does; normalises condition latents and de-normalises final ones
        statistics = [config.vae.latents_mean, config.vae.latents_std]
        self._latent_stats = torch.tensor(statistics, dtype=torch.float32, device=device).view(2, 1, -1, 1, 1)

    @property
    def rows_apart(self) -> bool:
        """Whether a call's images run apart (``batch_invariant``, resolved for the device)."""
        if self.batch_invariant is None:
            return self.device.type == "cpu"
        return self.batch_invariant

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        attention_backend: str | Ops | None = None,
        quantize: str | QuantScheme | None = None,
        groups: DitGroups | None = None,
        batch_invariant: bool | None = None,
    ) -> DitEngine:
        """``attention_backend``: as ``ArEngine.from_pretrained``. ``quantize``: the DiT's weight
        format, none | int8 | fp8, or a scheme naming stages (see ``glm_image.quant``); the glyph
        encoder and the VAE load as stored. ``groups``: the CFG and SP groups this process is a
        rank of (``glm_image.stages.ProcessStage`` builds them); every rank loads the whole DiT."""
        from diffusers import AutoencoderKL

        setup = prepare_stage(path, device, attention_backend, "DiT", quantize)
        root, config, device, ops = setup.root, setup.config, setup.device, setup.ops
        groups = groups or DitGroups()
        if groups.sp.size > 1:
            from ..parallel.layout import check_sp

            check_sp(groups.sp.size, config.dit.num_attention_heads)
        model = load_model(
            lambda: DitModel(config.dit, ops, groups.sp),
            root / "transformer",
            device=device,
            dtype=dtype,
            quantize=setup.quantize,
        )
        verify_ops(setup, model)
        glyph = GlyphEncoder.from_pretrained(root, config, device=device, dtype=dtype)
        # fp16 overflows in this VAE (force_upcast in its config): decode it in float32 then.
        vae_dtype = torch.float32 if dtype == torch.float16 and config.vae.force_upcast else dtype
        vae_config = AutoencoderKL.load_config(root / "vae")
        vae = load_model(
            lambda: AutoencoderKL.from_config(vae_config), root / "vae", device=device, dtype=vae_dtype
        )
        return cls(model, glyph, vae, config, device, groups, batch_invariant)

    def to(self, device: str | torch.device) -> DitEngine:
        """Move the DiT, the glyph encoder and the VAE; used to take turns on a small GPU."""
        self.device = torch.device(device)
        for module in (self.model, self.glyph.encoder, self.vae):
            module.to(self.device)
        self._latent_stats = self._latent_stats.to(self.device)
        return self

    def _check(self, prior: torch.Tensor, prompts: Sequence[str], height: int, width: int) -> int:
        self.config.size_limits.check_size(height, width)
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
        sp = self.groups.sp.size
        if expected % sp:
            raise GlmImageError(
                f"size {width}x{height}: its {expected} image tokens do not split over dit_sp = {sp} ranks; "
                f"allowed: sizes whose (height/16) * (width/16) is a multiple of {sp}"
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
        dit_cache: StepCache | None = None,
    ) -> torch.Tensor:
        """Final latents (B, C, H/8, W/8). ``prompts`` has one entry per image or per prompt.

        ``conditions`` (image-to-image): per prompt, its condition images as (PIL image, VQ codes
        (h*w,), (h, w)); each is encoded once into the condition cache, which the conditional
        branch attends to at every step and the unconditional branch does not.
        ``isolate_prompts``: see the module docstring.
        ``dit_cache``: a fresh ``StepCache`` per call, or None (every step runs every block); after
        the call its ``forwards`` holds each image's transformer passes.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        per_prompt = self._check(prior_token_ids, prompts, height, width)
        if guidance_scale < 1:
            raise GlmImageError(f"guidance_scale = {guidance_scale} must be >= 1")
        if dit_cache is not None and not isinstance(dit_cache, StepCache):
            raise GlmImageError(f"dit_cache: got {type(dit_cache).__name__}; allowed: a StepCache or None")
        call = (height, width, num_inference_steps, guidance_scale)
        if self.rows_apart and isolate_prompts and prior_token_ids.shape[0] > 1:
            return self._denoise_apart(
                prior_token_ids, prompts, per_prompt, call, seeds, latents, progress, conditions, dit_cache
            )
        return self._denoise(
            prior_token_ids,
            prompts,
            per_prompt,
            call,
            seeds,
            latents,
            progress,
            conditions,
            isolate_prompts,
            dit_cache,
        )

    def _denoise(
        self,
        prior_token_ids,
        prompts,
        per_prompt,
        call,
        seeds,
        latents,
        progress,
        conditions,
        isolate_prompts,
        dit_cache,
    ) -> torch.Tensor:
        """``denoise`` of the images of one batch, all in each forward (its inputs checked)."""
        height, width, num_inference_steps, guidance_scale = call
        prior = prior_token_ids.to(self.device)
        # Given latents keep their dtype until the first step upcasts them, as in the reference.
        latents = (
            self._noise(prior.shape[0], height, width, seeds) if latents is None else latents.to(self.device)
        )

        # CFG-parallel: this rank runs one branch (0: conditional, 1: unconditional)
        cfg = self.groups.cfg
        branch = cfg.rank if cfg.size > 1 and guidance_scale > 1 else None
        cache = None
        if conditions is not None:
            if len(conditions) != len(prompts):
                raise GlmImageError(f"conditions: {len(conditions)} lists for {len(prompts)} prompts")
            if branch != 1:  # the unconditional branch never reads the condition cache
                cache = self._write_conditions(conditions)
        plan = self._plan(
            prior, prompts, per_prompt, height, width, guidance_scale, isolate_prompts, cache, branch
        )
        schedule = flow_schedule(num_inference_steps, image_seq_len(height, width), self.config.scheduler)
        sigmas = schedule.sigmas.to(self.device)
        # The latents stay float32 between steps (the scheduler's upcast); the model sees its dtype.
        latents = latents.float()
        if dit_cache is not None:
            branches = 2 if plan.guidance > 1 and not plan.split else 1
            dit_cache.start(prior.shape[0], branches, self.config.dit.num_layers, self.groups.sp)
        for i, t in enumerate(schedule.timesteps.tolist()):
            velocity = self._velocity(plan, latents, t, i, dit_cache)
            latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
            if progress is not None:
                progress("dit", i + 1, num_inference_steps)
        if dit_cache is not None and plan.split:
            dit_cache.join_branches(cfg)  # the other branch's rows ran on the other rank
        return latents

    def _denoise_apart(
        self, prior, prompts, per_prompt, call, seeds, latents, progress, conditions, dit_cache
    ) -> torch.Tensor:
        """``denoise`` one image at a time (``rows_apart``): image i with its prompt, seed,
        latents and condition images, and a step cache of its own, gathered into ``dit_cache``."""
        images = prior.shape[0]
        seeds = image_seeds(seeds, images)
        parts, caches = [], []
        for i in range(images):
            prompt = i // per_prompt
            cache = None if dit_cache is None else copy.copy(dit_cache)  # its policy; ``start`` resets it
            with narrowed(self.model, [i]):  # per-image LoRA adapters: this image's
                one = self._denoise(
                    prior[i : i + 1],
                    [prompts[prompt]],
                    1,
                    call,
                    [seeds[i]],
                    None if latents is None else latents[i : i + 1],
                    one_of(progress, i, images),
                    None if conditions is None else [conditions[prompt]],
                    True,
                    cache,
                )
            parts.append(one)
            caches.append(cache)
        if dit_cache is not None:
            dit_cache.gather(caches)
        return torch.cat(parts)

    def _plan(
        self,
        prior,
        prompts,
        per_prompt,
        height,
        width,
        guidance_scale,
        isolate_prompts=True,
        cache=None,
        branch: int | None = None,
    ) -> _Plan:
        """Everything a step needs besides the latents and t: built once per call. ``cache``: the
        condition K/V (image-to-image), read by the conditional rows. ``branch``: CFG-parallel,
        the rows of this rank are the conditional (0) or the unconditional (1) ones only."""
        if branch is not None:
            return self._branch_plan(
                prior, prompts, per_prompt, height, width, guidance_scale, isolate_prompts, cache, branch
            )
        rope, size, crop = self._grid(prior.shape[0], height, width)
        cond, cond_keep = self._glyphs(prompts, per_prompt, isolate_prompts)
        drop = torch.zeros_like(prior, dtype=torch.bool)
        text, keep = cond, cond_keep
        if guidance_scale > 1:
            uncond, _ = self._glyphs([""] * len(prompts), per_prompt, False)
            text, keep = _stack_padded(cond, uncond, cond_keep)
            drop = torch.cat([drop, torch.ones_like(drop)])
            prior, size, crop = (torch.cat([x, x]) for x in (prior, size, crop))
        text, keep = self._sp_padded(text, keep)
        mode = CacheMode.READ if cache is not None else None
        groups = attention_groups(
            text.shape[0], keep, cache, mode, _first_half(text.shape[0], guidance_scale)
        )
        return _Plan(text, prior, drop, size, crop, float(guidance_scale), rope, groups, cache)

    def _branch_plan(
        self, prior, prompts, per_prompt, height, width, guidance_scale, isolate_prompts, cache, branch
    ) -> _Plan:
        """``_plan`` for one CFG branch: the conditional rows (reading ``cache``) or the
        unconditional ones (prior dropped, the glyphs of "", no cache)."""
        b = prior.shape[0]
        rope, size, crop = self._grid(b, height, width)
        if branch == 0:
            text, keep = self._glyphs(prompts, per_prompt, isolate_prompts)
        else:  # ``denoise`` wrote no condition cache on this rank
            text, keep = self._glyphs([""] * len(prompts), per_prompt, False)
        text, keep = self._sp_padded(text, keep)
        drop = torch.full_like(prior, branch == 1, dtype=torch.bool)
        mode = CacheMode.READ if cache is not None else None
        groups = attention_groups(b, keep, cache, mode)
        return _Plan(text, prior, drop, size, crop, float(guidance_scale), rope, groups, cache, split=True)

    def _grid(self, rows: int, height: int, width: int):
        """The image grid's rotary table, and each row's size and crop conditioning."""
        patch = self.config.vae.scale_factor * self.config.dit.patch_size
        rope = image_rotary_tables(
            height // patch, width // patch, self.config.dit.attention_head_dim, self.device
        )
        size = torch.tensor([[height, width]], dtype=self.dtype, device=self.device).repeat(rows, 1)
        crop = torch.zeros((rows, 2), dtype=self.dtype, device=self.device)
        return rope, size, crop

    def _glyphs(self, prompts, per_prompt: int, isolate: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, d) glyph embeddings of the prompts, ``per_prompt`` rows each, and which tokens
        are real ((B, T), or None when all are). Without isolation a prompt's padding stays
        visible to its rows, as in the reference's batch: all rows then see the same keys."""
        text, lengths = self.glyph.encode(prompts, return_lengths=True)
        text = text.repeat_interleave(per_prompt, dim=0).to(self.dtype)
        keep = None
        if isolate and len(set(lengths)) > 1:
            keep = _real_tokens(text.shape[1], lengths).repeat_interleave(per_prompt, dim=0)
        return text, keep

    def _sp_padded(
        self, text: torch.Tensor, keep: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sequence parallel: the glyphs (B, T, d) left-padded with hidden tokens to a multiple of
        the SP size, and their (B, T') real-token mask (on the CPU); one process: unchanged."""
        sp = self.groups.sp.size
        pad = -text.shape[1] % sp
        if pad == 0:
            return text, keep
        if keep is None:
            keep = torch.ones(text.shape[:2], dtype=torch.bool)
        text = torch.cat([text.new_zeros((text.shape[0], pad, text.shape[2])), text], dim=1)
        return text, torch.cat([torch.zeros((keep.shape[0], pad), dtype=torch.bool), keep], dim=1)

    def _write_conditions(self, conditions: Sequence[Sequence[Condition]]) -> ConditionKVCache:
        """Run each condition image once at t = 0 and keep its per-layer K/V, one sample per prompt."""
        from diffusers.image_processor import VaeImageProcessor

        vae_cfg, multiple = self.config.vae, self.config.vae.scale_factor * self.config.dit.patch_size
        processor = VaeImageProcessor(vae_scale_factor=vae_cfg.scale_factor)
        mean, std = self._latent_stats.to(self.dtype)
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
                tokens, sp = (height // multiple) * (width // multiple), self.groups.sp.size
                if tokens % sp:
                    raise GlmImageError(
                        f"images[{prompt_index}][{image_index}]: its {tokens} latent patches do not split over "
                        f"dit_sp = {sp} ranks; allowed: condition images whose token grid is a multiple of {sp}"
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

    def _velocity(
        self, plan: _Plan, latents: torch.Tensor, t: float, step: int = 0, dit_cache: StepCache | None = None
    ) -> torch.Tensor:
        """The guided velocity (float32) at timestep ``t``: one forward for both CFG branches."""
        b = latents.shape[0]
        both = plan.guidance > 1 and not plan.split  # both CFG branches in this batch
        x = (torch.cat([latents, latents]) if both else latents).to(self.dtype)
        # the DiT sees t - 1
        step_t = torch.full((x.shape[0],), t - 1, dtype=torch.float32, device=self.device)
        inputs = (x, plan.text, plan.prior, plan.drop, step_t, plan.size, plan.crop)
        mode = CacheMode.READ if plan.cache is not None else None
        if dit_cache is None:
            velocity = self.model(*inputs, cache=plan.cache, mode=mode, groups=plan.groups, rope=plan.rope)
        else:
            velocity = self._cached_forward(plan, inputs, mode, step, dit_cache)
        velocity = velocity.float()
        if plan.split:  # [conditional; unconditional] from the two ranks of the CFG group
            velocity = self.groups.cfg.all_gather(velocity, dim=0)
        return guidance(velocity[:b], velocity[b:], plan.guidance) if plan.guidance > 1 else velocity

    def _cached_forward(
        self, plan: _Plan, inputs: tuple, mode: CacheMode | None, step: int, dit_cache: StepCache
    ) -> torch.Tensor:
        """The model's forward in its three pieces, blocks 1.. only for the rows ``dit_cache``
        computes; a step that computes every row is the uncached forward, bit for bit."""
        model, x = self.model, inputs[0]
        image, text, temb = model.embed(*inputs)
        first, text = model.blocks(image, text, temb, plan.rope, plan.groups, plan.cache, mode, range(1))
        rest = range(1, self.config.dit.num_layers)
        compute = dit_cache.decide(step, image, first)
        rows = first.shape[0]
        if len(compute) == rows:
            out, _ = model.blocks(first, text, temb, plan.rope, plan.groups, plan.cache, mode, rest)
            dit_cache.record(step, compute, first, out)
            return model.head(out, temb, *x.shape[-2:])
        computing = set(compute)
        cached = [r for r in range(rows) if r not in computing]
        out = torch.empty_like(first)  # (rows, N, dim)
        index = torch.tensor(cached, device=x.device)
        out[index] = first[index] + dit_cache.predict(step, cached)
        if compute:
            index = torch.tensor(compute, device=x.device)
            groups = row_groups(plan.groups, compute, plan.cache)
            part, _ = model.blocks(
                first[index], text[index], temb[index], plan.rope, groups, plan.cache, mode, rest
            )
            dit_cache.record(step, compute, first[index], part)
            out[index] = part
        return model.head(out, temb, *x.shape[-2:])

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, *, tiled: bool | None = None) -> list:
        """Images from final latents: de-normalise with the VAE's statistics, decode, to 8-bit RGB.

        ``tiled`` (default: for images above 1024x1024) decodes in overlapping tiles so a
        2048x2048 decode needs a fraction of the memory; the seams are blended. Several ranks:
        only the answering one decodes (the latents are the same on all); the others return [].
        """
        from PIL import Image

        if not self.groups.leads:
            return []
        vae_cfg = self.config.vae
        dtype = next(self.vae.parameters()).dtype
        mean, std = self._latent_stats.to(dtype)
        latents = latents.to(dtype) * std + mean
        pixels = latents.shape[-2] * latents.shape[-1] * vae_cfg.scale_factor**2
        if tiled if tiled is not None else pixels > 1024 * 1024:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()
        if self.rows_apart:  # each image decoded alone: the same pixels in any batch
            images = torch.cat([self.vae.decode(x[None], return_dict=False)[0] for x in latents])
        else:
            images = self.vae.decode(latents, return_dict=False)[0]
        check_finite(images, "pixels")  # a VAE or kernel fault is an error, never a black image
        images = (images / 2 + 0.5).clamp(0, 1).float().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]


def _real_tokens(length: int, lengths: Sequence[int]) -> torch.Tensor:
    """(B, length) bool on the CPU: True on the last ``lengths[i]`` positions of row i (left padding)."""
    positions = torch.arange(length)
    starts = length - torch.tensor(lengths)
    return positions[None, :] >= starts[:, None]


def _stack_padded(
    cond: torch.Tensor, uncond: torch.Tensor, cond_keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[cond; uncond] along the batch, the shorter left-padded; (B2, T) mask of real tokens, on
    the CPU (it only plans the attention groups).

    ``cond_keep`` marks the real tokens of ``cond`` when its rows carry padding of their own.
    """
    length = max(cond.shape[1], uncond.shape[1])
    parts, keeps = [], []
    for x, own in ((cond, cond_keep), (uncond, None)):
        pad = length - x.shape[1]
        parts.append(torch.cat([x.new_zeros((x.shape[0], pad, x.shape[2])), x], dim=1))
        keep = torch.ones((x.shape[0], length), dtype=torch.bool, device="cpu")
        keep[:, :pad] = False
        if own is not None:
            keep[:, pad:] = own
        keeps.append(keep)
    return torch.cat(parts), torch.cat(keeps)
