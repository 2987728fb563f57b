"""The released size, measured the way a user runs it: the ``full`` stage of benchmarks/gpu_run.sh.

``glm-image-random`` (the released architecture, weights drawn on the device from a seed; see
``glm_image.synthetic.random``) is timed in parts, each its own process (one engine on the
device at a time; a part past its cap loses only itself), each writing one JSON into a folder;
``merge`` makes ``full.json`` of them:

- ``exact``: ours exact, then (ours freed) diffusers' ``GlmImagePipeline`` on the very same
  tensors: s/image, AR prefill s, AR decode tok/s, DiT s per CFG step, VAE s, peak GiB, and the
  fraction of the card's roofline floor of each (``bench.roofline``);
- ``fast``: ours with every speed-up on (Jacobi, int8 AR, fp8 DiT where the card has FP8, else
  int8, fbcache at its default threshold), with the AR and DiT forwards it computed;
- ``batch``: ours exact, 4 images per call; ``large``: ours exact at the large size (2048x2048);
- ``memory``: the memory planner's estimate beside the measured peak, per stage, bf16 and int8.

Like for like: both engines write the same AR tokens. Ours masks EOS and every non-code token
until the grid is complete and stops at its last token (``constrain_grid``); the reference is
given the same mask as a logits processor (``_CodesOnly``) and ``max_new_tokens`` = the grid, so
a random model's EOS can neither end its grid early nor add a step. Both run the same steps at
the same size, CFG 1.5, batch 1.

``--steps`` below ``--project-steps`` (50) times fewer denoising steps to fit a device command;
then each part also reports ``projected`` (AR + VAE + per-step DiT x 50) and says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from pathlib import Path

import torch

from .report import build_report, device_name, parse_size, save_report

__all__ = ["PARTS", "main"]

PARTS = ("exact", "fast", "batch", "large", "memory")
PROMPT = "A photo of a red fox sitting in a snowy forest at dawn, soft light, high detail."
GIB = 2**30
# every per-engine field a part reports (the CPU dry-run test checks each one is there)
ENGINE_FIELDS = (
    "s_per_image", "ar_s", "ar_prefill_s", "ar_decode_s", "ar_tokens", "ar_tok_s", "dit_s", "dit_s_per_step",
    "vae_s", "peak_gib", "steps", "images", "projected", "roofline",
)  # fmt: skip


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fp8_card(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _floor(args, root: Path, ar_model: torch.nn.Module, height: int, width: int, batch: int) -> dict:
    """The card's floor for one image: AR decode per token (weights read once) and DiT per CFG step."""
    from ..config import CheckpointConfig
    from .roofline import ar_weight_bytes_per_token, dit_flops_per_step, floor_fractions

    config = CheckpointConfig.from_dir(root)
    # image tokens dominate; the glyph stream of a prompt without quotes is one token
    image_tokens = (height // 16) * (width // 16)
    flops = dit_flops_per_step(config.dit, image_tokens, 1, images=batch)
    return floor_fractions(
        args.device,
        device_name(args.device),
        args.dtype,
        ar_bytes_per_step=ar_weight_bytes_per_token(ar_model),
        dit_flops=flops,
    )


def _engine_result(times, steps: int, project: int, peak: int, floor: dict) -> dict:
    """One engine's row (``StageTimes`` of one call, its peak bytes, the floor)."""
    images = times.images
    decode_tokens = max(times.ar_tokens - 1, 0)  # the prefill writes the first token
    dit_step = times.dit / steps
    out = {
        "s_per_image": times.total / images,
        "ar_s": times.ar,
        "ar_prefill_s": times.ar_prefill,
        "ar_decode_s": times.ar_decode,
        "ar_tokens": times.ar_tokens,
        "ar_tok_s": decode_tokens * times.ar_sequences / times.ar_decode if times.ar_decode > 0 else None,
        "dit_s": times.dit,
        "dit_s_per_step": dit_step,
        "vae_s": times.vae,
        "peak_gib": peak / GIB,
        "steps": steps,
        "images": images,
        "dit_forwards": times.dit_forwards,
        "ar_forwards": times.ar_forwards,
        # not measured when steps < project: AR + VAE + the per-step DiT time x project steps
        "projected": None
        if steps == project
        else {"steps": project, "s_per_image": (times.ar + times.vae + dit_step * project) / images},
    }
    roof = {"device": floor.get("device"), "reason": floor.get("reason")}
    ar_floor, dit_floor = floor.get("ar_seconds_per_step"), floor.get("dit_seconds_per_step")
    if ar_floor and decode_tokens:
        roof["ar_decode"] = ar_floor * decode_tokens / times.ar_decode
    if dit_floor:
        roof["dit_step"] = dit_floor / dit_step
    if ar_floor and dit_floor:
        image_floor = (ar_floor * times.ar_tokens * times.ar_sequences + dit_floor * steps) / images
        roof["s_per_image"] = image_floor / out["s_per_image"]
    roof["vae"] = None  # no floor in the table for the VAE: its time is reported, not bounded
    out["roofline"] = roof
    return out


def _measure(runner, args, height: int, width: int, batch: int, floor: dict, warmup: bool = True) -> dict:
    from .memory import PeakMemory

    if warmup and args.device.type != "cpu":
        # compile, capture and allocate once, outside the timing (64 AR tokens, one step)
        runner.run(PROMPT, height, width, 1, batch, args.seed, 64)
    with PeakMemory(args.device) as memory:
        _, times = runner.run(PROMPT, height, width, args.steps, batch, args.seed, None)
    result = _engine_result(times, args.steps, args.project_steps, memory.peak, floor)
    result["peak_method"] = memory.method
    return result


def _ours(args, root: Path, height: int, width: int, batch: int, **generation) -> dict:
    from .engines import OursRunner

    runner = OursRunner(root, args.device, args.dtype, **generation)
    floor = _floor(args, root, runner.pipe.ar.model, height, width, batch)
    return runner, floor


def _codes_only(codes: int):
    """A logits processor: everything but the image codes at -inf (ours' ``constrain_grid``)."""
    from transformers import LogitsProcessor

    class _CodesOnly(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores[:, codes:] = float("-inf")
            return scores

    return _CodesOnly()


def _reference(args, root: Path, grid_tokens: int):
    """``ReferenceRunner`` on diffusers' pipeline built from the drawn tensors, writing exactly
    ``grid_tokens`` image codes per sequence (see the module docstring)."""
    import functools

    from transformers import LogitsProcessorList

    from ..synthetic.random import reference_pipeline
    from .engines import ReferenceRunner, _no_loading_bars

    class DrawnReference(ReferenceRunner):
        def __init__(self) -> None:  # the base class loads from files; this one from the draw
            self.device = args.device
            with _no_loading_bars():
                self.pipe = reference_pipeline(root, device=args.device, dtype=args.dtype)
            self.pipe.set_progress_bar_config(disable=True)
            vle = self.pipe.vision_language_encoder
            codes = vle.config.vq_config.num_embeddings
            vle.generate = functools.partial(
                vle.generate, logits_processor=LogitsProcessorList([_codes_only(codes)])
            )
            self.cap, self._marks, self._counts = None, {}, {"ar": 0, "dit": 0}
            self._instrument()

        def run(self, *call):
            *rest, _ = call
            return super().run(*rest, grid_tokens)  # max_ar_tokens: the grid, no EOS step

    return DrawnReference()


def part_exact(args, root: Path) -> dict:
    height, width = args.size
    runner, floor = _ours(args, root, height, width, 1)
    ours = _measure(runner, args, height, width, 1, floor)
    del runner  # one engine on the device at a time
    _free()
    # no warm-up: the reference has nothing to compile or capture, and ours warmed the device up
    reference = _measure(
        _reference(args, root, ours["ar_tokens"]), args, height, width, 1, floor, warmup=False
    )
    ratio = {
        key: (reference[key] / ours[key]) if ours[key] else None
        for key in ("s_per_image", "ar_prefill_s", "dit_s_per_step", "vae_s", "peak_gib")
    }
    ratio["ar_tok_s"] = ours["ar_tok_s"] / reference["ar_tok_s"] if reference["ar_tok_s"] else None
    return {"ours": ours, "reference": reference, "speedup": ratio, "floor": floor}


def part_fast(args, root: Path) -> dict:
    from ..engine.choices import StepCacheOptions

    height, width = args.size
    scheme = "ar=int8,dit=fp8" if _fp8_card(args.device) else "int8"
    runner, floor = _ours(args, root, height, width, 1, ar_decoding="jacobi", quantize=scheme)
    result = _measure(runner.with_cache(StepCacheOptions()), args, height, width, 1, floor)
    return {"ours_fast": {**result, "quantize": scheme, "ar_decoding": "jacobi", "dit_cache": "fbcache"}}


def part_batch(args, root: Path) -> dict:
    height, width = args.size
    runner, floor = _ours(args, root, height, width, args.batch)
    return {"ours_batch": _measure(runner, args, height, width, args.batch, floor)}


def part_large(args, root: Path) -> dict:
    height, width = args.large_size
    runner, floor = _ours(args, root, height, width, 1)
    return {"ours_large": {**_measure(runner, args, height, width, 1, floor), "size": f"{width}x{height}"}}


def part_memory(args, root: Path) -> dict:
    """Per stage: the planner's estimate beside the measured peak (device memory on a GPU, the
    process's growth on a CPU), for the bf16 (as served) and int8 weights."""
    from ..engine import ArEngine, DitEngine
    from ..residency import estimate_memory
    from .memory import PeakMemory

    height, width = args.size
    out = {}
    for scheme in ("none", "int8"):
        estimate = estimate_memory(root, scheme, args.dtype, height=height, width=width)
        rows = {}
        with PeakMemory(args.device) as m:
            ar = ArEngine.from_pretrained(root, device=args.device, dtype=args.dtype, quantize=scheme)
        rows["ar_weights"] = (m.increase, estimate.weights["ar_text_decoder"])
        with PeakMemory(args.device) as m, torch.inference_mode():
            result = ar.generate(PROMPT, height, width, seeds=[args.seed])
        rows["ar_activations"] = (m.increase, estimate.ar_activations)
        prior = result.prior_tokens
        del ar, result
        _free()
        with PeakMemory(args.device) as m:
            dit = DitEngine.from_pretrained(root, device=args.device, dtype=args.dtype, quantize=scheme)
        rows["dit_glyph_vae_weights"] = (m.increase, estimate.dit_stage)
        with PeakMemory(args.device) as m, torch.inference_mode():
            latents = dit.denoise(prior, PROMPT, height, width, num_inference_steps=1, seeds=args.seed)
        rows["dit_activations"] = (m.increase, estimate.dit_activations)
        with PeakMemory(args.device) as m, torch.inference_mode():
            dit.decode(latents)
        rows["vae_activations"] = (m.increase, estimate.vae_activations)
        del dit, latents
        _free()
        out["bf16" if scheme == "none" else scheme] = {
            k: {"measured_gib": a / GIB, "estimated_gib": b / GIB, "ratio": round(b / a, 3) if a else None}
            for k, (a, b) in rows.items()
        }
    return {"memory": out}


_RUN = {
    "exact": part_exact,
    "fast": part_fast,
    "batch": part_batch,
    "large": part_large,
    "memory": part_memory,
}


def merge(parts_dir: Path, out: Path, args) -> dict:
    """``full.json``: every part's keys side by side; a part that wrote nothing is listed as missing."""
    merged, missing, config = {}, [], {}
    for part in PARTS:
        path = parts_dir / f"{part}.json"
        if not path.is_file():
            missing.append(part)
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        merged.update(data["results"][0])
        config = config or data["config"]
    notes = [
        "glm-image-random: the released architecture with random weights drawn from a seed; the "
        "speeds are the released model's (same shapes), the images and Jacobi acceptance are not",
        "both engines write the same AR tokens (codes only until the grid is complete, no EOS step)",
    ]
    if config.get("steps") != config.get("project_steps"):
        notes.append(
            f"timed at {config.get('steps')} steps; each 'projected' field is AR + VAE + "
            f"{config.get('project_steps')} x the measured DiT step: projected, not measured"
        )
    report = build_report(
        "full", [], config=config, notes=notes, device=args.device, missing=missing, **merged
    )
    save_report(report, out)
    return report


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = parse_size(text)
    except Exception:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1024x1024; got {text!r}") from None
    return height, width


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_full.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("part", choices=(*PARTS, "merge"), help="what to measure (merge: the parts into --out)")
    p.add_argument("--out", required=True, help="the part's JSON (merge: full.json)")
    p.add_argument("--parts-dir", help="merge: the folder of the parts' JSON files")
    p.add_argument("--preset", default="glm-image", help="the configs drawn (default: the release)")
    p.add_argument("--layers", type=_positive, help="every stack at most this deep (dry runs)")
    p.add_argument("--seed", type=int, default=0, help="the weights' and the generation's seed")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--size", type=_size, default=(1024, 1024), help="WIDTHxHEIGHT (default 1024x1024)")
    p.add_argument(
        "--large-size", type=_size, default=(2048, 2048), help="the large part (default 2048x2048)"
    )
    p.add_argument("--steps", type=_positive, default=50, help="denoising steps timed")
    p.add_argument("--project-steps", type=_positive, default=50, help="the steps a projection is made for")
    p.add_argument("--batch", type=_positive, default=4, help="the batch part's images per call")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..hub import synthetic_cache
    from ..synthetic.random import cached_random_checkpoint

    args = build_parser().parse_args(argv)
    args.device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype)
    if args.part == "merge":
        if not args.parts_dir:
            build_parser().error("merge needs --parts-dir")
        report = merge(Path(args.parts_dir), Path(args.out), args)
        print(json.dumps({k: report.get(k) for k in ("ours", "reference", "missing")}, indent=2))
        return 0
    root = cached_random_checkpoint(synthetic_cache(), seed=args.seed, layers=args.layers, preset=args.preset)
    with torch.inference_mode():
        result = _RUN[args.part](args, root)
    for key, value in result.items():  # a non-finite time is a failed run (ours checks its pixels)
        time = value.get("s_per_image") if isinstance(value, dict) else None
        if isinstance(time, float) and not math.isfinite(time):
            raise RuntimeError(f"{args.part}: {key} has a non-finite time")
    (height, width), (lh, lw) = args.size, args.large_size
    config = {
        "model": "glm-image-random", "preset": args.preset, "layers": args.layers, "seed": args.seed,
        "device": str(args.device), "dtype": str(args.dtype).removeprefix("torch."),
        "size": f"{width}x{height}", "large_size": f"{lw}x{lh}", "steps": args.steps,
        "project_steps": args.project_steps, "batch": args.batch, "guidance_scale": 1.5, "prompt": PROMPT,
    }  # fmt: skip
    save_report(build_report(f"full-{args.part}", [result], config=config, device=args.device), args.out)
    print(json.dumps(result, indent=2, default=str))
    return 0
