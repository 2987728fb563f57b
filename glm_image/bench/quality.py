"""`glm-image bench quality`: generate a prompt set, read the images back with OCR, score the text.

Every prompt gets one image per engine, with the same size, steps and seed (so with
``--compare-reference`` the two images differ only where the engines do). CVTG items are scored
with Word Accuracy and NED, LongText items with the text score (``metrics``), per engine, suite
and language. The OCR is RapidOCR (``ocr``), not the one the published numbers used: the report
says so, and which model read the images.

With ``dit_cache`` (a ``StepCacheOptions``) ours also runs with that DiT step cache (engine
``ours_cached``, same prompt, size, steps and seed): its samples carry the PSNR of their image
against ours uncached and the transformer passes it computed, its results the mean and worst
PSNR, the passes per image and its score minus ours uncached (``*_delta``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.choices import DEFAULT_CONTINUED, DEFAULT_COUPLED, DEFAULT_DRAFTS, DEFAULT_WINDOW
from ..errors import GlmImageError
from .metrics import (
    CvtgScore,
    LongTextScore,
    cvtg_aggregate,
    cvtg_score,
    longtext_aggregate,
    longtext_score,
    psnr,
)
from .report import build_report, markdown_table
from .suites import SuiteItem, load_suite

if TYPE_CHECKING:
    from ..engine.step_cache import StepCacheOptions

__all__ = ["QualityOptions", "format_quality", "psnr", "run_quality"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityOptions:
    suite: str = "cvtg"
    limit: int | None = None
    model: str = "tiny"
    size: tuple[int, int] = (1024, 1024)  # (width, height)
    steps: int = 50
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    attention_backend: str | None = None
    compare_reference: bool = False
    save_images: str | None = None
    dit_cache: StepCacheOptions | None = None  # also run ours with this DiT step cache
    ar_decoding: str = "sequential"  # how ours decodes (the reference: always sequential)
    jacobi_window: int = DEFAULT_WINDOW
    jacobi_drafts: str = DEFAULT_DRAFTS
    jacobi_coupled: bool = DEFAULT_COUPLED
    jacobi_continued: bool = DEFAULT_CONTINUED
    quantize: str | None = None  # ours' weight format (the reference: as stored)
    max_memory: str | None = None
    residency: str | None = None  # forced (``residency.RESIDENCIES``); None: the planner's


def _score(item: SuiteItem, lines: list[str]) -> dict[str, Any]:
    if item.suite == "cvtg":
        s = cvtg_score(item.targets, lines)
        return {
            "words": s.words,
            "correct_words": s.correct,
            "word_accuracy": s.word_accuracy,
            "ned": s.ned,
            "similarities": list(s.similarities),  # per target word, for the suite's NED
        }
    s = longtext_score(item.targets, " ".join(lines), item.lang)
    return {"matched": s.matched, "total": s.total, "text_score": s.text_score}


def _aggregate(samples: list[dict]) -> dict[str, Any]:
    """The suite's official aggregate over ``samples`` (all from one suite)."""
    if samples[0]["suite"] == "cvtg":
        scores = [CvtgScore(s["words"], s["correct_words"], tuple(s["similarities"])) for s in samples]
        return cvtg_aggregate(scores)
    return longtext_aggregate(LongTextScore(s["matched"], s["total"]) for s in samples)


