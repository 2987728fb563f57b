"""`glm-image bench speed`: seconds per stage and per image, ours against the reference.

For every (size, batch) case each engine first runs ``warmup`` untimed calls; then the timed
calls alternate, the order flipped every repeat (ours, reference, reference, ours, ...) so a
machine that drifts (thermal, other load) favours neither. Both engines get the same prompt, size,
steps, guidance (1.5) and seed; batch ``b`` is one call with ``num_images_per_prompt=b``.
Reported per engine: medians over the repeats of every stage, the AR decode rate, DiT seconds
per step, the end-to-end seconds per image and the peak memory of a run; then ours/reference
ratios and, on a GPU in the device table, the fraction of the hardware floor (``roofline``).

With ``dit_cache`` (a ``StepCacheOptions``) ours also runs with that DiT step cache, as the
engine ``ours_cached`` on the same loaded pipeline, timed in the same alternation; each case then
reports (``cache``) its DiT speed-up over ours uncached, the transformer passes per image and the
PSNR of its images against ours uncached (same prompt and seed).

On a GPU with ``--compare-reference`` the engine that is not running waits in host memory, so
each engine's peak memory is its own. On a CPU both stay loaded (see ``memory``).

Several devices (``--ar-tp``, ``--dit-cfg-parallel``, ``--dit-sp``, ``--placement``): ours runs its
stages on rank processes; the stage times are measured inside them as in one process, and each
case adds (``comm``) one more call with every collective timed: per stage on several ranks, its
seconds and the share of them its all-reduces / all-gathers / all-to-alls / broadcasts took.
Peak memory is this process's (a stage on rank processes is not counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..engine.choices import DEFAULT_CONTINUED, DEFAULT_COUPLED, DEFAULT_DRAFTS, DEFAULT_WINDOW
from ..errors import GlmImageError
from ..parallel.config import ParallelConfig
from .engines import StageTimes, on_device, on_engine
from .memory import PeakMemory
from .report import build_report, device_name, markdown_table, median
from .roofline import ar_weight_bytes_per_token, dit_flops_per_step, floor_fractions, fraction
from .runtime import load_runners

if TYPE_CHECKING:
    from ..engine.step_cache import StepCacheOptions

__all__ = ["SpeedOptions", "format_speed", "run_speed"]

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "A vintage poster with the title 'SUMMER SALE' in bold red letters"
STAGES = ("ar_prefill", "ar_decode", "dit", "vae", "total")


@dataclass(frozen=True)
class SpeedOptions:
    model: str = "tiny"
    sizes: tuple[tuple[int, int], ...] = ((1024, 1024),)  # (width, height)
    steps: int = 50
    batches: tuple[int, ...] = (1,)
    compare_reference: bool = False
    repeats: int = 3
    warmup: int = 1
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    attention_backend: str | None = None
    max_ar_tokens: int | None = None
    dit_cache: StepCacheOptions | None = None  # also run ours with this DiT step cache
    ar_decoding: str = "sequential"  # how ours decodes (the reference: always sequential)
    jacobi_window: int = DEFAULT_WINDOW
    jacobi_drafts: str = DEFAULT_DRAFTS
    jacobi_coupled: bool = DEFAULT_COUPLED
    jacobi_continued: bool = DEFAULT_CONTINUED
    quantize: str | None = None  # ours' weight format (the reference: as stored)
    max_memory: str | None = None
    residency: str | None = None  # forced (``residency.RESIDENCIES``); None: the planner's
    ar_tp: int = 1  # ours on several devices (``glm_image.parallel``)
    dit_cfg_parallel: bool = False
    dit_sp: int = 1
    placement: str = "same"
    lora: tuple[tuple[str, float], ...] = ()  # ours with these adapters (merged unless quantized)

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.ar_tp, self.dit_cfg_parallel, self.dit_sp, self.placement)

    def check(self) -> None:
        self.parallel.check()
        if self.dit_cache is not None:
            self.dit_cache.check()
        if not self.sizes or not self.batches:
            raise GlmImageError("--sizes and --batch need at least one value each")
        for name, value, least in (
            ("--steps", self.steps, 1),
            ("--repeats", self.repeats, 1),
            ("--warmup", self.warmup, 0),
        ):
            if value < least:
                raise GlmImageError(f"{name} = {value}; allowed: an integer >= {least}")
        if any(b < 1 for b in self.batches):
            raise GlmImageError(f"--batch = {','.join(map(str, self.batches))}; allowed: integers >= 1")
        if self.max_ar_tokens is not None and self.max_ar_tokens < 1:
            raise GlmImageError(f"--max-ar-tokens = {self.max_ar_tokens}; allowed: an integer >= 1")


def run_speed(options: SpeedOptions, progress=None) -> dict[str, Any]:
    """Measure every case; return the report (the shared layout of ``report``)."""
    options.check()
    loaded = load_runners(options)
    ours, runners, swap = loaded.ours, list(loaded.runners), loaded.swap
    if options.dit_cache is not None:
        runners.insert(1, ours.with_cache(options.dit_cache))
    device, dtype, root = loaded.device, loaded.dtype, loaded.root
    for width, height in options.sizes:  # a bad size fails now, not after the first case
        ours.pipe.validate([options.prompt], height, width, options.steps, 1.5, max(options.batches))

    checkpoint = ours.pipe.dit.config
    patch = checkpoint.vae.scale_factor * checkpoint.dit.patch_size  # pixels per DiT image token
    lengths = on_engine(ours.pipe.dit, functools.partial(_glyph_lengths, prompt=options.prompt))
    ar_bytes = on_engine(ours.pipe.ar, _ar_bytes)  # a tensor-parallel rank's: what one device reads
    name = device_name(device)
    results, memory_method = [], ""
    for width, height in options.sizes:
        for batch in options.batches:
            call = (options.prompt, height, width, options.steps, batch, options.seed, options.max_ar_tokens)
            for runner in runners:
                for _ in range(options.warmup):
                    _measure(runner, call, device, swap)
                    if progress:
                        progress()
            samples: dict[str, list] = {runner.name: [] for runner in runners}
            images: dict[str, list] = {}  # each engine's images of its last run
            for repeat in range(options.repeats):
                for runner in runners if repeat % 2 == 0 else runners[::-1]:
                    images[runner.name], times, memory = _measure(runner, call, device, swap)
                    samples[runner.name].append((times, memory))
                    memory_method = memory.method
                    if progress:
                        progress()
            image_tokens = (height // patch) * (width // patch)
            flops = dit_flops_per_step(checkpoint.dit, image_tokens, lengths[0], images=batch)
            floor = floor_fractions(device, name, dtype, ar_bytes_per_step=ar_bytes, dit_flops=flops)
            case = _case(
                width, height, batch, options, samples, runners, ar_bytes, flops, floor, dtype, device
            )
            case["cache"] = _cache_comparison(case, images, options) if options.dit_cache else None
            case["comm"] = ours.comm_share(*call)
            results.append(case)

    notes = [f"peak memory: {memory_method}"]
    if device.type == "cpu" and options.compare_reference:
        notes.append(
            "on a CPU both engines stay loaded in one process: peak RSS counts both engines' weights"
        )
    if options.max_ar_tokens is not None:
        notes.append(
            f"--max-ar-tokens {options.max_ar_tokens}: each AR model stopped after that many tokens and the rest of "
            "its grid was filled with code 0; AR rates are over the tokens written, images are not real ones"
        )
    if options.parallel.spread:
        notes.append(
            f"ours: {options.parallel.describe()}; comm: one more call per case with every collective timed "
            "(the device synchronised around each; the AR decoding eagerly), its share of each stage's seconds "
            "on the first rank; peak memory is the launching process's only"
        )
    if options.compare_reference and max(options.batches) > 1:
        notes.append(
            "with num_images_per_prompt > 1 the reference writes one token sequence per prompt and reuses it for "
            "every image; ours writes one per image (each image has its own seed)"
        )
    config = {
        "model": str(options.model),
        "checkpoint": str(root),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "sizes": [f"{w}x{h}" for w, h in options.sizes],
        "batches": list(options.batches),
        "steps": options.steps,
        "guidance": 1.5,
        "repeats": options.repeats,
        "warmup": options.warmup,
        "prompt": options.prompt,
        "seed": options.seed,
        "compare_reference": options.compare_reference,
        "max_ar_tokens": options.max_ar_tokens,
        "quantize": options.quantize,
        "ar_decoding": options.ar_decoding,
        "jacobi_window": options.jacobi_window if options.ar_decoding == "jacobi" else None,
        "dit_cache": dataclasses.asdict(options.dit_cache) if options.dit_cache else None,
        "parallel": dataclasses.asdict(options.parallel),
    }
    if options.dit_cache is not None:
        notes.append(
            "cache: ours_cached against ours uncached; psnr_db over 8-bit RGB, the worst image of the batch "
            "(null: identical); dit_forwards: transformer passes per image, a cached branch-step counting "
            "1/num_layers"
        )
    return build_report("speed", results, config=config, notes=notes, device=device)


def _glyph_lengths(engine, prompt: str) -> list[int]:
    return engine.glyph.encode([prompt], return_lengths=True)[1]


def _ar_bytes(engine) -> int:
    return ar_weight_bytes_per_token(engine.model)


def _measure(runner, call, device: torch.device, swap: bool) -> tuple[list, StageTimes, PeakMemory]:
    with on_device(runner, swap), PeakMemory(device) as memory:
        images, times = runner.run(*call)
    return images, times, memory


def _cache_comparison(case: dict, images: dict[str, list], options: SpeedOptions) -> dict:
    """The cached engine against ours uncached: DiT speed-up, passes per image, image PSNR."""
    from .metrics import psnr

    ours, cached = case["ours"], case["ours_cached"]
    scores = [psnr(a, b) for a, b in zip(images["ours_cached"], images["ours"], strict=True)]
    worst = min(scores)
    return {
        "dit_speedup": round(ours["dit_s"] / cached["dit_s"], 4) if cached["dit_s"] > 0 else None,
        "dit_forwards": cached["dit_forwards"],
        "dit_forwards_uncached": 2 * options.steps,  # guidance 1.5: both branches every step
        "psnr_db": None if worst == float("inf") else round(worst, 3),
    }


def _engine(samples: list, steps: int, ar_bytes: int, flops: float, floor: dict, weight_bytes: int) -> dict:
    """One engine's medians and the numbers derived from them."""
    times = [t for t, _ in samples]
    last = times[-1]
    stage = {s: round(median([getattr(t, s) for t in times]), 6) for s in STAGES}
    decode_steps = last.ar_tokens - 1  # the prefill writes the first token
    decode_rate = decode_steps / stage["ar_decode"] if decode_steps > 0 and stage["ar_decode"] > 0 else None
    dit_step = stage["dit"] / steps
    out: dict[str, Any] = {
        "seconds": {s: [round(getattr(t, s), 6) for t in times] for s in ("ar", *STAGES)},
        "ar_tokens": last.ar_tokens,
        "ar_sequences": last.ar_sequences,
        "images": last.images,
        "ar_prefill_s": stage["ar_prefill"],
        "ar_decode_s": stage["ar_decode"],
        "ar_tokens_per_s": round(decode_rate * last.ar_sequences, 3) if decode_rate else None,
        "ar_weight_gb_per_s": round(ar_bytes * decode_rate / 1e9, 3) if decode_rate else None,
        "dit_s": stage["dit"],
        "dit_s_per_step": round(dit_step, 6),
        "dit_tflop_per_s": round(flops / dit_step / 1e12, 4) if dit_step > 0 else None,
        "vae_s": stage["vae"],
        "total_s": stage["total"],
        "seconds_per_image": round(stage["total"] / last.images, 6),
        "peak_memory_bytes": max(m.peak for _, m in samples),
        "peak_memory_increase_bytes": max(m.increase for _, m in samples),
        "weight_bytes": weight_bytes,
        "fraction_of_floor": {
            "ar_decode": fraction(floor.get("ar_seconds_per_step"), 1 / decode_rate if decode_rate else None),
            "dit": fraction(floor.get("dit_seconds_per_step"), dit_step),
        },
    }
    if last.dit_forwards is not None:
        out["dit_forwards"] = last.dit_forwards
    if last.ar_forwards is not None:  # ours: Jacobi decoding writes several tokens per forward
        out["ar_forwards_per_image"] = last.ar_forwards
    return out


