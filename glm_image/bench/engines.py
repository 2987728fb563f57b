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

A stage of ours that runs on several ranks (``--ar-tp``, ``--dit-cfg-parallel``, ``--dit-sp``) is
timed the same way inside its ranks (``bench_stage`` runs on each rank's engine), and
``OursRunner.comm_share`` runs one more call with every collective timed (device synchronised
around each; the AR then decodes eagerly), for the share of each stage's time its all-reduces,
all-gathers, all-to-alls and broadcasts take on the first rank.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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

__all__ = ["OursRunner", "ReferenceRunner", "StageTimes", "bench_stage", "on_device"]


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
        """Every weight of both stages, over all ranks of a stage that runs on several."""
        return on_engine(self.pipe.ar, _stage_weight_bytes) + on_engine(self.pipe.dit, _stage_weight_bytes)

    def park(self, where: torch.device) -> None:
        """Move the stages of this process off the device while the other engine runs (a stage
        on several ranks stays on its devices: its handle's ``to`` does nothing)."""
        for handle in self.pipe.handles:
            handle.to(where)

    def unpark(self) -> None:
        """Back on the device; an offloading pipe moves each stage in itself when it runs."""
        if self.pipe.offload_to is None:
            for handle in self.pipe.handles:
                handle.to(self.device)

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
        out, total = self._call(prompt, height, width, steps, batch, seed, max_ar_tokens)
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

    def _call(self, prompt, height, width, steps, batch, seed, max_ar_tokens, profile: dict | None = None):
        """``GlmImage.generate`` with each stage run through ``bench_stage`` (here, or on every
        rank of a stage group); ``profile``: time every collective, each stage's counters put in it."""
        patched = []
        for stage, handle in zip((self.pipe.ar, self.pipe.dit), self.pipe.handles, strict=True):
            if _ranks(handle) == 1:
                patched += _instrument(stage, max_ar_tokens)
                continue
            run = handle.run

            def grouped(call, progress=None, run=run, name=handle.stage):
                answer = run(
                    functools.partial(bench_stage, call=call, cap=max_ar_tokens, profile=profile is not None)
                )
                if profile is None:
                    return answer
                answer, profile[name] = answer
                return answer

            handle.run = grouped
            patched.append((handle, "run"))
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
            return out, time.perf_counter() - start
        finally:  # back to the class's own methods
            for engine, name in patched:
                engine.__dict__.pop(name, None)

    def comm_share(self, prompt, height, width, steps, batch, seed, max_ar_tokens) -> dict | None:
        """Per stage on several ranks, one call with every collective timed: the stage's seconds
        on its first rank and the share its collectives took (None: no stage on several ranks)."""
        if not any(_ranks(handle) > 1 for handle in self.pipe.handles):
            return None
        profile: dict = {}
        self._call(prompt, height, width, steps, batch, seed, max_ar_tokens, profile)
        out = {}
        for name, stats in profile.items():
            spent = sum(stats["seconds"].values())
            out[name] = {
                "ranks": stats["ranks"],
                "stage_s": round(stats["stage_s"], 6),
                "collective_s": {k: round(v, 6) for k, v in stats["seconds"].items()},
                "calls": stats["calls"],
                "bytes": stats["bytes"],
                "share": round(spent / stats["stage_s"], 4) if stats["stage_s"] > 0 else None,
            }
        return out


def _ranks(handle) -> int:
    """How many ranks run ``handle``'s stage (1: its engine is in this process, to instrument)."""
    return handle.describe().get("ranks", 1)


def on_engine(stage, fn):
    """``fn(engine)`` on ``stage`` (an engine or a stage handle): its value on the stage's first
    rank, wherever that runs."""
    from ..stages import as_handle

    return as_handle("", stage).run(fn)


def _stage_weight_bytes(engine) -> int:
    """The weights of an ``ArEngine`` or ``DitEngine`` (its glyph encoder and VAE too), summed
    over the ranks of its groups (each DiT rank holds the whole DiT)."""
    ar = hasattr(engine, "generate")
    modules = [engine.model] if ar else [engine.model, engine.glyph.encoder, engine.vae]
    comms = [engine.model.tp] if ar else [engine.groups.sp, engine.groups.cfg]
    total = torch.tensor([_module_bytes(*modules)], dtype=torch.long, device=comms[0].device or "cpu")
    for comm in comms:
        comm.all_reduce(total)
    return int(total.item())


def _instrument(engine, cap: int | None) -> list:
    """Time the engine's stage honestly: ``generate`` (capped at ``cap`` tokens) and ``denoise``
    wait for their queued device work before they return. Returns what was patched."""
    device = engine.device
    if hasattr(engine, "generate"):
        generate = _capped_ours(engine.generate, cap) if cap is not None else engine.generate
        engine.generate = _then_sync(generate, device) if device.type != "cpu" else generate
        return [(engine, "generate")]
    if device.type != "cpu":
        engine.denoise = _then_sync(engine.denoise, device)
    return [(engine, "denoise")]


def bench_stage(engine, call, cap: int | None = None, profile: bool = False):
    """One stage call (``ArCall`` or ``DitCall``) as ``OursRunner`` times it, on a rank's engine
    (``ProcessStage.run`` sends it to every rank). ``profile``: every collective timed, the AR
    decoding eagerly (a synchronising step cannot be captured); returns (answer, counters)."""
    from ..stages import ar_stage, dit_stage

    run = ar_stage if hasattr(engine, "generate") else dit_stage
    patched = _instrument(engine, cap)
    comm = engine.model.tp if hasattr(engine, "generate") else engine.groups.sp
    stats, decode_step = comm.stats, getattr(engine, "decode_step", None)
    if profile:
        stats.reset()
        stats.timed = True
        if decode_step is not None:
            engine.decode_step = "eager"
    try:
        synchronize(engine.device)
        start = time.perf_counter()
        answer = run(engine, call)
        synchronize(engine.device)
        seconds = time.perf_counter() - start
    finally:
        for target, name in patched:
            target.__dict__.pop(name, None)
        stats.timed = False
        if decode_step is not None:
            engine.decode_step = decode_step
    if not profile:
        return answer
    ranks = comm.size if hasattr(engine, "generate") else engine.groups.cfg.size * comm.size
    return answer, {"ranks": ranks, "stage_s": seconds, **stats.as_dict()}


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