def run_quality(options: QualityOptions, progress=None) -> dict[str, Any]:
    from .engines import OursRunner, on_device
    from .ocr import RapidOcr
    from .runtime import load_runners

    if options.dit_cache is not None:
        options.dit_cache.check()
    items = load_suite(options.suite, options.limit)
    ocr = RapidOcr()  # before any model loads: a missing OCR package fails in a second
    loaded = load_runners(options)
    ours, runners, swap = loaded.ours, list(loaded.runners), loaded.swap
    if options.dit_cache is not None:
        runners.insert(1, ours.with_cache(options.dit_cache))
    device, dtype, root = loaded.device, loaded.dtype, loaded.root
    width, height = options.size
    ours.pipe.validate([item.prompt for item in items], height, width, options.steps, 1.5, 1)
    out_dir = Path(options.save_images) if options.save_images else None

    samples = []
    for item in items:
        uncached = None  # ours' image of this item, for the cached engine's PSNR
        for runner in runners:
            error = None
            try:
                with on_device(runner, swap):
                    images, times = runner.run(
                        item.prompt, height, width, options.steps, 1, options.seed, None
                    )
            except GlmImageError as e:
                if isinstance(runner, OursRunner):
                    raise
                # the reference can fail on a prompt (a non-image token inside its grid): that
                # image shows no text, and the run goes on
                images, times, error = None, None, str(e)
            lines = ocr.read(images[0]) if images else []
            sample = {
                "id": item.id,
                "suite": item.suite,
                "lang": item.lang,
                "group": item.group,
                "engine": runner.name,
                "prompt": item.prompt,
                "targets": list(item.targets),
                "seed": options.seed,
                "seconds": round(times.total, 3) if times else None,
                "ocr": lines,
                **_score(item, lines),
            }
            if error is not None:
                sample["error"] = error
            if runner is ours:
                uncached = images[0]
            elif runner.name == "ours_cached":
                score = psnr(images[0], uncached)
                sample["psnr_db"] = None if math.isinf(score) else round(score, 3)
                sample["dit_forwards"] = times.dit_forwards
            if out_dir is not None and images:
                out_dir.mkdir(parents=True, exist_ok=True)
                path = out_dir / f"{item.id.replace('/', '-')}-{runner.name}.png"
                images[0].save(path)
                sample["image"] = str(path)
            samples.append(sample)
            log.info("%s %s: %s", runner.name, item.id, lines)
            if progress:
                progress()

    results = []
    for runner in runners:
        for suite in dict.fromkeys(s["suite"] for s in samples):
            mine = [s for s in samples if s["engine"] == runner.name and s["suite"] == suite]
            langs = list(dict.fromkeys(s["lang"] for s in mine))
            for lang in [*langs, "all"] if len(langs) > 1 else langs:
                subset = mine if lang == "all" else [s for s in mine if s["lang"] == lang]
                failed = sum(1 for s in subset if "error" in s)
                result = {
                    "engine": runner.name,
                    "suite": suite,
                    "lang": lang,
                    **_aggregate(subset),
                    "failed": failed,
                }
                if runner.name == "ours_cached":
                    result |= _cache_summary(subset, result, results)
                results.append(result)

    ocr_info = ocr.describe()
    config = {
        "suite": options.suite,
        "limit": options.limit,
        "model": str(options.model),
        "checkpoint": str(root),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "size": f"{width}x{height}",
        "steps": options.steps,
        "guidance": 1.5,
        "seed": options.seed,
        "compare_reference": options.compare_reference,
        "dit_cache": dataclasses.asdict(options.dit_cache) if options.dit_cache else None,
        "quantize": options.quantize,
    }
    notes = [f"OCR: {ocr.name}", ocr_info["note"]]
    extra = {}
    if options.quantize not in (None, "none"):
        from .fidelity import fidelity

        prompts = [item.prompt for item in items]
        extra["quantization"] = fidelity(ours.pipe, root, prompts, height, width, options.steps, options.seed)
        notes.append(
            "quantization: ours quantized against the same checkpoint unquantized: AR logits teacher-forced on "
            "the unquantized tokens (KL, top-1), DiT velocity relative error (the worst prompt) and image PSNR "
            "given the same prior tokens and seed"
        )
    if options.dit_cache is not None:
        notes.append(
            "ours_cached: ours with the DiT step cache; psnr_db against ours uncached over 8-bit RGB (null: "
            "identical); dit_forwards: transformer passes per image, a cached branch-step counting 1/num_layers"
        )
    if any("error" in s for s in samples):
        notes.append(
            "an engine that failed on a prompt made no image there: scored as an image showing no text"
        )
    return build_report(
        "quality", results, config=config, notes=notes, device=device, ocr=ocr_info, samples=samples, **extra
    )


def _cache_summary(subset: list[dict], result: dict, earlier: list[dict]) -> dict[str, Any]:
    """The cached engine's subset against ours uncached on the same items (already in ``earlier``)."""
    scores = [s["psnr_db"] for s in subset if s.get("psnr_db") is not None]
    base = next(
        r
        for r in earlier
        if (r["engine"], r["suite"], r["lang"]) == ("ours", result["suite"], result["lang"])
    )
    key = "word_accuracy" if result["suite"] == "cvtg" else "text_score"
    return {
        "dit_forwards": round(sum(s["dit_forwards"] for s in subset) / len(subset), 4),
        "psnr_db_mean": round(sum(scores) / len(scores), 3) if scores else None,
        "psnr_db_min": min(scores) if scores else None,
        "identical_images": len(subset) - len(scores),
        f"{key}_delta": round(result[key] - base[key], 6),
    }


def _fmt(x: float | None) -> str | None:
    return None if x is None else f"{x:.4f}"


def _db(x: float | None) -> str:
    return "identical" if x is None else f"{x:.1f} dB"


def format_quality(report: dict[str, Any]) -> str:
    """The Markdown table of a quality report (what the command prints)."""
    config = report["config"]
    headers = [
        "engine",
        "suite",
        "lang",
        "images",
        "failed",
        "Word Acc",
        "NED",
        "LongText score",
        "words / units",
    ]
    rows = []
    for r in report["results"]:
        cvtg = r["suite"] == "cvtg"
        rows.append(
            [
                r["engine"],
                r["suite"],
                r["lang"],
                r["images"],
                r["failed"],
                _fmt(r.get("word_accuracy")),
                _fmt(r.get("ned")),
                _fmt(r.get("text_score")),
                f"{r['correct_words']}/{r['words']}" if cvtg else f"{r['matched']}/{r['total']}",
            ]
        )
    caches = [
        f"DiT cache, {r['suite']} {r['lang']}: {r['dit_forwards']:.4g} transformer passes per image, PSNR against "
        f"uncached mean {_db(r['psnr_db_mean'])} worst {_db(r['psnr_db_min'])}, "
        + ", ".join(f"{k} {v:+.4f}" for k, v in r.items() if k.endswith("_delta"))
        for r in report["results"]
        if r["engine"] == "ours_cached"
    ]
    lines = [
        f"glm-image bench quality: suite {config['suite']}, model {config['model']}, {config['size']}, "
        f"{config['steps']} steps, seed {config['seed']}, {report['machine']['device']}",
        "",
        markdown_table(headers, rows),
        "",
        *caches,
        *report["notes"],
    ]
    return "\n".join(lines)