RATIOS = (
    "ar_prefill_s",
    "ar_tokens_per_s",
    "dit_s_per_step",
    "vae_s",
    "seconds_per_image",
    "peak_memory_bytes",
)


def _case(width, height, batch, options, samples, runners, ar_bytes, flops, floor, dtype, device) -> dict:
    engines = {
        r.name: _engine(samples[r.name], options.steps, ar_bytes, flops, floor, r.weight_bytes)
        for r in runners
    }
    ours, reference = engines["ours"], engines.get("reference")
    ratio = None
    if reference is not None:
        ratio = {k: round(ours[k] / reference[k], 4) if ours[k] and reference[k] else None for k in RATIOS}
        ratio["speedup"] = round(reference["seconds_per_image"] / ours["seconds_per_image"], 4)
    return {
        "size": f"{width}x{height}",
        "width": width,
        "height": height,
        "batch": batch,
        "steps": options.steps,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "ar_weight_bytes_per_token": ar_bytes,
        "dit_flops_per_step": flops,
        "ours": ours,
        "ours_cached": engines.get("ours_cached"),
        "reference": reference,
        "ratio": ratio,
        "floor": floor,
    }


def _gib(n: int | None) -> str | None:
    return None if n is None else f"{n / 2**30:.2f}"


def _num(x: float | None, digits: int = 3) -> str | None:
    if x is None:
        return None
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.1f}%"


