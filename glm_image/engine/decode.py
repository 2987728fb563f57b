"""The AR decode loop: the first token from the prefill, then one token per step over the
static KV cache, with nothing synchronised per token.

Every step reads and writes only buffers allocated before the first step (the token, a step
counter, the visibility of the cache slots, the rotary tables of every step, the sampling
noise), so the same step runs two ways:

- eagerly (CPU, NPU, or CUDA with graphs off);
- captured as a device graph (CUDA graphs, Ascend NPUGraph: ``engine.graphs``) and replayed per
  token: one launch instead of the step's few hundred. The graph and its buffers are kept per
  bucket (batch, KV capacity rounded up, sampling): a later call of the bucket refills the
  buffers in place (``DecodeLoop.load``) and replays, capturing nothing. What a call changes is
  in the buffers, never in the graph: the prompt's length is a device tensor (``base``), the
  step counter is reset, the rotary tables and noise are copied in.

Under tensor parallel (``ArModel.tp`` of several ranks) the next token is decided once: the
group's first rank picks it from the gathered logits and sends it to the others (``decide``), so
the ranks can never write different tokens; only that rank draws sampling noise.

Sampling noise (the exact draw: ``argmax(softmax / Exp(1))``) is produced in chunks of steps,
each row from its own generator (``NoiseStream``); on a CPU the chunks are the very numbers the
reference draws one step at a time, and a worker thread prepares the next chunk while the
current one is used.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..device import synchronize
from ..errors import GlmImageError
from ..models.ar import ArModel, KVCache, rotary_tables
from ..parallel.comm import Comm
from ..progress import Progress
from ..sampling import SamplingParams, apply_filters, draw_with_noise, exponential_noise
from .graphs import Bucket, CallLease, bucket_capacity, capture_step, step_context

__all__ = ["DecodeLoop", "DecodeStats", "NoiseStream", "TokenPicker", "decide", "start_sequential"]


class NoiseStream:
    """Exp(1) noise per step, ``chunk`` steps at a time, row ``i`` from ``generators[i]``.

    ``buffer`` (B, chunk, V) is allocated once and refilled in place (a CUDA graph reads it), or
    given (a graph bucket's: its chunk is then the buffer's); ``refill(step)`` makes it hold steps
    [step, step + chunk). The numbers do not depend on the chunk on a CPU; on a device a chunk
    draws min(chunk, steps) steps at once either way. On a CPU with ``prefetch``, a
    worker thread draws the next chunk while the current one is in use (torch releases the GIL
    while it samples), so the draw costs the decode loop a copy, not the sampling.
    """

    def __init__(
        self,
        generators: list[torch.Generator],
        steps: int,
        vocab: int,
        device: torch.device,
        *,
        chunk: int = 64,
        prefetch: bool = False,
        buffer: torch.Tensor | None = None,
    ) -> None:
        self.generators, self.steps, self.vocab, self.device = generators, steps, vocab, device
        if buffer is None:
            self.chunk = max(1, min(chunk, steps))
            buffer = torch.empty((len(generators), self.chunk, vocab), device=device)
        self.chunk, self.buffer = buffer.shape[1], buffer
        self._ready: queue.Queue | None = None
        if prefetch and steps > self.chunk:
            self._ready = queue.Queue(maxsize=1)
            self._stop = threading.Event()
            self._worker = threading.Thread(target=self._produce, name="glm-image-noise", daemon=True)
            self._worker.start()

    def _draw(self, count: int) -> torch.Tensor:
        return exponential_noise(self.generators, count, self.vocab, self.device)

    def _produce(self) -> None:
        try:
            for first in range(0, self.steps, self.chunk):
                if self._stop.is_set():
                    return
                self._ready.put(self._draw(min(self.chunk, self.steps - first)))
        except BaseException as e:  # handed to the consumer, which raises it
            self._ready.put(e)

    def refill(self, step: int) -> None:
        """Make ``buffer`` hold the noise of steps [step, step + chunk); ``step`` % chunk == 0."""
        if self._ready is not None:
            noise = self._ready.get()
            if isinstance(noise, BaseException):
                raise noise
        else:
            noise = self._draw(min(self.chunk, self.steps - step))
        self.buffer[:, : noise.shape[1]].copy_(noise)

    def close(self) -> None:
        """Stop the worker (early, if the call ended before its last step)."""
        if self._ready is not None:
            self._stop.set()
            while self._worker.is_alive():  # unblock a worker waiting to hand over a chunk
                with contextlib.suppress(queue.Empty):
                    self._ready.get(timeout=0.05)


@dataclass(frozen=True)
class TokenPicker:
    """Logits -> the next token: filters, the grid constraint, the draw. Pure apart from ``unfinished``."""

    params: SamplingParams
    greedy: bool
    constrain_grid: bool
    num_codes: int  # image codes come first in the vocabulary
    eos: int
    pad: int | None

    def __call__(
        self, logits: torch.Tensor, noise: torch.Tensor | None, unfinished: torch.Tensor
    ) -> torch.Tensor:
        """(B, V) float32 logits and (B, V) noise -> (B,) tokens; ``unfinished`` updated in place."""
        scores = self.scores(logits)
        token = scores.argmax(dim=-1) if self.greedy else draw_with_noise(scores, noise)
        if not self.constrain_grid and self.pad is not None:
            # As transformers' generate: a finished sequence continues with padding.
            token = torch.where(unfinished, token, torch.full_like(token, self.pad))
        self.follow(token, unfinished)
        return token

    def follow(self, token: torch.Tensor, unfinished: torch.Tensor) -> None:
        """``unfinished`` after ``token`` (picked here, or by another rank): EOS ends a row."""
        if not self.constrain_grid and self.pad is not None:
            unfinished &= token != self.eos

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, V) float32 logits -> the scores a token is drawn from (greedy: the argmax of):
        temperature, top-k, top-p, then the grid constraint. Speculative decoding verifies its
        drafts against the softmax of exactly these."""
        if self.greedy:
            # only_codes masks in place; the raw logits may be kept by the caller
            return self.only_codes(logits.clone(), logits) if self.constrain_grid else logits
        scores = apply_filters(logits, self.params)
        return self.only_codes(scores, logits) if self.constrain_grid else scores

    def only_codes(self, scores: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Mask everything but the image codes in the (filtered, owned) ``scores``, in place.

        Should the filters have kept no code at all (a special token held all of top_p), the row
        falls back to the raw logits of the codes, so a grid is never cut and never NaN.
        """
        codes = self.num_codes
        scores[:, codes:] = float("-inf")
        empty = torch.isinf(scores[:, :codes]).all(dim=-1, keepdim=True)
        if scores.device.type == "cpu" and not bool(empty.any()):
            return scores  # the common case; a host check is free on a CPU, and skips two copies
        fallback = logits.clone()
        fallback[:, codes:] = float("-inf")
        return torch.where(empty, fallback, scores)


def decide(
    tp: Comm,
    picker: TokenPicker,
    logits: torch.Tensor,
    noise: torch.Tensor | None,
    unfinished: torch.Tensor,
) -> torch.Tensor:
    """(B,) next tokens, chosen once: ``picker`` on the tensor-parallel group's first rank, then
    sent to every other rank (which follows the pick's effect on ``unfinished``). One process:
    ``picker(logits, noise, unfinished)``."""
    if tp.size == 1:
        return picker(logits, noise, unfinished)
    if tp.leads:
        token = picker(logits, noise, unfinished)
    else:
        token = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    tp.broadcast_(token)
    if not tp.leads:
        picker.follow(token, unfinished)
    return token


@dataclass(frozen=True)
class DecodeStats:
    """What one call cost in model forwards (the prefill included) for its tokens."""

    decoding: str  # sequential | jacobi
    forwards: int  # forwards of the batch (as many as its slowest image needed)
    image_forwards: tuple[int, ...]  # per image: forwards until its last token
    tokens: int  # tokens per image
    host_reads: int | None = None  # jacobi: device values the host waited for (stop checks)
    # jacobi: per image, its forwards counted by the tokens each accepted (index 0..W)
    accepted: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def together(cls, parts: Sequence[DecodeStats]) -> DecodeStats:
        """The stats of rows decoded apart, as one batch's: ``forwards`` and ``host_reads`` are the
        slowest row's (what the rows would have run together), so the stats do not depend on how
        the rows were scheduled either."""
        reads = [p.host_reads for p in parts]
        accepted = None if any(p.accepted is None for p in parts) else sum((p.accepted for p in parts), ())
        return cls(
            parts[0].decoding,
            max(p.forwards for p in parts),
            tuple(f for p in parts for f in p.image_forwards),
            parts[0].tokens,
            None if None in reads else max(reads),
            accepted,
        )

    @property
    def tokens_per_forward(self) -> float:
        """Accepted tokens per forward, the mean over the images (sequential: 1)."""
        return sum(self.tokens / f for f in self.image_forwards) / len(self.image_forwards)


class DecodeLoop:
    """Steps 1..steps-1 of one call, after the prefill wrote the prompt into ``cache``.

    ``rope``: (B, steps - 1, rot) tables of the generated tokens' positions; ``valid``: (B, P)
    the prompt's real (non-padding) slots. Tokens go to ``tokens`` (B, steps); column 0 holds
    the prefill's token. A graph bucket's loop (``allocate``) holds ``cache.capacity`` steps in
    every buffer instead, and ``load`` makes it a new call's.
    """

    def __init__(
        self,
        model: ArModel,
        cache: KVCache,
        picker: TokenPicker,
        noise: NoiseStream | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        valid: torch.Tensor,
        tokens: torch.Tensor,
        unfinished: torch.Tensor,
    ) -> None:
        self.model, self.cache, self.picker, self.noise = model, cache, picker, noise
        self.cos, self.sin = rope
        self.tokens, self.unfinished = tokens, unfinished
        b = tokens.shape[0]
        self.device = tokens.device
        self.visible = torch.zeros((b, cache.capacity), dtype=torch.bool, device=self.device)
        # the graph's inputs: the step counter (index of the input token), and the cache slot of
        # generated index 0 (the prompt's length, which a bucket's calls change)
        self.step = torch.zeros(1, dtype=torch.long, device=self.device)
        self.base = torch.zeros(1, dtype=torch.long, device=self.device)
        self.noise_buffer = None if noise is None else noise.buffer
        self.captures = 0  # device graphs this call captured (run_graph)
        self._prompt(valid)

    def _prompt(self, valid: torch.Tensor) -> None:
        self.prompt_len = valid.shape[1]
        self.visible[:, : self.prompt_len] = valid
        self.base.fill_(self.prompt_len)

    @classmethod
    def allocate(
        cls,
        model: ArModel,
        cache: KVCache,
        picker: TokenPicker,
        dtype: torch.dtype,
        noise: tuple[int, int] | None,
    ) -> DecodeLoop:
        """A graph bucket's loop: every per-step buffer holds ``cache.capacity`` steps, the noise
        buffer (B, chunk, V) for ``noise`` = (chunk, V); ``load`` fills it for each call."""
        b, c, device = cache.keys.shape[1], cache.capacity, cache.keys.device
        rot = model.config.rotary_dim
        rope = tuple(torch.zeros((b, c, rot), dtype=dtype, device=device) for _ in range(2))
        tokens = torch.zeros((b, c), dtype=torch.long, device=device)
        unfinished = torch.ones(b, dtype=torch.bool, device=device)
        valid = torch.zeros((b, 0), dtype=torch.bool, device=device)
        loop = cls(model, cache, picker, None, rope, valid, tokens, unfinished)
        if noise is not None:
            loop.noise_buffer = torch.empty((b, *noise), device=device)
        return loop

    def load(
        self, valid: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], noise: NoiseStream | None
    ) -> None:
        """Make a bucket's loop the next call's: every buffer refilled in place (a captured graph
        holds their addresses), the step counter at 0, every row unfinished. ``noise`` must draw
        into ``noise_buffer``."""
        if (noise is None) != (self.noise_buffer is None) or (
            noise is not None and noise.buffer is not self.noise_buffer
        ):
            raise ValueError("a bucket's noise stream must fill the bucket's noise buffer")
        steps = rope[0].shape[1]
        self.cos[:, :steps].copy_(rope[0])
        self.sin[:, :steps].copy_(rope[1])
        self.visible.zero_()
        self._prompt(valid)
        self.step.zero_()
        self.unfinished.fill_(True)
        self.tokens.zero_()
        self.noise, self.captures = noise, 0

    # ---------------------------------------------------------------- eager

    def run_eager(
        self, steps: int, on_logits: Callable[[torch.Tensor], None] | None, progress: Progress | None
    ) -> None:
        """Python ints index every table: the attention may skip the cache's unused tail."""
        for step in range(1, steps):
            self.eager_step(step, on_logits)
            if progress is not None:
                progress("ar", step + 1, steps)

    def eager_step(self, step: int, on_logits: Callable[[torch.Tensor], None] | None = None) -> None:
        """Step ``step`` (1..steps-1) alone: the token of step - 1 in, the token of ``step`` out.
        ``run_eager`` is these steps in order; the AR scheduler (``engine.scheduler``) runs them
        one at a time, interleaved with other requests' rows."""
        slot = self.prompt_len + step - 1
        self.visible[:, slot] = True
        hidden = self.model(
            self.tokens[:, step - 1 : step],
            (self.cos[:, step - 1 : step], self.sin[:, step - 1 : step]),
            self.cache,
            torch.arange(slot, slot + 1, device=self.device),
            visible=self.visible,
            length=slot + 1,
        )
        logits = self.model.logits(hidden[:, -1])
        if on_logits is not None:
            on_logits(logits)
        noise = self._noise_row(step)
        self.tokens[:, step] = decide(self.model.tp, self.picker, logits, noise, self.unfinished)

    def _noise_row(self, step: int) -> torch.Tensor | None:
        if self.noise is None:
            return None
        if step % self.noise.chunk == 0:
            self.noise.refill(step)
        return self.noise.buffer[:, step % self.noise.chunk]

    def first_noise(self) -> torch.Tensor | None:
        """The prefill token's noise (step 0)."""
        return self._noise_row(0)

    # ---------------------------------------------------------------- device graph

    def _static_step(self) -> None:
        """One step on device tensors only (capturable): reads ``step``, advances it."""
        idx = self.step  # (1,): the input token's index; its cache slot is prompt_len + idx
        slot = idx + self.base
        self.visible.index_fill_(1, slot, True)
        token = self.tokens.index_select(1, idx)  # (B, 1)
        rope = (self.cos.index_select(1, idx), self.sin.index_select(1, idx))
        length = (slot + 1).to(torch.int32)
        hidden = self.model(token, rope, self.cache, slot, visible=self.visible, length=length)
        logits = self.model.logits(hidden[:, -1])
        noise = None
        if self.noise is not None:
            row = torch.remainder(idx + 1, self.noise.chunk)
            noise = self.noise.buffer.index_select(1, row).squeeze(1)
        new = decide(self.model.tp, self.picker, logits, noise, self.unfinished)
        self.tokens.index_copy_(1, idx + 1, new[:, None])
        self.step.add_(1)

    def run_static(
        self, steps: int, progress: Progress | None, replay: Callable[[], None] | None = None
    ) -> None:
        """Steps 1..steps-1 as ``replay`` calls (default: the static step, eagerly), the host
        doing nothing per step but refilling the noise every ``chunk`` steps."""
        replay = replay or self._static_step
        for step in range(1, steps):
            if self.noise is not None and step % self.noise.chunk == 0:
                self.noise.refill(step)
            replay()
            if progress is not None:
                progress("ar", step + 1, steps)

    def run_graph(
        self, steps: int, progress: Progress | None, bucket: Bucket | None = None, *, sync_every: int = 64
    ) -> str | None:
        """Replay the static step: ``bucket``'s graph (captured at its first call, the loop being
        the bucket's), or one captured now; the reason (nothing changed) if it cannot be
        captured. The eager run before capture computes step 1 exactly as the first replay will;
        the reset puts back what it changed of the loop's state (the counter, the visible slots,
        the rows' ``unfinished``), so a replay of a capture that ran for real starts right too."""
        if steps < 3:
            return f"{steps} tokens leave nothing to replay"
        self._noise_row(1)
        state = (self.step, self.visible, self.unfinished)
        captured, self.captures = capture_step(self._static_step, self.device, state, bucket)
        if isinstance(captured, str):
            return captured

        def paced(stage: str, done: int, total: int) -> None:
            # the host runs ahead of the device: let progress follow it every few dozen tokens
            if done % sync_every == 0 or done == total:
                captured.synchronize()
            progress(stage, done, total)

        self.run_static(steps, paced if progress is not None else None, captured.replay)
        return None


def start_sequential(
    engine,
    batch,
    steps: int,
    generators: list[torch.Generator],
    greedy: bool,
    constrain_grid: bool,
    kept_logits: list[torch.Tensor] | None = None,
    *,
    prefetch: bool = False,
    lease: CallLease | None = None,
) -> tuple[DecodeLoop, float]:
    """The prefill and the first token of sequential decoding of ``batch`` (an ``ArEngine``'s
    planned batch) on ``engine``: the loop of the later steps, and when the first token was
    there (``time.perf_counter``, device synchronised). ``ArEngine._decode`` runs the loop's
    steps in one go, the AR scheduler one step per iteration; the caller closes ``loop.noise``.

    ``lease`` (device graphs): ``lease(key, make)`` gives the graph bucket of ``key``, whose
    ``state`` (``make()`` on its first call) is the loop this call refills and returns; its
    ``tokens`` then hold the bucket's capacity of steps.
    """
    loop = _sequential_loop(engine, batch, steps, generators, greedy, constrain_grid, prefetch, lease)
    with _closing_noise(loop):
        hidden = engine._prefill(batch, loop.cache)
        return loop, _first_token(engine, loop, hidden, kept_logits)


def start_sequential_chunked(
    engine,
    batch,
    steps: int,
    generators: list[torch.Generator],
    greedy: bool,
    constrain_grid: bool,
    chunk: int,
):
    """``start_sequential`` with the prompt's prefill in chunks of ``chunk`` tokens: a generator
    that runs one chunk per ``next()``, yields after each chunk but the last, and returns what
    ``start_sequential`` returns (``StopIteration.value``). The AR scheduler runs one chunk per
    iteration, so a long prompt (an edit's condition image) does not stall the running rows.

    Each chunk is one window call (``ArModel.forward`` with per-row ``slots``): its tokens see
    the prompt's earlier slots and their own causal prefix, as the whole prefill's do, but its
    GEMMs have ``chunk`` rows, not the prompt's, so a row's logits differ from the whole
    prefill's in the last bits (the scheduler chunks only where rows share GEMMs anyway, its
    ``batched`` mode). For rows without padding (the scheduler's: one unpadded row each). Closing
    the generator early closes the loop's noise stream."""
    if not bool(batch.valid.all()):
        raise GlmImageError("a chunked prefill takes rows without padding (one row per call)")
    loop = _sequential_loop(engine, batch, steps, generators, greedy, constrain_grid, False, None)
    prompt_len = batch.input_ids.shape[1]
    with _closing_noise(loop):
        for start in range(0, prompt_len, chunk):
            end = min(start + chunk, prompt_len)
            hidden = engine._prefill_chunk(batch, loop.cache, loop.visible, start, end)
            if end < prompt_len:
                yield
        return loop, _first_token(engine, loop, hidden, None)


def _sequential_loop(engine, batch, steps, generators, greedy, constrain_grid, prefetch, lease) -> DecodeLoop:
    """A ``DecodeLoop`` for ``batch``'s ``steps`` (its cache, tokens, noise, rotary tables)."""
    model, text, device = engine.model, engine.config.ar.text, engine.device
    b, prompt_len = batch.input_ids.shape
    picker = engine._picker(greedy, constrain_grid)
    draws = not greedy and model.tp.leads  # tensor parallel: only the rank that decides draws
    chunk = 16 if device.type == "cpu" else 256
    # the generated tokens' rotary tables (the EOS step's position is the last)
    rope = rotary_tables(batch.decode_positions[:, :, : steps - 1], text, engine.dtype)
    vocab = text.vision_vocab_size
    if lease is None:
        cache = engine._cache(b, prompt_len + steps)
        tokens = torch.empty((b, steps), dtype=torch.long, device=device)
        unfinished = torch.ones(b, dtype=torch.bool, device=device)
        noise = (
            NoiseStream(generators, steps, vocab, device, chunk=chunk, prefetch=prefetch) if draws else None
        )
        return DecodeLoop(model, cache, picker, noise, rope, batch.valid, tokens, unfinished)
    capacity = bucket_capacity(prompt_len + steps)
    shape = (chunk, vocab) if draws else None
    key = ("sequential", b, capacity, picker, shape, *step_context(model))
    loop = lease(
        key, lambda: DecodeLoop.allocate(model, engine._cache(b, capacity), picker, engine.dtype, shape)
    ).state
    noise = None
    if draws:
        noise = NoiseStream(generators, steps, vocab, device, prefetch=prefetch, buffer=loop.noise_buffer)
    loop.load(batch.valid, rope, noise)
    return loop


@contextlib.contextmanager
def _closing_noise(loop: DecodeLoop):
    """Close the loop's noise stream (its worker thread) if what the block does fails."""
    try:
        yield
    except BaseException:
        if loop.noise is not None:
            loop.noise.close()
        raise


def _first_token(engine, loop: DecodeLoop, hidden: torch.Tensor, kept_logits) -> float:
    """The prefill's token (step 0) from its hidden states; when it was there."""
    model = engine.model
    logits = model.logits(hidden[:, -1])
    if kept_logits is not None:
        kept_logits.append(logits)
    loop.tokens[:, 0] = decide(model.tp, loop.picker, logits, loop.first_noise(), loop.unfinished)
    synchronize(engine.device)
    return time.perf_counter()
