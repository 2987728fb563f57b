"""GlmImage: validate -> AR prior tokens -> glyph embeddings -> denoise -> VAE -> images.

The one object a user needs. Both stages load from one checkpoint; the request is checked before
any work starts, with an error that names the field and the allowed values; a prompt reaches the
tokenizers as plain text (``validation.plain_text``); latents with NaN or Inf raise
``NonFiniteError`` before the VAE runs, so no black image comes out; every image has its
own seed (``seed`` numbers them ``seed, seed + 1, ...``), used by the AR sampler and the initial
noise alike, so a seed gives the image diffusers' ``GlmImagePipeline`` gives with
``generator=torch.Generator().manual_seed(seed)``.

Several devices (``ar_tp``, ``dit_cfg_parallel``, ``dit_sp``, ``placement``; see
``glm_image.parallel``): a stage with several ranks is a ``stages.ProcessStage`` of rank processes this
object spawns and owns (``close()``, or at exit); the other runs here. Only the stage values of
``glm_image.stages`` cross, so every entry point below works the same either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ._version import __version__
from .engine import ArEngine, DitEngine
from .engine.choices import (
    DEFAULT_CONTINUED,
    DEFAULT_COUPLED,
    DEFAULT_DRAFTS,
    DEFAULT_WINDOW,
    JacobiDrafts,
    StepCacheOptions,
    check_decoding,
)
from .errors import GlmImageError
from .parallel.config import ParallelConfig
from .progress import Progress
from .request import GenerationRequest
from .stages import ArCall, DitCall, GenerationOutput, as_handle, output_of, outputs_of, plan_call
from .validation import (
    IdleCacheWarning,
    check_generation,
    check_request,
    idle_step_cache,
    load_condition_images,
    request_seeds,
)

__all__ = ["GenerationOutput", "GlmImage"]

log = logging.getLogger(__name__)

LORA_MODES = ("auto", "merged", "unmerged")


def _describe(cache: StepCacheOptions | None) -> str:
    if cache is None:
        return "none"
    taylor = ", taylor" if cache.taylor else ""
    return (
        f"fbcache (threshold {cache.threshold}, warmup {cache.warmup}, "
        f"max consecutive {cache.max_consecutive}{taylor})"
    )


class GlmImage:
    def __init__(
        self,
        ar: ArEngine,
        dit: DitEngine,
        name: str,
        *,
        offload_to: str | torch.device | None = None,
        ar_decoding: str = "sequential",
        jacobi_window: int = DEFAULT_WINDOW,
        dit_cache: StepCacheOptions | None = None,
        quantize: str = "none",
        parallel: ParallelConfig | None = None,
        jacobi: JacobiDrafts | None = None,
    ) -> None:
        """``ar``, ``dit``: an engine each, or a stage handle (``stages.StageHandle``: rank
        processes, a torchrun rank's part). ``offload_to``: where a stage waits while the other runs (e.g. "cpu"); None keeps
        both stages on their device. ``ar_decoding``, ``jacobi_window``, ``dit_cache``, ``jacobi``
        (the Jacobi drafts' options): the defaults of ``generate``. ``quantize``: the weight format the engines were loaded with
        (recorded in every PNG). ``parallel``: how the stages are spread (checks sizes)."""
        check_decoding(ar_decoding, jacobi_window)
        self.jacobi = JacobiDrafts() if jacobi is None else jacobi
        self.jacobi.check()
        if dit_cache is not None:
            dit_cache.check()
        self.ar, self.dit, self.name = ar, dit, name
        self.handles = (as_handle("ar", ar), as_handle("dit", dit))  # how the stages are called
        self.ar_decoding, self.jacobi_window, self.dit_cache = ar_decoding, jacobi_window, dit_cache
        self.quantize = quantize
        self.parallel = parallel or ParallelConfig()
        self.answers = True  # False on the ranks of a torchrun launch but the first (they write nothing)
        self.device = ar.device
        self.offload_to = torch.device(offload_to) if offload_to is not None else None
        self.limits = ar.config.size_limits
        self.lora = None  # a lora.LoraRegistry once an adapter is loaded (every stage, any handle)
        self.residency = "swap" if self.offload_to is not None else "resident"
        self.streams: dict = {}  # stage -> engine.offload.BlockStream, under block offload
        self.memory = None  # (residency.MemoryPlan, checkpoint root, dtype) when the planner placed it

    @property
    def attention_backend(self) -> str:
        """The name of the ops backend both stages run on (see ``glm_image.ops``)."""
        model = getattr(self.ar, "model", None)
        return model.ops.name if model is not None else self.ar.attention_backend

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "tiny",
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        offload: bool | None = None,
        attention_backend: str | None = None,
        quantize: str | None = None,
        max_memory: str | int | None = None,
        residency: str | None = None,
        ar_decoding: str = "sequential",
        jacobi_window: int = DEFAULT_WINDOW,
        jacobi_drafts: str = DEFAULT_DRAFTS,
        jacobi_coupled: bool = DEFAULT_COUPLED,
        jacobi_continued: bool = DEFAULT_CONTINUED,
        dit_cache: StepCacheOptions | None = None,
        ar_tp: int = 1,
        dit_cfg_parallel: bool = False,
        dit_sp: int = 1,
        placement: str = "same",
        lora: Sequence[tuple[str | Path, float]] | None = None,
        lora_mode: str = "auto",
    ) -> GlmImage:
        """``model``: tiny | wide | a checkpoint folder | a Hugging Face id (see ``hub``).

        ``device``: cpu | cuda | npu (default: ``glm_image.device.detect_platform``); ``dtype``:
        float32 on a CPU, bfloat16 elsewhere. ``attention_backend``: auto | sdpa | triton | npu,
        the ops backend of both stages (see ``glm_image.ops``), chosen once for the device.
        ``quantize``: the weight format, none | int8 | fp8 | ``ar=int4,dit=int8`` | per stage
        ``ar=int8,dit=fp8`` | auto (see ``glm_image.quant``), applied while the weights load.
        ``residency``: where the weights live, one of ``residency.RESIDENCIES``: ``resident``
        (both stages on the device), ``swap`` (the stages take turns; the idle one waits in host
        memory), ``dit_offload`` (take turns, and the DiT's blocks stream from host memory a
        block ahead of use: ``engine.offload``), ``offload`` (the AR's layers stream too). None
        lets the memory planner decide (``glm_image.residency``) from the device's free memory or
        ``max_memory`` ("16GB", "24GiB"), for a 1024x1024 image; with ``quantize="auto"`` it
        also picks the format. Its choice and why are logged in one line. ``offload``: the older
        switch: True asks for at least ``swap``, False for ``resident``.
        ``ar_decoding``, ``jacobi_window``, ``jacobi_drafts``, ``jacobi_coupled``,
        ``jacobi_continued``, ``dit_cache``: the defaults of ``generate``.

        Several devices (``glm_image.parallel``): ``ar_tp`` tensor-parallel AR ranks;
        ``dit_cfg_parallel`` the DiT's two CFG branches on two ranks; ``dit_sp`` Ulysses
        sequence-parallel DiT ranks per branch; ``placement`` ``same`` (both stages from the first
        device) or ``separate`` (the DiT's ranks on the devices after the AR's). Ranks are worker
        processes, one device each (on a CPU: processes); ``close()`` stops them. Every value, the
        model's head counts and the number of devices are checked before any weights load.

        ``lora``: adapters applied to every image, ``[(path, scale), ...]`` (PEFT folders or
        diffusers ``.safetensors``; see ``glm_image.lora`` and docs/lora.md). ``lora_mode``:
        ``merged`` (into the weights: no cost per token), ``unmerged`` (beside them), or ``auto``
        (merged unless the weights are quantized).
        """
        if lora_mode not in LORA_MODES:
            raise GlmImageError(f"lora_mode = {lora_mode!r}; allowed: {', '.join(LORA_MODES)}")
        if lora:  # every adapter file read and checked before any weights load
            from .lora import read_adapters

            for path, _ in lora:
                read_adapters(path)
        check_decoding(ar_decoding, jacobi_window)
        jacobi = JacobiDrafts(jacobi_drafts, jacobi_coupled, jacobi_continued)
        jacobi.check()
        if dit_cache is not None:
            dit_cache.check()
        parallel = ParallelConfig(ar_tp, dit_cfg_parallel, dit_sp, placement)
        parallel.check()
        from .config import CheckpointConfig
        from .device import default_dtype, resolve_device
        from .hub import resolve_checkpoint
        from .ops import select_ops
        from .quant import check_device, parse_quantize
        from .residency import check_residency, plan_memory

        device = resolve_device(device)
        dtype = dtype or default_dtype(device)
        scheme = parse_quantize(quantize)  # a bad value fails before anything loads
        check_residency(residency)
        check_device(scheme, device)
        ops = select_ops(attention_backend, device)
        root = resolve_checkpoint(model)
        if parallel.spread:
            parallel.check(CheckpointConfig.from_dir(root), device)
            if residency not in (None, "resident"):
                raise GlmImageError(
                    f"residency = {residency!r}: the planner sizes one device and the stages run on "
                    f"several ({parallel.describe()}); allowed: resident or none"
                )
            if offload:
                raise GlmImageError(
                    f"offload = True: the stages cannot take turns on one device when they run on "
                    f"several ({parallel.describe()}); allowed: offload False or None"
                )
        if residency is None and offload is not None:
            residency = "swap" if offload else "resident"
        plan = plan_memory(
            root,
            device,
            dtype,
            quantize=scheme,
            max_memory=max_memory,
            residency=residency,
            parallel=parallel if parallel.spread else None,
        )
        defaults = {
            "ar_decoding": ar_decoding,
            "jacobi_window": jacobi_window,
            "jacobi": jacobi,
            "dit_cache": dit_cache,
        }
        if parallel.spread:  # the plan (per device) resolves quantize="auto"; the ranks load it
            pipe = cls._spread(
                root, model, device, dtype, attention_backend, plan.scheme, parallel, **defaults
            )
            if device.type != "cpu":  # a CPU's ranks share the host: the per-device plan is not its
                pipe.memory = (plan, root, dtype)
            if lora:
                pipe._fixed_lora(lora, lora_mode)
            return pipe
        offload = plan.offload
        home = torch.device("cpu") if offload else device
        streamed = " and streams the blocks of " + " and ".join(plan.streamed) if plan.streamed else ""
        log.info(
            "loading %s (%s) on %s%s",
            root,
            dtype,
            device,
            f"; the AR and DiT stages take turns on it{streamed}" if offload else "",
        )
        ar = ArEngine.from_pretrained(
            root, device=home, dtype=dtype, attention_backend=ops, quantize=plan.scheme
        )
        dit = DitEngine.from_pretrained(
            root, device=home, dtype=dtype, attention_backend=ops, quantize=plan.scheme
        )
        pipe = cls(
            ar,
            dit,
            str(model),
            offload_to=home if offload else None,
            quantize=str(plan.scheme),
            **defaults,
        )
        pipe.device = device
        if lora:
            pipe._fixed_lora(lora, lora_mode)
        pipe.memory = (plan, root, dtype)
        pipe._stream_blocks(plan.residency, device)
        return pipe

    def _registry(self):
        if self.lora is None:  # the adapters reach each stage through its handle, wherever it runs
            from .lora import LoraRegistry

            self.lora = LoraRegistry(dict(zip(("ar", "dit"), self.handles, strict=True)))
        return self.lora

    def _fixed_lora(self, lora: Sequence[tuple[str | Path, float]], mode: str) -> None:
        """``from_pretrained``'s adapters: merged into the weights (every rank merges its shard),
        or held and applied to every call; ``auto``: merged unless the weights are quantized."""
        if mode == "auto":
            mode = "merged" if self.quantize == "none" else "unmerged"
        registry = self._registry()
        if mode == "merged":
            if self.quantize != "none":
                raise GlmImageError(
                    f"lora_mode = 'merged' on quantized weights ({self.quantize}); allowed: 'unmerged' or 'auto'"
                )
            for path, scale in lora:
                registry.merge(path, scale)
        else:
            registry.fixed = registry.resolve(lora)
        log.info("lora %s: %s", mode, ", ".join(f"{p}:{s:g}" for p, s in lora))

    def load_lora(self, name: str, path: str | Path) -> None:
        """Hold the adapter at ``path`` as ``name`` (unmerged) for calls to pick with ``lora``."""
        self._registry().load(name, path)

    @classmethod
    def _spread(cls, root, model, device, dtype, attention_backend, scheme, parallel, **defaults) -> GlmImage:
        """Both stages as ``parallel`` says: a stage of several ranks is a ``ProcessStage`` (its
        ranks load their shards), a stage of one loads here on its device."""
        from .ops import select_ops
        from .stages import StageSpec, open_stage, spmd

        log.info("loading %s (%s): %s", root, dtype, parallel.describe())
        if spmd.launched():  # torchrun started the ranks: this process is one of them
            ops = select_ops(attention_backend, device)
            ar, dit = spmd.load(root, parallel, device, dtype, ops.name, scheme)
            pipe = cls(ar, dit, str(model), quantize=str(scheme), parallel=parallel, **defaults)
            pipe.device, pipe.answers = device, ar.control.rank == 0
            return pipe
        engines = []
        try:
            stages = zip(("ar", "dit"), (ArEngine, DitEngine), parallel.devices(device), strict=True)
            for stage, engine, devices in stages:
                ops = select_ops(attention_backend, torch.device(devices[0]))
                if len(devices) == 1:
                    loaded = engine.from_pretrained(
                        root, device=devices[0], dtype=dtype, attention_backend=ops, quantize=scheme
                    )
                else:
                    spec = StageSpec(
                        stage,
                        str(root),
                        dtype=str(dtype).removeprefix("torch."),
                        attention_backend=ops.name,
                        quantize=f"{stage}={scheme.stage(stage)}",  # "int4" alone is the AR's only
                        tp=parallel.ar_tp,
                        cfg=parallel.dit_cfg,
                        sp=parallel.dit_sp,
                    )
                    loaded = open_stage(spec, devices)
                engines.append(loaded)
        except BaseException:
            for index, loaded in enumerate(engines):
                as_handle(("ar", "dit")[index], loaded).close()
            raise
        pipe = cls(*engines, str(model), quantize=str(scheme), parallel=parallel, **defaults)
        pipe.device = device
        return pipe

    def _stream_blocks(self, residency: str, device: torch.device) -> None:
        """Apply ``residency``'s block offload: the streamed stages' blocks wait in host memory
        and are copied to ``device`` ahead of use (``engine.offload.BlockStream``)."""
        from .engine.offload import BlockStream, ar_units, dit_units
        from .residency import STREAMED

        self.residency = residency
        for stage in STREAMED[residency]:
            engine = self.ar if stage == "ar" else self.dit
            units = ar_units if stage == "ar" else dit_units
            self.streams[stage] = BlockStream(units(engine.model), device)
        if "ar" in self.streams and self.ar.decode_step == "auto":
            # a captured decode graph would replay the copies' addresses: the streamed AR runs eager
            self.ar.decode_step = "eager"

    def admission(self, max_side: int, batch: int, conditions: int):
        """The largest request this pipeline's memory plan holds (``admission.plan_admission``),
        starting from ``max_side`` square, ``batch`` images per call and ``conditions``
        condition images per prompt (on several devices, per device); None when it was not placed
        by the planner (ranks on a CPU, which share the host's memory)."""
        if self.memory is None:
            return None
        from .admission import plan_admission

        plan, root, dtype = self.memory
        limits = self.limits
        return plan_admission(
            plan,
            root,
            dtype,
            max_side=min(max_side, limits.maximum),
            min_side=limits.minimum,
            multiple=limits.multiple,
            batch=batch,
            conditions=conditions,
        )

    def free_after_failure(self) -> None:
        """After a call failed (an out-of-memory error from another process taking the device):
        drop the block copies in flight and the allocator's cached blocks, so the next call
        starts from the weights alone."""
        import gc

        for stream in self.streams.values():
            stream.release()
        gc.collect()
        module = getattr(torch, self.device.type, None)
        empty = getattr(module, "empty_cache", None) if self.device.type != "cpu" else None
        if callable(empty):
            empty()

    def close(self) -> None:
        """Stop the worker processes of the stages that run on several ranks (also done at exit)."""
        for stream in self.streams.values():
            stream.close()
        for handle in self.handles:
            handle.close()

    def __enter__(self) -> GlmImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def validate(
        self,
        prompts: Sequence[str],
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        num_images_per_prompt: int,
    ) -> None:
        """Raise ``GlmImageError`` naming the first field that is not allowed."""
        check_generation(
            self.limits, prompts, height, width, num_inference_steps, guidance_scale, num_images_per_prompt
        )
        self.parallel.check_size(height, width)

    def generate(
        self,
        prompt: str | Sequence[str],
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.5,
        seed: int | Sequence[int] | None = None,
        images: Sequence | None = None,
        num_images_per_prompt: int = 1,
        progress: Progress | None = None,
        ar_decoding: str | None = None,
        jacobi_window: int | None = None,
        dit_cache: StepCacheOptions | None = None,
        fit_images: bool = False,
        lora: Sequence[tuple[str | Path, float]] | None = None,
        jacobi_drafts: str | None = None,
        jacobi_coupled: bool | None = None,
        jacobi_continued: bool | None = None,
    ) -> GenerationOutput:
        """Images for every (prompt, image) pair, prompt-major.

        ``seed``: the first image's seed (image ``i`` uses ``seed + i``), or one seed per image,
        or None (random). ``ar_decoding``: ``sequential`` (one AR forward per token; a seed gives
        the reference's image) or ``jacobi`` (speculative Jacobi windows of ``jacobi_window``
        tokens: the same distribution of images in fewer forwards, not the same image per seed);
        None takes the pipeline's default (``from_pretrained``). ``jacobi_drafts`` (last, above,
        preview: a draft's first value), ``jacobi_coupled``, ``jacobi_continued`` (how a draft is
        renewed; ``engine.choices``): Jacobi decoding's draft options, each exact; None takes the
        pipeline's. ``dit_cache``: DiT step caching
        (``engine.step_cache``: skip blocks on steps that change little; ``GenerationOutput.
        dit_forwards`` says what each image computed); None takes the pipeline's default (off
        unless set there). ``fit_images``: a condition image of a size the model does not take
        (see ``SizeLimits``) is resized and centre-cropped to the nearest allowed size, with a
        logged warning, instead of being an error. ``lora``: adapters for this call,
        ``[(name or path, scale), ...]`` (unmerged, on top of ``from_pretrained``'s; a path is read
        once and kept).
        """
        dit_cache = self.dit_cache if dit_cache is None else dit_cache
        if dit_cache is not None:
            dit_cache.check()
        ar_decoding = self.ar_decoding if ar_decoding is None else ar_decoding
        jacobi_window = self.jacobi_window if jacobi_window is None else jacobi_window
        check_decoding(ar_decoding, jacobi_window)
        jacobi = JacobiDrafts(
            self.jacobi.drafts if jacobi_drafts is None else jacobi_drafts,
            self.jacobi.coupled if jacobi_coupled is None else jacobi_coupled,
            self.jacobi.continued if jacobi_continued is None else jacobi_continued,
        )
        jacobi.check()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.validate(prompts, height, width, num_inference_steps, guidance_scale, num_images_per_prompt)
        condition_images = load_condition_images(images, len(prompts), self.limits, fit=fit_images)
        count = len(prompts) * num_images_per_prompt
        seeds = request_seeds(seed, count)
        registry = self._registry() if lora or self.lora is not None else None  # names checked now
        adapters = registry.for_stages(registry.resolve(lora)) if registry is not None else {}

        call = ArCall(
            tuple(prompts),
            height,
            width,
            seeds,
            num_images_per_prompt,
            condition_images,
            ar_decoding,
            jacobi_window,
            jacobi,
        )
        prior, made = self._run_stages(
            call, num_inference_steps, guidance_scale, dit_cache, progress, adapters
        )
        log.info("generated %d image(s) %dx%d: %s", count, width, height, {**prior.timings, **made.timings})
        return output_of(prior, made)

    def _run_stages(self, call: ArCall, steps: int, guidance: float, dit_cache, progress, adapters):
        """``adapters``: stage -> its ``lora.StageLora`` (or None), from the registry."""
        idle = idle_step_cache(dit_cache, steps)
        if idle is not None:  # every entry point meets here before any work: one place to say so
            warnings.warn(idle, IdleCacheWarning, stacklevel=3)
        ar, dit = self.handles
        try:
            self._resident(ar, dit)
            prior = ar.run(dataclasses.replace(call, lora=adapters.get("ar")), progress)
            self._resident(dit, ar)
            made = dit.run(DitCall(prior, steps, guidance, dit_cache, adapters.get("dit")), progress)
        except torch.OutOfMemoryError:
            self.free_after_failure()  # the call's tensors are gone with its frames; drop the cache
            raise
        return prior, made

    # ---------------------------------------------------------------- requests

    def validate_request(self, request: GenerationRequest) -> None:
        """Raise ``GlmImageError`` naming the first field of ``request`` that is not allowed."""
        self._checked(request)

    def _checked(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` checked, its condition images opened (once: the call then uses them)."""
        request = check_request(self.limits, request)
        self.parallel.check_size(request.height, request.width)
        return request

    def run(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationOutput:
        """Carry out one request."""
        return self.run_batch([request], progress)[0]

    def run_batch(
        self, requests: Sequence[GenerationRequest], progress: Progress | None = None
    ) -> list[GenerationOutput]:
        """Requests with one ``batch_key`` as ONE engine call (``stages.plan_call``).

        Every image keeps its own seed, so each request gets the images it would get alone (up
        to the last bits of batched GEMMs). Returns one output per request, in order; the
        timings are the shared call's. The pipeline's defaults decode and cache.
        """
        requests = list(requests)
        if not requests:
            return []
        if len({r.batch_key for r in requests}) != 1:
            raise GlmImageError(
                "run_batch: requests differ in size, steps, guidance or condition images; "
                "group them by GenerationRequest.batch_key"
            )
        requests = [self._checked(request) for request in requests]
        call = plan_call(requests, self.limits, self.ar_decoding, self.jacobi_window, self.jacobi)
        first = requests[0]
        if len({r.lora for r in requests}) > 1 and self.dit_cache is not None:
            # the step cache forwards some rows of a batch only: per-image adapters cannot follow
            return [self.run_batch([r], progress)[0] for r in requests]
        # every name checked now; adapters row by row where requests differ (glm_image.lora)
        chosen = any(r.lora for r in requests) or self.lora is not None
        adapters = self._registry().for_requests(requests) if chosen else {}
        prior, made = self._run_stages(call, first.steps, first.guidance, self.dit_cache, progress, adapters)
        return outputs_of(requests, prior, made)

    def _resident(self, running, waiting) -> None:
        """With offloading, only the stage about to run sits on the device."""
        if self.offload_to is not None:
            for handle, where in ((waiting, self.offload_to), (running, self.device)):
                stream = self.streams.get(handle.stage)
                with stream.parked() if stream is not None else contextlib.nullcontext():
                    handle.to(where)

    def png_info(self, request: GenerationRequest, output: GenerationOutput, index: int) -> dict[str, str]:
        """Image ``index`` of ``output`` (made for ``request``): its generation parameters and
        cost, as PNG text chunks."""
        decoding = self.ar_decoding
        if decoding == "jacobi":  # the same distribution as sequential, not the same image per seed
            decoding += f" (window {self.jacobi_window}, {self.jacobi.describe()})"
        text = {
            "prompt": request.prompt,
            "seed": str(output.seeds[index]),
            "size": request.size,
            "steps": str(request.steps),
            "guidance": str(request.guidance),
            "ar_decoding": decoding,
            "dit_cache": _describe(self.dit_cache),
            "quantize": self.quantize,
            "model": self.name,
            "engine": f"glm-image {__version__}",
        }
        lora = [f"{p}:{s:g}" for p, s in self.lora.merged] if self.lora is not None else []
        lora += [f"{n}:{s:g}" for n, s in (self.lora.fixed if self.lora is not None else ())]
        lora += [f"{n}:{s:g}" for n, s in request.lora]
        if lora:
            text["lora"] = ", ".join(lora)
        parallel = self.parallel
        if parallel.spread:
            text["parallel"] = parallel.describe()
        if output.ar_forwards:
            text["ar_forwards"] = str(output.ar_forwards[index])
        if output.dit_forwards:
            text["dit_forwards"] = f"{output.dit_forwards[index]:g}"
        return text
