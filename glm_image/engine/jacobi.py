"""Speculative Jacobi decoding: several tokens per forward, the distribution of sequential sampling.

Each row keeps its accepted tokens and ``W - 1`` draft tokens after them. One iteration is one
forward over a window of ``W`` tokens per row (the last accepted token, then the drafts), then
verification and the Jacobi update (``sampling.speculative``): each row accepts 1..W tokens and
gets the next window's drafts. Sequential sampling is the special case W = 1.

Data layout (B rows, capacity C = P + steps + W, generated index i lives in cache slot P + i):

- ``tokens`` (B, steps + W): row b's accepted tokens in [0, n_b); past them, scratch;
- ``accepted`` n (B,), ``drafts`` (B, W - 1), ``q`` (B, W - 1, V): the draft distributions;
- the window of row b reads generated indices n_b - 1 .. n_b + W - 2 and writes their K/V at
  slots P + n_b - 1 + j (``ArModel`` scatters per row); query j sees the prompt's real slots and
  the generated slots up to its own (causal within the window): the model gets the row's open
  slots ``open`` (B, C) and the query slots, and ``ops.window_attention`` applies the causal
  bound per query (no dense (B, W, C) mask). Slots past it hold K/V of drafts an earlier window
  rejected; they are hidden, then overwritten.

Every row advances by its own count; a finished row (n_b = steps) still runs (static shapes)
but writes only scratch slots and counts nothing. One iteration reads and writes only buffers
allocated before the first, so it is a static step that a device graph can capture like
``DecodeLoop``'s, and keep per bucket (``engine.graphs``): a bucket's loop (``allocate``) holds
the bucket's capacity in every per-index buffer, and ``load`` refills it in place for each call
(the prompt's length ``base`` and the tokens per row ``limit`` are device tensors the step
reads). The host reads one small tensor (the row counts) before every eager iteration,
to know how much of the cache to read; the static step reads it only when the slowest row could
be done, so a device queues graph replays without draining between them. Each row draws its uniforms (2W - 1 per
iteration) from its own seeded generator (``UniformStream``).

Under tensor parallel every rank runs the forward (its shard), and the group's first rank alone
verifies and proposes (it alone draws the uniforms), then sends the accepted counts, tokens and
drafts to the others (``_share``): the ranks cannot disagree on a token.

Sampling is exact but not seed-for-seed equal to sequential decoding (the randomness is used
differently); greedy decoding gives exactly the sequential tokens.

Three options change where drafts come from, never what is accepted (``sampling.speculative``
has each one's exactness argument; every one keeps "a draft is distributed as its q given all
that was decided before its position"):

- ``drafts`` (``draft_sources``): a position's first draft copies the token above it in the
  grid, or for the target grid the preview's token at its place (the preview upsampled);
- ``coupled``: each row draws one uniform per generated index before the first iteration
  (``noise``, (B, steps + W)) and every draft of that index, its first and each Jacobi redraw,
  is the inverse CDF at it, so a draft changes only when its distribution moved across it.
  Verification keeps its fresh uniforms: reusing a position's uniform there would not be exact;
- ``continued``: past the first rejection a draft is not redrawn but renewed by the maximal
  coupling to its new distribution (kept with probability ``min(1, p/q_old)``), with fresh
  uniforms (another ``2(W - 1)`` per iteration).

They compose: a point-mass first draft (``above``) is renewed like any other, and with both
``coupled`` and ``continued`` the noise draws a position's first draft and ``continued`` its
renewals (whose residual draw must be fresh: it follows a test that read the draft).
``histogram`` (B, W + 1) counts each row's forwards by the tokens they accepted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..device import synchronize
from ..models.ar import ArModel, KVCache, rotary_tables
from ..progress import Progress
from ..sampling.speculative import greedy_drafts, greedy_verify, jacobi_drafts, verify
from .choices import DEFAULT_CONTINUED, DEFAULT_COUPLED, DEFAULT_DRAFTS, DEFAULT_WINDOW
from .decode import DecodeStats, TokenPicker
from .graphs import Bucket, CallLease, bucket_capacity, capture_step, run_steps, step_context, step_mode
from .protocol import GridSpec

__all__ = ["JacobiLoop", "JacobiOptions", "UniformStream", "decode", "draft_sources"]

MAX_UNREAD = 64  # static-step iterations the host queues without reading (sequential: 64 too)
UNIFORM_CHUNK = 256  # iterations of uniforms drawn at a time


@dataclass(frozen=True)
class JacobiOptions:
    """How drafts are made (see the module docstring); ``engine.choices`` has the defaults."""

    window: int = DEFAULT_WINDOW
    drafts: str = DEFAULT_DRAFTS
    coupled: bool = DEFAULT_COUPLED
    continued: bool = DEFAULT_CONTINUED

    def uniforms(self) -> int:
        """Fresh uniforms per iteration and row: accept W - 1, draw 1, first drafts W - 1, and
        with continuation its keep tests and residual draws."""
        return 2 * self.window - 1 + (2 * (self.window - 1) if self.continued else 0)


def draft_sources(spec: GridSpec, length: int, init: str) -> torch.Tensor:
    """(length,) for each generated index, the earlier index whose token an initial draft there
    copies, or -1 (then it is drawn from the window's last distribution)."""
    sources = torch.full((length,), -1, dtype=torch.long)
    if init == "last":
        return sources
    offset = 0
    for grid, (rows, cols) in enumerate(spec.generated):
        local = torch.arange(rows * cols)
        row, col = local // cols, local % cols
        if init == "preview" and spec.preview is not None and grid == 1:  # the target grid
            p_rows, p_cols = spec.preview
            src = (row * p_rows // rows) * p_cols + col * p_cols // cols
        else:
            src = torch.where(row > 0, offset + local - cols, -1)
        end = min(offset + rows * cols, length)
        sources[offset:end] = src[: end - offset]
        offset += rows * cols
    return sources


class UniformStream:
    """Uniforms in [0, 1), ``width`` per iteration, drawn ``chunk`` iterations at a time; row
    ``i`` from ``generators[i]``. float64: an inverse-CDF draw resolves probabilities down to the
    uniform's step. ``buffer`` (B, chunk, width) is allocated once and refilled in place (a
    device graph reads it), or given (a graph bucket's; its chunk is then the buffer's: the draws
    are the same, min(chunk, iterations) iterations at a time); ``refill(i)`` makes it hold
    iterations [i, i + chunk)."""

    def __init__(
        self,
        generators: list[torch.Generator],
        iterations: int,
        width: int,
        device: torch.device,
        chunk: int,
        *,
        buffer: torch.Tensor | None = None,
    ) -> None:
        self.generators, self.iterations = generators, iterations
        if buffer is None:
            chunk = max(1, min(chunk, iterations))
            buffer = torch.empty((len(generators), chunk, width), dtype=torch.float64, device=device)
        self.chunk, self.buffer = buffer.shape[1], buffer

    def refill(self, iteration: int) -> None:
        count = min(self.chunk, self.iterations - iteration)
        for row, generator in enumerate(self.generators):
            self.buffer[row, :count].uniform_(generator=generator)


class JacobiLoop:
    """The window iterations of one call, after the prefill wrote the prompt into ``cache``.

    ``rope``: (B, steps + W, rot) tables of generated indices 0.. (past the last, anything);
    ``valid``: (B, P) the prompt's real slots; ``sources``: ``draft_sources`` (>= steps + W).
    """

    def __init__(
        self,
        model: ArModel,
        cache: KVCache,
        picker: TokenPicker,
        uniforms: UniformStream | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        valid: torch.Tensor,
        steps: int,
        window: int,
        sources: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        continued: bool = False,
    ) -> None:
        self.model, self.cache, self.picker, self.uniforms = model, cache, picker, uniforms
        self.cos, self.sin = rope
        self.steps, self.window = steps, window
        # coupled: (B, >= steps + W) one uniform per generated index; None: fresh ones
        self.noise, self.continued = noise, continued
        b, self.prompt_len = valid.shape
        device = self.device = valid.device
        self.vocab = model.config.vision_vocab_size
        self.tp = model.tp
        self.tokens = torch.zeros((b, steps + window), dtype=torch.long, device=device)
        self.accepted = torch.zeros(b, dtype=torch.long, device=device)
        self.drafts = torch.zeros((b, window - 1), dtype=torch.long, device=device)
        # the draft distributions: only the rank that verifies keeps them
        keeps_q = not picker.greedy and self.tp.leads
        self.q = torch.zeros((b, window - 1, self.vocab), device=device) if keeps_q else None
        self.forwards = torch.zeros(b, dtype=torch.long, device=device)  # per row, while unfinished
        self.histogram = torch.zeros((b, window + 1), dtype=torch.long, device=device)
        self.iterations = 1  # forwards of the batch, the prefill's included
        self.iteration = torch.zeros(1, dtype=torch.long, device=device)  # the uniforms' row
        self.offsets = torch.arange(window, device=device)
        # the row's open slots (the model's ``visible``): padding stays hidden; the generated
        # slots are all open, and attention hides those past each query's own slot
        self.open = torch.ones((b, cache.capacity), dtype=torch.bool, device=device)
        self.open[:, : self.prompt_len] = valid
        self.sources = sources.to(device)
        self.structured = bool((sources >= 0).any())
        # what a graph bucket's calls change, as device tensors the static step reads: the slot
        # of generated index 0 (the prompt's length) and the tokens each row writes
        self.base = torch.full((1,), self.prompt_len, dtype=torch.long, device=device)
        self.limit = torch.full((1,), steps, dtype=torch.long, device=device)
        self.captures = 0  # device graphs this call captured (run_graph)

    @classmethod
    def allocate(
        cls,
        model: ArModel,
        cache: KVCache,
        picker: TokenPicker,
        window: int,
        dtype: torch.dtype,
        *,
        uniforms: int | None,
        coupled: bool,
        continued: bool,
        structured: bool,
    ) -> JacobiLoop:
        """A graph bucket's loop: every per-index buffer (tokens, rotary tables, draft sources,
        coupled noise) holds ``cache.capacity`` indices, ``uniforms`` per iteration (None: greedy
        or not the deciding rank) in chunks of ``UNIFORM_CHUNK``; ``load`` fills it per call."""
        b, c, device = cache.keys.shape[1], cache.capacity, cache.keys.device
        rot = model.config.rotary_dim
        rope = tuple(torch.zeros((b, c, rot), dtype=dtype, device=device) for _ in range(2))
        stream = None
        if uniforms is not None:
            buffer = torch.zeros((b, UNIFORM_CHUNK, uniforms), dtype=torch.float64, device=device)
            stream = UniformStream([], 0, uniforms, device, UNIFORM_CHUNK, buffer=buffer)
        valid = torch.zeros((b, 0), dtype=torch.bool, device=device)
        sources = torch.full((c,), -1, dtype=torch.long)
        noise = torch.zeros((b, c), dtype=torch.float64, device=device) if coupled else None
        loop = cls(
            model, cache, picker, stream, rope, valid, c - window, window, sources,
            noise=noise, continued=continued,
        )  # fmt: skip
        loop.structured = structured
        return loop

    def load(
        self,
        valid: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        steps: int,
        sources: torch.Tensor,
        uniforms: UniformStream | None,
        noise: torch.Tensor | None,
    ) -> None:
        """Make a bucket's loop the next call's (``start``'s arguments): every buffer refilled in
        place (a captured graph holds their addresses), every counter at 0. ``uniforms`` must draw
        into the bucket's uniform buffer."""
        mine = None if self.uniforms is None else self.uniforms.buffer
        if (uniforms is None) != (mine is None) or (uniforms is not None and uniforms.buffer is not mine):
            raise ValueError("a bucket's uniform stream must fill the bucket's uniform buffer")
        if bool((sources >= 0).any()) != self.structured or (noise is None) != (self.noise is None):
            raise ValueError("the call's draft options are not its bucket's")
        indices = rope[0].shape[1]  # steps + W
        self.cos[:, :indices].copy_(rope[0])
        self.sin[:, :indices].copy_(rope[1])
        self.steps, self.prompt_len = steps, valid.shape[1]
        self.limit.fill_(steps)
        self.base.fill_(self.prompt_len)
        self.open.fill_(True)
        self.open[:, : self.prompt_len] = valid
        self.sources.fill_(-1)
        self.sources[: len(sources)].copy_(sources)
        if noise is not None:
            self.noise.zero_()
            self.noise[:, : noise.shape[1]].copy_(noise)
        state = [self.tokens, self.accepted, self.drafts, self.forwards, self.histogram, self.iteration]
        for x in state + ([self.q] if self.q is not None else []):
            x.zero_()
        self.uniforms, self.iterations, self.captures = uniforms, 1, 0

    # ---------------------------------------------------------------- one iteration

    def _target(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, V) raw logits -> the target: argmax tokens (B, T), or probabilities (B, T, V)
        after the very filters and grid constraint of sequential sampling (``TokenPicker``)."""
        b, t, v = logits.shape
        scores = self.picker.scores(logits.reshape(b * t, v))
        if self.picker.greedy:
            return scores.argmax(dim=-1).view(b, t)
        return scores.softmax(dim=-1).view(b, t, v)

    def _init(self, accepted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The initial drafts of the next window's positions accepted + j: tokens (B, D), or
        distributions (B, D, V); a point mass on the token ``sources`` names where that token is
        accepted already, else the last target. Copying only accepted tokens makes the first
        draft a function of the accepted prefix, which is all its exactness needs (a source
        at or past ``accepted`` would be a draft: W - 1 > the grid's width)."""
        b, d = self.drafts.shape
        last = target[:, -1:]
        fallback = last.expand(b, d) if self.q is None else last.expand(b, d, self.vocab)
        if not self.structured:
            return fallback
        position = (accepted.unsqueeze(1) + self.offsets[:d]).clamp_max(len(self.sources) - 1)
        source = self.sources[position]  # (B, D)
        copies = (source >= 0) & (source < accepted.unsqueeze(1))
        copied = self.tokens.gather(1, source.clamp_min(0))
        if self.q is None:
            return torch.where(copies, copied, fallback)
        point = target.new_zeros((b, d, self.vocab)).scatter_(-1, copied.unsqueeze(-1), 1.0)
        return torch.where(copies.unsqueeze(-1), point, fallback)

    def _advance(self, logits: torch.Tensor, u: torch.Tensor | None) -> None:
        """Verify a forward's (B, T, V) logits (T = 1 for the prefill's token, else W) against
        the drafts, write the accepted tokens, propose the next drafts; ``u`` (B, 2W - 1)."""
        t = logits.shape[1]
        n, d = self.accepted, self.drafts.shape[1]
        target = self._target(logits)
        drafts = self.drafts[:, : t - 1]
        if self.q is None:
            count, tokens = greedy_verify(target, drafts)
        else:
            count, tokens = verify(target, self.q[:, : t - 1], drafts, u[:, : t - 1], u[:, t - 1])
        count = torch.minimum(count, (self.limit - n).clamp_min(0))  # finished rows: 0
        self.tokens.scatter_(1, n.unsqueeze(1) + self.offsets[:t], tokens)
        running = n < self.limit
        self.forwards += running
        self.histogram.scatter_add_(1, count.unsqueeze(1), running.long().unsqueeze(1))
        n = n + count
        init = self._init(n, target)
        if self.q is None:
            self.drafts.copy_(greedy_drafts(target, count, init))
        else:
            draw = u[:, t : t + d]
            if self.noise is not None:  # the positions' own uniforms (module docstring)
                draw = self.noise.gather(1, n.unsqueeze(1) + self.offsets[:d])
            carry = {}
            if self.continued:  # the drafts past the first rejection, renewed with fresh uniforms
                carry = {"old": drafts, "q_old": self.q[:, : t - 1]}
                carry |= {"keep_u": u[:, t + d : t + 2 * d], "draw_u": u[:, t + 2 * d : t + 3 * d]}
            drafts, q = jacobi_drafts(target, count, init, draw, **carry)
            self.drafts.copy_(drafts)
            self.q.copy_(q)
        self.accepted.copy_(n)

    def _uniforms(self) -> torch.Tensor | None:
        if self.uniforms is None:
            return None
        row = torch.remainder(self.iteration, self.uniforms.chunk)
        return self.uniforms.buffer.index_select(1, row).squeeze(1)  # (B, JacobiOptions.uniforms())

    def _verify(self, logits: torch.Tensor) -> None:
        """``_advance`` on the rank that decides; every rank then holds its result."""
        if self.tp.leads:
            self._advance(logits, self._uniforms())
        self._share()

    def _share(self) -> None:
        """Tensor parallel: the deciding rank's counts, drafts and tokens, sent to every rank."""
        if self.tp.size == 1:
            return
        d = self.drafts.shape[1]
        state = torch.cat([self.accepted[:, None], self.drafts, self.tokens], dim=1)  # (B, 1 + D + len)
        self.tp.broadcast_(state)
        self.accepted.copy_(state[:, 0])
        self.drafts.copy_(state[:, 1 : 1 + d])
        self.tokens.copy_(state[:, 1 + d :])

    def first(self, logits: torch.Tensor) -> None:
        """Token 0 from the prefill's last logits (B, 1, V), and the first drafts."""
        if self.uniforms is not None:
            self.uniforms.refill(0)
        self._verify(logits)
        self.iteration.fill_(1)

    def step(self, length: int | None = None) -> None:
        """One window iteration on device tensors (capturable with ``length`` None)."""
        n = self.accepted
        index = (n - 1).unsqueeze(1) + self.offsets  # (B, W): generated index of each input
        ids = torch.cat([self.tokens.gather(1, index[:, :1]), self.drafts], dim=1)
        at = index.unsqueeze(-1).expand(-1, -1, self.cos.shape[-1])
        rope = (self.cos.gather(1, at), self.sin.gather(1, at))
        slots = index + self.base  # (B, W): query j sees the open slots up to slots[:, j]
        hidden = self.model(ids, rope, self.cache, slots, visible=self.open, length=length)
        self._verify(self.model.logits(hidden))
        self.iteration.add_(1)

    # ---------------------------------------------------------------- the loop

    def _snapshot(self) -> list[torch.Tensor]:
        state = [self.accepted, self.drafts, self.forwards, self.histogram, self.iteration]
        return state + ([self.q] if self.q is not None else [])

    def run_eager(self, steps: int, on_logits: None, progress: Progress | None) -> None:
        """Iterate until every row holds its tokens, attention reading the cache only up to the
        furthest window slot (a Python int from the iteration's host read)."""
        self._run(progress, None)

    def run_static(self, steps: int, progress: Progress | None, replay=None) -> None:
        """Iterate with the capturable step (``replay``: its captured graph), the whole cache."""
        self._run(progress, replay or self.step)

    def run_graph(self, steps: int, progress: Progress | None, bucket: Bucket | None = None) -> str | None:
        """Replay the iteration: ``bucket``'s graph (``engine.graphs``: captured at its first
        call, this loop being the bucket's), or one captured now; the reason (nothing changed)
        if it cannot be captured. Capture runs one iteration eagerly, which the reset undoes."""
        if self.steps < 2:
            return f"{self.steps} tokens leave nothing to replay"
        captured, self.captures = capture_step(self.step, self.device, self._snapshot(), bucket)
        if isinstance(captured, str):
            return captured
        self._run(progress, captured.replay)
        return None

    def _run(self, progress: Progress | None, step) -> None:
        """Iterations until every row is done. ``step`` None: eager, each iteration bounded by a
        host read of the furthest row. A static step needs no bound, so the host reads only when
        the slowest row could be done: an iteration accepts at most ``window`` tokens of a row,
        so a row ``r`` tokens short needs at least ceil(r / window) more, which run without a
        read (at most ``MAX_UNREAD``, so progress and an abandoning caller are heard). The
        iterations and tokens are the same either way; the device is never drained to wait."""
        for _ in self.iterate(progress, step):
            pass

    def iterate(self, progress: Progress | None = None, step=None):
        """``_run`` as a generator that yields after each host read's iterations (eager: after
        every iteration), so the AR scheduler can interleave rows between them."""
        iteration, self.reads = 1, 0
        while True:
            low, high = torch.stack(torch.aminmax(self.accepted)).tolist()  # the host read
            self.reads += 1
            if progress is not None:
                progress("ar", low, self.steps)
            if low >= self.steps:
                self.iterations = iteration
                return
            ahead = 1 if step is None else min(MAX_UNREAD, -(-(self.steps - low) // self.window))
            for _ in range(ahead):
                if self.uniforms is not None and iteration % self.uniforms.chunk == 0:
                    self.uniforms.refill(iteration)
                if step is None:
                    self.step(self.prompt_len + high - 1 + self.window)
                else:
                    step()
                iteration += 1
            yield

    def stats(self) -> DecodeStats:
        forwards = tuple(self.forwards.tolist())
        accepted = tuple(tuple(row) for row in self.histogram.tolist())
        return DecodeStats(
            "jacobi", self.iterations, forwards, self.steps, host_reads=self.reads, accepted=accepted
        )

    def result(self) -> torch.Tensor:
        """(B, steps) tokens; with the grid unconstrained, padding after EOS (as sequential)."""
        tokens = self.tokens[:, : self.steps].clone()
        picker = self.picker
        if not picker.constrain_grid and picker.pad is not None:
            eos = tokens == picker.eos
            tokens[(eos.long().cumsum(dim=1) - eos.long()) > 0] = picker.pad
        return tokens


def decode(
    engine,
    batch,
    spec: GridSpec,
    steps: int,
    generators: list[torch.Generator],
    greedy: bool,
    constrain_grid: bool,
    *,
    options: JacobiOptions = JacobiOptions(),
    progress: Progress | None = None,
) -> tuple[torch.Tensor, DecodeStats, float, str, int]:
    """``ArEngine._decode`` by Jacobi windows: tokens (B, steps), the counters, when the prefill
    was done (``time.perf_counter``, device synchronised), how the iterations ran (the
    engine's ``decode_step``, as for sequential decoding) and the device graphs captured."""
    mode, leasing = step_mode(engine, False)
    with leasing as lease:
        loop, prefill_done = start(
            engine, batch, spec, steps, generators, greedy, constrain_grid, options, lease=lease
        )
        how = run_steps(engine, loop, steps, None, progress, mode, lease)
        return loop.result(), loop.stats(), prefill_done, how, loop.captures


def start(
    engine,
    batch,
    spec: GridSpec,
    steps: int,
    generators: list[torch.Generator],
    greedy: bool,
    constrain_grid: bool,
    options: JacobiOptions = JacobiOptions(),
    *,
    lease: CallLease | None = None,
) -> tuple[JacobiLoop, float]:
    """The prefill and the first token of ``decode``: the loop of the later iterations and when
    the first token was there (``time.perf_counter``, device synchronised). ``lease`` (device
    graphs): the loop is the state of the graph bucket it gives (``decode.start_sequential``)."""
    window = options.window
    model, text, device = engine.model, engine.config.ar.text, engine.device
    b, prompt_len = batch.input_ids.shape
    picker = engine._picker(greedy, constrain_grid)
    positions = batch.decode_positions[:, :, :steps]
    positions = torch.cat([positions, positions[:, :, -1:].expand(-1, -1, window)], dim=2)
    rope = rotary_tables(positions, text, engine.dtype)  # past the last token: scratch only
    # at most one forward per token: ``steps`` iterations, the prefill's included
    draws = not greedy and model.tp.leads  # only the rank that verifies draws
    width = options.uniforms() if draws else None
    noise = None
    if draws and options.coupled:  # drawn before the iterations' uniforms, from each row's generator
        noise = torch.empty((b, steps + window), dtype=torch.float64, device=device)
        for row, generator in enumerate(generators):
            noise[row].uniform_(generator=generator)
    sources = draft_sources(spec, steps + window, options.drafts)
    continued = options.continued and draws
    if lease is None:
        cache = engine._cache(b, prompt_len + steps + window)
        uniforms = UniformStream(generators, steps, width, device, UNIFORM_CHUNK) if draws else None
        loop = JacobiLoop(
            model, cache, picker, uniforms, rope, batch.valid, steps, window, sources,
            noise=noise, continued=continued,
        )  # fmt: skip
    else:
        capacity = bucket_capacity(prompt_len + steps + window)
        structured = bool((sources >= 0).any())
        shape = (window, picker, structured, noise is not None, continued, width)
        key = ("jacobi", b, capacity, *shape, *step_context(model))

        def make() -> JacobiLoop:
            return JacobiLoop.allocate(
                model, engine._cache(b, capacity), picker, window, engine.dtype,
                uniforms=width, coupled=noise is not None, continued=continued, structured=structured,
            )  # fmt: skip

        loop = lease(key, make).state
        uniforms = None
        if draws:
            buffer = loop.uniforms.buffer
            uniforms = UniformStream(generators, steps, width, device, UNIFORM_CHUNK, buffer=buffer)
        loop.load(batch.valid, rope, steps, sources, uniforms, noise)
    loop.first(model.logits(engine._prefill(batch, loop.cache)[:, -1:]))
    synchronize(device)
    return loop, time.perf_counter()
