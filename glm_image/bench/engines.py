"""The two engines a benchmark runs, behind one interface: our ``GlmImage`` and diffusers'
``GlmImagePipeline``, on the same checkpoint folder, giving per-stage seconds for one call.

Ours reports its stages itself (``GenerationOutput.timings``). The reference is timed from the
outside without changing what it computes: ``generate_prior_tokens`` is wrapped (the AR stage),
a pre-forward hook on the vision-language encoder counts its forwards (one per token it writes)
and marks the start of the second one: the prefill is over and the first token sampled, which
is what our ``ar_prefill`` covers too (tokenisation and planning included on both sides). A hook
on the transformer counts DiT forwards, and ``vae.decode`` is wrapped (the VAE stage); the DiT
stage is what lies between the end of the AR stage and the start of the decode (glyph
encoding, the denoising loop). On a GPU the device is synchronised at every mark, except
between decode steps.

Ours can also run with a DiT step cache (``OursRunner.with_cache``): the same loaded pipeline,
each call given a fresh ``StepCache``, reporting the transformer passes each image computed.

``max_ar_tokens`` (benchmarks only) stops both AR models after that many tokens and fills the
rest of the grid with code 0, so the DiT and the VAE still run on a whole grid: the AR rate is
then measured over the tokens written, and the image is not a real one.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import GlmImageError
from .report import synchronize

if TYPE_CHECKING:
    from ..engine.step_cache import StepCacheOptions

__all__ = ["OursRunner", "ReferenceRunner", "StageTimes", "on_device"]


@dataclass(frozen=True)
class StageTimes:
    """One call's wall seconds per stage and what the AR wrote."""

    ar: float  # prior tokens, prefill included
    ar_prefill: float  # planning, tokenisation, prefill and the first token
    dit: float  # glyph embeddings and the denoising loop
    vae: float
    total: float  # the whole call
    ar_tokens: int  # tokens written per sequence (the reference counts its EOS step)
    ar_sequences: int  # token sequences the AR wrote in the call
    images: int
    # transformer passes per image: the reference runs one per CFG branch and step; ours reports
    # them with a step cache (a cached branch-step counts 1/num_layers, its first-block probe)
    dit_forwards: float | None = None
    ar_forwards: float | None = None  # ours: AR forwards per image, the prefill included

    @property
    def ar_decode(self) -> float:
        return self.ar - self.ar_prefill


@contextmanager
def on_device(runner, swap: bool):
    """Run ``runner`` on its device; with ``swap`` it waits in host memory before and after, so
    two engines that do not fit on a GPU together take turns (and each one's peak is its own)."""
    if swap:
        runner.unpark()
    try:
        yield runner
    finally:
        if swap:
            runner.park(torch.device("cpu"))
            torch.cuda.empty_cache()


@contextmanager
def _no_loading_bars():
    """diffusers and transformers draw a bar per component and shard while loading; the bench
    draws its own."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


def _module_bytes(*modules: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


class OursRunner:
    name = "ours"
    dit_cache: StepCacheOptions | None = None

    def __init__(
        self,
        model: str | Path,
        device: torch.device,
        dtype: torch.dtype,
        attention_backend: str | None = None,
        **generation,
    ) -> None:
        """``generation``: ``GlmImage.from_pretrained``'s generation defaults (``ar_decoding``,
        ``jacobi_window``)."""
        from ..pipeline import GlmImage

        self.device = device
        self.pipe = GlmImage.from_pretrained(
            model, device=device, dtype=dtype, attention_backend=attention_backend, **generation
        )

    def with_cache(self, options: StepCacheOptions) -> OursRunner:
        """A runner named ``ours_cached`` on the same pipeline, its DiT steps cached with ``options``."""
        runner = copy.copy(self)
        runner.name, runner.dit_cache = "ours_cached", options
        return runner

    @property
    def weight_bytes(self) -> int:
        dit = self.pipe.dit
        return _module_bytes(self.pipe.ar.model, dit.model, dit.glyph.encoder, dit.vae)

    def park(self, where: torch.device) -> None:
        """Move both stages off the device while the other engine runs."""
        self.pipe.ar.to(where)
        self.pipe.dit.to(where)

    def unpark(self) -> None:
        """Back on the device; an offloading pipe moves each stage in itself when it runs."""
        if self.pipe.offload_to is None:
            self.pipe.ar.to(self.device)
            self.pipe.dit.to(self.device)

    def run(
        self,
        prompt: str,
        height: int,
        width: int,
        steps: int,
        batch: int,
        seed: int,
        max_ar_tokens: int | None,
    ) -> tuple[list, StageTimes]:
        """One ``GlmImage.generate`` call. Its own stage timings are used; on a GPU the AR and
        the denoising loop are made to wait for their queued work before they return, so each
        stage's time holds its own kernels (one synchronisation each; nothing else changes)."""
        ar, dit = self.pipe.ar, self.pipe.dit
        generate = _capped_ours(ar.generate, max_ar_tokens) if max_ar_tokens is not None else ar.generate
        denoise = dit.denoise
        if self.device.type != "cpu":
            generate, denoise = _then_sync(generate, self.device), _then_sync(denoise, self.device)
        ar.generate, dit.denoise = generate, denoise
        try:
            synchronize(self.device)
            start = time.perf_counter()
            out = self.pipe.generate(
                prompt,
                height,
                width,
                num_inference_steps=steps,
                seed=seed,
                num_images_per_prompt=batch,
                dit_cache=self.dit_cache,
            )
            synchronize(self.device)
            total = time.perf_counter() - start
        finally:  # back to the class's own methods
            for engine, name in ((ar, "generate"), (dit, "denoise")):
                engine.__dict__.pop(name, None)
        t = out.timings
        times = StageTimes(
            t["ar"],
            t["ar_prefill"],
            t["dit"],
            t["vae"],
            total,
            out.ar_tokens,
            batch,
            batch,
            round(sum(out.dit_forwards) / batch, 4) if self.dit_cache is not None else None,
            sum(out.ar_forwards) / batch,
        )
        return out.images, times


