"""`glm-image bench ar`: AR decode speed and cost, our decoders against transformers' ``generate``
on the same weights, in the same run.

Per sampling temperature (the checkpoint's unless ``--temperatures``), every decoder runs the
same prompt, size and seeds: transformers' ``generate`` (the reference), our sequential decoder,
and with ``--ar-decoding ...,jacobi`` speculative Jacobi decoding at each ``--jacobi-window`` and
``--jacobi-drafts`` and ``--jacobi-options`` (how drafts are renewed: ``JACOBI_OPTIONS``). After
one warm-up call each, ``--repeats`` timed calls; reported per decoder:
model forwards per image (the prefill included: the reference and sequential decoding make one
per token), tokens per forward, the median tokens/s (new tokens x images / wall time of the whole
call), the weight bandwidth that implies (decoder weight bytes per forward x forwards / s), and
the ratios to sequential and to the reference; for Jacobi decoding also the histogram of the
tokens each forward accepted (the images' forwards together, index 0..W).

``--max-tokens`` caps the tokens (a wide-preset forward reads ~2 GB on a CPU); without it the
whole protocol at the size is generated. ``--sharpen`` measures a copy of the model whose AR
distributions are sharp (``glm_image.synthetic.sharpen_ar``): random weights accept almost no
draft, and neither is the released model.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine.choices import DEFAULT_CONTINUED, DEFAULT_COUPLED, DEFAULT_WINDOW, check_decoding
from ..errors import GlmImageError
from .report import build_report, markdown_table, median, timed
from .roofline import ar_weight_bytes_per_token
from .runtime import StageBench

__all__ = ["ArBenchOptions", "format_ar", "run_ar"]

PROMPT = "A vintage poster with the title 'SUMMER SALE' in bold red letters"

# ``--jacobi-options``: name -> (jacobi_coupled, jacobi_continued)
JACOBI_OPTIONS = {
    "default": (DEFAULT_COUPLED, DEFAULT_CONTINUED),
    "plain": (False, False),
    "coupled": (True, False),
    "continued": (False, True),
    "coupled+continued": (True, True),
}


@dataclass(frozen=True)
class ArBenchOptions(StageBench):
    max_tokens: int | None = None
    greedy: bool = False
    images: int = 1  # images per call (one seed each)
    decodings: tuple[str, ...] = ("sequential",)
    windows: tuple[int, ...] = (DEFAULT_WINDOW,)
    drafts: tuple[str, ...] = ("last",)
    jacobi_options: tuple[str, ...] = ("default",)  # JACOBI_OPTIONS names
    temperatures: tuple[float, ...] = ()  # () = the checkpoint's
    sharpen: bool = False
    compare_reference: bool = True

    def check(self) -> None:
        super().check()
        if self.max_tokens is not None and self.max_tokens < 1:
            raise GlmImageError(f"--max-tokens = {self.max_tokens}; allowed: an integer >= 1")
        if self.images < 1:
            raise GlmImageError(f"--images = {self.images}; allowed: an integer >= 1")
        unknown = [o for o in self.jacobi_options if o not in JACOBI_OPTIONS]
        if unknown or not self.jacobi_options:
            raise GlmImageError(
                f"--jacobi-options = {','.join(self.jacobi_options)}; allowed: {', '.join(JACOBI_OPTIONS)}"
            )
        for decoding in self.decodings:
            for window in self.windows:
                for drafts in self.drafts:
                    check_decoding(decoding, window, drafts)
        if any(not t > 0 for t in self.temperatures):
            raise GlmImageError(f"--temperatures = {list(self.temperatures)}; allowed: numbers > 0")


def _decoders(engine, options: ArBenchOptions, call: dict) -> dict[str, Any]:
    """decoder name -> a function running one call (returning its ArResult)."""
    runners = {"sequential": lambda: engine.generate(**call)}
    if "jacobi" in options.decodings:
        cases = itertools.product(options.windows, options.drafts, options.jacobi_options)
        for window, drafts, how in cases:
            name = f"jacobi W={window}" + (f" {drafts}" if len(options.drafts) > 1 else "")
            name += f" {how}" if len(options.jacobi_options) > 1 else ""
            coupled, continued = JACOBI_OPTIONS[how]
            runners[name] = lambda w=window, d=drafts, c=coupled, k=continued: engine.generate(
                **call,
                decoding="jacobi",
                jacobi_window=w,
                jacobi_drafts=d,
                jacobi_coupled=c,
                jacobi_continued=k,
            )
    return runners


def run_ar(options: ArBenchOptions, progress=None) -> dict[str, Any]:
    from ..engine import ArEngine
    from ..sampling import SamplingParams

    options.check()
    name = options.model + (" (sharpened)" if options.sharpen else "")
    with tempfile.TemporaryDirectory() as scratch:
        if options.sharpen:
            from ..hub import resolve_checkpoint
            from ..synthetic import sharpen_ar

            model = sharpen_ar(resolve_checkpoint(options.model), Path(scratch) / "sharp")
            options = dataclasses.replace(options, model=str(model))
        ours, root, device, dtype = options.load(ArEngine)
        width, height = options.size
        protocol = ours.generate(PROMPT, height, width, max_new_tokens=1).spec.num_tokens
        tokens = min(protocol, options.max_tokens) if options.max_tokens else protocol
        reference = (
            _reference(root, ours, device, dtype, tokens, options) if options.compare_reference else None
        )
        call = {
            "prompts": PROMPT,
            "height": height,
            "width": width,
            "seeds": list(range(options.images)),
            "num_images_per_prompt": options.images,
            "greedy": options.greedy,
            "max_new_tokens": tokens,
        }
        default = ours.sampling
        temperatures = options.temperatures or (default.temperature,)
        results = []
        for temperature in temperatures:
            ours.sampling = SamplingParams(temperature, default.top_p, default.top_k)
            runners = _decoders(ours, options, call)
            if reference is not None:
                runners = {"reference": reference, **runners}
            rows = [_measure(name, run, options, tokens, device, progress) for name, run in runners.items()]
            results += _with_ratios(rows, ours, name, options.greedy, temperature, width, height)
        ours.sampling = default
    g = ours.config.generation
    config = {
        "model": name,
        "checkpoint": str(root),
        "size": f"{width}x{height}",
        "repeats": options.repeats,
        "max_tokens": options.max_tokens,
        "greedy": options.greedy,
        "images": options.images,
        "decodings": list(options.decodings),
        "jacobi_windows": list(options.windows),
        "jacobi_drafts": list(options.drafts),
        "jacobi_options": {
            o: dict(zip(("coupled", "continued"), JACOBI_OPTIONS[o], strict=True))
            for o in options.jacobi_options
        },
        "top_p": g.top_p,
        "sharpened": options.sharpen,
    }
    notes = [
        "tokens/s = new tokens x images / wall seconds of the whole call, prefill included, median over "
        "the repeats; forwards per image include the prefill",
        "acceptance depends on the weights: random or sharpened weights are not the released model",
    ]
    return build_report("ar_decode", results, config=config, notes=notes, device=device)


def _reference(root: Path, ours, device, dtype, tokens: int, options: ArBenchOptions):
    """transformers' generate on the same weights: one sequence per call (it reuses one prompt's
    tokens for every image), so its tokens/s counts one image."""
    from transformers import GlmImageForConditionalGeneration

    model = GlmImageForConditionalGeneration.from_pretrained(root / "vision_language_encoder", dtype=dtype)
    model = model.to(device).eval()
    width, height = options.size
    inputs = ours.processor_inputs(PROMPT, height, width).to(device)

    def run() -> None:
        sampling = ours.sampling  # the temperature of the current case
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=not options.greedy,
                temperature=sampling.temperature,
            )
        assert out.shape[1] - inputs["input_ids"].shape[1] == tokens

    return run


def _measure(name: str, run, options: ArBenchOptions, tokens: int, device, progress) -> dict[str, Any]:
    out = run()  # warm-up; the forward counts are fixed by the seeds
    seconds = [timed(run, device) for _ in range(options.repeats)]
    if progress:
        progress()
    images = 1 if out is None else options.images
    forwards = tokens if out is None else sum(out.stats.image_forwards) / len(out.stats.image_forwards)
    tps = images * tokens / median(seconds)
    return {
        "forwards_per_s": forwards / median(seconds),  # batch forwards: the weights are read once each
        "decoder": name,
        "images": images,
        "new_tokens": tokens,
        "forwards_per_image": round(forwards, 2),
        "tokens_per_forward": round(tokens / forwards, 3),
        "seconds": seconds,
        "tokens_per_s": round(tps, 2),
        "decode_step": None if out is None else out.decode_step,
        # the warm-up's captures: the timed calls replay its kept graph (engine.graphs), where
        # results before graph buckets paid a capture in every timed call
        "warmup_graph_captures": None if out is None else out.graph_captures,
        "accepted_histogram": _histogram(None if out is None else out.stats.accepted),
    }


def _histogram(accepted) -> list[int] | None:
    """Forwards by the tokens each accepted (index 0..W), every image's together; None where
    a decoder accepts one token per forward by construction."""
    if accepted is None:
        return None
    return [sum(column) for column in zip(*accepted, strict=True)]


def _with_ratios(rows, ours, name, greedy, temperature, width, height) -> list[dict[str, Any]]:
    per_forward = ar_weight_bytes_per_token(ours.model)
    base = next(r for r in rows if r["decoder"] == "sequential")
    reference = next((r for r in rows if r["decoder"] == "reference"), None)
    for r in rows:
        forwards_per_s = r.pop("forwards_per_s")
        r.update(
            model=name,
            size=f"{width}x{height}",
            mode="greedy" if greedy else "sampled",
            temperature=temperature,
            device=str(ours.device),
            dtype=str(ours.dtype).removeprefix("torch."),
            backend=ours.model.ops.name,
            weight_bytes_per_token=per_forward,
            weight_gb_per_s=round(per_forward * forwards_per_s / 1e9, 3),
            forwards_vs_sequential=round(r["forwards_per_image"] / base["forwards_per_image"], 3),
            speed_vs_sequential=round(r["tokens_per_s"] / base["tokens_per_s"], 3),
            speed_vs_reference=round(r["tokens_per_s"] / reference["tokens_per_s"], 3) if reference else None,
        )
    return rows


def format_ar(report: dict[str, Any]) -> str:
    headers = ["model", "size", "mode", "T", "decoder", "tokens", "fwd/image", "tok/fwd", "tok/s", "GB/s"]
    headers += ["fwd vs seq", "speed vs seq", "speed vs ref"]
    rows = [
        [
            r["model"],
            r["size"],
            r["mode"],
            r["temperature"],
            r["decoder"],
            r["new_tokens"],
            r["forwards_per_image"],
            r["tokens_per_forward"],
            r["tokens_per_s"],
            r["weight_gb_per_s"],
            r["forwards_vs_sequential"],
            r["speed_vs_sequential"],
            r["speed_vs_reference"],
        ]
        for r in report["results"]
    ]
    histograms = [
        f"- {r['decoder']} (T={r['temperature']}): forwards by tokens accepted 1..W: "
        + ", ".join(f"{k}: {n}" for k, n in enumerate(r["accepted_histogram"]) if k > 0)
        for r in report["results"]
        if r.get("accepted_histogram")
    ]
    lines = [markdown_table(headers, rows), ""]
    if histograms:
        lines += [
            "Accepted tokens per forward (all images' forwards, the prefill's included):",
            *histograms,
            "",
        ]
    return "\n".join([*lines, *report["notes"]])