def _options_line(config: dict[str, Any]) -> str:
    """The options ours ran with, so a table says what it measured (the reference: always stored
    weights, sequential decoding, no step cache)."""
    decoding = config.get("ar_decoding") or "sequential"
    if decoding == "jacobi" and config.get("jacobi_window") is not None:
        decoding += f" (window {config['jacobi_window']})"
    cache = config.get("dit_cache")
    if cache:
        shown = ", ".join(f"{k} {v}" for k, v in cache.items())
        cache_text = f"DiT cache on ({shown}; row ours_cached)"
    else:
        cache_text = "DiT cache off"
    parts = [f"quantize {config.get('quantize') or 'none'}", f"decoding {decoding}", cache_text]
    if config.get("max_ar_tokens") is not None:
        parts.append(f"AR stopped after {config['max_ar_tokens']} tokens")
    parallel = config.get("parallel")
    if parallel:
        with contextlib.suppress(TypeError, ValueError):  # a report from another version: say nothing
            parts.append(ParallelConfig(**parallel).describe())
    return ", ".join(parts)


def format_speed(report: dict[str, Any]) -> str:
    """The Markdown table of a speed report (what the command prints)."""
    config, machine = report["config"], report["machine"]
    headers = [
        "size",
        "batch",
        "engine",
        "AR prefill s",
        "AR decode tok/s",
        "DiT s/step",
        "VAE s",
        "s/image",
        "peak mem GiB",
        "AR floor",
        "DiT floor",
    ]
    rows = []
    for case in report["results"]:
        for name in ("ours", "ours_cached", "reference"):
            e = case.get(name)
            if e is None:
                continue
            f = e["fraction_of_floor"]
            rows.append(
                [
                    case["size"],
                    case["batch"],
                    name,
                    _num(e["ar_prefill_s"]),
                    _num(e["ar_tokens_per_s"]),
                    _num(e["dit_s_per_step"]),
                    _num(e["vae_s"]),
                    _num(e["seconds_per_image"]),
                    _gib(e["peak_memory_bytes"]),
                    _pct(f["ar_decode"]),
                    _pct(f["dit"]),
                ]
            )
        r = case["ratio"]
        if r is not None:
            rows.append(
                [
                    case["size"],
                    case["batch"],
                    "ours/ref",
                    _num(r["ar_prefill_s"]),
                    _num(r["ar_tokens_per_s"]),
                    _num(r["dit_s_per_step"]),
                    _num(r["vae_s"]),
                    _num(r["seconds_per_image"]),
                    _num(r["peak_memory_bytes"]),
                    None,
                    None,
                ]
            )
    floors = {c["floor"].get("device") or c["floor"].get("reason") for c in report["results"]}
    caches = [
        f"DiT cache at {c['size']} batch {c['batch']}: DiT x{_num(k['dit_speedup'])} against uncached, "
        f"{_num(k['dit_forwards'])} of {k['dit_forwards_uncached']} transformer passes per image, PSNR "
        + ("identical" if k["psnr_db"] is None else f"{k['psnr_db']:.1f} dB")
        for c in report["results"]
        if (k := c.get("cache"))
    ]
    comms = [
        f"collectives at {c['size']} batch {c['batch']}, {stage} on {k['ranks']} ranks: {_pct(k['share'])} of "
        f"{_num(k['stage_s'])} s ("
        + ", ".join(
            f"{kind} {_num(seconds)} s in {k['calls'][kind]} calls"
            for kind, seconds in k["collective_s"].items()
        )
        + ")"
        for c in report["results"]
        for stage, k in (c.get("comm") or {}).items()
    ]
    lines = [
        f"glm-image bench speed: model {config['model']}, {machine['device']}, {config['dtype']}, "
        f"{config['steps']} steps, median of {config['repeats']} (after {config['warmup']} warm-up)",
        f"ours: {_options_line(config)}",
        "",
        markdown_table(headers, rows),
        "",
        "AR decode tok/s = tokens after the first x sequences / (AR - prefill) s; DiT s/step = DiT s / steps"
        + ("; ours/ref < 1 is faster for times, > 1 for tok/s." if config["compare_reference"] else "."),
        f"floor: {'; '.join(sorted(map(str, floors)))}",
        *caches,
        *comms,
        *report["notes"],
    ]
    return "\n".join(lines)
