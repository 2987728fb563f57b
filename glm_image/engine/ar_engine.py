"""The AR engine: prompts in, prior tokens for the DiT out.

One call is planned in full before the first token: the prompts are tokenized by the
checkpoint's own processor, left-padded into one batch, and every position, rotary table and
cache slot of the whole generation is known (preview grid + target grid [+ EOS]). Then a
prefill and a fixed-length decode loop run with a static KV cache and no host synchronisation
per token: the sampled token stays on the device and feeds the next step. Each sample has its
own seeded generator, so a batch gives the same images as its samples run one by one.

Batch invariance (``batch_invariant``): a row's tokens must not depend on the rows decoded with
it. The maths guarantees that, but a device's kernels round a row differently with the batch's
shape: on a CPU, MKL's GEMM gives a row other bits for 1-3, 5-7 or 9-11 rows than for 12 or more,
and ATen's attention kernel other bits when masked keys trail a row's last one (8 or more) or its
prompt is left-padded by other than a multiple of 8 slots (measured with torch 2.13 on an AMD EPYC,
AVX2 and AVX-512). Sampling turns such a last-bit difference into another token now and then (a
uniform near a threshold), and once one token differs the rest of the image does. So a batch can
run its rows apart, each as a batch of one with its own unpadded prompt: every kernel then sees the
shapes of the row alone, and the tokens equal the solo run's by construction. That is the default
on a CPU, where batching gains little; on an accelerator batching is the throughput, and its
kernels (cuBLAS picks GEMM kernels by row count) give a row the same distribution but not always the
same bits, so rows run together unless ``batch_invariant=True``.

``decoding="jacobi"`` decodes by speculative Jacobi windows instead (``engine.jacobi``): each
forward checks a window of draft tokens and keeps those sequential sampling could have written,
so the images have the same distribution in fewer forwards, though not the same image per seed;
greedy decoding gives exactly the sequential tokens. ``sequential`` equals the reference seed for
seed and stays the default.

Tensor parallel (``tp``, ``glm_image.parallel``): every rank of the group runs this engine on
its shard of the decoder, with the same call; the prompt ids and every token are decided by the
group's first rank and sent to the others, so the ranks cannot diverge, and only that rank draws
sampling noise (seeded sampling gives the tokens of one process, unless a draw lands within the
last bits where the shards' sums round differently: docs/decoding-jacobi.md).

Device graphs (``decode_step`` auto on CUDA or Ascend): the decode step is captured once per
bucket (batch, KV capacity, sampling, LoRA; ``engine.graphs``) and kept, ``graph_buckets`` of
them; a later call of a bucket refills its buffers and replays. ``ArResult.graph_captures``: what
a call captured (0 when it replayed); ``graph_captures``: the engine's total.

``constrain_grid=True`` (default) masks EOS and the special tokens while a grid is incomplete,
*after* temperature/top-k/top-p, so whenever the reference would have written a valid grid we
write the same one, and where it would have cut the grid short we cannot. ``False`` reproduces
the reference exactly, including its failures (for parity tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import CheckpointConfig
from ..errors import GlmImageError
from ..lora import narrowed
from ..models.ar import ArModel, KVCache, rotary_tables
from ..models.vision import VisionEncoder
from ..ops import Ops
from ..parallel.comm import SINGLE, Comm
from ..progress import Progress, one_of
from ..quant import QuantScheme
from ..sampling import SamplingParams, image_seeds
from ..weights import load_model
from . import jacobi
from .choices import (
    DECODE_STEPS,
    DEFAULT_CONTINUED,
    DEFAULT_COUPLED,
    DEFAULT_DRAFTS,
    DEFAULT_WINDOW,
    check_decoding,
)
from .decode import DecodeStats, TokenPicker, start_sequential
from .graphs import DEFAULT_BUCKETS, GraphCache, run_steps, step_mode
from .loading import prepare_stage, verify_ops
from .protocol import GridSpec, decode_positions, prompt_positions, upsample_grid

__all__ = ["ArEngine", "ArResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArResult:
    """Everything one generation produced (``generate_prior_tokens`` returns only ``prior_tokens``)."""

    tokens: torch.Tensor  # (B, steps) generated ids, preview grid first
    prior_tokens: torch.Tensor | None  # (B, 4 * rows * cols) target grid upsampled x2; None if broken
    spec: GridSpec
    seeds: tuple[int, ...]
    logits: list[torch.Tensor] | None  # raw (B, V) logits per step, when asked for
    # image-to-image: per row, each condition image's VQ codes (h*w,) and its grid (h, w)
    conditions: list[list[tuple[torch.Tensor, tuple[int, int]]]] | None = None
    prefill_seconds: float = 0.0  # planning + prefill + the first token, device synchronised
    decode_step: str = "eager"  # how the steps after the first ran: eager, static or graph
    stats: DecodeStats | None = None  # model forwards (the prefill included), tokens per forward
    graph_captures: int = 0  # device graphs this call captured (0: none, or it replayed kept ones)


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor  # (B, P) left-padded
    valid: torch.Tensor  # (B, P) bool, False on padding
    positions: torch.Tensor  # (3, B, P)
    decode_positions: torch.Tensor  # (3, B, num_tokens + 1)

    def row(self, i: int) -> _Batch:
        """Row ``i`` alone, its left padding removed: the batch its prompt makes by itself."""
        start = int(self.valid[i].int().argmax())  # the first real slot
        return _Batch(
            self.input_ids[i : i + 1, start:],
            self.valid[i : i + 1, start:],
            self.positions[:, i : i + 1, start:],
            self.decode_positions[:, i : i + 1],
        )

    def repeat_rows(self, n: int) -> _Batch:
        """Each row ``n`` times in a row (n images per prompt)."""
        return _Batch(
            self.input_ids.repeat_interleave(n, dim=0),
            self.valid.repeat_interleave(n, dim=0),
            self.positions.repeat_interleave(n, dim=1),
            self.decode_positions.repeat_interleave(n, dim=1),
        )


@dataclass(frozen=True)
class _Decoded:
    """What decoding a batch gave (``ArEngine.generate``'s inner call)."""

    tokens: torch.Tensor  # (B, steps)
    logits: list[torch.Tensor] | None  # per step (B, V), when asked for
    prefill_done: float  # time.perf_counter() when the prefill's token was there
    how: str  # eager | static | graph
    stats: DecodeStats
    captures: int = 0  # device graphs captured


def _apart(
    batch: _Batch, generators: list[torch.Generator], run, progress: Progress | None, model
) -> _Decoded:
    """``run`` once per row, each row a batch of one (``ArEngine.batch_invariant``), put back
    together as one batch's result. The prefill time is the rows' prefills added up; progress
    is the rows' mean (``progress.one_of``)."""
    b, start, prefill = len(generators), time.perf_counter(), 0.0
    parts = []
    for i in range(b):
        began = time.perf_counter()
        with narrowed(model, [i]):  # per-image LoRA adapters: this row's
            parts.append(run(batch.row(i), generators[i : i + 1], one_of(progress, i, b)))
        prefill += parts[-1].prefill_done - began
    logits = None
    if parts[0].logits is not None:
        logits = [torch.cat(step) for step in zip(*(p.logits for p in parts), strict=True)]
    return _Decoded(
        torch.cat([p.tokens for p in parts]),
        logits,
        start + prefill,
        parts[0].how,
        DecodeStats.together([p.stats for p in parts]),
        sum(p.captures for p in parts),
    )


class ArEngine:
    """The AR text decoder with its processor and sampling defaults, on one device."""

    def __init__(
        self,
        model: ArModel,
        config: CheckpointConfig,
        processor,
        device: torch.device,
        root: Path | None = None,
        *,
        decode_step: str = "auto",
        noise_worker: bool = False,
        batch_invariant: bool | None = None,
        graph_buckets: int = DEFAULT_BUCKETS,
    ) -> None:
        """``graph_buckets``: the device graphs (with their buffers) kept for later calls, least
        recently used out (``engine.graphs``); 0 captures per call. ``batch_invariant``: decode
        a batch's rows apart, so that each row's tokens equal its solo run's bit for bit (see the
        module docstring); None: on a CPU only.
        ``decode_step``: see ``DECODE_STEPS``. ``noise_worker``: draw the sampling noise on a
        worker thread (CPU; it overlaps the draw with the step). The engine never changes torch's
        thread count: for a small decoder on a CPU, give the worker its core yourself with
        ``torch.set_num_threads(cores - 1)`` (measured on 2 cores, tiny preset: 1.31 -> 1.21 ms
        per token); at the released widths the draw is 0.3% of a step and the option is moot."""
        if decode_step not in DECODE_STEPS:
            raise GlmImageError(f"decode_step = {decode_step!r}; allowed: {', '.join(DECODE_STEPS)}")
        if batch_invariant is not None and not isinstance(batch_invariant, bool):
            raise GlmImageError(f"batch_invariant = {batch_invariant!r}; allowed: true, false or none (auto)")
        if not isinstance(graph_buckets, int) or isinstance(graph_buckets, bool) or graph_buckets < 0:
            raise GlmImageError(f"graph_buckets = {graph_buckets!r}; allowed: an integer >= 0")
        self.graphs = GraphCache(graph_buckets)
        self.decode_step = decode_step
        self.noise_worker = noise_worker
        self.batch_invariant = batch_invariant
        self.model = model.eval()
        self.root = root
        self._vision: VisionEncoder | None = None
        self.config = config
        self.processor = processor
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.num_codes = config.ar.vq.num_embeddings  # image codes come first in the vocabulary
        g = config.generation
        self.sampling = SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        # generation_config.json's do_sample: false makes greedy decoding the default
        self.greedy_default = not g.do_sample

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        attention_backend: str | Ops | None = None,
        decode_step: str = "auto",
        noise_worker: bool = False,
        quantize: str | QuantScheme | None = None,
        tp: Comm = SINGLE,
        batch_invariant: bool | None = None,
        graph_buckets: int = DEFAULT_BUCKETS,
    ) -> ArEngine:
        """``attention_backend``: an ops backend name (auto, sdpa, triton, npu; see
        ``glm_image.ops``) chosen for ``device``, or a backend already chosen by the caller (e.g.
        for the device the stage will run on when it is loaded elsewhere first). ``quantize``:
        the decoder's weight format, none | int8 | fp8 | int4, or a scheme naming stages
        (``ar=int4,dit=int8``; see ``glm_image.quant``), applied layer by layer while loading.
        ``tp``: the tensor-parallel group this process is a rank of (its shard is all it loads;
        ``glm_image.stages.ProcessStage`` builds the group). The other options: see ``__init__``."""
        from transformers import GlmImageProcessor

        setup = prepare_stage(path, device, attention_backend, "AR", quantize)
        config = setup.config
        if tp.size > 1:
            from ..parallel.layout import check_tp

            check_tp(tp.size, config.ar.text)
        model = load_model(
            lambda: ArModel(config.ar.text, setup.ops, tp),
            setup.root / "vision_language_encoder",
            device=setup.device,
            dtype=dtype,
            quantize=setup.quantize,
        )
        verify_ops(setup, model)
        if setup.device.type == "cpu":
            # A CPU GEMV over a short-rowed matrix is faster with the matrix stored column-major
            # (measured: 2.3x on the tiny head, no change at the released widths). Same values,
            # same shape, only the strides change; GPUs keep the checkpoint's layout.
            head = model.lm_head.weight
            head.data = head.data.t().contiguous().t()
        processor = GlmImageProcessor.from_pretrained(setup.root / "processor")
        return cls(
            model,
            config,
            processor,
            setup.device,
            setup.root,
            decode_step=decode_step,
            noise_worker=noise_worker,
            batch_invariant=batch_invariant,
            graph_buckets=graph_buckets,
        )

    @property
    def rows_apart(self) -> bool:
        """Whether a batch's rows are decoded apart (``batch_invariant``, resolved for the device)."""
        if self.batch_invariant is None:
            return self.device.type == "cpu"
        return self.batch_invariant

    def to(self, device: str | torch.device) -> ArEngine:
        """Move the stage's weights (the ViT too, once loaded); used to take turns on a small GPU."""
        self.device = torch.device(device)
        self.graphs.clear()  # their buffers and graphs are the old device's
        self.model.to(self.device)
        if self._vision is not None:
            self._vision.to(self.device)
        return self

    @property
    def graph_captures(self) -> int:
        """Device graphs this engine captured since it was made (``ArResult.graph_captures`` per call)."""
        return self.graphs.captures

    @property
    def vision(self) -> VisionEncoder:
        """The ViT + VQ tokenizer, loaded on the first image-to-image request (1.2B parameters)."""
        if self._vision is None:
            if self.root is None:
                raise GlmImageError(
                    "images: this engine was built without a checkpoint folder to load the ViT from"
                )
            ar = self.config.ar
            self._vision = load_model(
                lambda: VisionEncoder(ar.vision, ar.vq),
                self.root / "vision_language_encoder",
                device=self.device,
                dtype=self.dtype,
            ).eval()
        return self._vision

    # ---------------------------------------------------------------- planning

    def _grid_spec(self, grids: torch.Tensor) -> GridSpec:
        (_, rows, cols), (_, p_rows, p_cols) = grids.tolist()
        return GridSpec((rows, cols), (p_rows, p_cols))

    def processor_inputs(self, prompt: str, height: int, width: int, images: Sequence | None = None):
        """The checkpoint processor's output for one prompt (what the reference feeds
        ``GlmImageForConditionalGeneration``): input_ids, attention_mask, image_grid_thw, and for
        condition images pixel_values, with one image placeholder per patch in input_ids."""
        content = [{"type": "image", "image": image} for image in images or ()]
        messages = [[{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]]
        return self.processor.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"target_h": height, "target_w": width},
        )

    def _conditions(self, out) -> tuple[torch.Tensor, list[tuple[torch.Tensor, tuple[int, int]]]]:
        """Put the condition images' VQ codes where the processor left placeholders."""
        ids = out["input_ids"][0].clone()
        grids = [tuple(g) for g in out["image_grid_thw"][:-1].tolist()]
        vision = self.vision
        pixels = out["pixel_values"].to(self.device, self.dtype)
        codes = [c.cpu() for c in vision.tokens(vision.features(pixels, grids))]
        ids[ids == self.config.ar.image_token_id] = torch.cat(codes)
        return ids, [(c, (h, w)) for c, (_, h, w) in zip(codes, grids, strict=True)]

    def _plan(
        self, prompts: Sequence[str], height: int, width: int, images: Sequence[Sequence] | None = None
    ) -> tuple[_Batch, GridSpec, list | None]:
        ar = self.config.ar
        ids, positions, decode, spec, conditions = [], [], [], None, []
        for row, prompt in enumerate(prompts):
            out = self.processor_inputs(prompt, height, width, images[row] if images else None)
            if images:
                sample_ids, condition = self._conditions(out)
                conditions.append(condition)
                (_, rows, cols) = out["image_grid_thw"][-1].tolist()
                spec = GridSpec((rows, cols), None)  # image-to-image: the target grid only
            else:
                sample_ids, spec = out["input_ids"][0], self._grid_spec(out["image_grid_thw"])
            pos, offset = prompt_positions(
                sample_ids,
                [grid for _, grid in conditions[-1]] if images else (),
                image_start_id=ar.image_start_token_id,
                image_end_id=ar.image_end_token_id,
            )
            ids.append(sample_ids)
            positions.append(pos)
            decode.append(decode_positions(offset, spec))

        length = max(len(x) for x in ids)
        pad_id = self.config.ar.text.pad_token_id
        input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
        valid = torch.zeros((len(ids), length), dtype=torch.bool)
        pos = torch.zeros((3, len(ids), length), dtype=torch.long)
        for i, (x, p) in enumerate(zip(ids, positions, strict=True)):
            input_ids[i, length - len(x) :] = x
            valid[i, length - len(x) :] = True
            pos[:, i, length - len(x) :] = p
        to = self.device
        batch = _Batch(input_ids.to(to), valid.to(to), pos.to(to), torch.stack(decode, dim=1).to(to))
        # tensor parallel: the prompt is the first rank's (its condition images' codes included)
        self.model.tp.broadcast_(batch.input_ids)
        return batch, spec, (conditions if images else None)

    # ---------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate(
        self,
        prompts: str | Sequence[str],
        height: int,
        width: int,
        *,
        seeds: int | Sequence[int] | None = None,
        greedy: bool | None = None,
        constrain_grid: bool = True,
        num_images_per_prompt: int = 1,
        include_eos: bool = False,
        max_new_tokens: int | None = None,
        return_logits: bool = False,
        progress: Progress | None = None,
        images: Sequence[Sequence] | None = None,
        decoding: str = "sequential",
        jacobi_window: int = DEFAULT_WINDOW,
        jacobi_drafts: str = DEFAULT_DRAFTS,
        jacobi_coupled: bool = DEFAULT_COUPLED,
        jacobi_continued: bool = DEFAULT_CONTINUED,
    ) -> ArResult:
        """Generate the grids for every (prompt, image) pair; see ``generate_prior_tokens``.

        ``greedy``: argmax decoding; None follows the checkpoint (``do_sample`` in
        generation_config.json; the released model samples).

        ``include_eos`` runs the step after the last grid token too (the reference's final EOS
        step; the prior tokens do not need it). ``max_new_tokens`` stops early, for benchmarks
        and experiments: ``prior_tokens`` is then None unless the target grid is complete.
        ``images``: image-to-image, one list of condition images (PIL) per prompt; the model then
        writes the target grid only (no preview), and ``conditions`` carries the images' codes.

        ``decoding``: ``sequential`` or ``jacobi`` (see the module docstring); ``jacobi_window``
        tokens go through each Jacobi forward (the most it can accept), ``jacobi_drafts`` says
        where a position's first draft comes from (``engine.choices.DRAFT_INITS``),
        ``jacobi_coupled`` and ``jacobi_continued`` how a draft is renewed (``engine.jacobi``). The
        result's ``stats`` count the forwards either way.
        """
        start = time.perf_counter()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise GlmImageError("prompts: need at least one prompt")
        if num_images_per_prompt < 1:
            raise GlmImageError(f"num_images_per_prompt = {num_images_per_prompt} must be >= 1")
        check_decoding(decoding, jacobi_window, jacobi_drafts, jacobi_coupled, jacobi_continued)
        if decoding == "jacobi" and return_logits:
            raise GlmImageError(
                "return_logits: the logits of every step exist with decoding='sequential' only"
            )
        self.config.size_limits.check_size(height, width)
        if images is not None and len(images) != len(prompts):
            raise GlmImageError(
                f"images: {len(images)} image lists for {len(prompts)} prompts; need one per prompt"
            )
        # Each prompt is tokenized (and its images encoded) once; its rows repeat per image.
        batch, spec, conditions = self._plan(prompts, height, width, images)
        if num_images_per_prompt > 1:
            batch = batch.repeat_rows(num_images_per_prompt)
            if conditions is not None:
                conditions = [c for c in conditions for _ in range(num_images_per_prompt)]
        seeds = image_seeds(seeds, batch.input_ids.shape[0])
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        steps = spec.num_tokens + (1 if include_eos else 0)
        if max_new_tokens is not None:
            if max_new_tokens < 1:
                raise GlmImageError(f"max_new_tokens = {max_new_tokens} must be >= 1")
            steps = min(steps, max_new_tokens)

        greedy = self.greedy_default if greedy is None else greedy
        window = min(jacobi_window, steps)  # a row never accepts more than the tokens left
        options = jacobi.JacobiOptions(window, jacobi_drafts, jacobi_coupled, jacobi_continued)

        def run(rows: _Batch, gens: list[torch.Generator], report: Progress | None) -> _Decoded:
            if decoding == "jacobi":
                tokens, stats, done, how, captures = jacobi.decode(
                    self, rows, spec, steps, gens, greedy, constrain_grid,
                    options=options, progress=report,
                )  # fmt: skip
                return _Decoded(tokens, None, done, how, stats, captures)
            tokens, logits, done, how, captures = self._decode(
                rows, steps, gens, greedy, constrain_grid, return_logits, report
            )
            stats = DecodeStats("sequential", steps, (steps,) * len(gens), steps)
            return _Decoded(tokens, logits, done, how, stats, captures)

        if self.rows_apart and len(generators) > 1:
            decoded = _apart(batch, generators, run, progress, self.model)
        else:
            decoded = run(batch, generators, progress)
        tokens, logits, how, stats = decoded.tokens, decoded.logits, decoded.how, decoded.stats
        prefill_done = decoded.prefill_done
        end = spec.target_offset + spec.target[0] * spec.target[1]
        target = tokens[:, spec.target_offset : end]
        whole = steps >= end and bool((target < self.num_codes).all())
        prior = upsample_grid(target, *spec.target) if whole else None
        return ArResult(
            tokens, prior, spec, seeds, logits, conditions, prefill_done - start, how, stats, decoded.captures
        )

    def generate_prior_tokens(
        self,
        prompts: str | Sequence[str],
        height: int,
        width: int,
        seeds: int | Sequence[int] | None = None,
        greedy: bool | None = None,
        constrain_grid: bool = True,
        *,
        num_images_per_prompt: int = 1,
        progress: Progress | None = None,
        decoding: str = "sequential",
        jacobi_window: int = DEFAULT_WINDOW,
    ) -> torch.Tensor:
        """Prior tokens for the DiT: (B, (H/16) * (W/16)), B = prompts x images per prompt.

        ``seeds``: one per image, or one int (image ``i`` uses ``seed + i``), or None (random).
        ``decoding``, ``jacobi_window``: see ``generate``.
        """
        result = self.generate(
            prompts,
            height,
            width,
            seeds=seeds,
            greedy=greedy,
            constrain_grid=constrain_grid,
            num_images_per_prompt=num_images_per_prompt,
            progress=progress,
            decoding=decoding,
            jacobi_window=jacobi_window,
        )
        if result.prior_tokens is None:
            bad = (result.tokens[:, result.spec.target_offset :] >= self.num_codes).nonzero()[0].tolist()
            raise GlmImageError(
                f"the AR model wrote a non-image token inside the target grid (image {bad[0]}, grid token "
                f"{bad[1]}); the reference fails the same way. Use constrain_grid=True to prevent it."
            )
        return result.prior_tokens

    def _prefill(self, batch: _Batch, cache: KVCache) -> torch.Tensor:
        """The whole prompt at once, causal, padding hidden; hidden states (B, P, hidden)."""
        prompt_len = batch.input_ids.shape[1]
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=self.device).tril()
        # A padding row may see itself, so that no attention row is empty (an empty row is NaN,
        # and NaN in a masked value still poisons the weighted sum of the rows that skip it).
        eye = torch.eye(prompt_len, dtype=torch.bool, device=self.device)
        mask = (causal & batch.valid[:, None, :]) | eye
        rope = rotary_tables(batch.positions, self.config.ar.text, self.dtype)
        slots = torch.arange(prompt_len, device=self.device)
        return self.model(batch.input_ids, rope, cache, slots, mask=mask[:, None])

    def _prefill_chunk(
        self, batch: _Batch, cache: KVCache, visible: torch.Tensor, start: int, end: int
    ) -> torch.Tensor:
        """Prompt tokens [start, end) of rows without padding, after [0, start) are in ``cache``:
        one window call, each token seeing the slots ``visible`` opens up to its own (causal);
        hidden states (B, end - start, hidden). ``decode.start_sequential_chunked`` runs these."""
        b = batch.input_ids.shape[0]
        rope = rotary_tables(batch.positions[:, :, start:end], self.config.ar.text, self.dtype)
        slots = torch.arange(start, end, device=self.device).repeat(b, 1)  # (B, T): each row's slots
        return self.model(batch.input_ids[:, start:end], rope, cache, slots, visible=visible, length=end)

    def _cache(self, batch: int, capacity: int) -> KVCache:
        """A static KV cache of ``capacity`` slots per row for this process's KV heads."""
        text = self.config.ar.text
        return KVCache(text, batch, capacity, self.device, self.dtype, kv_heads=self.model.shard.kv)

    def _picker(self, greedy: bool, constrain_grid: bool) -> TokenPicker:
        """How the next token is chosen from the logits, for sequential and Jacobi decoding."""
        text = self.config.ar.text
        return TokenPicker(
            self.sampling,
            greedy,
            constrain_grid,
            self.num_codes,
            text.eos_token_id,
            self.config.generation.pad_token_id,
        )

    def _decode(
        self,
        batch: _Batch,
        steps: int,
        generators: list[torch.Generator],
        greedy: bool,
        constrain_grid: bool,
        return_logits: bool,
        progress: Progress | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None, float, str, int]:
        """Tokens (B, steps), the raw logits if asked for, when the prefill was done
        (``time.perf_counter``; the one device synchronisation of a call, for the timings), how
        the later steps ran (eager, static or graph) and the device graphs captured."""
        kept_logits: list[torch.Tensor] | None = [] if return_logits else None
        prefetch = self.noise_worker and self.device.type == "cpu"
        mode, leasing = step_mode(self, kept_logits is not None)
        with leasing as lease:
            loop, prefill_done = start_sequential(
                self, batch, steps, generators, greedy, constrain_grid, kept_logits,
                prefetch=prefetch, lease=lease,
            )  # fmt: skip
            try:
                if progress is not None:
                    progress("ar", 1, steps)
                how = run_steps(self, loop, steps, kept_logits, progress, mode, lease)
            finally:
                if loop.noise is not None:
                    loop.noise.close()
            # a bucket's buffer is the next call's: the tokens are copied out before it is let go
            tokens = loop.tokens if lease is None else loop.tokens[:, :steps].clone()
        return tokens, kept_logits, prefill_done, how, loop.captures