def _then_sync(fn, device: torch.device):
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        synchronize(device)
        return out

    return run


def _capped_ours(generate, cap: int):
    """``ArEngine.generate`` stopped after ``cap`` tokens, its grid completed with code 0."""
    from ..engine.protocol import upsample_grid

    def run(*args, **kwargs):
        result = generate(*args, **{**kwargs, "max_new_tokens": cap})
        spec = result.spec
        written = result.tokens.shape[1]
        if written >= spec.num_tokens:
            return result
        full = result.tokens.new_zeros((result.tokens.shape[0], spec.num_tokens))
        full[:, :written] = result.tokens
        rows, cols = spec.target
        target = full[:, spec.target_offset : spec.target_offset + rows * cols]
        return dataclasses.replace(result, prior_tokens=upsample_grid(target, rows, cols))

    return run


class ReferenceRunner:
    name = "reference"

    def __init__(
        self, root: Path, device: torch.device, dtype: torch.dtype, *, load_on: torch.device
    ) -> None:
        from diffusers import GlmImagePipeline

        self.device = device
        with _no_loading_bars():
            self.pipe = GlmImagePipeline.from_pretrained(root, dtype=dtype).to(load_on)
        self.pipe.set_progress_bar_config(disable=True)
        self.cap: int | None = None
        self._marks: dict[str, float] = {}
        self._counts = {"ar": 0, "dit": 0}
        self._instrument()

    @property
    def weight_bytes(self) -> int:
        p = self.pipe
        return _module_bytes(p.vision_language_encoder, p.transformer, p.text_encoder, p.vae)

    def park(self, where: torch.device) -> None:
        self.pipe.to(where)

    def unpark(self) -> None:
        self.pipe.to(self.device)

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def _instrument(self) -> None:
        """Stage marks around the reference's own calls; what they compute is unchanged."""
        pipe, marks, counts = self.pipe, self._marks, self._counts
        prior_tokens, decode = pipe.generate_prior_tokens, pipe.vae.decode
        vle = pipe.vision_language_encoder
        vle_generate = vle.generate

        def timed_prior_tokens(*args, **kwargs):
            marks["ar_start"] = self._now()
            out = prior_tokens(*args, **kwargs)
            marks["ar_end"] = self._now()
            return out

        def timed_decode(*args, **kwargs):
            marks["vae_start"] = self._now()
            out = decode(*args, **kwargs)
            marks["vae_end"] = self._now()
            return out

        def capped_generate(*args, max_new_tokens: int, **kwargs):
            if self.cap is None or self.cap >= max_new_tokens:
                return vle_generate(*args, max_new_tokens=max_new_tokens, **kwargs)
            out = vle_generate(*args, max_new_tokens=self.cap, **kwargs)
            missing = kwargs["input_ids"].shape[1] + max_new_tokens - out.shape[1]
            return torch.cat([out, out.new_zeros((out.shape[0], missing))], dim=1) if missing > 0 else out

        def ar_forward(*_) -> None:
            counts["ar"] += 1
            if counts["ar"] == 2:  # the first token is sampled: the prefill is over, as ours counts it
                marks["ar_prefill"] = self._now()

        def dit_forward(*_) -> None:
            counts["dit"] += 1

        pipe.generate_prior_tokens = timed_prior_tokens
        pipe.vae.decode = timed_decode
        vle.generate = capped_generate
        vle.register_forward_pre_hook(ar_forward)
        pipe.transformer.register_forward_hook(dit_forward)

    def run(
        self,
        prompt: str,
        height: int,
        width: int,
        steps: int,
        batch: int,
        seed: int,
        max_ar_tokens: int | None,
    ) -> tuple[list, StageTimes]:
        self.cap = max_ar_tokens
        self._marks.clear()
        self._counts.update(ar=0, dit=0)
        start = self._now()
        try:
            images = self.pipe(
                prompt=prompt,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=1.5,
                num_images_per_prompt=batch,
                generator=torch.Generator().manual_seed(seed),
            ).images
        except (RuntimeError, IndexError, ValueError) as e:
            raise GlmImageError(
                f"the reference GlmImagePipeline failed at {width}x{height}, seed {seed} ({type(e).__name__}: {e}). "
                "An index or shape error here usually means its AR model wrote a non-image token inside the "
                "grid (it has no guard against that): try another --seed"
            ) from None
        total = self._now() - start
        m = self._marks
        times = StageTimes(
            ar=m["ar_end"] - m["ar_start"],
            ar_prefill=m.get("ar_prefill", m["ar_end"]) - m["ar_start"],
            dit=m["vae_start"] - m["ar_end"],
            vae=m["vae_end"] - m["vae_start"],
            total=total,
            ar_tokens=self._counts["ar"],
            ar_sequences=1,  # num_images_per_prompt shares one token sequence per prompt
            images=batch,
            dit_forwards=self._counts["dit"],
        )
        return images, times
