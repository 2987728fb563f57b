"""GlmImage: validate -> AR prior tokens -> glyph embeddings -> denoise -> VAE -> images.

The one object a user needs. Both stages load from one checkpoint; the request is checked before
any work starts, with an error that names the field and the allowed values; a prompt reaches the
tokenizers as plain text (``validation.plain_text``); latents with NaN or Inf raise
``NonFiniteError`` before the VAE runs, so no black image comes out; every image has its
own seed (``seed`` numbers them ``seed, seed + 1, ...``), used by the AR sampler and the initial
noise alike, so a seed gives the image diffusers' ``GlmImagePipeline`` gives with
``generator=torch.Generator().manual_seed(seed)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._version import __version__
from .engine import ArEngine, DitEngine
from .engine.choices import DEFAULT_WINDOW, check_decoding
from .errors import GlmImageError
from .progress import Progress
from .request import GenerationRequest
from .stages import ar_stage, dit_stage
from .validation import (
    check_generation,
    check_request,
    load_condition_images,
    request_seeds,
)

__all__ = ["GenerationOutput", "GlmImage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationOutput:
    images: list  # PIL images, one per (prompt, image) pair, prompt-major
    prior_token_ids: torch.Tensor  # (B, (H/16) * (W/16))
    seeds: tuple[int, ...]
    # seconds per stage: "ar" (of which "ar_prefill": planning, prefill and the first token),
    # "dit", "vae"; shared by every image of the call
    timings: dict[str, float] = field(default_factory=dict)
    ar_tokens: int = 0  # tokens the AR model wrote per image (preview + target grid)
    # AR model forwards per image, the prefill included (sequential: one per token; Jacobi: fewer)
    ar_forwards: tuple[int, ...] = ()


def _needs_offload(root: Path, device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda":
        return False
    from .weights import WeightIndex

    folders = ("vision_language_encoder", "transformer", "text_encoder", "vae")
    params = sum(WeightIndex.from_folder(root / f).num_params for f in folders)
    needed = params * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    return needed > 0.85 * free


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
    ) -> None:
        """``offload_to``: where a stage waits while the other runs (e.g. "cpu"); None keeps both
        stages on their device. ``ar_decoding``, ``jacobi_window``: the defaults of ``generate``."""
        check_decoding(ar_decoding, jacobi_window)
        self.ar, self.dit, self.name = ar, dit, name
        self.ar_decoding, self.jacobi_window = ar_decoding, jacobi_window
        self.device = ar.device
        self.offload_to = torch.device(offload_to) if offload_to is not None else None
        self.limits = ar.config.size_limits

    @property
    def attention_backend(self) -> str:
        """The name of the ops backend both stages run on (see ``glm_image.ops``)."""
        return self.ar.model.ops.name

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "tiny",
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        offload: bool | None = None,
        attention_backend: str | None = None,
        ar_decoding: str = "sequential",
        jacobi_window: int = DEFAULT_WINDOW,
    ) -> GlmImage:
        """``model``: tiny | wide | a checkpoint folder | a Hugging Face id (see ``hub``).

        ``device``: cpu | cuda | npu (default: ``glm_image.device.detect_platform``); ``dtype``:
        float32 on a CPU, bfloat16 elsewhere. ``attention_backend``: auto | sdpa | triton | npu,
        the ops backend of both stages (see ``glm_image.ops``), chosen once for the device.
        ``offload``: keep only the running stage on the device (the other waits in host memory).
        None decides: on a GPU whose free memory cannot hold both stages' weights (with 15%
        headroom for activations), offload; everywhere else, keep both. The choice is logged.
        ``ar_decoding``: how the AR stage decodes by default (see ``generate``).
        """
        check_decoding(ar_decoding, jacobi_window)
        from .device import default_dtype, resolve_device
        from .hub import resolve_checkpoint
        from .ops import select_ops

        device = resolve_device(device)
        dtype = dtype or default_dtype(device)
        ops = select_ops(attention_backend, device)
        root = resolve_checkpoint(model)
        if offload is None:
            offload = _needs_offload(root, device, dtype)
        home = torch.device("cpu") if offload else device
        log.info(
            "loading %s (%s) on %s%s",
            root,
            dtype,
            device,
            "; the AR and DiT stages take turns on it" if offload else "",
        )
        ar = ArEngine.from_pretrained(root, device=home, dtype=dtype, attention_backend=ops)
        dit = DitEngine.from_pretrained(root, device=home, dtype=dtype, attention_backend=ops)
        pipe = cls(
            ar,
            dit,
            str(model),
            offload_to=home if offload else None,
            ar_decoding=ar_decoding,
            jacobi_window=jacobi_window,
        )
        pipe.device = device
        return pipe

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
    ) -> GenerationOutput:
        """Images for every (prompt, image) pair, prompt-major.

        ``seed``: the first image's seed (image ``i`` uses ``seed + i``), or one seed per image,
        or None (random). ``ar_decoding``: ``sequential`` (one AR forward per token; a seed gives
        the reference's image) or ``jacobi`` (speculative Jacobi windows of ``jacobi_window``
        tokens: the same distribution of images in fewer forwards, not the same image per seed);
        None takes the pipeline's default (``from_pretrained``).
        """
        ar_decoding = self.ar_decoding if ar_decoding is None else ar_decoding
        jacobi_window = self.jacobi_window if jacobi_window is None else jacobi_window
        check_decoding(ar_decoding, jacobi_window)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.validate(prompts, height, width, num_inference_steps, guidance_scale, num_images_per_prompt)
        condition_images = load_condition_images(images, len(prompts), self.limits)
        count = len(prompts) * num_images_per_prompt
        seeds = request_seeds(seed, count)

        self._resident(self.ar, self.dit)
        prior = ar_stage(
            self.ar,
            prompts,
            height,
            width,
            seeds,
            num_images_per_prompt=num_images_per_prompt,
            condition_images=condition_images,
            decoding=ar_decoding,
            jacobi_window=jacobi_window,
            progress=progress,
        )
        self._resident(self.dit, self.ar)
        images, dit_timings = dit_stage(
            self.dit, prior, num_inference_steps, guidance_scale, progress=progress
        )
        timings = {**prior.timings, **dit_timings}
        log.info("generated %d image(s) %dx%d: %s", count, width, height, timings)
        return GenerationOutput(
            images, prior.prior_token_ids, seeds, timings, prior.ar_tokens, prior.ar_forwards
        )

    # ---------------------------------------------------------------- requests

    def validate_request(self, request: GenerationRequest) -> None:
        """Raise ``GlmImageError`` naming the first field of ``request`` that is not allowed."""
        check_request(self.limits, request)

    def run(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationOutput:
        """Carry out one request."""
        return self.generate(
            request.prompt,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            seed=request.seed,
            images=list(request.images) or None,
            num_images_per_prompt=request.num_images,
            progress=progress,
        )

    def run_batch(
        self, requests: Sequence[GenerationRequest], progress: Progress | None = None
    ) -> list[GenerationOutput]:
        """Several text-to-image requests with one ``batch_key`` as ONE engine call.

        Every image keeps its own seed, so each request gets the images it would get alone (up
        to the last bits of batched GEMMs). Returns one output per request, in order; the
        timings are the shared call's.
        """
        requests = list(requests)
        if not requests:
            return []
        if len({r.batch_key for r in requests}) != 1:
            raise GlmImageError(
                "run_batch: requests differ in size, steps, guidance or condition images; "
                "group them by GenerationRequest.batch_key"
            )
        if len(requests) == 1:
            return [self.run(requests[0], progress)]
        first = requests[0]
        prompts, seeds = [], []
        for request in requests:
            own = request_seeds(request.seed, request.num_images)
            prompts += [request.prompt] * request.num_images
            seeds += own
        out = self.generate(
            prompts,
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            seed=seeds,
            progress=progress,
        )
        results, at = [], 0
        for request in requests:
            n = request.num_images
            results.append(
                GenerationOutput(
                    out.images[at : at + n],
                    out.prior_token_ids[at : at + n],
                    out.seeds[at : at + n],
                    out.timings,
                    out.ar_tokens,
                    out.ar_forwards[at : at + n],
                )
            )
            at += n
        return results

    def _resident(self, running, waiting) -> None:
        """With offloading, only the stage about to run sits on the device."""
        if self.offload_to is not None:
            waiting.to(self.offload_to)
            running.to(self.device)

    def png_info(
        self, prompt: str, seed: int, height: int, width: int, steps: int, guidance: float
    ) -> dict[str, str]:
        """The generation parameters, as PNG text chunks."""
        decoding = self.ar_decoding
        if decoding == "jacobi":  # the same distribution as sequential, not the same image per seed
            decoding += f" (window {self.jacobi_window})"
        return {
            "prompt": prompt,
            "seed": str(seed),
            "size": f"{width}x{height}",
            "steps": str(steps),
            "guidance": str(guidance),
            "ar_decoding": decoding,
            "model": self.name,
            "engine": f"glm-image {__version__}",
        }
